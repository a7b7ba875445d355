"""Every workbench on a family other than GPT-2: a tiny random Llama (grouped-query attention,
rotary positions, RMSNorm, SwiGLU), driven through app.py with AppTest. Each page's output is
compared with the engine's on the same model, so the page is checked to show what the engine
computed for that family."""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pytest

from app_harness import clean, code, described_feature_model, no_exception, open_app, set_widgets, shown, texts

from core.consensus.engine import ConsensusConfig, DecodeConfig, consensus_decode, run_consensus
from core.consensus.simulation import SimulationConfig, run_simulation
from core.generation.autoregressive import SamplingConfig, generate
from core.models.loading import load_model
from pages.parts.consensus_charts import visible
from tests.families_kit import family_dir

PROMPT = "ROMEO: But soft, what light"
TEXT = ("ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. "
        "JULIET: O Romeo, Romeo, wherefore art thou Romeo? Deny thy father and refuse thy name. ")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return family_dir(tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def llama(llama_dir):
    return load_model(str(llama_dir))


def _open(page: str, folder: Path, **state):
    at = open_app(page, state={"model_spec": str(folder), **state})
    no_exception(at)
    return at


# -- Generate --------------------------------------------------------------------------------------

def test_generate_on_a_llama_greedy_sampled_and_beams_with_logprobs(llama_dir, llama):
    at = _open("pages/generate.py", llama_dir)
    assert any("llama" in c for c in texts(at.sidebar.caption) + texts(at.sidebar.markdown))
    at.toggle(key="gen_compare").set_value(True).run()
    set_widgets(at, "gen_A_", greedy=True, max_new_tokens=6, n_alternatives=3)
    set_widgets(at, "gen_B_", max_new_tokens=6, seed=7, temperature=0.8, top_k=40, top_p=0.9, min_p=0.05,
                repetition_penalty=1.3)
    at.text_area(key="gen_prompt").input(PROMPT)
    at.button(key="gen_go").click().run()
    clean(at)
    a = generate(llama, PROMPT, SamplingConfig(greedy=True, max_new_tokens=6, n_alternatives=3))
    b = generate(llama, PROMPT, SamplingConfig(max_new_tokens=6, seed=7, temperature=0.8, top_k=40, top_p=0.9,
                                               min_p=0.05, repetition_penalty=1.3))
    assert code(at) == shown(PROMPT + a.completion, PROMPT + b.completion)
    (strip,) = [e for e in at.get("bidi_component") if "gen_A_strip_" in e.proto.id]
    generated = [e for e in json.loads(strip.proto.json)["tokens"] if not e["prompt"]]
    for entry, t in zip(generated, a.tokens, strict=True):   # each token's probability, as the engine computed it
        assert f"p = {t.prob:.4g}" in entry["tip"] and f"id {t.token_id}" in entry["tip"]
    at.session_state["gen_A_inspect_1"] = generated[2]["i"]   # what a click on the third new token stores
    at.run()
    table = at.dataframe[0].value
    assert table["id"].tolist()[:3] == [alt[0] for alt in a.tokens[2].alternatives]

    at.toggle(key="gen_compare").set_value(False).run()
    set_widgets(at, "gen_A_", greedy=False, num_beams=3)
    at.run()
    set_widgets(at, "gen_A_", max_new_tokens=5)
    at.button(key="gen_go").click().run()
    clean(at)
    beams = generate(llama, PROMPT, SamplingConfig(num_beams=3, max_new_tokens=5, n_alternatives=3))
    assert code(at) == shown(PROMPT + beams.completion)
    assert any("beam search, 3 beams" in c for c in texts(at.caption))


# -- Consensus -------------------------------------------------------------------------------------

def _charts(at):
    import json

    import pyarrow as pa

    out = []
    for el in at.get("vega_lite_chart"):
        spec = json.loads(el.proto.spec)
        out.append((spec, pa.ipc.open_stream(el.proto.datasets[0].data.data).read_all().to_pandas()))
    return out


@pytest.mark.parametrize("reinit,noff", [("none", False), ("once", True), ("iteration", False), ("block", False)])
def test_consensus_on_a_llama_every_reinit_mode_and_noff(llama_dir, llama, reinit, noff):
    at = _open("pages/consensus.py", llama_dir)
    at.text_area(key="cons_prompts").input(PROMPT)
    set_widgets(at, "", cons_iterations=2, cons_reinit=reinit, cons_noff=noff, cons_decode="0,1")
    at.button(key="cons_run").click().run()
    clean(at)
    expected = run_consensus(llama, [PROMPT], ConsensusConfig(iterations=2, reinit=reinit, skip_mlp=noff,
                                                              decode_iterations=(0, 1)))
    spec, data = _charts(at)[0]
    got = data.pivot(index="prompt", columns="step", values="value").to_numpy()
    np.testing.assert_allclose(got, expected.metric, atol=1e-6)
    assert got.shape == (1, 2 * llama.stack.n_layer + 1)
    table = at.dataframe[0].value   # the logit lens after each iteration
    assert table["after iteration 1"].tolist() == [visible(t) for t in expected.lens_tokens[1][0]]  # per position
    assert [w.value for w in at.dataframe] and not at.error


def test_consensus_decoding_on_a_llama(llama_dir, llama):
    at = _open("pages/consensus.py", llama_dir)
    at.radio(key="cons_mode").set_value("Consensus decoding").run()
    at.text_area(key="cons_prompts").input("ROMEO:")
    set_widgets(at, "", cons_iterations=1, cons_new_tokens=3)
    at.button(key="cons_run").click().run()
    clean(at)
    expected = consensus_decode(llama, ["ROMEO:"], ConsensusConfig(iterations=1), DecodeConfig(new_tokens=3))
    assert at.code[0].value == expected.texts[0].rstrip("\n")


@pytest.mark.parametrize("head", ["all", 3])
def test_simulation_with_q_k_v_from_a_llama_layer_with_shared_kv_heads(llama_dir, llama, head):
    at = _open("pages/consensus.py", llama_dir)
    at.radio(key="cons_mode").set_value("Simulation").run()
    at.selectbox(key="sim_qkv").set_value("layer").run()
    at.number_input(key="sim_layer").set_value(1)
    at.selectbox(key="sim_head").set_value(head)
    set_widgets(at, "", sim_tokens=5, sim_steps=6, sim_inits=2)
    at.button(key="cons_run").click().run()
    clean(at)
    spec = "layer:1" if head == "all" else f"layer:1:{head}"
    expected = run_simulation(SimulationConfig(qkv=spec, tokens=5, steps=6, batch=2), lm=llama)
    data = _charts(at)[0][1]
    np.testing.assert_allclose(data.pivot(index="prompt", columns="step", values="value").to_numpy(),
                               expected.metric, atol=1e-6)
    assert any("rotary positions" in c for c in texts(at.caption))
    assert f"d={llama.stack.d_model}" in at.selectbox(key="cons_show").value


# -- Features / transcoders ------------------------------------------------------------------------

def test_features_train_collect_describe_and_explain_on_a_llama(llama_dir, env, tmp_path_factory):
    from core.interp import (BuiltinExplainer, FeatureStore, load_transcoder_set, run_explain_completion,
                             store_path)
    from pages.parts.features_card import md_escape

    model_dir, set_dir = described_feature_model(tmp_path_factory.mktemp("llama-features"), llama_dir, [TEXT * 8] * 3,
                                                 steps=30, n_tokens=2048)
    at = _open("pages/features.py", model_dir)
    clean(at)
    assert at.selectbox(key="feat_layer").options == [f"Layer {i}" for i in range(3)]
    with FeatureStore(store_path(set_dir), readonly=True) as store:
        first = store.features(0, order_by="score")[0].feature  # the page opens on the best-explained
        card = store.feature(0, first)
    assert at.number_input(key="feat_feature").value == first
    promoted = [d.value for d in at.dataframe if list(d.value.columns) == ["token", "effect"]]
    assert promoted[0]["effect"].tolist() == pytest.approx([v for _, v in card.stats.promoted])
    assert all(v != 0 for _, v in card.stats.promoted)

    at = _open("pages/features.py", model_dir, feat_section="Explain a completion")
    at.text_area(key="feat_x_prompt").input("ROMEO:")
    at.number_input(key="feat_x_max_new").set_value(5)
    at.button(key="feat_x_run").click().run()
    clean(at)
    lm = load_model(str(model_dir))
    with FeatureStore(store_path(set_dir), readonly=True) as store:
        expected = run_explain_completion(lm, load_transcoder_set(set_dir), "ROMEO:", store=store,
                                          explainer=BuiltinExplainer(),
                                          settings=SamplingConfig(max_new_tokens=5, greedy=True, n_alternatives=0))
    assert md_escape(expected.total_description) in texts(at.markdown)
    assert any(html.escape(expected.completion) in b.proto.body for b in at.get("html"))
