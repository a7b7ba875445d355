"""The Consensus page, driven through app.py with AppTest (see app_harness.py), on the shipped
untrained default model (4 layers, width 256).

At the end every number input goes to its minimum and its maximum, text goes in empty, blank, very
long and in odd Unicode, and Run is pressed: the page shows no exception, an impossible input gets
one st.error saying what to change, and the runs already on screen stay. Where a maximum is long by
nature (10 million iterations or simulation steps) the run is started and stopped."""
from __future__ import annotations

import io
import json
import re
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from app_harness import (LONG, ODD, TEXTS, clean, limits, no_exception, one_error, open_app, set_widgets,
                         stop_at_first_progress, texts)
from streamlit.elements.progress import ProgressMixin
from streamlit.runtime.scriptrunner_utils.script_run_context import get_script_run_ctx

from core.consensus.engine import ConsensusConfig, Progress, Started, consensus_stream, run_consensus
from core.consensus.simulation import SimulationConfig, run_simulation
from core.errors import LabError
from pages.parts.consensus_charts import visible

PAGE = "pages/consensus.py"
PROMPTS = ["The quick brown fox jumps over the lazy dog.", "ROMEO: But soft!"]


@pytest.fixture(autouse=True)
def runs_dir(tmp_path_factory, monkeypatch) -> Path:
    """Every run the page keeps goes to a runs folder of the test's own."""
    root = tmp_path_factory.mktemp("runs")
    monkeypatch.setenv("GPTLAB_RUNS", str(root))
    return root


def npy(files: dict[str, bytes], name: str) -> np.ndarray:
    return np.load(io.BytesIO(files[name]), allow_pickle=False)


def chart_specs(at) -> list[tuple[dict, dict[str, pd.DataFrame]]]:
    """Every altair chart on the page: its whole Vega-Lite spec and its datasets by name."""
    out = []
    for el in at.get("vega_lite_chart"):
        sets = {d.name: pa.ipc.open_stream(d.data.data).read_all().to_pandas() for d in el.proto.datasets}
        out.append((json.loads(el.proto.spec), sets))
    return out


def layer_data(spec: dict, sets: dict[str, pd.DataFrame], layer: dict) -> pd.DataFrame:
    return sets[(layer.get("data") or spec.get("data"))["name"]]


def charts(at) -> list[tuple[dict, pd.DataFrame]]:
    """Every altair chart on the page: its first layer's spec (the lines, or the heatmap's cells) and
    that layer's data."""
    out = []
    for spec, sets in chart_specs(at):
        first = spec["layer"][0] if "layer" in spec else spec
        out.append((first, layer_data(spec, sets, first)))
    return out


def page(mode: str | None = None, model: Path | None = None):
    at = open_app(PAGE, state={"model_spec": str(model)} if model else None)
    if mode is not None:
        at.radio(key="cons_mode").set_value(mode).run()
    return at


def run(at, **values):
    """Set controls (by full key) and press Run, in one script run as a browser sends them."""
    set_widgets(at, "", **values)
    at.button(key="cons_run").click()
    return at.run()


# -- consensus runs ------------------------------------------------------------------------------

def test_typed_prompts_run_shows_chart_heatmap_decodings_and_downloads(default_lm, downloads):
    at = page()
    at.text_area(key="cons_prompts").input("\n".join(PROMPTS))
    at.number_input(key="cons_iterations").set_value(2)
    at.toggle(key="cons_matrix").set_value(True)
    at.text_input(key="cons_decode").input("0,1")
    run(at)
    clean(at)
    expected = run_consensus(default_lm, PROMPTS, ConsensusConfig(iterations=2, matrix=True, decode_iterations=(0, 1)))
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

    # the logit lens per input position, aligned with the prompt's tokens, whitespace visible
    table = at.dataframe[0].value
    assert list(table.columns) == ["position", "input token", "after iteration 0", "after iteration 1"]
    assert table["position"].tolist() == list(range(T0))
    assert table["input token"].tolist() == [visible(default_lm.tokenizer.decode([t])) for t in expected.token_ids[0]]
    assert table["after iteration 1"].tolist() == [visible(t) for t in expected.lens_tokens[1][0]]
    at.selectbox(key="cons_lens_prompt").set_value(1).run()
    table = at.dataframe[0].value
    assert len(table) == len(expected.token_ids[1])
    assert table["after iteration 0"].tolist() == [visible(t) for t in expected.lens_tokens[0][1]]

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


def test_random_prompts_run(default_lm):
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


def test_skip_mlp_and_overlay_of_two_runs(default_lm):
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
    with_mlp = over[over["run"] == "default N=2"]["mean"].to_numpy()  # one prompt: its mean is its line
    without = over[over["run"] == "default N=2 noff"]["mean"].to_numpy()
    expected = run_consensus(default_lm, PROMPTS[:1], ConsensusConfig(iterations=2, skip_mlp=True)).metric[0]
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


def test_stopped_run_stays_on_screen_and_downloadable(default_lm, downloads):
    """Stop reruns the script mid-loop; the run's live record (set at Started) is archived as stopped."""
    events = consensus_stream(default_lm, PROMPTS[:1], ConsensusConfig(iterations=5, max_events=5))
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
    assert set(record) == {"label", "kind", "status", "result", "error", "tokens", "settings", "new_texts", "run"}


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


# -- every control at its extremes ------------------------------------------------------------------

def runs_in(at) -> list[dict]:
    return at.session_state["cons_runs"] if "cons_runs" in at.session_state else []


def test_consensus_widget_limits_are_the_ones_tested():
    at = page()
    at.radio(key="cons_source").set_value("random").run()
    found = {w.key: limits(w) for w in at.number_input}
    assert found == {"cons_rand_n": (1, 1024), "cons_rand_len": (1, 100_000), "cons_iterations": (1, 10_000_000),
                     "cons_seed": (0, 2**31 - 1), "cons_record_every": (1, 10_000_000)}
    at.radio(key="cons_mode").set_value("Consensus decoding").run()
    found = {w.key: limits(w) for w in [*at.number_input, *at.slider] if w.key.startswith("cons_")}
    assert found["cons_new_tokens"] == (1, 100_000) and found["cons_temperature"] == (0.0, 10.0)
    assert found["cons_top_p"] == (0.01, 1.0)
    at.radio(key="cons_mode").set_value("Simulation").run()
    found = {w.key: limits(w) for w in at.number_input}
    assert found == {"sim_tokens": (2, 4096), "sim_dim": (2, 4096), "sim_dt": (0.0, 100.0),
                     "sim_beta": (-1000.0, 1000.0), "sim_steps": (1, 10_000_000), "sim_inits": (1, 1024),
                     "sim_seed": (0, 2**31 - 1), "sim_record_every": (1, 10_000_000)}


@pytest.mark.parametrize("name", list(TEXTS))
def test_consensus_prompt_text_extremes(name, downloads):
    """With the real vl-convert: a prompt holding a NUL used to abort the whole process when its
    chart was rendered to PNG for the download button."""
    at = page()
    run(at, cons_prompts=TEXTS[name], cons_iterations=1)
    if name in ("empty", "blank"):
        one_error(at, "No prompts")
        assert not runs_in(at)
    elif name == "long":
        one_error(at, "beyond the model's context of 256", "shorten it")
        assert not runs_in(at)
    else:
        clean(at)
        (record,) = runs_in(at)
        assert record["status"] == "finished" and record["result"].prompts == [ODD]
        assert downloads["consensus_chart.png"][:8] == b"\x89PNG\r\n\x1a\n"


def test_consensus_run_controls_at_their_extremes(fast_png):
    at = page()
    # every re-initialisation, at the smallest and the largest seed, one iteration each
    for reinit in ("none", "once", "iteration", "block"):
        for seed in (0, 2**31 - 1):
            run(at, cons_prompts="To be, or not to be", cons_iterations=1, cons_reinit=reinit, cons_seed=seed,
                     cons_record_every=1)
            clean(at)
    assert [r["status"] for r in runs_in(at)] == ["finished"] * 8
    # record every k at its maximum: the embeddings and the last layer-step only
    run(at, cons_reinit="none", cons_iterations=3, cons_record_every=10_000_000)
    clean(at)
    assert runs_in(at)[-1]["result"].steps.tolist() == [0, 12]
    # decode iterations: empty, junk (echoed short), out of range, odd unicode digits
    run(at, cons_decode="")
    clean(at)
    run(at, cons_decode="9" * 20_000 + "x")
    one_error(at, "comma-separated whole numbers like 0,4,9")
    run(at, cons_decode=ODD)
    one_error(at, "comma-separated whole numbers like 0,4,9")
    run(at, cons_decode="0,2,3")
    one_error(at, "outside 0..2")
    run(at, cons_decode=" \t")
    clean(at)


def test_consensus_random_prompts_at_their_extremes(fast_png):
    at = page()
    at.radio(key="cons_source").set_value("random").run()
    run(at, cons_rand_n=1024, cons_rand_len=100_000, cons_iterations=1)
    one_error(at, "exceed the model's context of 256 tokens", "ask for at most 256")
    assert not runs_in(at)
    run(at, cons_rand_n=1, cons_rand_len=1, cons_iterations=1)
    clean(at)
    run(at, cons_rand_n=1024, cons_rand_len=2, cons_iterations=1)
    clean(at)
    run(at, cons_rand_n=1, cons_rand_len=256, cons_iterations=1)
    clean(at)
    done = runs_in(at)
    assert [len(r["result"].prompts) for r in done] == [1, 1024, 1]
    assert [r["result"].lengths[0] for r in done] == [1, 2, 256]


# Characters in a chart's text that make vl-convert panic, which aborts the whole process (found here:
# a prompt holding a NUL took the server down when its chart was rendered for download).
VL_CONVERT_ABORTS_ON = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


@pytest.fixture
def fast_png(monkeypatch, downloads) -> list[str]:
    """Every download made as if clicked (see ``downloads``), with vl-convert's PNG rendering (about
    a second a chart) replaced by a check that the spec it would get holds nothing that makes it
    abort the process; the real renderer runs in the Unicode prompt test. Returns the specs seen,
    as JSON."""
    import vl_convert

    seen: list[str] = []

    def check(spec, scale=1, **kw):
        text = json.dumps(spec, ensure_ascii=False) if not isinstance(spec, str) else spec
        assert not VL_CONVERT_ABORTS_ON.search(text)
        seen.append(text)
        return b"\x89PNG\r\n\x1a\n"

    monkeypatch.setattr(vl_convert, "vegalite_to_png", check)
    return seen


def test_consensus_ten_million_iterations_start_and_stop(fast_png, tiny_gptlab_dir: Path):
    at = page(model=tiny_gptlab_dir)
    t0 = time.monotonic()
    with stop_at_first_progress():
        run(at, cons_prompts="To be, or not to be", cons_iterations=10_000_000, cons_record_every=10_000_000)
    at.run()
    clean(at)
    assert time.monotonic() - t0 < 60
    (record,) = runs_in(at)
    total = 10_000_000 * 2
    assert record["status"] == "stopped"
    done = int(record["result"].steps_done.max())
    assert 0 < done < total
    assert any(w.startswith(f"Stopped after {done:,} of {total:,} layer-steps") for w in texts(at.warning))


def test_consensus_decoding_controls_at_their_extremes(fast_png):
    at = page("Consensus decoding")
    run(at, cons_prompts="To be", cons_iterations=1, cons_new_tokens=100_000)
    one_error(at, "beyond the model's context of 256", "ask for fewer new tokens")
    run(at, cons_new_tokens=1, cons_top_p=0.01, cons_temperature=0.0)
    one_error(at, "temperature must be above 0")
    assert not runs_in(at)
    run(at, cons_new_tokens=1, cons_top_p=0.01, cons_temperature=10.0)
    clean(at)
    run(at, cons_new_tokens=2, cons_top_p=1.0, cons_temperature=0.05)
    clean(at)
    done = runs_in(at)
    assert [r["status"] for r in done] == ["finished", "finished"]
    assert [r["result"].tokens_done for r in done] == [1, 2]


def test_simulation_controls_at_their_extremes(fast_png):
    at = page("Simulation")
    small = dict(sim_tokens=3, sim_dim=2, sim_steps=3, sim_inits=1, sim_record_every=1, sim_dt=0.1, sim_beta=1.0)
    run(at, **{**small, "sim_dt": 0.0})
    one_error(at, "The step size dt must be a positive number")
    for integrator in ("euler", "rk4"):
        for qkv in ("identity", "random"):
            run(at, **small, sim_integrator=integrator, sim_qkv=qkv)
            clean(at)
    run(at, **{**small, "sim_tokens": 2, "sim_dim": 2, "sim_steps": 1, "sim_dt": 0.0001, "sim_beta": -1000.0,
                    "sim_seed": 0, "sim_causal": True})
    clean(at)
    run(at, **{**small, "sim_dt": 100.0, "sim_beta": 1000.0, "sim_seed": 2**31 - 1, "sim_matrix": True,
                    "sim_causal": False})
    clean(at)
    run(at, **{**small, "sim_tokens": 4096, "sim_dim": 2, "sim_steps": 1, "sim_matrix": False})
    clean(at)
    run(at, **{**small, "sim_tokens": 4, "sim_dim": 4096, "sim_steps": 1})
    clean(at)
    run(at, **{**small, "sim_inits": 1024, "sim_steps": 2, "sim_record_every": 10_000_000})
    clean(at)
    sims = runs_in(at)
    assert all(r["status"] == "finished" and np.isfinite(r["result"].metric).all() for r in sims)
    assert [r["result"].simulation.tokens for r in sims[-3:]] == [4096, 4, 3]
    assert sims[-2]["result"].hidden.shape == (1, 4, 4096) and sims[-1]["result"].steps.tolist() == [0, 2]
    # everything at its maximum: refused up front, with what to change
    run(at, sim_tokens=4096, sim_dim=4096, sim_inits=1024, sim_steps=10_000_000, sim_record_every=10_000_000,
             sim_matrix=True, sim_dt=100.0, sim_beta=1000.0, sim_seed=2**31 - 1, sim_causal=True)
    one_error(at, "of working memory (1024 initial condition(s) of 4096 tokens in d = 4096)",
              "use a smaller d, fewer tokens or fewer initial conditions")
    # what fits the machine but not the recording: a record-every that fits is offered
    run(at, sim_dim=2, sim_inits=1, sim_record_every=1)
    message = one_error(at, "over the 2.0 GB memory budget", "(--record-every ")
    k = int(message.split("--record-every ")[1].split(")")[0])
    at.button(key="cons_offer").click().run()
    assert at.number_input(key="sim_record_every").value == k
    assert len(runs_in(at)) == len(sims)


def test_simulation_layer_qkv_every_head_and_the_last_layer(fast_png, default_lm):
    lm = default_lm
    at = page("Simulation")
    at.selectbox(key="sim_qkv").set_value("layer").run()
    assert limits(at.number_input(key="sim_layer")) == (0, lm.stack.n_layer - 1)
    assert at.selectbox(key="sim_head").options == ["all (averaged scores, V = W_O W_V)"] + \
        [str(h) for h in range(lm.stack.n_head)]
    run(at, sim_layer=0, sim_head="all", sim_tokens=3, sim_steps=2)
    clean(at)
    for layer, head in [(lm.stack.n_layer - 1, lm.stack.n_head - 1)]:
        run(at, sim_layer=layer, sim_head=head, sim_tokens=3, sim_steps=2)
        clean(at)
    assert [r["result"].hidden.shape[-1] for r in runs_in(at)] == [lm.stack.d_model] * 2


def test_simulation_ten_million_steps_start_and_stop(fast_png):
    at = page("Simulation")
    with stop_at_first_progress():
        run(at, sim_tokens=8, sim_dim=3, sim_steps=10_000_000, sim_record_every=10_000_000, sim_inits=1)
    at.run()
    clean(at)
    (record,) = runs_in(at)
    assert record["status"] == "stopped"
    done = int(record["result"].steps_done.max())
    assert 0 < done < 10_000_000
    assert any(w.startswith(f"Stopped after {done:,} of 10,000,000 steps") for w in texts(at.warning))


def test_simulation_progress_comes_at_least_every_second_however_slow_the_steps(monkeypatch):
    """The engine's event cadence is count-based (max_events) and time-based: a run whose steps
    are slow still reports (and so can be stopped) within about a second."""
    import core.consensus.simulation as sim
    from core.consensus.engine import Progress

    real = sim.integrate_step

    def slow(*args, **kwargs):
        time.sleep(0.3)
        return real(*args, **kwargs)

    monkeypatch.setattr(sim, "integrate_step", slow)
    events = sim.simulation_stream(sim.SimulationConfig(tokens=3, dim=2, steps=1000, max_events=10))
    next(events)
    t0 = time.monotonic()
    first = next(ev for ev in events if isinstance(ev, Progress))
    events.close()
    assert first.step < 100  # long before the 100th step the count cadence would wait for
    assert time.monotonic() - t0 < 15  # the 100th step would take 30 s; a busy CI core is slow, not that slow


def test_simulation_working_memory_is_refused_before_anything_is_made(monkeypatch):
    import core.devices as devices
    import core.consensus.simulation as sim

    cfg = sim.SimulationConfig(tokens=64, dim=1024, batch=8, steps=1)
    need = sim.working_bytes(cfg, 1024)
    assert need == 4 * (5 * 1024 ** 2 + 12 * 8 * 64 * 1024 + 6 * 8 * 64 * 64)
    monkeypatch.setattr(devices, "free_bytes", lambda device: need - 1)
    monkeypatch.setattr(sim, "make_qkv", lambda *a, **k: pytest.fail("made the matrices of a refused run"))
    with pytest.raises(LabError, match=r"needs about 44\.8 MB of working memory \(8 initial condition\(s\) of 64 "
                                       r"tokens in d = 1024\), more than the 44\.7 MB free on cpu; use a smaller d"):
        sim.simulation_stream(cfg)
    monkeypatch.setattr(devices, "free_bytes", lambda device: None)  # cannot tell: no refusal
    monkeypatch.undo()
    assert sim.run_simulation(sim.SimulationConfig(tokens=4, dim=8, steps=2)).complete


def test_consensus_results_controls_at_their_extremes(fast_png, downloads):
    at = page()
    run(at, cons_prompts="To be, or not to be\nThat is the question", cons_iterations=2, cons_matrix=True)
    run(at, cons_noff=True)
    clean(at)
    from core.consensus.metrics import STAT_NAMES

    for series in STAT_NAMES:
        at.selectbox(key="cons_series").set_value(series).run()
        at.toggle(key="cons_log").set_value(True).run()
        no_exception(at)
    for prefix, expected in [("", "consensus"), (" \t", "consensus"), (LONG, "To_be_or_not_to_be_that_is"),
                             (ODD, ""), ("../../etc/passwd", "etc_passwd")]:
        downloads.clear()
        at.text_input(key="cons_prefix").input(prefix).run()
        no_exception(at)
        stems = {name.rsplit(".", 1)[0].removesuffix("_hidden").removesuffix("_eplot").removesuffix("_matrix")
                 .removesuffix("_chart").removesuffix("_overlay") for name in downloads}
        assert len(stems) == 1, sorted(downloads)
        (stem,) = stems
        assert len(stem) <= 100 and "/" not in stem and not stem.startswith(".")
        assert stem.startswith(expected) and stem.isascii(), stem
    slider = at.select_slider(key="cons_heat_step")
    for step in (slider.options[0], slider.options[-1]):
        at.select_slider(key="cons_heat_step").set_value(int(step)).run()
        no_exception(at)
    for prompt in (0, 1):
        at.selectbox(key="cons_heat_prompt").set_value(prompt).run()
        no_exception(at)
    at.multiselect(key="cons_overlay").set_value([]).run()
    no_exception(at)
    labels = at.selectbox(key="cons_show").options
    at.multiselect(key="cons_overlay").set_value(labels).run()
    no_exception(at)
    for label in labels:
        at.selectbox(key="cons_show").set_value(label).run()
        clean(at)


# -- charts legible at many prompts (issue #12, item 3) ------------------------------------------------

def layers(spec: dict) -> list[dict]:
    return spec.get("layer", [spec])


def random_run(at, n: int, length: int = 6, iterations: int = 1, **more):
    at.radio(key="cons_source").set_value("random").run()
    return run(at, cons_rand_n=n, cons_rand_len=length, cons_iterations=iterations, **more)


def test_few_prompts_get_a_colour_each_and_the_legend_beside_a_fixed_height_plot(default_lm):
    from pages.parts.charts import PALETTE, PLOT_HEIGHT

    at = random_run(page(), 8)
    clean(at)
    (spec, sets), _ = chart_specs(at)  # the run, the overlay
    assert spec["height"] == PLOT_HEIGHT
    (lines,) = [lay for lay in layers(spec) if lay["mark"]["type"] == "line"]
    colour = lines["encoding"]["color"]
    assert colour["legend"]["orient"] == "right"  # beside the plot, never under it inside the height
    names = [f"{b}: " for b in range(8)]
    assert [d[:3] for d in colour["scale"]["domain"]] == names and colour["scale"]["range"] == PALETTE[:8]
    assert not at.multiselect(key="cons_pick_prompts") if "cons_pick_prompts" in at.session_state else True
    data = layer_data(spec, sets, lines)
    assert data["prompt"].nunique() == 8


def test_many_prompts_show_mean_and_min_max_band_and_picked_prompts_in_colour(default_lm):
    from pages.parts.charts import FAINT_COLOUR, PALETTE, PLOT_HEIGHT, SUMMARY_COLOUR

    at = random_run(page(), 24)
    clean(at)
    result = at.session_state["cons_runs"][-1]["result"]
    spec, sets = chart_specs(at)[0]
    assert spec["height"] == PLOT_HEIGHT
    by_mark = {}
    for lay in layers(spec):
        by_mark.setdefault(lay["mark"]["type"], []).append(lay)
    faint, mean = by_mark["line"][:2]
    assert faint["encoding"]["color"]["value"] == FAINT_COLOUR and faint["encoding"]["detail"]["field"] == "prompt"
    assert layer_data(spec, sets, faint)["prompt"].nunique() == 24  # every prompt, faint, hover brings one forward
    params = spec.get("params", []) + [p for lay in layers(spec) for p in lay.get("params", [])]
    assert any(p.get("select", {}).get("on") == "pointerover" for p in params)
    summary = layer_data(spec, sets, mean)
    np.testing.assert_allclose(summary["mean"], result.metric.mean(0), rtol=1e-6)
    band = by_mark["area"][0]
    data = layer_data(spec, sets, band)
    np.testing.assert_allclose(data["low"], result.metric.min(0), rtol=1e-6)
    np.testing.assert_allclose(data["high"], result.metric.max(0), rtol=1e-6)
    colour = mean["encoding"]["color"]
    assert colour["scale"]["domain"] == ["mean of 24 prompts (band: min to max)"]
    assert colour["scale"]["range"] == [SUMMARY_COLOUR] and colour["legend"]["orient"] == "right"

    names = at.multiselect(key="cons_pick_prompts").options
    assert len(names) == 24 and names[0].startswith("0: ")
    at.multiselect(key="cons_pick_prompts").set_value([names[3], names[17]]).run()
    clean(at)
    spec, sets = chart_specs(at)[0]
    picked = [lay for lay in layers(spec) if lay["mark"]["type"] == "line"][2]
    data = layer_data(spec, sets, picked)
    assert first_seen(data["prompt"]) == [names[3], names[17]]
    np.testing.assert_allclose(data[data["prompt"] == names[17]]["value"], result.metric[17], rtol=1e-6)
    domain = picked["encoding"]["color"]["scale"]["domain"]
    assert domain == ["mean of 24 prompts (band: min to max)", names[3], names[17]]
    assert picked["encoding"]["color"]["scale"]["range"] == [SUMMARY_COLOUR, *PALETTE[:2]]  # distinct colours


def first_seen(values) -> list:
    return list(pd.unique(pd.Series(list(values))))


def test_log_y_labels_every_decade_down_to_the_float_floor(default_lm):
    from pages.parts.charts import LOG_FLOOR

    at = page()
    run(at, cons_prompts=PROMPTS[0], cons_iterations=2)
    at.toggle(key="cons_log").set_value(True).run()
    clean(at)
    spec, data = charts(at)[0]
    y = spec["encoding"]["y"]
    result = at.session_state["cons_runs"][-1]["result"]
    lo, hi = float(result.metric.min()), float(result.metric.max())
    assert y["scale"]["type"] == "log" and y["field"] == "y"
    ticks = y["axis"]["values"]
    assert ticks == [10.0 ** k for k in range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1)]
    assert y["scale"]["domain"] == [ticks[0], ticks[-1]] and len(ticks) >= 2
    assert "1e-" in y["axis"]["labelExpr"] or "format" in y["axis"]["labelExpr"]
    np.testing.assert_allclose(data["y"], np.maximum(data["value"], LOG_FLOOR))
    # a series that reaches zero (the metric of a one-token prompt) is drawn on the floor, and the axis says so
    run(at, cons_prompts="ROMEO", cons_iterations=1)
    clean(at)
    spec, data = charts(at)[0]
    y = spec["encoding"]["y"]
    assert (data["value"] <= LOG_FLOOR).any() and y["axis"]["values"][0] == LOG_FLOOR
    assert "drawn at 1e-8" in y["title"]


def test_decade_labels_read_as_powers_of_ten():
    """The axis's label expression, evaluated the way Vega does (d3-format), for the decades."""
    from pages.parts.charts import decades

    assert decades(3e-7, 0.8) == [1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    assert decades(1e-8, 1e-8) == [1e-8, 1e-7]
    assert decades(2.0, 350.0) == [1.0, 10.0, 100.0, 1000.0]


def test_heatmap_axes_show_the_tokens_and_the_metric_chart_marks_its_step(default_lm):
    at = page()
    run(at, cons_prompts="To be, or not to be\nROMEO:\nBut soft", cons_iterations=2, cons_matrix=True)
    clean(at)
    spec, sets = chart_specs(at)[0]
    rule = layers(spec)[-1]
    assert rule["mark"]["type"] == "rule" and layer_data(spec, sets, rule)["step"].tolist() == [8]
    heat, _ = charts(at)[1]
    tokens = [visible(default_lm.tokenizer.decode([t])) for t in default_lm.tokenizer.encode("To be, or not to be")]
    for axis in ("x", "y"):
        expr = heat["encoding"][axis]["axis"]["labelExpr"]
        assert expr == "[" + ", ".join(json.dumps(t, ensure_ascii=False) for t in tokens) + "][datum.value]"
    assert "␣be" in tokens
    at.select_slider(key="cons_heat_step").set_value(3).run()
    spec, sets = chart_specs(at)[0]
    assert layer_data(spec, sets, layers(spec)[-1])["step"].tolist() == [3]  # the rule follows the slider
    run(at, cons_matrix=False)
    spec, _ = chart_specs(at)[0]
    assert all(lay["mark"]["type"] != "rule" for lay in layers(spec))  # no heatmap, no mark


def test_overlay_draws_each_run_as_mean_and_band(default_lm):
    at = random_run(page(), 12)
    run(at, cons_noff=True)
    clean(at)
    spec, sets = chart_specs(at)[-1]
    band, line = layers(spec)
    assert band["mark"]["type"] == "area" and line["mark"]["type"] == "line"
    assert line["encoding"]["color"]["legend"]["orient"] == "right"
    data = layer_data(spec, sets, line)
    runs = at.session_state["cons_runs"]
    assert first_seen(data["run"]) == [r["label"] for r in runs]
    for r in runs:
        part = data[data["run"] == r["label"]]
        np.testing.assert_allclose(part["mean"], r["result"].metric.mean(0), rtol=1e-6)
        np.testing.assert_allclose(part["low"], r["result"].metric.min(0), rtol=1e-6)
        assert (part["lines"] == 12).all()


def test_decoding_traces_summarise_many_tokens_and_follow_log_y():
    at = page("Consensus decoding")
    run(at, cons_prompts=PROMPTS[1], cons_iterations=1, cons_new_tokens=12)
    clean(at)
    spec, sets = chart_specs(at)[0]
    marks = [lay["mark"]["type"] for lay in layers(spec)]
    assert "area" in marks  # 12 new tokens: mean and band
    tokens = at.multiselect(key="cons_pick_tokens").options
    assert len(tokens) == 12 and tokens[0].startswith("0 → ")
    at.toggle(key="cons_log").set_value(True).run()
    spec, _ = chart_specs(at)[0]
    assert layers(spec)[0]["encoding"]["y"]["scale"]["type"] == "log"


def test_png_download_is_the_chart_on_screen(fast_png):
    from pages.parts.charts import PNG_WIDTH, PLOT_HEIGHT

    at = random_run(page(), 16)
    at.toggle(key="cons_log").set_value(True).run()
    clean(at)
    fast_png.clear()
    at.run()  # the download buttons render their PNGs (see ``downloads``)
    screen, _ = chart_specs(at)[0]
    png = next(json.loads(s) for s in fast_png if '"layer"' in s and '"pointerover"' in s)
    assert png["height"] == screen["height"] == PLOT_HEIGHT and png["width"] == PNG_WIDTH
    assert png["autosize"] == screen["autosize"] == {"type": "fit", "contains": "padding"}  # axes inside the height
    assert [lay["mark"] for lay in png["layer"]] == [lay["mark"] for lay in screen["layer"]]
    assert [lay["encoding"] for lay in png["layer"]] == [lay["encoding"] for lay in screen["layer"]]
    assert png["config"]["axis"]["labelFontSize"] == 12  # the look travels with the spec, not a screen theme
    (el,) = [e for e in at.get("vega_lite_chart")][:1]
    assert el.proto.theme == ""  # drawn without Streamlit's theme: the screen shows the spec's own look


# -- honest statistics and labels (issue #12, item 4) ----------------------------------------------------

def test_random_prompt_labels_never_show_the_replacement_character(default_lm):
    at = random_run(page(), 24, length=16)
    clean(at)
    result = at.session_state["cons_runs"][-1]["result"]
    names = at.multiselect(key="cons_pick_prompts").options
    assert not any("\ufffd" in n for n in names) and not any("\ufffd" in p for p in result.prompts)
    # seed 42 draws byte tokens that make no character: they read as escapes
    assert any("\\x" in p for p in result.prompts)
    run(at, cons_rand_n=3, cons_matrix=True)
    heat, _ = charts(at)[1]
    assert "\ufffd" not in heat["encoding"]["x"]["axis"]["labelExpr"]


def test_logit_lens_cells_are_never_blank(default_lm):
    """A lens that predicts newlines everywhere used to show blank cells: whitespace is visible."""
    at = page()
    run(at, cons_prompts="ROMEO: But soft", cons_iterations=2, cons_decode="1")
    clean(at)
    table = at.dataframe[0].value
    assert not table.apply(lambda col: col.astype(str).str.contains(r"^\s*$")).any().any()
    assert table["input token"].tolist()[-2:] == ["␣But", "␣soft"]


def test_decoding_mode_shows_only_controls_that_act_and_counts_prompt_tokens(default_lm):
    at = page("Consensus decoding")
    at.text_area(key="cons_prompts").input("\n".join(PROMPTS)).run()
    lengths = [len(default_lm.tokenizer.encode(p)) for p in PROMPTS]
    caption = next(c for c in texts(at.caption) if "layer-steps" in c)
    span = f"{min(lengths)}–{max(lengths)}" if min(lengths) != max(lengths) else f"{lengths[0]}"
    from core.consensus.config import PAGE_ITERATIONS, PAGE_NEW_TOKENS

    per = PAGE_ITERATIONS * default_lm.stack.n_layer
    assert caption.startswith(f"2 prompts of {span} + {PAGE_NEW_TOKENS} new tokens"), caption
    assert f" · {per} layer-steps per new token ({per * PAGE_NEW_TOKENS:,} per prompt) · " in caption
    keys = {w.key for w in at.main if getattr(w, "key", None)}
    assert not {"cons_matrix", "cons_decode"} & keys  # consensus-run-only switches
    run(at, cons_iterations=1, cons_new_tokens=2)
    clean(at)
    assert not [w for w in at.selectbox if w.key == "cons_series"]  # decoding traces hold the metric only
    at.radio(key="cons_mode").set_value("Consensus run").run()
    caption = next(c for c in texts(at.caption) if "layer-steps" in c)
    assert caption.startswith(f"2 prompts of {span} tokens") and " · 4 layer-steps per prompt · " in caption
    run(at)
    assert [w for w in at.selectbox if w.key == "cons_series"]


def test_visible_token_text():
    assert visible("\n\n") == "↵↵" and visible(" the") == "␣the" and visible("\t") == "⇥"
    assert visible("") == "∅" and visible("\x00a") == "\\x00a" and visible(None) == ""


def test_thin_keeps_every_kth_point_and_each_lines_last():
    from pages.parts.charts import thin

    frame = pd.DataFrame({"prompt": np.repeat(["a", "b"], 10), "step": np.tile(np.arange(10), 2)})
    assert thin(frame, "prompt", 100) is frame
    kept = thin(frame, "prompt", 5)  # every 4th point of each line, and its last
    assert kept.groupby("prompt")["step"].apply(list).to_dict() == {"a": [0, 4, 8, 9], "b": [0, 4, 8, 9]}


# -- saved runs: kept as they go, reopened after a reload, overlaid, deleted; background; many models ---

from core.commands.cli import main as cli_main  # noqa: E402
from core.consensus import runs as saved  # noqa: E402
from core.jobs.folder import mark  # noqa: E402
from core.models.loading import load_model  # noqa: E402
from tests.conftest import wait_for  # noqa: E402
from core.training.runs import RUN_KIND as TRAINING_RUN  # noqa: E402


@pytest.fixture
def jobs():
    """Background runs a test starts are killed after it."""
    from tests.conftest import kill_process_groups

    before = set(saved._CHILDREN)
    yield
    kill_process_groups({p.pid: p for f, p in list(saved._CHILDREN.items()) if f not in before})


def metric_of(at, label: str) -> np.ndarray:
    (record,) = [r for r in at.session_state["cons_runs"] if r["label"] == label]
    return record["result"].metric


def test_a_page_run_is_kept_and_a_reload_brings_back_the_run_the_model_and_the_settings(tiny_gptlab_dir):
    at = page(model=tiny_gptlab_dir)
    run(at, cons_prompts=PROMPTS[1], cons_iterations=3, cons_noff=True)
    clean(at)
    (info,) = saved.list_runs()
    assert (info.state, info.kind, info.model, info.prompts) == ("finished", "run", str(tiny_gptlab_dir), 1)
    (record,) = at.session_state["cons_runs"]
    assert record["run"] == info.name and at.multiselect(key="cons_open").value == [info.name]
    expected = run_consensus(load_model(str(tiny_gptlab_dir)), PROMPTS[1:], ConsensusConfig(iterations=3, skip_mlp=True))
    np.testing.assert_allclose(saved.load_run(info.name)[1].metric, expected.metric, atol=1e-6)
    assert at.query_params["model"] == str(tiny_gptlab_dir)  # the sidebar's model is in the URL

    # a reload: a new session, with only the URL (bound widgets keep their values there)
    from app_harness import APP
    from streamlit.testing.v1 import AppTest

    again = AppTest.from_file(str(APP), default_timeout=60)
    again.query_params.update({"model": str(tiny_gptlab_dir), "dtype": "no-such-dtype", "cons_open": info.name,
                               "cons_iterations": "3", "cons_noff": "true", "cons_prompts": PROMPTS[1]})
    again.run()
    again.switch_page(PAGE).run()
    clean(again)
    assert again.session_state["model_spec"] == str(tiny_gptlab_dir)
    assert again.session_state["model_dtype"] == "float32"  # a dtype the sidebar does not offer is not taken
    assert again.number_input(key="cons_iterations").value == 3 and again.toggle(key="cons_noff").value
    assert again.text_area(key="cons_prompts").value == PROMPTS[1]
    (reopened,) = again.session_state["cons_runs"]
    assert reopened["run"] == info.name and reopened["label"] == record["label"] and reopened["status"] == "finished"
    np.testing.assert_allclose(reopened["result"].metric, expected.metric, atol=1e-6)
    assert again.multiselect(key="cons_overlay").value == [record["label"]]
    chart = charts(again)[0][1]
    np.testing.assert_allclose(chart.sort_values("step")["value"].to_numpy(), expected.metric[0], atol=1e-6)
    assert reopened["tokens"] == [[load_model(str(tiny_gptlab_dir)).tokenizer.token_str(t)
                                   for t in expected.token_ids[0]]]


def test_runs_of_the_cli_open_on_the_page_overlay_and_are_deleted(default_lm, runs_dir, capsys):
    for name, extra in (("plain", []), ("noff", ["--noff"])):
        assert cli_main(["consensus", "--prompt", PROMPTS[0], "--size", "2", "--run-name", name, *extra]) == 0
    capsys.readouterr()
    at = page()
    assert at.multiselect(key="cons_open").options == ["noff", "plain"] and not at.session_state["cons_runs"]
    at.multiselect(key="cons_open").set_value(["plain", "noff"]).run()
    clean(at)
    assert [r["label"] for r in at.session_state["cons_runs"]] == ["default N=2", "default N=2 noff"]
    assert at.multiselect(key="cons_overlay").value == ["default N=2", "default N=2 noff"]
    over = charts(at)[-1][1]
    for label, skip in (("default N=2", False), ("default N=2 noff", True)):
        expected = run_consensus(default_lm, PROMPTS[:1], ConsensusConfig(iterations=2, skip_mlp=skip)).metric[0]
        np.testing.assert_allclose(over[over["run"] == label].sort_values("step")["mean"].to_numpy(), expected,
                                   atol=1e-6)
    table = at.dataframe[-1].value
    assert table["run"].tolist() == ["noff", "plain"] and set(table["state"]) == {"finished"}

    at.multiselect(key="cons_delete_pick").set_value(["plain"]).run()
    at.button(key="cons_delete_go").click().run()
    clean(at)
    assert not (runs_dir / "consensus" / "plain").exists() and (runs_dir / "consensus" / "noff").is_dir()
    assert [r["label"] for r in at.session_state["cons_runs"]] == ["default N=2 noff"]
    assert at.multiselect(key="cons_open").value == ["noff"]
    # closing a run on the page leaves it saved
    at.multiselect(key="cons_open").set_value([]).run()
    assert not at.session_state["cons_runs"] and (runs_dir / "consensus" / "noff").is_dir()


def test_a_background_run_goes_on_without_the_page_and_opens_when_done(tiny_gptlab_dir, jobs):
    at = page(model=tiny_gptlab_dir)
    at.toggle(key="cons_background").set_value(True)
    run(at, cons_prompts=PROMPTS[1], cons_iterations=4)
    clean(at)
    (info,) = saved.list_runs()
    assert info.model == str(tiny_gptlab_dir) and (info.path / "console.txt").exists()
    assert at.multiselect(key="cons_open").value == [info.name]
    assert not at.get("vega_lite_chart") or info.state != "running"  # nothing computed in the page itself
    wait_for_state(info.name, "finished")
    at.run()
    clean(at)
    (record,) = at.session_state["cons_runs"]
    assert record["run"] == info.name and record["status"] == "finished"
    expected = run_consensus(load_model(str(tiny_gptlab_dir)), PROMPTS[1:], ConsensusConfig(iterations=4))
    np.testing.assert_allclose(record["result"].metric, expected.metric, atol=1e-6)

    # a long one is followed while it runs, and stopped from the page
    run(at, cons_prompts=PROMPTS[1], cons_iterations=1_000_000, cons_record_every=1000)
    name = next(i.name for i in saved.list_runs() if i.name != info.name)
    wait_for(lambda: (saved.run_info(name).done or 0) >= 2000, timeout=120)
    at.run()
    clean(at)
    assert any(p.text.startswith(f"{name} · ") for p in at.get("progress"))
    at.button(key=f"cons_stop_{name}").click().run()
    wait_for_state(name, "stopped")
    at.run()
    clean(at)
    stopped = next(r for r in at.session_state["cons_runs"] if r["run"] == name)
    assert stopped["status"] == "stopped" and 1 < stopped["result"].columns_done < len(stopped["result"].steps) + 1
    at.selectbox(key="cons_show").set_value(stopped["label"]).run()
    assert any(w.startswith("Stopped after") for w in texts(at.warning))


def wait_for_state(name: str, state: str) -> None:
    wait_for(lambda: saved.run_info(name).state == state, timeout=120)


def fake_training_run(root: Path, model: Path, steps=(10, 20)) -> Path:
    """A training run folder whose checkpoints are copies of ``model`` (all the page reads)."""
    import shutil

    folder = root / "trun"
    folder.mkdir(parents=True)
    mark(folder, TRAINING_RUN)
    (folder / "config.json").write_text("{}")
    (folder / "status.json").write_text(json.dumps({"state": "finished"}))
    for s in steps:
        shutil.copytree(model, folder / "checkpoints" / str(s))
    return folder


def test_consensus_over_training_runs_the_same_prompts_on_every_checkpoint(tiny_gptlab_dir, runs_dir):
    folder = fake_training_run(runs_dir, tiny_gptlab_dir)
    at = page(model=tiny_gptlab_dir)
    set_widgets(at, "", cons_prompts=PROMPTS[1], cons_iterations=2)
    at.selectbox(key="cons_models_run").set_value(str(folder))
    at.button(key="cons_models_add").click().run()
    specs = [str(folder / "checkpoints" / "10"), str(folder / "checkpoints" / "20")]
    assert at.text_area(key="cons_models").value.splitlines() == specs
    at.text_area(key="cons_models").input("\n".join(specs + ["no-such-model-here"])).run()
    at.button(key="cons_models_go").click().run()
    assert len(at.error) == 1 and at.error[0].value.startswith("no-such-model-here:")
    labels = ["trun step 10 N=2", "trun step 20 N=2"]
    assert [r["label"] for r in at.session_state["cons_runs"]] == labels
    assert at.multiselect(key="cons_overlay").value == labels
    for spec, label in zip(specs, labels):
        expected = run_consensus(load_model(spec), PROMPTS[1:], ConsensusConfig(iterations=2)).metric
        np.testing.assert_allclose(metric_of(at, label), expected, atol=1e-6)
    kept = {i.model: i for i in saved.list_runs()}
    assert set(kept) == set(specs) and {i.label for i in kept.values()} == set(labels)
    assert set(charts(at)[-1][1]["run"]) == set(labels)


def test_a_background_run_that_fails_says_why_on_the_page(jobs):
    at = page()
    config = saved.run_config("run", "no-such-model-anywhere", {"source": "typed", "texts": ["hi"]},
                              ConsensusConfig(iterations=1), label="doomed")
    info = saved.launch(config, device="cpu")
    wait_for_state(info.name, "failed")
    at.multiselect(key="cons_open").set_value([info.name]).run()
    no_exception(at)
    (error,) = texts(at.error)
    assert error.startswith(f"Run {info.name} (doomed) failed before it computed anything: Model "
                            f"'no-such-model-anywhere' is not in the local Hugging Face cache")
    assert not at.session_state["cons_runs"]


def test_a_stopped_page_run_is_kept_as_stopped_with_what_it_computed(downloads):
    at = page()
    at.text_area(key="cons_prompts").input(PROMPTS[0])
    at.number_input(key="cons_iterations").set_value(50)
    with stop_at_first_progress():
        run(at)
    at.run()
    clean(at)
    (record,) = at.session_state["cons_runs"]
    (info,) = saved.list_runs()
    wait_for_state(info.name, "stopped")  # its last writes go on in a thread, so the page answers at once
    info = saved.run_info(info.name)
    assert record["run"] == info.name and info.state == "stopped" and info.total == 200
    kept = saved.load_run(info.name)[1]
    np.testing.assert_array_equal(kept.metric, record["result"].metric)
    assert kept.steps_done.tolist() == record["result"].steps_done.tolist() == [1]


def test_leaving_the_page_and_coming_back_keeps_the_runs_and_the_settings():
    at = page()
    run(at, cons_prompts=PROMPTS[0], cons_iterations=2, cons_seed=7)
    (info,) = saved.list_runs()
    at.switch_page("pages/home.py").run()
    at.switch_page(PAGE).run()
    clean(at)
    assert at.multiselect(key="cons_open").value == [info.name]
    assert [r["run"] for r in at.session_state["cons_runs"]] == [info.name]
    assert at.number_input(key="cons_iterations").value == 2 and at.number_input(key="cons_seed").value == 7
    # a link never ticks "trust remote code" for anyone
    from app_harness import APP
    from streamlit.testing.v1 import AppTest

    linked = AppTest.from_file(str(APP), default_timeout=60)
    linked.query_params.update({"model": "some/model", "model_trust_remote_code": "true", "device": "cpu"})
    linked.run()
    assert linked.session_state["model_spec"] == "some/model"
    assert linked.session_state["model_trust_remote_code"] is False
    assert linked.text_input(key="model_other").value == "some/model"


def test_runs_of_the_same_settings_are_numbered_by_their_folders_in_every_session():
    """The later runs of one label are #2, #3, ... in the order their folders were made, whichever
    session (or order of opening) shows them: a run keeps its number on every visit."""
    at = page()
    for _ in range(3):
        run(at, cons_prompts=PROMPTS[1], cons_iterations=1)
    clean(at)
    made = list(reversed(saved.list_runs()))  # oldest first
    want = {info.name: label for info, label in zip(made, ["default N=1", "default N=1 #2", "default N=1 #3"])}
    assert {r["run"]: r["label"] for r in at.session_state["cons_runs"]} == want
    assert at.selectbox(key="cons_show").value == "default N=1 #3"

    from app_harness import APP
    from streamlit.testing.v1 import AppTest

    other = AppTest.from_file(str(APP), default_timeout=60)
    other.query_params["cons_open"] = [info.name for info in reversed(made)]  # opened newest first
    other.run()
    other.switch_page(PAGE).run()
    clean(other)
    assert {r["run"]: r["label"] for r in other.session_state["cons_runs"]} == want
    assert sorted(other.selectbox(key="cons_show").options) == sorted(want.values())
    # closing the first run renumbers nothing
    other.multiselect(key="cons_open").set_value([made[2].name, made[1].name]).run()
    assert {r["run"]: r["label"] for r in other.session_state["cons_runs"]} == {
        made[1].name: "default N=1 #2", made[2].name: "default N=1 #3"}
