"""Honest explanation scores, the same for every explainer, on held-out text.

Every score is computed on windows from the held-out part of the corpus (never shown to the
explainer) and stored with its sample size ``n``:

- *Detection* (as in EleutherAI's delphi): given only the explanation, a detector gives each
  window a probability that the feature fires somewhere in it. Positives: held-out activating
  windows; negatives: held-out windows where the feature is silent, random ones and *hard* ones
  (holding one of the feature's top tokens, yet silent). Score: the AUC of those probabilities
  (the chance that a random positive gets a higher probability than a random negative; 0.5 is
  chance, 1 is perfect). The balanced accuracy of the thresholded verdict (probability > 0.5) and
  the true-negative rate on the hard negatives alone are kept as details. A yes/no detector (the
  rule detector) gives only 0 and 1, and then AUC and balanced accuracy are equal by construction.
- *Fuzzing* (delphi): the held-out activating windows are shown with tokens marked, once with the
  tokens where the feature fires marked and once with as many tokens where it is silent marked
  instead; the detector gives the probability that the marked tokens are what the explanation
  describes. Score: AUC of correctly vs wrongly marked windows. Detection asks *whether*, fuzzing
  *where*.
- *Simulation* (OpenAI 2023, "Language models can explain neurons in language models"): a
  simulator predicts the activation of every token from the explanation; score: Pearson
  correlation between predicted and true activations over all tokens of the scored windows,
  firing and silent alike (:func:`simulation_sample` picks them: the first ``n`` firing and the
  first ``n`` silent held-out windows in the store's random order, the silent ones mixing random
  and hard negatives in the store's ratio; ``n`` None takes them all). Undefined when the truth is
  constant; 0, with the reason, when the prediction is.

Detectors and simulators: :class:`RuleDetector` / :class:`RuleSimulator` need no model: they read
the tokens quoted in the explanation (``"the"``) and predict firing exactly on those tokens (what
the built-in explainer writes; its scores say "rule"); :class:`LMDetector` asks the explainer's
language model the yes/no questions of :mod:`core.interp.prompts` and reads the probability of
"yes" from its log-probabilities, locally or through a server. :class:`LMSimulator` asks it, once
per window, for every token's activation from 0 to 10 (the window's tokens numbered, whitespace
visible), reads the answer's ``index: value`` lines or JSON list, and where the model's
log-probabilities of the digits are at hand takes each token's expected value over 0..10 instead
of the written number; tokens an answer leaves out count as 0 and are counted in the details.
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence

import numpy as np

from .config import SCORE_METHODS, SIM_ANSWER_TOKENS, SIM_SCALE, check_score_methods
from .prompts import (clean_token, expected_values, fit_detection_prompt, fit_fuzz_prompt, fit_simulation_prompt,
                      parse_simulation)
from .store import MIN_FIRING, Context, FeatureStore, Score  # noqa: F401 (MIN_FIRING is the store's sort rule)

if TYPE_CHECKING:
    from .explain import PromptedExplainer

METHODS = SCORE_METHODS  # stated once, in the torch-free config
METHOD_HELP = {
    "detection": "AUC telling held-out windows where the feature fires from silent ones (random and hard "
                 "negatives) given only the explanation; 0.5 is chance, 1 perfect.",
    "fuzzing": "AUC telling held-out windows with the firing tokens marked from the same windows with silent tokens "
               "marked; 0.5 is chance, 1 perfect.",
    "simulation": "Correlation of the activation predicted from the explanation with the true one, token by token "
                  "over held-out firing and silent windows; 0 is no relation, 1 perfect.",
}
Marked = tuple[Sequence[str], Sequence[int]]   # a window's tokens and the positions marked in it
GOOD_AUC = 0.7      # a detection AUC from which an explanation "holds up" in layer descriptions


class Detector(Protocol):
    name: str

    def detect(self, explanation: str, texts: Sequence[Sequence[str]]) -> list[float]:
        """For each window (a list of token texts): the probability that the feature fires in it."""

    def fuzz(self, explanation: str, windows: Sequence[Marked]) -> list[float]:
        """For each window with some tokens marked: the probability that the marked tokens are ones the
        explanation describes."""


@dataclass
class Simulated:
    """A simulator's prediction for one window: a value per token, and how it was come by."""

    values: list[float]
    answered: int                   # tokens the simulator gave a value for (the rest count as 0)
    from_logprobs: int = 0          # of those, read as an expected value over the digits' probabilities
    cut: int = 0                    # tokens left out of the question (the window's start, too long to ask)
    format: str = "rule"            # the answer's form: "rule" (no model), "lines", "json", "none" (unreadable)


class Simulator(Protocol):
    name: str

    def simulate_windows(self, explanation: str, windows: Sequence[Sequence[str]]) -> list[Simulated]:
        """Predicted activation of every token of each window (a list of token texts)."""


_QUOTED = re.compile(r"\"([^\"]+)\"|“([^”]+)”")


def quoted_tokens(explanation: str) -> list[str]:
    """The double-quoted strings of an explanation, normalised like tokens are for matching."""
    return [norm_token(a or b) for a, b in _QUOTED.findall(explanation or "") if norm_token(a or b)]


def norm_token(text: str) -> str:
    """Tokens and quoted strings compare after making whitespace visible, stripping and lowercasing."""
    return clean_token(text).strip().lower()


class RuleDetector:
    """Says yes (1) to a window that contains one of the explanation's quoted tokens, no (0) otherwise;
    in fuzzing, yes when a marked token is one of them."""

    name = "rule"

    def detect(self, explanation: str, texts: Sequence[Sequence[str]]) -> list[float]:
        quoted = set(quoted_tokens(explanation))
        return [float(any(norm_token(t) in quoted for t in toks)) for toks in texts]

    def fuzz(self, explanation: str, windows: Sequence[Marked]) -> list[float]:
        quoted = set(quoted_tokens(explanation))
        return [float(any(norm_token(toks[p]) in quoted for p in marks)) for toks, marks in windows]


class RuleSimulator:
    """Predicts 1 on the explanation's quoted tokens and 0 elsewhere."""

    name = "rule"

    def simulate(self, explanation: str, tokens: Sequence[str]) -> list[float]:
        quoted = set(quoted_tokens(explanation))
        return [1.0 if norm_token(t) in quoted else 0.0 for t in tokens]

    def simulate_windows(self, explanation: str, windows: Sequence[Sequence[str]]) -> list[Simulated]:
        return [Simulated(self.simulate(explanation, toks), len(toks)) for toks in windows]


class LMDetector:
    """The explainer's language model (local or behind a server) as detector: "would the neuron fire
    in this text?" (and, fuzzing, "are the marked tokens what it fires on?"), answered by the
    probability of "yes" against "no" as the answer's first token. A window too long for the
    explainer's input loses tokens from its start, never the explanation or the question."""

    def __init__(self, explainer: "PromptedExplainer"):
        self.explainer = explainer
        self.name = explainer.name

    def detect(self, explanation: str, texts: Sequence[Sequence[str]]) -> list[float]:
        ex = self.explainer
        return ex.yes_probability([fit_detection_prompt(explanation, t, ex.count, ex.max_input) for t in texts])

    def fuzz(self, explanation: str, windows: Sequence[Marked]) -> list[float]:
        ex = self.explainer
        return ex.yes_probability([fit_fuzz_prompt(explanation, t, m, ex.count, ex.max_input) for t, m in windows])


def simulation_answer_tokens(n_tokens: int) -> int:
    """The most tokens an LM simulator may write about a window of ``n_tokens`` (``index: value`` lines)."""
    per_token, extra = SIM_ANSWER_TOKENS
    return per_token * n_tokens + extra


class LMSimulator:
    """The explainer's language model as simulator: one question per window (the explanation, the
    window's tokens numbered, "each token's activation from 0 to 10?"), greedily answered; see the
    module docstring. A window too long for the model's input loses tokens from its start (they
    count as predicted 0 and as ``cut``); the explanation and the question always stay."""

    def __init__(self, explainer: "PromptedExplainer"):
        self.explainer = explainer
        self.name = explainer.name

    def simulate_windows(self, explanation: str, windows: Sequence[Sequence[str]]) -> list[Simulated]:
        ex = self.explainer
        out: list[Simulated | None] = [None] * len(windows)
        groups: dict[int, list[tuple[int, str, int]]] = {}      # answer room -> (window, prompt, first token asked)
        for w, toks in enumerate(windows):
            fitted = fit_simulation_prompt(explanation, toks, ex.count,
                                           lambda n: ex.prompt_budget(simulation_answer_tokens(n)))
            if fitted is None:
                out[w] = Simulated([0.0] * len(toks), 0, cut=len(toks), format="none")
                continue
            prompt, start = fitted
            groups.setdefault(simulation_answer_tokens(len(toks) - start), []).append((w, prompt, start))
        for room, asks in groups.items():
            answers = ex.answers_with_logprobs([p for _, p, _ in asks], room)
            for (w, _, start), (text, steps) in zip(asks, answers):
                n = len(windows[w]) - start
                parsed = parse_simulation(text, n, first=start + 1)
                values, used = expected_values(text, parsed, steps)
                out[w] = Simulated([0.0] * start + [0.0 if v is None else float(v) for v in values], parsed.answered,
                                   from_logprobs=used, cut=start, format=parsed.format)
        return out  # type: ignore[return-value]


def simulation_sample(positives: Sequence[Context], negatives: Sequence[Context], n: int | None) -> list[Context]:
    """The windows a simulation is scored on: the first ``n`` firing ones and the first ``n`` silent
    ones, in the store's (random) order; the silent ones interleave random (``negative``) and hard
    negatives so that any ``n`` holds both in the store's ratio. ``n`` None: every window. A smaller
    ``n``'s sample is the start of a larger one's, so scores on different ``n`` share windows."""
    rand = [c for c in negatives if c.kind != "hard"]
    hard = [c for c in negatives if c.kind == "hard"]
    keyed = [((i + 0.5) / len(rand), 0, c) for i, c in enumerate(rand)] + \
            [((i + 0.5) / len(hard), 1, c) for i, c in enumerate(hard)]
    silent = [c for _, _, c in sorted(keyed, key=lambda k: (k[0], k[1]))]
    if n is None:
        return list(positives) + silent
    return list(positives)[:n] + silent[:n]


def balanced_accuracy(pred: Sequence[bool], truth: Sequence[bool]) -> float | None:
    p, t = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if t.all() or (~t).all():
        return None  # one class only: balanced accuracy is undefined
    tpr = float((p & t).sum() / t.sum())
    tnr = float((~p & ~t).sum() / (~t).sum())
    return (tpr + tnr) / 2


def auc(scores: Sequence[float], truth: Sequence[bool]) -> float | None:
    """Area under the ROC curve: the chance that a random positive scores above a random negative,
    ties counting half (the Mann-Whitney U statistic over n_pos x n_neg); None with one class."""
    s, t = np.asarray(scores, dtype=np.float64), np.asarray(truth, dtype=bool)
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[t].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def _binary_details(prob: Sequence[float], truth: Sequence[bool]) -> dict:
    p, t = np.asarray(prob, dtype=np.float64) > 0.5, np.asarray(truth, dtype=bool)
    return {"balanced_accuracy": balanced_accuracy(p, t),
            "tpr": float((p & t).sum() / t.sum()) if t.any() else None,
            "tnr": float((~p & ~t).sum() / (~t).sum()) if (~t).any() else None,
            "yes_no": bool(np.isin(np.asarray(prob, dtype=np.float64), (0.0, 1.0)).all())}


def detection_score(explanation: str, positives: Sequence[Context], negatives: Sequence[Context],
                    detector: Detector) -> Score:
    """AUC of ``detector``'s probabilities telling ``positives`` from ``negatives`` (which may include
    hard negatives, kind ``hard``) given the explanation; balanced accuracy and the hard negatives'
    true-negative rate in the details."""
    texts = [c.tokens for c in positives] + [c.tokens for c in negatives]
    truth = [True] * len(positives) + [False] * len(negatives)
    if not texts:
        return Score("detection", None, 0, {"reason": "no held-out windows"})
    prob = [float(x) for x in detector.detect(explanation, texts)]
    hard = [p for p, c in zip(prob[len(positives):], negatives) if c.kind == "hard"]
    details = {"detector": detector.name, "n_pos": len(positives), "n_neg": len(negatives), "n_hard": len(hard),
               **_binary_details(prob, truth),
               "hard_tnr": float(np.mean(np.asarray(hard) <= 0.5)) if hard else None}
    return Score("detection", auc(prob, truth), len(texts), details)


def fuzz_windows(positives: Sequence[Context], seed: int = 0) -> tuple[list[Marked], list[Marked]]:
    """``(correctly marked, wrongly marked)``: each activating window once with its firing tokens
    marked, and once with as many of its silent tokens (picked at random) marked instead; a window
    that fires on every token has no wrong marking and is left out of both."""
    rng = random.Random(seed)
    right: list[Marked] = []
    wrong: list[Marked] = []
    for c in positives:
        on = [i for i, a in enumerate(c.acts) if a > 0]
        off = [i for i, a in enumerate(c.acts) if not a > 0]
        if not on or not off:
            continue
        right.append((c.tokens, on))
        wrong.append((c.tokens, sorted(rng.sample(off, min(len(on), len(off))))))
    return right, wrong


def fuzzing_score(explanation: str, positives: Sequence[Context], detector: Detector, seed: int = 0) -> Score:
    """AUC of ``detector`` telling correctly from wrongly marked activating windows (module docstring)."""
    right, wrong = fuzz_windows(positives, seed)
    if not right:
        return Score("fuzzing", None, 0, {"reason": "no held-out activating windows with silent tokens"})
    prob = [float(x) for x in detector.fuzz(explanation, right + wrong)]
    truth = [True] * len(right) + [False] * len(wrong)
    details = {"detector": detector.name, "n_pos": len(right), "n_neg": len(wrong), **_binary_details(prob, truth)}
    return Score("fuzzing", auc(prob, truth), len(prob), details)


def simulation_score(explanation: str, contexts: Sequence[Context], simulator: Simulator) -> Score:
    """Pearson correlation of simulated and true activations over every token of ``contexts``; an
    LM simulator's answers are accounted for in the details (tokens left unanswered and counted as
    0, unreadable answers, values read from log-probabilities, tokens cut from too long windows)."""
    sims = simulator.simulate_windows(explanation, [c.tokens for c in contexts]) if contexts else []
    pred: list[float] = []
    true: list[float] = []
    for c, sim in zip(contexts, sims):
        values = list(sim.values)[:len(c.acts)]
        pred.extend(values + [0.0] * (len(c.acts) - len(values)))   # a short prediction: the rest count as 0
        true.extend(c.acts)
    details = {"simulator": simulator.name, "n_windows": len(contexts),
               "n_pos": sum(1 for c in contexts if max(c.acts, default=0.0) > 0),
               "n_hard": sum(1 for c in contexts if c.kind == "hard")}
    if any(sim.format != "rule" for sim in sims):
        asked = [len(c.acts) - sim.cut for c, sim in zip(contexts, sims)]
        details |= {"scale": SIM_SCALE,
                    "unanswered": sum(max(0, a - sim.answered) for a, sim in zip(asked, sims)),
                    "short_answers": sum(1 for a, sim in zip(asked, sims) if 0 < sim.answered < a),
                    "unreadable": sum(1 for sim in sims if sim.format == "none"),
                    "json_answers": sum(1 for sim in sims if sim.format == "json"),
                    "from_logprobs": sum(sim.from_logprobs for sim in sims),
                    "cut": sum(sim.cut for sim in sims)}
    if len(pred) < 2:
        return Score("simulation", None, len(pred), details | {"reason": "too few tokens"})
    p, t = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    if np.ptp(t) == 0:  # no variation to predict: the correlation is undefined
        return Score("simulation", None, len(pred), details | {"reason": "constant truth"})
    if np.ptp(p) == 0:  # a flat prediction explains nothing of it
        return Score("simulation", 0.0, len(pred), details | {"reason": "constant prediction"})
    r = float(np.corrcoef(p, t)[0, 1])
    return Score("simulation", r if math.isfinite(r) else None, len(pred), details)


check_methods = check_score_methods  # None: all; an unknown name is a LabError naming --scores


def score_feature(store: FeatureStore, layer: int, feature: int, explanation: str, detector: Detector | None,
                  simulator: Simulator | None = None, set_id: int | None = None, *,
                  methods: Sequence[str] | None = None, n_sim: int | None = None) -> list[Score]:
    """The scores of ``methods`` (default all) for one feature on its stored held-out windows:
    detection and fuzzing with a detector, simulation with a simulator on
    :func:`simulation_sample` ``(n_sim)``."""
    methods = check_methods(methods)
    pos = store.contexts(layer, feature, "heldout", set_id=set_id)
    neg = store.contexts(layer, feature, "negative", set_id=set_id) + store.contexts(layer, feature, "hard",
                                                                                     set_id=set_id)
    out = []
    if detector is not None and "detection" in methods:
        out.append(detection_score(explanation, pos, neg, detector))
    if detector is not None and "fuzzing" in methods:
        out.append(fuzzing_score(explanation, pos, detector, seed=layer * 1_000_003 + feature))
    if simulator is not None and "simulation" in methods:
        out.append(simulation_score(explanation, simulation_sample(pos, neg, n_sim), simulator))
    return out


def score_label(score: Score | None) -> str:
    """One score as the CLI and the page write it, with its sample size: ``detection AUC 0.91
    (n=125: 50 firing, 75 silent incl. 25 hard)``; the balanced accuracy only where it can differ."""
    if score is None:
        return "not scored"
    d = score.details or {}
    if score.method == "simulation":
        head = f"simulation r {'n/a' if score.value is None else f'{score.value:.2f}'}"
        if d.get("reason"):
            head += f", {d['reason']}"
        sample = f"n={score.n:,} tokens"
        if "n_windows" in d and "n_pos" in d:
            hard = f" incl. {d['n_hard']} hard" if d.get("n_hard") else ""
            sample += f" in {d['n_windows']} windows: {d['n_pos']} firing, {d['n_windows'] - d['n_pos']} silent{hard}"
        if d.get("unanswered"):
            sample += f"; {d['unanswered']:,} tokens unanswered, counted 0"
        if d.get("cut"):
            sample += f"; {d['cut']:,} tokens too long to ask, counted 0"
        return f"{head} ({sample})"
    head = f"{score.method} AUC {'n/a' if score.value is None else f'{score.value:.2f}'}"
    if not d.get("yes_no", True) and d.get("balanced_accuracy") is not None:
        head += f", balanced accuracy {d['balanced_accuracy']:.2f}"
    if score.method == "detection" and "n_pos" in d:
        hard = f" incl. {d['n_hard']} hard" if d.get("n_hard") else ""
        return f"{head} (n={score.n}: {d['n_pos']} firing, {d['n_neg']} silent{hard})"
    if "n_pos" in d:
        return f"{head} (n={score.n}: {d['n_pos']} right, {d['n_neg']} wrong markings)"
    return f"{head} (n={score.n})"


def interpretability_from_scores(values: Sequence[float | None], weights: Sequence[float] | None = None) -> int | None:
    """A 1-10 grade from AUCs (or balanced accuracies): their weighted mean, with chance (0.5) -> 1
    and perfect (1.0) -> 10 (the reference pipeline's 1-10 scale). None without scores."""
    pairs = [(v, 1.0 if weights is None else abs(w)) for v, w in zip(values, weights or [1.0] * len(values))
             if v is not None and math.isfinite(v)]
    if not pairs or sum(w for _, w in pairs) <= 0:
        return None
    mean = sum(v * w for v, w in pairs) / sum(w for _, w in pairs)
    return int(round(1 + 9 * min(1.0, max(0.0, (mean - 0.5) / 0.5))))
