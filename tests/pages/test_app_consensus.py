"""The Consensus page, driven through app.py with AppTest (see app_harness.py), on the shipped
untrained default model (4 layers, width 256)."""
from __future__ import annotations

import io
import json
import time
from contextlib import contextmanager

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from app_harness import open_app, stop_at_first_progress, texts
from streamlit.elements.progress import ProgressMixin
from streamlit.runtime.scriptrunner_utils.script_run_context import get_script_run_ctx

from core.consensus.engine import ConsensusConfig, Progress, Started, consensus_stream, run_consensus
from core.models.loading import load_model
from core.consensus.simulation import SimulationConfig, run_simulation

PAGE = "pages/consensus.py"
PROMPTS = ["The quick brown fox jumps over the lazy dog.", "ROMEO: But soft!"]


@pytest.fixture(scope="module")
def lm():
    return load_model("default")


def npy(files: dict[str, bytes], name: str) -> np.ndarray:
    return np.load(io.BytesIO(files[name]), allow_pickle=False)


def charts(at) -> list[tuple[dict, pd.DataFrame]]:
    """Every altair chart on the page: its Vega-Lite spec and its data."""
    out = []
    for el in at.get("vega_lite_chart"):
        spec = json.loads(el.proto.spec)
        data = pa.ipc.open_stream(el.proto.datasets[0].data.data).read_all().to_pandas()
        out.append((spec, data))
    return out


def page(mode: str | None = None):
    at = open_app(PAGE)
    if mode is not None:
        at.radio(key="cons_mode").set_value(mode).run()
    return at


def clean(at) -> None:
    assert not at.exception, at.exception
    assert not at.error, texts(at.error)


def run(at):
    at.button(key="cons_run").click().run()
    return at


# -- consensus runs ------------------------------------------------------------------------------

def test_typed_prompts_run_shows_chart_heatmap_decodings_and_downloads(lm, downloads):
    at = page()
    at.text_area(key="cons_prompts").input("\n".join(PROMPTS))
    at.number_input(key="cons_iterations").set_value(2)
    at.toggle(key="cons_matrix").set_value(True)
    at.text_input(key="cons_decode").input("0,1")
    run(at)
    clean(at)
    expected = run_consensus(lm, PROMPTS, ConsensusConfig(iterations=2, matrix=True, decode_iterations=(0, 1)))
    B, P = expected.metric.shape
    assert (B, P) == (2, 9)  # 2 iterations x 4 blocks + the embeddings

    (spec, data), (hspec, heat), (ospec, over) = charts(at)  # the run, the heatmap, the overlay
    assert spec["encoding"]["x"]["title"] == "layer-step" and spec["mark"]["type"] == "line"
    assert data["prompt"].nunique() == 2 and len(data) == B * P
    got = data.pivot(index="prompt", columns="step", values="value").to_numpy()
    np.testing.assert_allclose(got, expected.metric, atol=1e-6)
    # the heatmap starts on the last layer-step of prompt 0: its T x T cosines
    assert at.select_slider(key="cons_heat_step").value == 8
    T0 = len(expected.token_ids[0])
    assert hspec["mark"]["type"] == "rect" and len(heat) == T0 * T0
    np.testing.assert_allclose(heat.pivot(index="i", columns="j", values="cos").to_numpy(),
                               expected.matrix[0, :T0, :T0, -1], atol=1e-6)
    at.select_slider(key="cons_heat_step").set_value(0).run()
    heat0 = charts(at)[1][1]
    np.testing.assert_allclose(heat0.pivot(index="i", columns="j", values="cos").to_numpy(),
                               expected.matrix[0, :T0, :T0, 0], atol=1e-6)
    assert set(over["run"]) == {"default N=2"}

    table = at.dataframe[0].value
    assert list(table.columns) == ["prompt", "after iteration 0", "after iteration 1"]
    assert table["after iteration 1"].tolist() == expected.decodings[1]

    labels = [d.label for d in at.download_button]
    assert labels[:6] == ["Metric .npy", "Hidden .npy", "Eplot .npy", "Matrices .npy", "CSV", "Chart (PNG)"]
    np.testing.assert_allclose(npy(downloads, "consensus.npy"), expected.metric, atol=1e-6)
    assert npy(downloads, "consensus.npy").dtype == np.float32
    T = max(len(t) for t in expected.token_ids)
    assert npy(downloads, "consensus_hidden.npy").shape == (2, T, 256)
    assert npy(downloads, "consensus_eplot.npy").shape == (2, P - 1, 2)
    assert npy(downloads, "consensus_matrix.npy").shape == (2, T, T, P - 1)
    csv = pd.read_csv(io.BytesIO(downloads["consensus.csv"]))
    assert list(csv.columns) == ["prompt", "prompt_text", "step", "metric", "mean_cosine", "mean_dot",
                                 "effective_rank", "centroid_distance"]
    assert len(csv) == B * P
    np.testing.assert_allclose(csv["mean_dot"].to_numpy().reshape(B, P), expected.mean_dot, rtol=1e-5)
    assert downloads["consensus_chart.png"][:8] == b"\x89PNG\r\n\x1a\n"


def test_random_prompts_run(lm):
    at = page()
    at.radio(key="cons_source").set_value("random").run()
    at.number_input(key="cons_rand_n").set_value(3)
    at.number_input(key="cons_rand_len").set_value(5)
    at.number_input(key="cons_iterations").set_value(1)
    run(at)
    clean(at)
    assert at.selectbox(key="cons_show").value == "default N=1 random 3x5 seed=42"
    data = charts(at)[0][1]
    assert data["prompt"].nunique() == 3 and len(data) == 3 * 5


def test_skip_mlp_and_overlay_of_two_runs(lm):
    at = page()
    at.text_area(key="cons_prompts").input(PROMPTS[0])
    at.number_input(key="cons_iterations").set_value(2)
    run(at)
    at.toggle(key="cons_noff").set_value(True)
    run(at)
    clean(at)
    assert at.multiselect(key="cons_overlay").value == ["default N=2", "default N=2 noff"]
    over = charts(at)[-1][1]
    assert set(over["run"]) == {"default N=2", "default N=2 noff"}
    with_mlp = over[over["run"] == "default N=2"]["value"].to_numpy()
    without = over[over["run"] == "default N=2 noff"]["value"].to_numpy()
    expected = run_consensus(lm, PROMPTS[:1], ConsensusConfig(iterations=2, skip_mlp=True)).metric[0]
    np.testing.assert_allclose(without, expected, atol=1e-6)
    assert not np.allclose(with_mlp, without)
    # the same settings again get their own label; clearing empties the list
    run(at)
    assert at.selectbox(key="cons_show").options[-1] == "default N=2 noff #2"
    at.button(key="cons_clear").click().run()
    clean(at)
    assert not at.get("vega_lite_chart") and not at.download_button


# -- consensus decoding ------------------------------------------------------------------------

def test_consensus_decoding_mode(downloads):
    at = page("Consensus decoding")
    at.text_area(key="cons_prompts").input(PROMPTS[1])
    at.number_input(key="cons_iterations").set_value(1)
    at.number_input(key="cons_new_tokens").set_value(3)
    run(at)
    clean(at)
    shown = at.code[0].value
    assert shown.startswith(PROMPTS[1]) and len(shown) > len(PROMPTS[1])
    spec, data = charts(at)[0]
    assert spec["encoding"]["color"]["field"] == "token" and data["index"].nunique() == 3
    assert len(data) == 3 * 5  # 3 tokens, each a 1-iteration run of 4 blocks + the embeddings
    assert [d.label for d in at.download_button] == ["Texts .npy", "Traces .npy", "CSV", "Chart (PNG)"]
    assert npy(downloads, "consensus.npy").tolist() == [shown]
    assert npy(downloads, "consensus_diag.npy").shape == (3, 5)
    assert "decode K=3 top-p=0.8" in at.selectbox(key="cons_show").value


# -- simulation --------------------------------------------------------------------------------

def test_simulation_mode_and_overlay_with_a_model_run(downloads):
    at = page("Simulation")
    at.number_input(key="sim_tokens").set_value(6)
    at.number_input(key="sim_dim").set_value(3)
    at.number_input(key="sim_steps").set_value(40)
    at.number_input(key="sim_inits").set_value(2)
    at.toggle(key="sim_matrix").set_value(True)
    run(at)
    clean(at)
    expected = run_simulation(SimulationConfig(tokens=6, dim=3, steps=40, batch=2, matrix=True))
    spec, data = charts(at)[0]
    assert spec["encoding"]["x"]["title"] == "integration step"
    np.testing.assert_allclose(data.pivot(index="prompt", columns="step", values="value").to_numpy(),
                               expected.metric, atol=1e-6)
    assert npy(downloads, "consensus_matrix.npy").shape == (2, 6, 6, 40)
    assert npy(downloads, "consensus_hidden.npy").shape == (2, 6, 3)
    sim_label = at.selectbox(key="cons_show").value
    assert sim_label.startswith("sim identity n=6 d=3")

    at.radio(key="cons_mode").set_value("Consensus run").run()
    at.number_input(key="cons_iterations").set_value(1)
    run(at)
    clean(at)
    over = charts(at)[-1][1]
    assert set(over["run"]) == {sim_label, "default N=1"}


def test_simulation_with_a_layer_of_the_model():
    at = page("Simulation")
    at.selectbox(key="sim_qkv").set_value("layer").run()
    at.number_input(key="sim_layer").set_value(1)
    at.selectbox(key="sim_head").set_value(0)
    at.number_input(key="sim_tokens").set_value(5)
    at.number_input(key="sim_steps").set_value(5)
    run(at)
    clean(at)
    assert any("block 1 head 0 of default" in c for c in texts(at.caption))
    assert "d=256" in at.selectbox(key="cons_show").value


# -- errors, stop ------------------------------------------------------------------------------

def test_bad_inputs_show_errors_not_exceptions():
    at = page()
    at.text_area(key="cons_prompts").input("   \n  ")
    run(at)
    assert not at.exception
    assert any("No prompts" in e for e in texts(at.error))
    at.text_area(key="cons_prompts").input("word " * 400)
    run(at)
    assert not at.exception
    assert any("beyond the model's context of 256" in e for e in texts(at.error))
    at.text_input(key="cons_decode").input("0,x")
    at.text_area(key="cons_prompts").input("fine")
    run(at)
    assert any("comma-separated" in e for e in texts(at.error))
    assert not at.get("vega_lite_chart")  # nothing ran

    at.radio(key="cons_mode").set_value("Simulation").run()
    at.number_input(key="sim_dt").set_value(0.0)
    run(at)
    assert not at.exception
    assert any("step size dt" in e for e in texts(at.error))


def test_memory_estimate_offers_record_every():
    at = page()
    at.text_area(key="cons_prompts").input(PROMPTS[0])
    at.number_input(key="cons_iterations").set_value(10_000_000)
    at.toggle(key="cons_matrix").set_value(True)
    run(at)
    assert not at.exception
    (message,) = texts(at.error)
    assert "memory budget" in message
    offer = at.button(key="cons_offer")
    k = int(offer.label.split()[2].split("-")[0])
    assert f"--record-every {k}" in message
    offer.click().run()
    assert at.number_input(key="cons_record_every").value == k
    assert not at.error and not at.get("vega_lite_chart")  # set, not started


def test_stopped_run_stays_on_screen_and_downloadable(lm, downloads):
    """Stop reruns the script mid-loop; the run's live record (set at Started) is archived as stopped."""
    events = consensus_stream(lm, PROMPTS[:1], ConsensusConfig(iterations=5, max_events=5))
    started = next(events)
    assert isinstance(started, Started)
    for ev in events:
        if isinstance(ev, Progress):
            break
    events.close()
    live = started.result
    done = live.columns_done
    assert 0 < done < len(live.steps)
    record = dict(label="default N=5", kind="run", status="running", result=live, error=None, tokens=None,
                  settings={}, new_texts=[[]])
    at = open_app(PAGE, state={"cons_live": record})
    clean(at)
    assert any(w.startswith("Stopped after") for w in texts(at.warning))
    assert npy(downloads, "consensus.npy").shape == (1, done)
    np.testing.assert_array_equal(npy(downloads, "consensus.npy"), live.metric[:, :done])
    assert len(charts(at)[0][1]) == done
    assert "cons_live" not in at.session_state


def test_stop_mid_run_archives_what_was_computed(downloads):
    """Pressing Stop makes Streamlit raise inside the page's next call into Streamlit; here the
    progress bar's first update raises the same exception, mid-run."""
    at = page()
    at.text_area(key="cons_prompts").input(PROMPTS[0])
    at.number_input(key="cons_iterations").set_value(50)  # 200 layer-steps, an event after each
    with stop_at_first_progress():
        run(at)
    at.run()
    clean(at)
    (record,) = at.session_state["cons_runs"]
    assert record["status"] == "stopped" and "cons_live" not in at.session_state
    result = record["result"]
    assert result.steps_done.tolist() == [1] and result.metric.shape == (1, 2)  # trimmed at the stop
    assert any(w.startswith("Stopped after 1 of 200 layer-steps") for w in texts(at.warning))
    np.testing.assert_array_equal(npy(downloads, "consensus.npy"), result.metric)
    assert np.isfinite(result.metric).all()


@contextmanager
def stop_pressed_mid_run(at_update: int = 1):
    """Press Stop at the progress bar's ``at_update``-th update, the way a server does: the script
    run's request becomes STOP, so that update and every later call into Streamlit raise
    StopException, session-state access included (``stop_at_first_progress`` raises once only,
    which hid a page that waited 20 s for a stopped run to hand its result over)."""
    original, seen = ProgressMixin.progress, []

    def press_stop(self, value, text=None, **kw):
        if value > 0:
            seen.append(value)
            if len(seen) == at_update:
                get_script_run_ctx().script_requests.request_stop()
        return original(self, value, text, **kw)

    ProgressMixin.progress = press_stop
    try:
        yield
    finally:
        ProgressMixin.progress = original


@pytest.mark.parametrize("mode", [None, "Consensus decoding", "Simulation"])
def test_stop_answers_at_once_and_keeps_the_partial_run(mode):
    """After a real Stop the next script run shows the stopped run at once: it never waits on the
    stopped thread (it used to wait 20 s: the loop's clean-up touched session state, which raises
    after a Stop, so it never said it was done)."""
    at = page(mode)
    if mode == "Consensus decoding":
        at.number_input(key="cons_iterations").set_value(2)
        at.number_input(key="cons_new_tokens").set_value(50)
    elif mode == "Simulation":
        at.number_input(key="sim_steps").set_value(1_000_000)
    else:
        at.number_input(key="cons_iterations").set_value(1_000_000)
    with stop_pressed_mid_run(at_update=2):
        run(at)
    live = at.session_state["cons_live"]
    assert live["done"].is_set()  # the stopped thread closed its engine and said so
    t0 = time.monotonic()
    at.run()
    assert time.monotonic() - t0 < 5  # a whole script run on a shared CPU; it waited 20 s
    clean(at)
    (record,) = at.session_state["cons_runs"]
    assert record["status"] == "stopped" and "cons_live" not in at.session_state
    assert any(w.startswith("Stopped after") for w in texts(at.warning))
    assert set(record) == {"label", "kind", "status", "result", "error", "tokens", "settings", "new_texts"}


def test_out_of_memory_mid_run_keeps_the_partial_run(monkeypatch, downloads):
    import torch

    import core.consensus.engine as engine

    real_block, calls = engine._block, []

    def failing_block(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_block(*args, **kwargs)

    at = page()
    at.text_area(key="cons_prompts").input(PROMPTS[0])
    at.number_input(key="cons_iterations").set_value(3)
    monkeypatch.setattr(engine, "_block", failing_block)
    run(at)
    assert not at.exception
    (message,) = texts(at.error)
    assert "ran out of memory" in message and "What was computed before is kept" in message
    assert any(w.startswith("Failed after 2 of 12 layer-steps") for w in texts(at.warning))
    assert npy(downloads, "consensus.npy").shape == (1, 3)  # the embeddings and two blocks
    assert np.isfinite(npy(downloads, "consensus.npy")).all()
