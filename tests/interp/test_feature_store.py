"""The feature store: round trip, search (FTS5 and the LIKE fallback), atomic builds, a real
collection checked against activations recomputed from the model, damaged files (random bytes,
overwritten pages, truncation, another schema) ending in one sentence, and several processes
writing one store."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from core.errors import LabError
from core.interp import (CollectConfig, CollectFinished, Context, FeatureStats, FeatureStore, Score,
                         TranscoderTrainConfig, collect_features, corpus_from_texts, mlp_io, open_store, run_to_end,
                         train_transcoders)
from core.interp.store import FTS5, HIST_EDGES
from core.models.loading import load_model
from tests.conftest import CORPUS


def _stats(layer, f, density):
    return FeatureStats(layer=layer, feature=f, density=density, n_active=int(density * 1000), max_act=2.0 + f,
                        mean_act=1.0, hist=[f] * len(HIST_EDGES), top_tokens=[(" king", 3), (" lord", 1)],
                        promoted=[(" crown", 0.5)], suppressed=[(" peasant", -0.4)])


def _fill(store: FeatureStore) -> None:
    store.set_vocab_size(1000)
    store.add_set("tiny", "/tmp/set", {"transcoder": {"n_features": 3}})
    store.put_vocab({1: " the", 2: " king", 3: " is", 4: "\n", 999: " dead"})
    for layer in (0, 1):
        store.put_layer(layer, 3, {"fve": 0.8 + layer / 10, "l0": 8.0, "dead_fraction": 0.0, "loss_clean": 3.0,
                                   "loss_replaced": 3.1, "loss_ablated": 4.0, "loss_recovered": 0.9}, n_tokens=1000)
        store.put_features([_stats(layer, 0, 0.5), _stats(layer, 1, 0.01), _stats(layer, 2, 0.0)])
    store.put_contexts(0, 1, [
        Context("top", 0, [], [1, 2, 3, 999], [0.0, 2.5, 0.125, 0.0], position=1, activation=2.5, window=7),
        Context("top", 1, [], [2, 4], [1.5, 0.0], position=0, activation=1.5, window=9),
        Context("quantile", 0, [], [3, 2], [0.0, 0.75], position=1, activation=0.75, window=3, quantile=0.5),
        Context("negative", 0, [], [1, 3], [0.0, 0.0], position=0, activation=0.0, window=4)])
    store.put_explanations([(0, 0, "Fires on \"the\" before nouns"), (0, 1, "Fires on \"king\"; royal titles"),
                            (1, 0, "Line breaks between speeches")], "builtin")
    store.put_explanations([(0, 1, "Mentions of kings and queens")], "lm:flan")
    store.put_scores([(0, 1, Score("detection", 0.9, 20, {"tpr": 0.8})), (0, 0, Score("detection", 0.6, 20)),
                      (0, 1, Score("simulation", 0.7, 100))], "builtin")
    store.put_description("layer", 0, "builtin", "Layer 0 features fire on \"the\".")
    store.put_description("total", -1, "builtin", "Everything.")
    store.add_completion("ROMEO:", " hi", "builtin", {"layers": []})


def test_round_trip(tmp_path):
    path = tmp_path / "features.sqlite"
    with FeatureStore.build(path) as store:
        _fill(store)
    with open_store(path) as store:                     # read-only
        assert [s["model"] for s in store.sets()] == ["tiny"]
        layers = store.layers()
        assert [l.layer for l in layers] == [0, 1] and layers[1].fve == pytest.approx(0.9)
        assert layers[0].n_alive == 2 and layers[0].hook_in == "blocks.0.ln2.hook_normalized"
        feats = store.features(0, order_by="density", explainer="builtin")
        assert [f.feature for f in feats] == [0, 1]     # the dead feature is left out
        assert feats[1].explanation == "Fires on \"king\"; royal titles" and feats[1].score == pytest.approx(0.9)
        assert [f.feature for f in store.features(0, order_by="score", explainer="builtin")] == [1, 0]
        assert store.count_features(0, include_dead=True) == 3
        card = store.feature(0, 1)
        assert card.address == "blocks.0.transcoder.1"
        assert card.stats.top_tokens == [(" king", 3), (" lord", 1)] and card.stats.promoted == [(" crown", 0.5)]
        assert card.stats.hist == [1] * len(HIST_EDGES)
        assert [c.tokens for c in card.top] == [[" the", " king", " is", " dead"], [" king", "\n"]]
        assert card.top[0].acts == pytest.approx([0.0, 2.5, 0.125, 0.0], abs=2.5 / 510)
        assert card.top[0].token == " king" and card.top[0].window == 7
        assert card.quantiles[0].quantile == 0.5
        assert card.explanations == {"lm:flan": "Mentions of kings and queens",
                                     "builtin": "Fires on \"king\"; royal titles"}
        assert card.scores == {"builtin": {"detection": 0.9, "simulation": 0.7}}
        assert store.scores(0, 1)["builtin"]["detection"].details == {"tpr": 0.8}
        assert store.contexts(0, 1, "negative")[0].acts == [0.0, 0.0]
        assert store.explanation(0, 1) == "Mentions of kings and queens"       # the latest explainer's
        assert store.explanations(0, "builtin") == {0: "Fires on \"the\" before nouns", 1: "Fires on \"king\"; royal titles"}
        assert store.layer_scores(0, "builtin") == {1: 0.9, 0: 0.6}
        assert store.description("layer", 0) == "Layer 0 features fire on \"the\"."
        assert store.description("total") == "Everything."
        assert store.completions()[0]["prompt"] == "ROMEO:"
        edges, counts = store.density_histogram(0, bins=4)
        assert sum(counts) == 2 and edges[0] == pytest.approx(np.log10(0.01))
        with pytest.raises(LabError, match="not in the store"):
            store.stats(0, 99)
        with pytest.raises(LabError, match="cannot be written here"):      # read-only really is read-only
            store.put_description("total", -1, "x", "y")


@pytest.mark.parametrize("fts", [True, False])
def test_search(tmp_path, fts):
    if fts and not FTS5:
        pytest.skip("this sqlite3 has no FTS5")
    path = tmp_path / "s.sqlite"
    with FeatureStore.build(path) as store:
        _fill(store)
    with FeatureStore(path) as store:
        store.fts = fts
        hits = store.search("king")
        assert {(h.layer, h.feature, h.explainer) for h in hits} == {(0, 1, "builtin"), (0, 1, "lm:flan")}
        assert [(h.layer, h.feature) for h in store.search("royal TITLES")] == [(0, 1)]
        assert [(h.layer, h.feature) for h in store.search("line", layer=1)] == [(1, 0)]
        assert store.search("line", layer=0) == []
        assert store.search("") == [] and store.search("\"(*") == []
        assert {h.feature for h in store.search("fires AND OR NOT", explainer="builtin")} <= {0, 1}
        store.put_explanations([(1, 0, "Now about crowns")], "builtin")       # updates are re-indexed
        assert [(h.layer, h.feature) for h in store.search("crowns")] == [(1, 0)]
        assert store.search("speeches") == []


def test_build_is_atomic(tmp_path):
    path = tmp_path / "features.sqlite"
    with FeatureStore.build(path) as store:
        _fill(store)
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with FeatureStore.build(path) as store:
            store.add_set("other", None, {})
            raise RuntimeError("stopped halfway")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.sqlite"]
    with pytest.raises(LabError, match="No feature store"):
        FeatureStore(tmp_path / "missing.sqlite")
    (tmp_path / "junk.sqlite").write_text("not a database")
    with pytest.raises(LabError, match="not a feature store"):
        FeatureStore(tmp_path / "junk.sqlite")


def test_collection_matches_recomputed_activations(tiny_gptlab_dir, tmp_path):
    lm = load_model(str(tiny_gptlab_dir))
    corpus = corpus_from_texts(lm, [CORPUS, CORPUS.upper(), CORPUS[::-1]])
    cfg = TranscoderTrainConfig(expansion=2, k=4, steps=20, batch_tokens=256, seq_len=32, model_batch=8,
                                buffer_batches=2, val_windows=4, lr=1e-2, warmup_steps=2)
    tset = run_to_end(train_transcoders(lm, cfg, corpus=corpus, out_dir=tmp_path / "set"))
    ccfg = CollectConfig(n_tokens=2048, seq_len=32, batch_size=16, top_k=5, n_quantile=3, n_heldout=3, n_negative=3,
                         holdout_every=4, window_before=6, window_after=2)
    events = list(collect_features(lm, tset, ccfg, corpus=corpus))
    done = events[-1]
    assert isinstance(done, CollectFinished) and done.path == tmp_path / "set" / "features.sqlite"
    windows = corpus.windows("train", 32, 2048 // 32)
    with open_store(done.path) as store:
        assert [l.layer for l in store.layers()] == [0, 1]
        assert store.layers()[0].fve == pytest.approx(tset.metrics["layers"]["0"]["fve"])
        for layer in (0, 1):
            feats = store.features(layer, include_dead=True)
            assert len(feats) == tset[layer].n_features and all(0 <= f.density <= 1 for f in feats)
            checked = 0
            for f in store.features(layer, limit=3):
                top = store.contexts(layer, f.feature, "top")
                assert top and [c.activation for c in top] == sorted((c.activation for c in top), reverse=True)
                assert top[0].activation == pytest.approx(f.max_act, rel=1e-5)
                for c in top + store.contexts(layer, f.feature, "heldout") + store.contexts(layer, f.feature, "negative"):
                    held = c.window % 4 == 3
                    assert held == (c.kind in ("heldout", "negative"))
                    ids = torch.from_numpy(windows[c.window:c.window + 1])
                    acts = tset[layer].encode(mlp_io(lm, ids, [layer])[layer][0])[0, :, f.feature]
                    seg = windows[c.window].tolist()
                    # the stored window is a slice of the corpus window; find it and compare activations
                    for s in range(len(seg) - len(c.token_ids) + 1):
                        tol = 1e-3 + max(c.acts) / 255  # one-byte quantisation relative to the window's peak
                        if seg[s:s + len(c.token_ids)] == c.token_ids and \
                                np.allclose(acts[s:s + len(c.token_ids)].numpy(), c.acts, atol=tol, rtol=1e-3):
                            break
                    else:
                        raise AssertionError(f"context {c} does not match recomputed activations")
                    if c.kind == "negative":
                        assert max(c.acts) == 0.0
                    else:
                        assert c.activation > 0 and c.acts[c.position] == pytest.approx(c.activation, abs=max(c.acts) / 255)
                    checked += 1
            assert checked > 0
        card = store.feature(0, store.features(0, limit=1)[0].feature)
        assert len(card.stats.promoted) == 10 and card.stats.promoted[0][1] >= card.stats.promoted[-1][1]
        assert sum(card.stats.hist) == card.stats.n_active


# -- damaged files ------------------------------------------------------------------------------------

def _reads(store: FeatureStore) -> None:
    """Every kind of read the CLI and the page make."""
    store.sets()
    store.layers()
    for layer in (0, 1):
        store.features(layer, order_by="score", explainer="builtin")
        store.count_features(layer)
        store.density_histogram(layer)
        store.explanations(layer)
    store.feature(0, 1)
    store.scores(0, 1)
    store.contexts(0, 1, "negative")
    store.search("king")
    store.description("total")
    store.completions()
    store.vocab()


@pytest.fixture(scope="module")
def good_store(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("good") / "features.sqlite"
    with FeatureStore.build(path) as store:
        _fill(store)
    return path.read_bytes()


def _one_sentence(e: LabError, path) -> None:
    assert str(path) in str(e) and "\n" not in str(e) and "collect" in str(e)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=0, max_size=4096))
def test_random_bytes_are_refused_in_one_sentence(tmp_path, data):
    path = tmp_path / "features.sqlite"
    path.write_bytes(data)
    for readonly in (True, False):
        with pytest.raises(LabError) as e:
            FeatureStore(path, readonly=readonly)
        _one_sentence(e.value, path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offset=st.floats(0, 1, exclude_max=True), junk=st.binary(min_size=1, max_size=256))
def test_a_damaged_store_fails_only_in_sentences(tmp_path, good_store, offset, junk):
    """Bytes overwritten anywhere in a real store: every read works or ends in one LabError naming
    the file, never an sqlite3 / json / numpy exception."""
    at = int(offset * len(good_store))
    path = tmp_path / "features.sqlite"
    path.write_bytes(good_store[:at] + junk + good_store[at + len(junk):])
    try:
        with FeatureStore(path, readonly=True) as store:
            _reads(store)
    except LabError as e:
        assert str(path) in str(e) and "\n" not in str(e)


def test_truncated_and_foreign_stores_are_refused(tmp_path, good_store):
    path = tmp_path / "features.sqlite"
    path.write_bytes(good_store[:len(good_store) // 2])
    with pytest.raises(LabError, match="is truncated") as e:
        FeatureStore(path, readonly=True)
    _one_sentence(e.value, path)

    path.unlink()
    conn = sqlite3.connect(path)                     # an SQLite file with a format mark but another schema
    conn.executescript("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
                       "INSERT INTO meta VALUES ('format', '1'); CREATE TABLE layers (x INTEGER);")
    conn.commit()
    conn.close()
    with pytest.raises(LabError, match="this version can read .*layers") as e:
        FeatureStore(path)
    _one_sentence(e.value, path)
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value='7' WHERE key='format'")
    conn.commit()
    conn.close()
    with pytest.raises(LabError, match="newer format"):
        FeatureStore(path)
    assert not list(tmp_path.glob(".*.lock"))        # a refused writer leaves no lock behind


# -- several processes --------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def _writer(path: Path, script: str) -> subprocess.Popen:
    """A separate Python process running ``script`` with ``store`` helpers imported."""
    code = f"import sys, time\nfrom core.interp.store import FeatureStore\npath = {str(path)!r}\n{script}"
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_a_second_writer_waits_then_is_refused_in_a_sentence(tmp_path):
    path = tmp_path / "features.sqlite"
    with FeatureStore.build(path) as store:
        _fill(store)
    holder = _writer(path, "with FeatureStore(path) as s:\n"
                           "    s.put_explanations([(1, 2, 'held')], 'holder')\n"
                           "    print('ready', flush=True)\n"
                           "    sys.stdin.read()\n")
    try:
        assert holder.stdout.readline().strip() == "ready"
        t0 = time.monotonic()
        with pytest.raises(LabError, match=rf"being written by another process \(pid {holder.pid}: .*\); wait for it") as e:
            FeatureStore(path, wait_s=0.3)
        assert time.monotonic() - t0 >= 0.3 and "\n" not in str(e.value) and str(path) in str(e.value)
        with pytest.raises(LabError, match="being written by another process"):   # nor can a collection replace it
            with FeatureStore.build(path, wait_s=0.1) as fresh:
                fresh.add_set("other", None, {})
        with open_store(path) as reader:                                   # readers are never in the way
            assert reader.explanation(1, 2, "holder") == "held"
    finally:
        holder.communicate("", timeout=30)
    assert holder.returncode == 0
    with FeatureStore(path, wait_s=5) as store:                           # the lock went with the holder
        store.put_explanations([(1, 2, "mine")], "second")
        assert store.explanation(1, 2, "holder") == "held"


def test_two_processes_writing_one_store_take_turns(tmp_path):
    """Two writers opening, writing and closing as fast as they can: no 'database is locked', no
    lost rows, and the file passes SQLite's integrity check."""
    path = tmp_path / "features.sqlite"
    with FeatureStore.build(path) as store:
        _fill(store)
    script = ("for i in range(25):\n"
              "    with FeatureStore(path, wait_s=30) as s:\n"
              "        s.put_explanations([(0, i, f'text {{i}}')], {who!r})\n"
              "        s.put_scores([], {who!r})\n")
    procs = [_writer(path, script.format(who=f"writer{n}")) for n in range(2)]
    with open_store(path) as reader:                                      # a reader meanwhile
        for _ in range(20):
            reader.layers()
            reader.search("text")
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert not any("locked" in err or "Traceback" in err for _, err in outs), outs
    with open_store(path) as store:
        assert store.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        for n in range(2):
            assert len(store.explanations(0, f"writer{n}")) == 25
    assert not list(tmp_path.glob(".*.lock"))


def test_a_store_in_a_folder_with_uri_characters_opens_read_only(tmp_path):
    path = tmp_path / "odd?name#1%20" / "features.sqlite"
    with FeatureStore.build(path) as store:
        _fill(store)
    with open_store(path) as store:
        assert [l.layer for l in store.layers()] == [0, 1]


# -- packed scoring windows ----------------------------------------------------------------------------

def _packed_store(path: Path) -> Path:
    with FeatureStore.build(path) as store:
        _fill(store)
        store.put_windows({40: [1, 2, 3, 4, 2, 1], 41: [2, 2, 999, 1, 3, 4]})
        store.put_scoring(0, 1, "heldout", 2, 1, [(40, 1, [0.0, 1.5, 0.0]), (41, 4, [0.0, 0.0, 3.0, 0.5])])
        with pytest.raises(LabError, match="does not match the stored windows"):
            store.put_scoring(0, 1, "heldout", 2, 1, [(40, 1, [0.0, 1.5, 0.0, 0.0])])   # one activation too many
        with pytest.raises(LabError, match="does not match the stored windows"):
            store.put_scoring(0, 1, "heldout", 2, 1, [(42, 1, [0.0, 1.5, 0.0])])        # no such window
        store.put_scoring(0, 1, "negative", 2, 1, [(41, 0, [0.0, 0.0])])
        store.put_scoring(0, 1, "hard", 2, 1, [(40, 5, [0.0, 0.0, 0.0])])
    return path


def test_packed_scoring_windows_read_back_as_contexts(tmp_path):
    """Windows stored once, each feature's scoring contexts as arrays pointing into them: cut
    ``before`` tokens before and ``after`` after the position, clipped at the window's edges."""
    with FeatureStore(_packed_store(tmp_path / "f.sqlite"), readonly=True) as store:
        held = store.contexts(0, 1, "heldout")
        assert [c.token_ids for c in held] == [[1, 2, 3], [999, 1, 3, 4]]    # position 4 of 6: 2 before, 1 after
        assert [c.position for c in held] == [1, 2] and [c.window for c in held] == [40, 41]
        assert held[0].tokens == [" the", " king", " is"] and held[0].activation == pytest.approx(1.5)
        assert held[1].acts == pytest.approx([0.0, 0.0, 3.0, 0.5], abs=3.0 / 255)
        assert held[1].activation == pytest.approx(3.0, rel=1e-3)
        (neg,) = store.contexts(0, 1, "negative")
        assert neg.token_ids == [2, 2] and neg.acts == [0.0, 0.0] and neg.kind == "negative"
        (hard,) = store.contexts(0, 1, "hard")
        assert hard.token_ids == [4, 2, 1] and hard.position == 2 and max(hard.acts) == 0.0
        assert store.contexts(0, 1, "heldout", limit=1) == held[:1]
        # a feature without a packed row reads the contexts table (as stores written before packing do)
        assert store.contexts(0, 0, "heldout") == []


def test_a_store_from_before_packing_still_reads(tmp_path):
    path = tmp_path / "old.sqlite"
    with FeatureStore.build(path) as store:
        _fill(store)
    con = sqlite3.connect(path)
    con.execute("DROP TABLE scoring")
    con.execute("DROP TABLE windows")
    con.commit()
    con.close()
    with FeatureStore(path, readonly=True) as store:
        assert not store.packed
        (neg,) = store.contexts(0, 1, "negative")
        assert neg.token_ids == [1, 3] and store.contexts(0, 1, "hard") == []


@pytest.mark.parametrize("damage", ["UPDATE scoring SET windows = x'2a000000' WHERE kind = 'heldout'",
                                    "UPDATE scoring SET acts = x'01' WHERE kind = 'heldout'",
                                    "DELETE FROM windows WHERE window = 41"])
def test_a_damaged_packed_row_is_one_sentence(tmp_path, damage):
    path = _packed_store(tmp_path / "f.sqlite")
    con = sqlite3.connect(path)
    con.execute(damage)
    con.commit()
    con.close()
    with FeatureStore(path, readonly=True) as store:
        with pytest.raises(LabError, match=r"is damaged or not a feature store"):
            store.contexts(0, 1, "heldout")
