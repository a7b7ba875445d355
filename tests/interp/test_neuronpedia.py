"""The Neuronpedia / SAEDashboard export of a feature store: every key of SAEDashboard's batch
layout present, and read back it gives the store's own numbers (densities, logit effects,
histograms, top and quantile contexts with the activation of every token, explanations and
their scores)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from core.errors import LabError
from core.interp import Context, FeatureStats, FeatureStore, Score
from core.interp.neuronpedia import BATCH_SIZE, export_neuronpedia, read_neuronpedia, source_name
from core.interp.store import HIST_EDGES

N0 = BATCH_SIZE + 3  # layer 0 spills into a second batch file

# SAEDashboard's NeuronpediaDashboardFeature.to_dict() / NeuronpediaDashboardActivation.to_dict() keys
FEATURE_KEYS = {"feature_index", "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
                "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
                "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson", "neg_str",
                "neg_values", "pos_str", "pos_values", "frac_nonzero", "freq_hist_data_bar_values",
                "freq_hist_data_bar_heights", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
                "n_prompts_total", "n_tokens_in_prompt", "dataset", "decoder_weights_dist", "activations", "vector"}
ACTIVATION_KEYS = {"bin_min", "bin_max", "bin_contains", "tokens", "values", "qualifying_token_index"}


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("np") / "features.sqlite"
    vocab = {i: f" tok{i}" for i in range(50)} | {50: "\n", 51: "é\"quoted\""}
    with FeatureStore.build(path) as store:
        store.set_vocab_size(1000)
        store.add_set("tiny/model", "/tmp/set", {"transcoder": {"n_features": N0}, "seq_len": 32,
                                                 "corpus": "shakespeare"})
        store.put_vocab(vocab)
        for layer, n in ((0, N0), (2, 5)):
            store.put_layer(layer, n, {"fve": 0.9, "l0": 8.0, "dead_fraction": 0.1, "loss_clean": 3.0,
                                       "loss_replaced": 3.1, "loss_ablated": 4.0, "loss_recovered": 0.9},
                            n_tokens=4096)
            rows = []
            for f in range(n):
                dead = f % 7 == 3
                rows.append(FeatureStats(
                    layer=layer, feature=f, density=0.0 if dead else float(rng.random() * 0.2),
                    n_active=0 if dead else 10, max_act=float(rng.random() * 5), mean_act=1.0,
                    hist=rng.integers(0, 9, len(HIST_EDGES)).tolist(), top_tokens=[(" tok1", 3)],
                    promoted=[(" tok2", float(rng.random())), ("\n", 0.25)],
                    suppressed=[(" tok3", -float(rng.random()))]))
                if dead:
                    continue
                ctxs = []
                for r in range(3):
                    ids = rng.integers(0, 52, 6).tolist()
                    acts = (rng.random(6) * 4).tolist()
                    ctxs.append(Context("top", r, [], ids, acts, position=int(np.argmax(acts)),
                                        activation=float(max(acts)), window=r))
                for r, q in enumerate((0.0, 0.4, 1.0)):
                    ids = rng.integers(0, 52, 5).tolist()
                    acts = (rng.random(5) * (r + 1)).tolist()
                    ctxs.append(Context("quantile", r, [], ids, acts, position=2, activation=float(acts[2]), window=9,
                                        quantile=q))
                ctxs.append(Context("negative", 0, [], [1, 2], [0.0, 0.0], position=0, activation=0.0, window=4))
                store.put_contexts(layer, f, ctxs)
            store.put_features(rows)
        store.put_explanations([(0, 1, "Fires on \"tok\" words"), (0, N0 - 1, "Line breaks"), (2, 0, "Numbers")],
                               "builtin")
        store.put_explanations([(0, 1, "Mentions of kings")], "lm:google/flan-t5-base")
        store.put_scores([(0, 1, Score("detection", 0.9, 20, {"tpr": 0.8, "tnr": 1.0})),
                          (0, 1, Score("simulation", None, 0)), (2, 0, Score("detection", 0.55, 12))], "builtin")
        store.put_scores([(0, 1, Score("detection", 0.7, 20))], "lm:google/flan-t5-base")
        store.put_description("layer", 0, "builtin", "Layer 0: words.")
        store.put_description("total", -1, "builtin", "Everything.")
    return path


def test_export_has_saedashboards_shape(store_path, tmp_path):
    with FeatureStore(store_path, readonly=True) as store:
        folders = export_neuronpedia(store, tmp_path / "np", model_id="tiny-model", sae_set="tc")
    assert [f.name for f in folders] == ["0-tc", "2-tc"] == [source_name(0, "tc"), source_name(2, "tc")]
    assert sorted(p.name for p in folders[0].iterdir()) == ["batch-0.json", "batch-1.json", "explanations.json",
                                                             "run_settings.json"]
    batch = json.loads((folders[0] / "batch-1.json").read_text())
    assert set(batch) == {"model_id", "layer", "sae_set", "sae_id_suffix", "features"}
    assert (batch["model_id"], batch["layer"], batch["sae_set"]) == ("tiny-model", 0, "tc")
    assert [f["feature_index"] for f in batch["features"]] == list(range(BATCH_SIZE, N0))
    feat = json.loads((folders[0] / "batch-0.json").read_text())["features"][1]
    assert set(feat) == FEATURE_KEYS and all(set(a) == ACTIVATION_KEYS for a in feat["activations"])
    assert (feat["n_prompts_total"], feat["n_tokens_in_prompt"], feat["dataset"]) == (4096 // 32, 32, "shakespeare")
    top = [a for a in feat["activations"] if a["bin_min"] == -1]
    assert len(top) == 3 and all(a["bin_contains"] == -1 for a in top)
    assert all(a["values"][a["qualifying_token_index"]] == pytest.approx(a["bin_max"], abs=4 / 255) for a in top)
    quant = feat["activations"][3:]
    assert [a["bin_min"] for a in quant[1:]] == [a["bin_max"] for a in quant[:-1]]
    assert sum(a["bin_contains"] for a in quant) == pytest.approx(1.0)
    records = json.loads((folders[0] / "explanations.json").read_text())
    rec = next(r for r in records if r["index"] == "1" and r["explanationModelName"] == "builtin")
    assert rec["layer"] == "0-tc" and rec["modelId"] == "tiny-model" and rec["description"] == "Fires on \"tok\" words"
    assert {s["explanationScoreTypeName"]: s["value"] for s in rec["scores"]} == {"detection": 0.9, "simulation": None}
    settings = json.loads((folders[1] / "run_settings.json").read_text())
    assert (settings["hook_name"], settings["hook_name_out"]) == ("blocks.2.ln2.hook_normalized",
                                                                  "blocks.2.hook_mlp_out")
    assert settings["gptlab"]["total_description"] == "Everything."


def test_export_reads_back_as_the_stores_numbers(store_path, tmp_path):
    with FeatureStore(store_path, readonly=True) as store:
        export_neuronpedia(store, tmp_path / "np")                     # model id from the store: tiny-model
        back = read_neuronpedia(tmp_path / "np")
        assert sorted(back) == [0, 2] and len(back[0]) == N0 and len(back[2]) == 5
        for layer, feats in back.items():
            for f, got in feats.items():
                s = store.stats(layer, f)
                assert got.density == s.density and got.hist == s.hist
                assert got.promoted == s.promoted and got.suppressed == s.suppressed
                for kind, mine in (("top", got.top), ("quantile", got.quantiles)):
                    theirs = store.contexts(layer, f, kind)
                    assert len(mine) == len(theirs)
                    for a, b in zip(mine, theirs):
                        assert a.tokens == b.tokens and a.acts == b.acts          # bit for bit
                        assert a.position == b.position and a.activation == b.activation
                        if kind == "quantile":
                            assert a.quantile == pytest.approx(b.quantile, abs=1e-12)
                card = store.feature(layer, f)
                assert got.explanations == card.explanations
                assert {ex: {m: s.value for m, s in d.items()} for ex, d in got.scores.items()} == card.scores
                for ex, d in got.scores.items():
                    for m, sc in d.items():
                        want = store.scores(layer, f)[ex][m]
                        assert (sc.n, sc.details) == (want.n, want.details)
    one = read_neuronpedia(tmp_path / "np" / "2-gptlab-tc")            # a single source folder reads too
    assert list(one) == [2] and one[2][0].explanations == {"builtin": "Numbers"}


def test_bad_requests_are_one_sentence(store_path, tmp_path):
    with FeatureStore(store_path, readonly=True) as store:
        with pytest.raises(LabError, match="--layers"):
            export_neuronpedia(store, tmp_path / "x", layers=[7])
        with pytest.raises(LabError, match="--sae-set"):
            export_neuronpedia(store, tmp_path / "x", sae_set="a b/c")
    with pytest.raises(LabError, match="No Neuronpedia export"):
        read_neuronpedia(tmp_path)


def test_cli_export_neuronpedia(store_path, tmp_path, capsys):
    from core.commands.cli import main

    rc = main(["transcoders", "export", "--store", str(store_path), "--to", str(tmp_path / "np"), "--format",
               "neuronpedia", "--layers", "2", "--model-id", "gpt2-small", "--sae-set", "tc"])
    assert rc == 0, capsys.readouterr().err
    batch = json.loads((tmp_path / "np" / "2-tc" / "batch-0.json").read_text())
    assert batch["model_id"] == "gpt2-small" and len(batch["features"]) == 5
    rc = main(["transcoders", "export", "--store", str(tmp_path / "nope.sqlite"), "--to", str(tmp_path / "np2"),
               "--format", "neuronpedia"])
    assert rc == 2 and "No feature store" in capsys.readouterr().err
