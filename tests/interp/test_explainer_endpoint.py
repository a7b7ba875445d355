"""The remote explainer against a real `core serve` on loopback (no mocks): it fills a feature store
through chat and plain completions, with the T5 path's prompts, from Python and from the CLI; the key
comes from the environment and is never written; a busy server is waited out, a dead or slow one
and a refused key end in one sentence, and a failed call leaves the store as it was."""
from __future__ import annotations

import logging
import math
import sqlite3
import threading
import time

import pytest

from core.errors import LabError
from core.interp import Context, FeatureStore, describe_store
from core.interp.explain import BuiltinExplainer, LMExplainer, PromptedExplainer, RemoteExplainer, load_explainer
from core.interp.prompts import feature_prompt
from core.models.loading import load_model
from core.serve.client import connect
from tests.interp.test_feature_store import _fill
from tests.serve.helpers import busy, serving

KEY = "s3cret-explainer-key"


@pytest.fixture(scope="module")
def default_lm():
    return load_model("default")


@pytest.fixture(scope="module")
def server(default_lm):
    with serving(default_lm, api_key=KEY) as s:
        yield s


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("GPTLAB_EXPLAINER_KEY", KEY)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    return KEY


def _ctx(tokens, pos, kind):
    acts = [0.0] * len(tokens)
    acts[pos] = 1.0 if kind != "negative" else 0.0
    return Context(kind, 0, list(tokens), list(range(len(tokens))), acts, position=pos, activation=acts[pos])


def small_store(path):
    """The feature-store test's store (2 layers, 2 live features each), with a held-out activating
    window next to its silent one, so detection has both sides to score."""
    with FeatureStore.build(path) as store:
        _fill(store)
        store.put_contexts(0, 1, [_ctx([" the", " king", " is"], 1, "heldout")])
    return path


def rows(path, table) -> list[dict]:
    con = sqlite3.connect(path)
    con.row_factory = sqlite3.Row
    try:
        return sorted((dict(r) for r in con.execute(f"SELECT * FROM {table}")), key=repr)
    finally:
        con.close()


@pytest.mark.parametrize("suffix", ["", "/completions"])
def test_the_remote_explainer_fills_a_store_through_the_server(server, key, tmp_path, suffix):
    path = small_store(tmp_path / "features.sqlite")
    ex = load_explainer(server.url + suffix, model="default")
    assert isinstance(ex, RemoteExplainer) and ex.endpoint.api == ("completions" if suffix else "chat")
    assert ex.name == f"api:default@{server.url}" and KEY not in ex.name
    with FeatureStore(path) as store:
        events = list(describe_store(store, ex, n_top=5))
        assert events[-1].explainer == ex.name
        for layer in (0, 1):
            assert set(store.explanations(layer, ex.name)) == {0, 1}          # both live features, both layers
            assert store.description("layer", layer, ex.name)
        assert store.description("total", -1, ex.name)
        det = store.scores(0, 1)[ex.name]["detection"]
        assert det.n == 2 and det.details["detector"] == ex.name and det.value is not None
        assert "fuzzing" in store.scores(0, 1)[ex.name]
    assert KEY.encode() not in path.read_bytes()


def test_it_asks_the_t5_paths_prompts(server, key):
    ex = load_explainer(server.url, model="default")
    for method in ("explain_features", "describe_layer", "describe_total", "rate_output", "rate_interpretation",
                   "detector"):  # one implementation for the local and the remote model
        assert getattr(RemoteExplainer, method) is getattr(LMExplainer, method) is getattr(PromptedExplainer, method)
    sent: list[str] = []
    ask = ex.endpoint.ask
    ex.endpoint.ask = lambda prompt, *a, **k: (sent.append(prompt), ask(prompt, *a, **k))[1]
    from core.interp.explain import FeatureEvidence

    ev = FeatureEvidence(0, 0, [_ctx([" the", " king", " is"], 1, "top")], promoted=[(" queen", 1.0)])
    ex.explain_features([ev])
    assert sent == [feature_prompt(ev.top, ex.count, ex.max_input, [" queen"])[0]]
    assert "<< king>>" in sent[0] and ex.count(sent[0]) <= ex.max_input


def test_the_cli_describes_through_the_server_and_never_shows_the_key(server, key, tmp_path, capsys, caplog):
    from core.commands.cli import main

    caplog.set_level(logging.DEBUG)  # the openai client's and the server's own logs, at their most talkative
    path = small_store(tmp_path / "features.sqlite")
    rc = main(["transcoders", "describe", "--model", "default", "--transcoders", str(tmp_path), "--store", str(path),
               "--explainer", server.url, "--explainer-model", "default", "--layers", "0"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "layer 0:" in out and "total:" in out and KEY not in out + err
    assert "Sending HTTP Request: POST" in caplog.text and KEY not in caplog.text
    with FeatureStore(path, readonly=True) as store:
        assert set(store.explanations(0, f"api:default@{server.url}")) == {0, 1}
    assert KEY.encode() not in path.read_bytes()


def test_the_model_is_found_or_named_in_a_sentence(server, key):
    assert load_explainer(server.url).endpoint.model == "default"     # the one model the server lists
    ex = load_explainer(server.url, model="gpt-4", max_retries=0)
    with pytest.raises(LabError, match="answered 404.*not served here.*--explainer-model"):
        ex.generate(["Say hi."])
    with pytest.raises(LabError, match="--explainer-model names a model behind a server"):
        load_explainer("builtin", model="default")
    with pytest.raises(LabError, match="must start with http"):
        connect("ftp://127.0.0.1/v1")


def test_a_refused_key_leaves_the_store_as_it_was(server, tmp_path, monkeypatch):
    monkeypatch.setenv("GPTLAB_EXPLAINER_KEY", "wrong")
    path = small_store(tmp_path / "features.sqlite")
    before = rows(path, "explanations"), rows(path, "scores")
    with pytest.raises(LabError, match=r"refused the API key \(401\); set GPTLAB_EXPLAINER_KEY") as e:
        load_explainer(server.url, model="default")
    assert "wrong" not in str(e.value)
    monkeypatch.delenv("GPTLAB_EXPLAINER_KEY")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)                           # the second variable works too
    assert load_explainer(server.url, model="default").endpoint.model == "default"
    assert (rows(path, "explanations"), rows(path, "scores")) == before


def test_a_server_gone_mid_run_keeps_only_whole_batches(default_lm, key, tmp_path):
    path = small_store(tmp_path / "features.sqlite")
    before = rows(path, "explanations")
    with serving(default_lm, api_key=KEY) as s:
        ex = load_explainer(s.url, model="default", max_retries=0, timeout_s=10)
        with FeatureStore(path) as store:
            events = describe_store(store, ex, n_top=5, batch_size=1)
            next(events)                                               # started
            first = next(events)                                       # one feature explained and committed
            s.stop()
            with pytest.raises(LabError, match="Could not reach the explainer server"):
                list(events)
    new = [(r["layer"], r["feature"]) for r in rows(path, "explanations") if r["explainer"] == ex.name]
    assert new == [(first.layer, first.feature)] and len(rows(path, "explanations")) == len(before) + 1
    scored = [(r["layer"], r["feature"]) for r in rows(path, "scores") if r["explainer"] == ex.name]
    assert sorted(set(scored)) == new                                 # no explanation without its scores


def test_a_failing_scorer_writes_nothing_of_its_batch(tmp_path):
    class Broken(BuiltinExplainer):
        name = "broken"

        def detector(self):
            class Fails:
                name = "fails"

                def detect(self, explanation, texts):
                    raise LabError("the scorer's server went away.")
            return Fails()

    path = small_store(tmp_path / "features.sqlite")
    before = rows(path, "explanations"), rows(path, "scores")
    with FeatureStore(path) as store, pytest.raises(LabError, match="went away"):
        list(describe_store(store, Broken(), layers=[0]))
    assert (rows(path, "explanations"), rows(path, "scores")) == before


def test_a_busy_server_is_waited_out(default_lm, key):
    with serving(default_lm, api_key=KEY, max_queue=0) as s:
        ex = load_explainer(s.url, model="default", max_retries=4)
        with busy(s) as release:
            threading.Timer(1.5, release.set).start()                 # 503 + Retry-After: 1 until then
            t0 = time.monotonic()
            answer = ex.generate(["Name a king."])
            assert len(answer) == 1 and time.monotonic() - t0 >= 1.0


def test_a_slow_server_times_out_in_a_sentence(default_lm, key):
    with serving(default_lm, api_key=KEY) as s:
        ex = load_explainer(s.url, model="default", max_retries=0, timeout_s=0.5)
        with busy(s):
            with pytest.raises(LabError, match=r"did not answer within 0.5s"):
                ex.generate(["Name a king."])


def test_a_dead_server_is_one_sentence(key):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]                                      # closed when the block ends: nobody listens
    with pytest.raises(LabError, match=rf"Could not reach the explainer server at http://127.0.0.1:{port}/v1"):
        load_explainer(f"http://127.0.0.1:{port}/v1", model="m", max_retries=0)


def test_prompts_too_long_for_a_small_context_are_cut_until_they_fit(tiny_gptlab_dir, key):
    lm = load_model(str(tiny_gptlab_dir))                               # a context of 64 tokens
    with serving(lm, api_key=KEY) as s:
        ex = load_explainer(s.url + "/completions", max_retries=0, max_new_tokens=8)
        assert ex.max_input == 64 - 8
        long = "The king is dead. " * 40 + "Answer yes or no.\nAnswer:"
        assert len(ex.generate([long])) == 1 and isinstance(ex.yes_no([long])[0], bool)
        with pytest.raises(LabError, match="too few for any"):
            load_explainer(s.url, max_retries=0)                       # chat: 64 - template room - 32 answer tokens


class _Top:
    """An endpoint stand-in answering with fixed top log-probabilities."""

    def __init__(self, top, text=" maybe"):
        self.top, self.text, self.asked = top, text, []

    def ask(self, prompt, max_tokens=None, top_logprobs=0):
        from core.serve.client import Answer

        self.asked.append(top_logprobs)
        return Answer(self.text, self.top)


@pytest.mark.parametrize("top, text, expected", [
    ({" Yes": -0.5, " no": -1.5, " the": -3.0}, "", 1 / (1 + math.exp(-1.0))),   # both listed: their odds
    ({"yes": -0.2, " the": -3.0}, "", 1 / (1 + math.exp(-(-0.2 - (-4.0))))),       # "no" below the last listed
    ({" the": -1.0, " a": -2.0}, " Yes.", 1.0),                                    # neither: the text says
    (None, " no", 0.0),
])
def test_a_servers_yes_probability_comes_from_its_log_probabilities(top, text, expected):
    ex = RemoteExplainer.__new__(RemoteExplainer)
    ex.endpoint = _Top(top, text)
    assert ex._yes_probability("Q? Answer:") == pytest.approx(expected)
    assert ex.endpoint.asked == [20]
