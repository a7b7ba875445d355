"""The intervention panels, driven through app.py with AppTest, checked against core.interventions on
the same model: Generate's Interventions panel, the Attention and Patching pages, Consensus's
per-layer MLP skipping and head ablation, and a feature card's "try it" and "steer" actions."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from app_harness import code, open_app, set_widgets, shown, texts

from core.generation.config import SamplingConfig
from core.interventions import (attention_patterns, compare_generation, feature_activations, from_flags,
                                patching_sweep, prepare)
from core.interventions.config import PATCH_CLEAN, PATCH_CORRUPTED, STEER_DEFAULT

PROMPT = "ROMEO: But soft, what light"


def vega_data(at) -> list[tuple[dict, "object"]]:
    out = []
    for el in at.get("vega_lite_chart"):
        spec = json.loads(el.proto.spec)
        data = pa.ipc.open_stream(el.proto.datasets[0].data.data).read_all().to_pandas() if el.proto.datasets else None
        out.append((spec, data))
    return out


# -- Generate ------------------------------------------------------------------------------------------------

def test_generate_panel_shows_with_and_without_and_the_logprob_change(default_lm):
    at = open_app("pages/generate.py")
    assert not at.exception
    at.text_area(key="gen_prompt").input(PROMPT)
    set_widgets(at, "iv_", heads=["0.1", "2.3"], mlp=[1], attn=[2], layer=[3], new_tokens=6)
    at.button(key="iv_go").click()
    at.run()
    assert not at.exception and not at.error, texts(at.error)
    iv = from_flags(["head:0.1", "head:2.3", "attn:2", "mlp:1", "layer:3"])
    ref = compare_generation(default_lm, PROMPT, SamplingConfig(max_new_tokens=6, greedy=True), iv)
    assert code(at)[-2:] == shown(ref.original.text, ref.intervened.text)
    table = at.dataframe[-1].value
    assert list(table["token"]) == [t.replace("\n", "↵").replace("\t", "⇥") for t in ref.tokens]
    np.testing.assert_allclose(table["change"], ref.delta, atol=1e-5)
    assert "head:0.1, head:2.3, attn:2, mlp:1, layer:3" in " ".join(texts(at.markdown))


def test_generate_panel_feature_ablation_and_steering_use_the_models_transcoders(default_lm):
    at = open_app("pages/generate.py")
    at.text_area(key="gen_prompt").input(PROMPT)
    set_widgets(at, "iv_", features="1.3", steer="2.5", strength=12.0, new_tokens=4, mode="mean", greedy=False)
    at.run()                                                     # the seed is enabled once greedy is off
    at.number_input(key="iv_seed").set_value(7)
    at.button(key="iv_go").click()
    at.run()
    assert not at.exception and not at.error, texts(at.error)
    ref = compare_generation(default_lm, PROMPT, SamplingConfig(max_new_tokens=4, greedy=False, seed=7),
                             from_flags(["feature:1.3:mean"], ["2.5=12"]))
    assert code(at)[-2] == shown(ref.original.text)[0]          # both sampled with seed 7
    assert code(at)[-1] == shown(ref.intervened.text)[0]
    assert "feature:1.3:mean, 2.5=12" in " ".join(texts(at.markdown))


@pytest.mark.parametrize("values, words", [({}, "Nothing to compare"), ({"features": "x"}, "Cannot read"),
                                           ({"steer": "9.1", "strength": 3.0}, "names layer 9")])
def test_generate_panel_bad_choices_are_one_error(default_lm, values, words):
    at = open_app("pages/generate.py")
    set_widgets(at, "iv_", **values)
    at.button(key="iv_go").click()
    at.run()
    assert not at.exception
    assert len(at.error) == 1 and words in at.error[0].value


# -- Attention ---------------------------------------------------------------------------------------------------

def test_attention_grid_enlarged_head_and_ablation(default_lm):
    at = open_app("pages/attention.py")
    assert not at.exception
    at.text_area(key="att_prompt").input(PROMPT)
    at.button(key="att_go").click()
    at.run()
    assert not at.exception and not at.error
    tokens, pats = attention_patterns(default_lm, PROMPT)
    L, H, T, _ = pats.shape
    (grid_spec, grid), (_, head) = vega_data(at)
    assert "facet" in grid_spec and len(grid[["layer", "head"]].drop_duplicates()) == L * H
    row = grid[(grid.layer == 1) & (grid["head"] == 2) & (grid["query"] == 3) & (grid["key"] == 1)]
    assert float(row.weight.iloc[0]) == pytest.approx(float(pats[1, 2, 3, 1]), abs=1e-6)
    at.selectbox(key="att_layer").set_value(2)
    at.selectbox(key="att_head").set_value(1)
    at.run()
    assert "Layer 2, head 1" in texts(at.subheader)
    _, head = vega_data(at)[1]
    np.testing.assert_allclose(np.sort(head.weight.to_numpy()), np.sort(pats[2, 1].ravel()), atol=1e-6)
    at.button(key="att_ablate").click()
    at.run()
    assert not at.exception and "2.1" in " ".join(texts(at.info))
    _, ablated = attention_patterns(default_lm, PROMPT, prepare(default_lm, from_flags(["head:2.1"])))
    _, head = vega_data(at)[1]
    np.testing.assert_allclose(np.sort(head.weight.to_numpy()), np.sort(ablated[2, 1].ravel()), atol=1e-6)
    if L > 3:   # a later layer's patterns change once head 2.1 writes nothing
        assert not np.allclose(ablated[3], pats[3])
    at.button(key="att_generate").click()
    at.run()
    assert not at.exception
    assert at.multiselect(key="iv_heads").value == ["2.1"]           # Generate opened with the head picked


# -- Patching ---------------------------------------------------------------------------------------------------

def test_patching_page_heatmap_is_the_sweep(default_lm):
    at = open_app("pages/patching.py")
    assert not at.exception
    at.button(key="patch_go").click()
    at.run()
    assert not at.exception and not at.error, texts(at.error)
    ref = patching_sweep(default_lm, PATCH_CLEAN, PATCH_CORRUPTED)
    (_, data), = vega_data(at)
    L, T = ref.restored.shape
    assert len(data) == L * T
    grid = data["logit difference"].to_numpy().reshape(L, T)
    np.testing.assert_allclose(grid, ref.logit_diff, atol=1e-4)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Logit difference, clean"] == f"{ref.clean_diff:.3f}"


def test_patching_page_with_chosen_tokens_and_point(default_lm):
    at = open_app("pages/patching.py")
    at.selectbox(key="patch_point").set_value("resid_post")
    at.text_input(key="patch_answer").input(" Romeo")
    at.text_input(key="patch_wrong").input(" Juliet")
    at.button(key="patch_go").click()
    at.run()
    assert not at.exception and not at.error, texts(at.error)
    ids = [default_lm.tokenizer.encode(t)[0] for t in (" Romeo", " Juliet")]
    ref = patching_sweep(default_lm, PATCH_CLEAN, PATCH_CORRUPTED, point="resid_post", answer=ids[0], wrong=ids[1])
    (_, data), = vega_data(at)
    np.testing.assert_allclose(data["logit difference"].to_numpy().reshape(ref.logit_diff.shape), ref.logit_diff,
                               atol=1e-4)
    assert data["restored"].to_numpy().reshape(ref.restored.shape)[-1, -1] == pytest.approx(1.0, abs=1e-4)
    at.text_input(key="patch_answer").input(" Romeo and")
    at.button(key="patch_go").click()
    at.run()
    assert len(at.error) == 1 and "give one token" in at.error[0].value


def test_patching_page_refuses_prompts_of_different_lengths(default_lm):
    at = open_app("pages/patching.py")
    at.text_input(key="patch_corrupted").input("A much shorter one")
    at.button(key="patch_go").click()
    at.run()
    assert not at.exception and len(at.error) == 1 and "same number of tokens" in at.error[0].value


# -- Consensus ----------------------------------------------------------------------------------------------------

def test_consensus_run_skips_chosen_mlps_ablates_heads_and_records_them(default_lm):
    from core.consensus.engine import ConsensusConfig, run_consensus

    at = open_app("pages/consensus.py")
    at.text_area(key="cons_prompts").input("ROMEO: But soft!")
    set_widgets(at, "", cons_iterations=2, cons_iv_mlp=[1], cons_iv_heads=["0.2"])
    at.button(key="cons_run").click()
    at.run()
    assert not at.exception and not at.error, texts(at.error)
    record = at.session_state["cons_runs"][-1]
    assert record["settings"]["interventions"] == ("mlp:1", "head:0.2")
    assert record["result"].config.interventions == ("mlp:1", "head:0.2")
    assert "mlp:1 head:0.2" in record["label"]
    ref = run_consensus(default_lm, ["ROMEO: But soft!"], ConsensusConfig(iterations=2, interventions=("mlp:1", "head:0.2")))
    np.testing.assert_allclose(record["result"].metric, ref.metric, atol=1e-6)


# -- Features -------------------------------------------------------------------------------------------------------

def test_feature_card_try_it_and_steer_with_it(default_lm):
    from core.interp.transcoder import find_transcoder_set

    at = open_app("pages/features.py")
    assert not at.exception, at.exception
    layer, feature = at.selectbox(key="feat_layer").value, int(at.number_input(key="feat_feature").value)
    at.text_input(key="feat_try_text").input(PROMPT)
    at.button(key="feat_try_go").click()
    at.run()
    assert not at.exception and not at.error, texts(at.error)
    tokens, acts = feature_activations(default_lm, find_transcoder_set(default_lm), layer, feature, PROMPT)
    body = [h.proto.body for h in at.get("html") if "feature-try" in h.proto.body][0]
    assert body.count("title=\"activation ") == len(tokens)
    for a in acts:
        assert f"activation {a:.4g}" in body
    at.button(key="feat_steer").click()
    at.run()
    assert not at.exception
    assert at.text_input(key="iv_steer").value == f"{layer}.{feature}"
    assert at.slider(key="iv_strength").value == STEER_DEFAULT
