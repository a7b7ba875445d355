"""The simulation score for language-model explainers: one question per window, answers parsed
from `index: value` lines or a JSON list (garbage and short answers count as 0 and are counted),
expected values from the digits' log-probabilities, the same window sample as the rule simulator,
and the whole path through a tiny local T5 / GPT-2, through `python -m core serve` and the CLI."""
from __future__ import annotations

import json
import math
import random
import re

import numpy as np
import pytest

from core.errors import LabError
from core.interp import Context, FeatureStore, describe_store
from core.interp.config import SCORE_METHODS, SIM_SCALE, SIM_WINDOWS
from core.interp.explain import LMExplainer, PromptedExplainer, load_explainer
from core.interp.prompts import (ParsedSimulation, expected_values, fit_simulation_prompt, parse_simulation,
                                 simulation_prompt)
from core.interp.scoring import (METHODS, LMSimulator, RuleSimulator, Simulated, score_label, simulation_answer_tokens,
                                 simulation_sample, simulation_score)
from core.interp.store import Score
from tests.interp.test_explainers import tiny_t5  # noqa: F401 (a fixture: the tiny random T5 built offline)

VOCAB = [" the", " a", " king", " queen", " of", " and", " to", " my", " lord", " is", ",", ".", "\n", " dog", "\t"]


def _window(rng: random.Random, firing: bool, n: int = 9, kind: str | None = None) -> Context:
    toks = [rng.choice(VOCAB) for _ in range(n)]
    acts = [0.0] * n
    if firing:
        for i in rng.sample(range(n), 2):
            acts[i] = round(0.5 + 3 * rng.random(), 3)
    kind = kind or ("heldout" if firing else "negative")
    return Context(kind, 0, toks, [VOCAB.index(t) for t in toks], acts, position=0, activation=max(acts))


def _windows(seed: int = 0, n: int = 12) -> list[Context]:
    rng = random.Random(seed)
    return [_window(rng, True) for _ in range(n)] + [_window(rng, False) for _ in range(n)]


_LISTED = re.compile(r'^(\d+)\. (".*")$', re.MULTILINE)


def asked_tokens(prompt: str) -> tuple[int, list[str]]:
    """(first number, tokens) a simulation prompt lists: what a scripted simulator answers about."""
    rows = [(int(i), json.loads(t)) for i, t in _LISTED.findall(prompt)]
    return rows[0][0], [t for _, t in rows]


class Scripted(PromptedExplainer):
    """A language-model explainer whose answers are scripted from the prompt: ``answer(first,
    tokens)`` returns the text (and optionally the steps) for the tokens a prompt asks about."""

    name = "api:scripted@test"
    max_input, max_new_tokens = 4096, 32

    def __init__(self, answer):
        self.answer, self.prompts, self.rooms = answer, [], []

    def count(self, text: str) -> int:
        return len(text) // 4 + 1

    def answers_with_logprobs(self, prompts, max_new_tokens):
        self.prompts += list(prompts)
        self.rooms.append(max_new_tokens)
        out = []
        for p in prompts:
            got = self.answer(*asked_tokens(p))
            out.append(got if isinstance(got, tuple) else (got, None))
        return out


def truth_lookup(windows: list[Context]) -> dict[tuple[str, ...], list[float]]:
    table = {tuple(c.tokens): list(c.acts) for c in windows}
    assert len(table) == len(windows)  # random windows: distinct
    return table


# -- (a) the score on scripted answers ------------------------------------------------------------

def test_exact_answers_score_one_constant_zero_with_a_reason_shuffled_near_zero():
    windows = _windows(0, n=20)
    truth = truth_lookup(windows)
    scale = SIM_SCALE / max(max(c.acts) for c in windows)

    def exact(first, tokens):
        acts = truth[tuple(tokens)]
        return "".join(f"{i}: {a * scale:.12f}\n" for i, a in enumerate(acts, first))

    ex = Scripted(exact)
    sim = ex.simulator()
    assert isinstance(sim, LMSimulator) and sim.name == ex.name
    score = simulation_score('Fires on "king"', windows, sim)
    assert score.method == "simulation" and score.value == pytest.approx(1.0, abs=1e-9)
    assert score.n == sum(len(c.acts) for c in windows)
    d = score.details
    assert (d["n_windows"], d["n_pos"], d["unanswered"], d["unreadable"], d["short_answers"]) == (40, 20, 0, 0, 0)
    assert len(ex.prompts) == 40                                              # one LM call per window
    assert ex.rooms == [simulation_answer_tokens(9)]

    constant = simulation_score("x", windows, Scripted(lambda first, toks: "".join(
        f"{i}: 5\n" for i in range(first, first + len(toks)))).simulator())
    assert constant.value == 0.0 and constant.details["reason"] == "constant prediction"
    assert "constant prediction" in score_label(constant)
    garbage = simulation_score("x", windows, Scripted(lambda first, toks: "I cannot tell.").simulator())
    assert garbage.value == 0.0 and garbage.details["unreadable"] == 40
    assert garbage.details["unanswered"] == garbage.n and not math.isnan(garbage.value)
    silent = [c for c in windows if max(c.acts) == 0]
    undefined = simulation_score("x", silent, Scripted(exact).simulator())
    assert undefined.value is None and undefined.details["reason"] == "constant truth"

    rng = random.Random(7)
    values = [a * scale for c in windows for a in c.acts]
    rng.shuffle(values)
    table = {}
    at = 0
    for c in windows:
        table[tuple(c.tokens)] = values[at:at + len(c.acts)]
        at += len(c.acts)
    shuffled = simulation_score("x", windows, Scripted(lambda first, toks: "".join(
        f"{i}: {v:.6f}\n" for i, v in enumerate(table[tuple(toks)], first))).simulator())
    expected = float(np.corrcoef(values, [a for c in windows for a in c.acts])[0, 1])
    assert shuffled.value == pytest.approx(expected, abs=1e-9) and abs(shuffled.value) < 0.15


def test_a_short_answer_counts_zeros_and_is_counted():
    windows = _windows(1, n=4)
    truth = truth_lookup(windows)

    def half(first, tokens):  # values for the first half of the tokens only
        acts = truth[tuple(tokens)]
        return "".join(f"{i}: {a}\n" for i, a in enumerate(acts[:4], first))

    score = simulation_score("x", windows, Scripted(half).simulator())
    assert score.details["short_answers"] == 8 and score.details["unanswered"] == 8 * 5
    pred = [a if i < 4 else 0.0 for c in windows for i, a in enumerate(c.acts)]
    true = [a for c in windows for a in c.acts]
    assert score.value == pytest.approx(float(np.corrcoef(pred, true)[0, 1]), abs=1e-9)
    assert "40 tokens unanswered, counted 0" in score_label(score)


def test_expected_values_from_log_probabilities():
    windows = _windows(2, n=3)
    truth = truth_lookup(windows)

    def with_steps(first, tokens):
        # each value token " 3" with alternatives " 3" (p=.5), " 4" (p=.25), " x" (not a number, ignored)
        steps, text = [], ""
        for i in range(first, first + len(tokens)):
            for tok, alts in ((str(i), {}), (":", {}), (" 3", {" 3": math.log(.5), " 4": math.log(.25),
                                                                  " x": math.log(.25)}), ("\n", {})):
                steps.append((tok, -0.1, alts))
                text += tok
        return text, steps

    ex = Scripted(with_steps)
    sims = ex.simulator().simulate_windows("x", [c.tokens for c in windows])
    expected = (3 * .5 + 4 * .25) / .75
    assert all(s.values == pytest.approx([expected] * 9) and s.from_logprobs == 9 for s in sims)
    score = simulation_score("x", windows, ex.simulator())
    assert score.details["from_logprobs"] == 54 and score.details["reason"] == "constant prediction"
    # steps that do not spell the text leave the written numbers
    parsed = parse_simulation("1: 3\n", 1)
    assert expected_values("1: 3\n", parsed, [("1: 7", -1.0, {})]) == ([3.0], 0)
    # a number written over two tokens ("1", "0") keeps its written value
    parsed = parse_simulation("1: 10", 1)
    assert expected_values("1: 10", parsed, [("1", 0, {}), (":", 0, {}), (" 1", 0, {" 1": 0.0}), ("0", 0, {})]) \
        == ([10.0], 0)
    # pairs may share a text (two tokens spelling " 2"): their probabilities add up
    parsed = parse_simulation("1: 2", 1)
    pairs = [(" 2", math.log(.25)), (" 2", math.log(.25)), (" 6", math.log(.5))]
    assert expected_values("1: 2", parsed, [("1", 0, {}), (":", 0, {}), (" 2", math.log(.25), pairs)]) == ([4.0], 1)


# -- (b) parsing ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, values, form", [
    ("1: 0\n2: 10\n3: 4.5", [0.0, 10.0, 4.5], "lines"),
    ("Here you are.\n1: 0\n2 = 7\n3 -> 2\n", [0.0, 7.0, 2.0], "lines"),
    ("1: 0 2: 3 3: 5", [0.0, 3.0, 5.0], "lines"),                                  # one line (a T5 cannot break lines)
    ('1. " the": 0\n2. "\\n": 9\n3. " king": 12', [0.0, 9.0, 10.0], "lines"),      # echoed tokens; clamped to 10
    ("1: 0\n1: 8\n2: -3\n7: 5", [0.0, 0.0, None], "lines"),                        # first wins; out of range ignored
    ("[0, 7, 3]", [0.0, 7.0, 3.0], "json"),
    ("Activations: [0, 7.5]", [0.0, 7.5, None], "json"),                           # short: the rest unanswered
    ("[0, 1, 2, 3, 4]", [0.0, 1.0, 2.0], "json"),                                  # long: the extra ignored
    ("[\"a\", 3]", [None, None, None], "none"),                                    # not a list of numbers
    ("I think the neuron fires on king.", [None, None, None], "none"),
    ("", [None, None, None], "none"),
    (None, [None, None, None], "none"),
])
def test_parse_simulation(text, values, form):
    got = parse_simulation(text, 3)
    assert (got.values, got.format) == (values, form)
    assert got.answered == sum(v is not None for v in values)
    for v, span in zip(got.values, got.spans):
        assert (span is None) == (v is None)
        if span is not None:
            assert min(SIM_SCALE, max(0.0, float(text[span[0]:span[1]]))) == v


def test_parse_counts_from_the_first_token_asked():
    got = parse_simulation("5: 1\n6: 2\n4: 9", 2, first=5)
    assert got.values == [1.0, 2.0]
    assert isinstance(parse_simulation("1: 1", 0), ParsedSimulation) and parse_simulation("1: 1", 0).values == []


def test_the_prompt_numbers_the_tokens_and_shows_whitespace():
    toks = [" the", "\n", "\t", ' "q"', "king"]
    prompt = simulation_prompt('Fires on "king"', toks)
    assert 'Fires on "king"' in prompt and asked_tokens(prompt) == (1, toks)
    assert '2. "\\n"' in prompt and '3. "\\t"' in prompt and f"0 (not at all) to {SIM_SCALE}" in prompt
    cut = simulation_prompt("x", toks, 2)
    assert asked_tokens(cut) == (3, toks[2:]) and "tokens 3 to 5" in cut
    # fitted: the window loses tokens from its start; nothing fits -> None
    budget = len(simulation_prompt("x", toks, 3)) // 4 + 1
    prompt, start = fit_simulation_prompt("x", toks, lambda t: len(t) // 4 + 1, lambda n: budget)
    assert start == 3 and asked_tokens(prompt) == (4, toks[3:])
    assert fit_simulation_prompt("x", toks, lambda t: len(t), lambda n: 10) is None


def test_a_window_too_long_to_ask_loses_its_start_or_is_counted_as_cut():
    windows = _windows(3, n=2)
    truth = truth_lookup(windows)
    ex = Scripted(lambda first, toks: "".join(f"{i}: 1\n" for i in range(first, first + len(toks))))
    full = len(simulation_prompt("x", windows[0].tokens)) // 4 + 1
    ex.max_input = full - 8 - ex.max_new_tokens + simulation_answer_tokens(9)  # a few tokens short of the whole
    sims = ex.simulator().simulate_windows("x", [c.tokens for c in windows])
    assert all(0 < s.cut < 9 and s.values == [0.0] * s.cut + [1.0] * (9 - s.cut) for s in sims)
    ex.max_input = 1
    asked = len(ex.prompts)
    sims = ex.simulator().simulate_windows("x", [c.tokens for c in windows])
    assert all(s.cut == 9 and s.answered == 0 and s.format == "none" for s in sims)
    score = simulation_score("x", windows, ex.simulator())
    assert score.details["cut"] == 36 and score.details["unanswered"] == 0 and len(ex.prompts) == asked  # none asked
    assert score.value is None or score.value == 0.0
    assert "36 tokens too long to ask, counted 0" in score_label(score)
    assert truth


# -- the sample -----------------------------------------------------------------------------------

def test_the_sample_is_a_prefix_of_the_rule_simulators_with_both_kinds_of_silence():
    rng = random.Random(4)
    pos = [_window(rng, True) for _ in range(50)]
    neg = [_window(rng, False) for _ in range(50)]
    hard = [_window(rng, False, kind="hard") for _ in range(25)]
    everything = simulation_sample(pos, neg + hard, None)
    assert len(everything) == 125 and {id(c) for c in everything} == {id(c) for c in pos + neg + hard}
    ten = simulation_sample(pos, neg + hard, SIM_WINDOWS["lm"])
    assert ten[:10] == pos[:10] and len(ten) == 20
    silent = ten[10:]
    assert sum(c.kind == "hard" for c in silent) in (3, 4)                    # the store's 2:1 ratio
    assert [c for c in silent if c.kind == "negative"] == neg[:len(silent) - sum(c.kind == "hard" for c in silent)]
    # the rule simulator's full sample scores the same as before (order does not change a correlation)
    exp = 'Fires on "king"'
    old = simulation_score(exp, pos + neg + hard, RuleSimulator())
    assert simulation_score(exp, everything, RuleSimulator()).value == pytest.approx(old.value, abs=1e-12)


def test_score_label_names_the_sample_and_the_reason():
    s = Score("simulation", 0.4213, 340, {"n_windows": 20, "n_pos": 10, "n_hard": 3})
    assert score_label(s) == "simulation r 0.42 (n=340 tokens in 20 windows: 10 firing, 10 silent incl. 3 hard)"
    assert score_label(Score("simulation", None, 34, {"reason": "constant truth"})) == \
        "simulation r n/a, constant truth (n=34 tokens)"
    assert METHODS == SCORE_METHODS


# -- (c) end to end: a local model, the server, the CLI ------------------------------------------

def small_store(path):
    """The feature-store test's store with three firing and two more silent held-out windows (6
    tokens each) on feature 1 of layer 0, beside its silent one of 2 tokens (simulation on
    ``n_sim=2`` reads 2 firing windows and 2 silent ones, 2 x 6 + 2 + 6 tokens), and three firing
    and two silent ones on feature 0."""
    from tests.interp.test_feature_store import _fill

    rng = random.Random(5)
    ids = [1, 2, 3, 4, 999]

    def window(kind, rank):
        toks = [rng.choice(ids) for _ in range(6)]
        acts = [0.0] * 6
        if kind == "heldout":
            acts[rng.randrange(6)] = 1.0 + rng.random()
        return Context(kind, rank, [], toks, acts, position=0, activation=max(acts), window=100 + rank)

    with FeatureStore.build(path) as store:
        _fill(store)
        store.put_contexts(0, 1, [window("heldout", r) for r in range(3)] + [window("negative", r) for r in (1, 2)])
        store.put_contexts(0, 0, [window("heldout", r) for r in range(3)] + [window("negative", r) for r in (0, 1)])
    return path


SIM_N = 2 * 6 + 2 + 6


def _simulation_rows(path, explainer: str):
    with FeatureStore(path, readonly=True) as store:
        return {layer_f: store.scores(*layer_f).get(explainer, {}).get("simulation") for layer_f in
                ((0, 0), (0, 1), (1, 0), (1, 1))}


def test_a_local_transformers_model_simulates_with_its_digit_probabilities(tiny_gpt2_dir, tmp_path):
    ex = LMExplainer(str(tiny_gpt2_dir), max_new_tokens=4, batch_size=2)
    from core.interp.explain import RemoteExplainer

    # one simulator, one prompt, one parser for the local and the remote model
    assert LMExplainer.simulator is RemoteExplainer.simulator is PromptedExplainer.simulator
    prompts = ["the king is", "a"]                                           # short: never truncated
    answers = ex.answers_with_logprobs(prompts, 6)
    digits = ex._digit_ids()
    assert digits and all(t.strip().isdigit() and int(t) <= SIM_SCALE for t in digits.values())
    for text, steps in answers:
        assert steps is not None and "".join(s[0] for s in steps) == text and len(steps) <= 6
        for tok, lp, alts in steps:
            assert lp <= 0 and len(alts) == len(digits) and sum(math.exp(a) for _, a in alts) <= 1 + 1e-5
    # the same greedy text as the explainer's own generate
    assert [t for t, _ in answers] == ex.generate(prompts, 6)
    path = small_store(tmp_path / "features.sqlite")
    with FeatureStore(path) as store:
        list(describe_store(store, ex, layers=[0], n_top=2, methods=["simulation"], n_sim=2))
    rows = _simulation_rows(path, ex.name)
    got = rows[(0, 1)]
    assert got is not None and got.details["simulator"] == ex.name and got.details["n_windows"] == 4
    assert got.n == SIM_N and (got.value is None or -1 <= got.value <= 1)   # 2 firing + 2 silent windows
    with FeatureStore(path, readonly=True) as store:
        assert set(store.scores(0, 1)[ex.name]) == {"simulation"}              # --scores simulation: only it


def test_a_tiny_t5_simulates(tiny_t5):
    ex = load_explainer(f"lm:{tiny_t5}", max_new_tokens=6, batch_size=2)
    assert ex.prompt_budget(1000) == ex.max_input == 64                       # a seq2seq answer has its own room
    windows = _windows(6, n=1)
    sims = ex.simulator().simulate_windows('Fires on "king"', [c.tokens for c in windows])
    assert [len(s.values) for s in sims] == [9, 9] and all(s.cut > 0 for s in sims)  # 64 tokens: the start is cut
    assert all(0 <= v <= SIM_SCALE for s in sims for v in s.values)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`core serve` (the real server, on loopback) of a tiny random GPT-2 with room for a whole
    simulation question (1024 positions): its answers are noise, but every call is made."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from core.models.loading import load_model
    from tests.conftest import _hf_tokenizer
    from tests.serve.helpers import serving

    folder = tmp_path_factory.mktemp("tiny-gpt2-long")
    tok = _hf_tokenizer(folder)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=1024, n_embd=32, n_layer=2, n_head=4,
                               bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)).eval() \
        .save_pretrained(folder)
    with serving(load_model(str(folder)), model_name="tiny") as s:
        yield s


@pytest.mark.parametrize("suffix", ["", "/completions"])
def test_through_the_server_every_answer_token_comes_with_its_alternatives(server, suffix):
    ex = load_explainer(server.url + suffix, model="tiny", max_retries=0)
    (text, steps), = ex.answers_with_logprobs([simulation_prompt('Fires on "king"', [" the", " king"])], 12)
    assert steps is not None and "".join(s[0] for s in steps) == text and len(steps) <= 12
    assert all(len(alts) >= 1 and lp <= 0 for _, lp, alts in steps)


def test_the_cli_fills_the_simulation_score_through_the_server(server, tmp_path, capsys):
    from core.commands.cli import main

    path = small_store(tmp_path / "features.sqlite")
    rc = main(["transcoders", "describe", "--model", "default", "--transcoders", str(tmp_path), "--store", str(path),
               "--explainer", server.url, "--explainer-model", "tiny", "--layers", "0",
               "--scores", "detection,simulation", "--n-sim", "2"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    name = f"api:tiny@{server.url}"
    with FeatureStore(path, readonly=True) as store:
        for f in (0, 1):
            rows = store.scores(0, f)[name]
            assert set(rows) == {"detection", "simulation"}                  # fuzzing was not asked for
        assert store.scores(0, 0)[name]["simulation"].n == 2 * 6 + 2 * 6       # feature 0: four whole windows
        sim = store.scores(0, 1)[name]["simulation"]
    assert sim.details["simulator"] == name and sim.details["n_windows"] == 4 and sim.n == SIM_N
    assert sim.details["cut"] == 0                                           # every window was asked, whole
    assert sim.details["unanswered"] + sim.details["from_logprobs"] <= sim.n
    assert sim.value is None or -1 <= sim.value <= 1
    assert main(["transcoders", "describe", "--model", "default", "--store", str(path), "--explainer", server.url,
                 "--scores", "simulation,recall"]) == 2
    assert "--scores takes detection, fuzzing, simulation" in capsys.readouterr().err


def test_help_states_the_flags_and_the_cost(capsys):
    from core.commands.cli import main

    assert main(["transcoders", "describe", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--scores" in text and "detection,fuzzing,simulation" in text and "--n-sim N" in text
    assert f"default: {SIM_WINDOWS['lm']} for a language model" in text and "one call per window" in text


def test_simulated_is_plain_data():
    s = Simulated([0.0, 1.0], 2)
    assert s.format == "rule" and s.cut == 0 and s.from_logprobs == 0


def test_the_builtin_explainer_reads_every_window_unless_n_sim_says_otherwise(tmp_path):
    from core.interp import BuiltinExplainer

    path = small_store(tmp_path / "features.sqlite")
    with FeatureStore(path) as store:
        list(describe_store(store, BuiltinExplainer(), layers=[0], n_top=2))
        every = store.scores(0, 1)["builtin"]["simulation"]
        assert every.details["n_windows"] == 3 + 3 and every.n == 3 * 6 + 2 + 2 * 6       # SIM_WINDOWS["builtin"]: all
        list(describe_store(store, BuiltinExplainer(), layers=[0], n_top=2, n_sim=2))
        two = store.scores(0, 1)["builtin"]["simulation"]
        assert two.details["n_windows"] == 4 and two.n == SIM_N                          # the LM's sample at n=2
        with pytest.raises(LabError, match="--n-sim must be at least 1"):
            list(describe_store(store, BuiltinExplainer(), layers=[0], n_sim=0))
