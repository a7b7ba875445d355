"""The feature store: round trip, search (FTS5 and the LIKE fallback), atomic builds, and a real
collection checked against activations recomputed from the model."""
from __future__ import annotations

import sqlite3

import numpy as np
import pytest
import torch

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
