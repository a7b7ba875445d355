"""Every page's widgets at their extremes, driven through app.py with AppTest (see app_harness.py).

Each number input and slider goes to its minimum and its maximum, text goes in empty, blank, very
long (20,000 characters) and in odd Unicode, selectboxes go through their options where that is
cheap, and then the page's main button is pressed. Whatever happens, the page shows no exception;
where the input is impossible it shows one st.error saying what to change, and nothing computed
earlier is replaced by half a result. Runs stay cheap: tiny models where a maximum would mean a
long run, and where a maximum is long by nature (10 million consensus iterations or simulation
steps) the run is started and stopped.

The Training page's upload (a .txt/.jsonl file saved under the runs folder's data/) is tested
here too, through AppTest's file uploader, down to a real tiny run training on the saved copy.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from app_harness import (LONG, ODD, TEXTS, clean, described_feature_model, limits, no_exception, one_error, open_app,
                         set_widgets, stop_at_first_progress, texts)

from core.errors import LabError
from core.models.loading import load_model
from core.training import runs as runs_mod
from core.training.config import TrainConfig
from core.training.data import save_upload, upload_name, uploads_dir
from core.training.memory import check_fits, parameter_count

CORPUS = ("ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun.\n"
          "JULIET: O Romeo, Romeo, wherefore art thou Romeo? Deny thy father and refuse thy name.\n") * 40


# -- Consensus ---------------------------------------------------------------------------------------

CONS_PAGE = "pages/consensus.py"


def cons_page(mode: str | None = None, model: Path | None = None):
    at = open_app(CONS_PAGE, state={"model_spec": str(model)} if model else None)
    if mode is not None:
        at.radio(key="cons_mode").set_value(mode).run()
    return at


def cons_run(at, **values):
    """Set controls (by full key) and press Run, in one script run as a browser sends them."""
    set_widgets(at, "", **values)
    at.button(key="cons_run").click()
    return at.run()


def runs_in(at) -> list[dict]:
    return at.session_state["cons_runs"] if "cons_runs" in at.session_state else []


def test_consensus_widget_limits_are_the_ones_tested():
    at = cons_page()
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
    at = cons_page()
    cons_run(at, cons_prompts=TEXTS[name], cons_iterations=1)
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
    at = cons_page()
    # every re-initialisation, at the smallest and the largest seed, one iteration each
    for reinit in ("none", "once", "iteration", "block"):
        for seed in (0, 2**31 - 1):
            cons_run(at, cons_prompts="To be, or not to be", cons_iterations=1, cons_reinit=reinit, cons_seed=seed,
                     cons_record_every=1)
            clean(at)
    assert [r["status"] for r in runs_in(at)] == ["finished"] * 8
    # record every k at its maximum: the embeddings and the last layer-step only
    cons_run(at, cons_reinit="none", cons_iterations=3, cons_record_every=10_000_000)
    clean(at)
    assert runs_in(at)[-1]["result"].steps.tolist() == [0, 12]
    # decode iterations: empty, junk (echoed short), out of range, odd unicode digits
    cons_run(at, cons_decode="")
    clean(at)
    cons_run(at, cons_decode="9" * 20_000 + "x")
    one_error(at, "comma-separated whole numbers like 0,4,9")
    cons_run(at, cons_decode=ODD)
    one_error(at, "comma-separated whole numbers like 0,4,9")
    cons_run(at, cons_decode="0,2,3")
    one_error(at, "outside 0..2")
    cons_run(at, cons_decode=" \t")
    clean(at)


def test_consensus_random_prompts_at_their_extremes(fast_png):
    at = cons_page()
    at.radio(key="cons_source").set_value("random").run()
    cons_run(at, cons_rand_n=1024, cons_rand_len=100_000, cons_iterations=1)
    one_error(at, "exceed the model's context of 256 tokens", "ask for at most 256")
    assert not runs_in(at)
    cons_run(at, cons_rand_n=1, cons_rand_len=1, cons_iterations=1)
    clean(at)
    cons_run(at, cons_rand_n=1024, cons_rand_len=2, cons_iterations=1)
    clean(at)
    cons_run(at, cons_rand_n=1, cons_rand_len=256, cons_iterations=1)
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
    at = cons_page(model=tiny_gptlab_dir)
    t0 = time.monotonic()
    with stop_at_first_progress():
        cons_run(at, cons_prompts="To be, or not to be", cons_iterations=10_000_000, cons_record_every=10_000_000)
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
    at = cons_page("Consensus decoding")
    cons_run(at, cons_prompts="To be", cons_iterations=1, cons_new_tokens=100_000)
    one_error(at, "beyond the model's context of 256", "ask for fewer new tokens")
    cons_run(at, cons_new_tokens=1, cons_top_p=0.01, cons_temperature=0.0)
    one_error(at, "temperature must be above 0")
    assert not runs_in(at)
    cons_run(at, cons_new_tokens=1, cons_top_p=0.01, cons_temperature=10.0)
    clean(at)
    cons_run(at, cons_new_tokens=2, cons_top_p=1.0, cons_temperature=0.05)
    clean(at)
    done = runs_in(at)
    assert [r["status"] for r in done] == ["finished", "finished"]
    assert [r["result"].tokens_done for r in done] == [1, 2]


def test_simulation_controls_at_their_extremes(fast_png):
    at = cons_page("Simulation")
    small = dict(sim_tokens=3, sim_dim=2, sim_steps=3, sim_inits=1, sim_record_every=1, sim_dt=0.1, sim_beta=1.0)
    cons_run(at, **{**small, "sim_dt": 0.0})
    one_error(at, "The step size dt must be a positive number")
    for integrator in ("euler", "rk4"):
        for qkv in ("identity", "random"):
            cons_run(at, **small, sim_integrator=integrator, sim_qkv=qkv)
            clean(at)
    cons_run(at, **{**small, "sim_tokens": 2, "sim_dim": 2, "sim_steps": 1, "sim_dt": 0.0001, "sim_beta": -1000.0,
                    "sim_seed": 0, "sim_causal": True})
    clean(at)
    cons_run(at, **{**small, "sim_dt": 100.0, "sim_beta": 1000.0, "sim_seed": 2**31 - 1, "sim_matrix": True,
                    "sim_causal": False})
    clean(at)
    cons_run(at, **{**small, "sim_tokens": 4096, "sim_dim": 2, "sim_steps": 1, "sim_matrix": False})
    clean(at)
    cons_run(at, **{**small, "sim_tokens": 4, "sim_dim": 4096, "sim_steps": 1})
    clean(at)
    cons_run(at, **{**small, "sim_inits": 1024, "sim_steps": 2, "sim_record_every": 10_000_000})
    clean(at)
    sims = runs_in(at)
    assert all(r["status"] == "finished" and np.isfinite(r["result"].metric).all() for r in sims)
    assert [r["result"].simulation.tokens for r in sims[-3:]] == [4096, 4, 3]
    assert sims[-2]["result"].hidden.shape == (1, 4, 4096) and sims[-1]["result"].steps.tolist() == [0, 2]
    # everything at its maximum: refused up front, with what to change
    cons_run(at, sim_tokens=4096, sim_dim=4096, sim_inits=1024, sim_steps=10_000_000, sim_record_every=10_000_000,
             sim_matrix=True, sim_dt=100.0, sim_beta=1000.0, sim_seed=2**31 - 1, sim_causal=True)
    one_error(at, "of working memory (1024 initial condition(s) of 4096 tokens in d = 4096)",
              "use a smaller d, fewer tokens or fewer initial conditions")
    # what fits the machine but not the recording: a record-every that fits is offered
    cons_run(at, sim_dim=2, sim_inits=1, sim_record_every=1)
    message = one_error(at, "over the 2.0 GB memory budget", "(--record-every ")
    k = int(message.split("--record-every ")[1].split(")")[0])
    at.button(key="cons_offer").click().run()
    assert at.number_input(key="sim_record_every").value == k
    assert len(runs_in(at)) == len(sims)


def test_simulation_layer_qkv_every_head_and_the_last_layer(fast_png):
    lm = load_model("default")
    at = cons_page("Simulation")
    at.selectbox(key="sim_qkv").set_value("layer").run()
    assert limits(at.number_input(key="sim_layer")) == (0, lm.stack.n_layer - 1)
    assert at.selectbox(key="sim_head").options == ["all (averaged scores, V = W_O W_V)"] + \
        [str(h) for h in range(lm.stack.n_head)]
    cons_run(at, sim_layer=0, sim_head="all", sim_tokens=3, sim_steps=2)
    clean(at)
    for layer, head in [(lm.stack.n_layer - 1, lm.stack.n_head - 1)]:
        cons_run(at, sim_layer=layer, sim_head=head, sim_tokens=3, sim_steps=2)
        clean(at)
    assert [r["result"].hidden.shape[-1] for r in runs_in(at)] == [lm.stack.d_model] * 2


def test_simulation_ten_million_steps_start_and_stop(fast_png):
    at = cons_page("Simulation")
    with stop_at_first_progress():
        cons_run(at, sim_tokens=8, sim_dim=3, sim_steps=10_000_000, sim_record_every=10_000_000, sim_inits=1)
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
    at = cons_page()
    cons_run(at, cons_prompts="To be, or not to be\nThat is the question", cons_iterations=2, cons_matrix=True)
    cons_run(at, cons_noff=True)
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


# -- Training ----------------------------------------------------------------------------------------

TR_PAGE = "pages/training.py"
TR_MAX = dict(n_layer=1024, n_head=1024, d_model=65536, block_size=131072, vocab_size=1 << 20, lr=10.0,
              weight_decay=10.0, warmup_steps=10_000_000, seed=2**31 - 1, batch_size=65536, grad_acc_steps=65536,
              max_steps=100_000_000, epochs=100_000.0, val_every=100_000_000, log_every=100_000_000,
              preview_every=100_000_000, save_every=100_000_000, keep_last=100_000)
TR_MIN = dict(n_layer=1, n_head=1, d_model=1, block_size=1, vocab_size=300, lr=0.0, weight_decay=0.0, warmup_steps=0,
              seed=0, batch_size=1, grad_acc_steps=1, max_steps=1, epochs=0.0, val_every=0, log_every=1,
              preview_every=0, save_every=0, keep_last=1)


@pytest.fixture
def launched(monkeypatch) -> list[tuple[TrainConfig, str | None]]:
    """The runs the page would start, captured instead of started (the page re-imports ``launch``
    from core.training.runs on every run, so the stand-in is what it calls)."""
    calls: list = []

    def fake_launch(cfg, run_id=None, root=None):
        calls.append((cfg, run_id))
        raise LabError("captured")  # the page shows it; no folder, no process

    monkeypatch.setattr(runs_mod, "launch", fake_launch)
    return calls


def tr_submit(at, **values):
    set_widgets(at, "tr_", devices=["cpu"], **values)
    at.button(key="tr_launch").click()
    return at.run()


def nothing_started(root: Path) -> bool:
    return not root.exists() or not any(p for p in root.iterdir())


def test_training_form_limits_are_the_ones_tested(runs_root):
    at = open_app(TR_PAGE)
    found = {w.key[3:]: limits(w) for w in at.number_input if w.key.startswith("tr_")}
    assert found == {k: (TR_MIN[k], TR_MAX[k]) for k in TR_MAX}
    assert at.selectbox(key="tr_dataset").options[-1] == "Upload a .txt/.jsonl file…"
    uploader = at.file_uploader(key="tr_upload")
    assert uploader.allowed_type == [".txt", ".jsonl"] and uploader.proto.max_upload_size_mb == 200


def test_training_every_maximum_is_refused_before_a_process_starts(runs_root, launched):
    at = open_app(TR_PAGE)
    tr_submit(at, **TR_MAX)
    one_error(at, "This run needs about", "more than the", "free on cpu",
              "use fewer layers, a smaller d_model, a smaller batch size or a shorter block size")
    assert not launched and nothing_started(runs_root)


@pytest.mark.parametrize("values, message", [
    (dict(lr=0.0), "learning rate must be above 0 (got 0.0)"),
    (dict(epochs=0.0, max_steps=None), "epochs must be above 0 (got 0.0)"),
    (dict(d_model=1, n_head=None), "d_model=1 is not divisible by n_head=4"),
    (dict(n_layer=1024, d_model=65536, n_head=1024), "This run needs about"),
])
def test_training_impossible_extremes_say_what_to_change(runs_root, launched, values, message):
    at = open_app(TR_PAGE)
    base = {**TR_MIN, "lr": None, "epochs": None}
    tr_submit(at, **{**base, **values})
    one_error(at, message)
    assert not launched and nothing_started(runs_root)


def test_training_valid_extremes_reach_the_launch_with_those_values(runs_root, launched):
    """Every count at its maximum on a tiny model, then every setting at its smallest valid value:
    the config handed to the launcher carries them (the launcher is a stand-in here)."""
    at = open_app(TR_PAGE)
    counts = {k: TR_MAX[k] for k in ("lr", "weight_decay", "warmup_steps", "seed", "max_steps", "val_every",
                                     "log_every", "preview_every", "save_every", "keep_last", "grad_acc_steps")}
    tr_submit(at, n_layer=1, n_head=1, d_model=8, block_size=16, batch_size=1, vocab_size=300, **counts)
    one_error(at, "captured")
    tr_submit(at, **{**TR_MIN, "lr": None, "epochs": None})
    one_error(at, "captured")
    (high, _), (low, _) = launched
    assert {k: getattr(high, k) for k in counts} == counts
    assert (high.n_layer, high.d_model, high.block_size) == (1, 8, 16)
    assert {k: getattr(low, k) for k in TR_MIN if k not in ("lr", "epochs")} == \
        {k: v for k, v in TR_MIN.items() if k not in ("lr", "epochs")}
    assert nothing_started(runs_root)


@pytest.mark.parametrize("field, name", [(f, n) for f in ("run_name", "dataset_path") for n in TEXTS])
def test_training_text_extremes(runs_root, launched, field, name):
    at = open_app(TR_PAGE)
    values = {"run_name": "", "dataset": "shakespeare", "dataset_path": ""}
    if field == "dataset_path":
        values["dataset"] = "path"
    values[field] = TEXTS[name]
    tr_submit(at, **values)
    expected = {
        ("run_name", "empty"): "captured", ("run_name", "blank"): "captured",
        ("run_name", "long"): "The run name is 20,000 characters long; use at most 100",
        ("run_name", "unicode"): "is not allowed; use letters, digits",
        ("dataset_path", "empty"): "Enter a local .txt/.jsonl file or folder",
        ("dataset_path", "blank"): "Enter a local .txt/.jsonl file or folder",
        ("dataset_path", "long"): "is not a usable path or dataset name (File name too long)",
        ("dataset_path", "unicode"): "is neither an existing local file or folder nor a Hugging Face dataset id",
    }[(field, name)]
    one_error(at, expected)
    assert len(launched) == (1 if expected == "captured" else 0)
    if launched:
        assert launched[0][1] is None  # a blank name: the engine names the run


# -- Training: uploads ------------------------------------------------------------------------------

def upload(at, name: str, data: bytes, mime: str = "text/plain") -> None:
    at.file_uploader(key="tr_upload").set_value((name, data, mime))


def saved_uploads(root: Path) -> list[Path]:
    folder = uploads_dir(root)
    return sorted(folder.iterdir()) if folder.is_dir() else []


def test_upload_trains_a_run_on_the_saved_copy_with_every_minimum(runs_root):
    """The whole path: a file uploaded with a hostile name is saved under the runs folder's data/,
    the run's dataset is that copy, and a run with every setting at its smallest valid value
    (one layer of width 1, a one-token context, one step) trains on it to the end."""
    at = open_app(TR_PAGE)
    data = CORPUS.encode("utf-8")
    upload(at, "../../../etc/my corpus.txt", data)
    tr_submit(at, dataset="upload", **{**TR_MIN, "lr": None, "epochs": None})
    clean(at)
    assert any("Launched run" in t for t in texts(at.success))
    (saved,) = saved_uploads(runs_root)
    assert saved.name == upload_name("my corpus.txt", data) and saved.name.startswith("my_corpus-")
    assert saved.parent == (runs_root / "data").resolve() and saved.read_bytes() == data
    (folder,) = [p for p in runs_root.iterdir() if p.name != "data"]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["dataset"] == str(saved)
    assert {k: cfg[k] for k in ("n_layer", "n_head", "d_model", "block_size", "batch_size", "max_steps")} == \
        dict(n_layer=1, n_head=1, d_model=1, block_size=1, batch_size=1, max_steps=1)
    deadline = time.monotonic() + 120
    while runs_mod.read_status(folder)["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.5)
    status = runs_mod.read_status(folder)
    assert status["state"] == "finished", (status, runs_mod.log_tail(folder))
    assert status["step"] == 1
    at.run()
    no_exception(at)
    assert at.dataframe[0].value["run"].tolist() == [folder.name]  # the data folder is not a run


def test_upload_refusals_write_nothing(runs_root, launched, monkeypatch):
    import pages.parts.training_form as form

    monkeypatch.setattr(form, "upload_limit_bytes", lambda: 1000)  # the page's cap, as a 200 MB file would meet it
    at = open_app(TR_PAGE)
    tr_submit(at, dataset="upload")
    one_error(at, "Choose a .txt or .jsonl file under 'Upload a dataset file', or pick another dataset.")
    upload(at, "big.txt", b"x" * 1001)
    tr_submit(at, dataset="upload")
    one_error(at, "The file is 0.0 MB, over the 0.0 MB upload limit",
              "copy it to this machine, choose 'Local file / folder or hub id…' and enter its path under "
              "'Path or dataset id'")
    for name, data, message in [
        ("empty.txt", b"", "is empty; upload a file with text in it"),
        ("blank.txt", b" \n\t\n", "is empty; upload a file with text in it"),
        ("latin1.txt", "Ça va, Roméo?".encode("latin-1"), "is not UTF-8 text (byte 0); save it as UTF-8"),
        ("rows.jsonl", b'{"text": "fine"}\n{"text": 3}\n', "line 2 has no string 'text' field"),
        ("rows.jsonl", b'{"text": "fine"}\nnot json\n', "line 2 is not valid JSON"),
    ]:
        upload(at, name, data)
        tr_submit(at, dataset="upload")
        one_error(at, message)
    assert not launched and not saved_uploads(runs_root)


def test_upload_of_odd_and_long_names_and_unicode_text(runs_root, launched):
    at = open_app(TR_PAGE)
    text = (ODD + "\n").encode("utf-8")
    # (no NUL in a name: no file system has one, and Streamlit refuses such an upload itself)
    for name in [ODD.replace("\x00", "") + ".txt", "x" * 20_000 + ".jsonl", "..\\..\\windows.TXT", ".hidden.txt"]:
        data = text if not name.endswith(".jsonl") else json.dumps({"text": ODD}).encode() + b"\n"
        upload(at, name, data)
        tr_submit(at, dataset="upload")
        one_error(at, "captured")
        no_exception(at)
    names = [cfg.dataset for cfg, _ in launched]
    assert len(names) == 4
    for path in map(Path, names):
        assert path.parent == (runs_root / "data").resolve()
        assert len(path.name.encode()) <= 100 + 20 and not path.name.startswith(".")
    assert Path(names[2]).name.startswith("windows-") and Path(names[2]).suffix == ".txt"
    # refused by the stand-in launcher after saving: the saved copies are whole files, no temp files
    assert all(not p.name.startswith(".") for p in saved_uploads(runs_root))


def test_save_upload_sanitises_names_dedupes_and_caps(tmp_path: Path):
    folder = tmp_path / "data"
    a = save_upload("../../x/../corpus.txt", b"first text", folder, 1 << 20)
    b = save_upload("corpus.txt", b"first text", folder, 1 << 20)
    c = save_upload("C:\\Users\\me\\corpus.txt", b"second text", folder, 1 << 20)
    assert a == b and a != c and a.parent == c.parent == folder.resolve()
    assert a.read_bytes() == b"first text" and c.read_bytes() == b"second text"
    assert sorted(p.name for p in folder.iterdir()) == sorted({a.name, c.name})  # no temp files left
    with pytest.raises(LabError, match=r"over the 0 MB limit for uploads; to train on a bigger file, copy it"):
        save_upload("big.txt", b"x" * 11, folder, 10)
    with pytest.raises(LabError, match=r"Only \.txt and \.jsonl files can be uploaded .*got 'notes\.pdf'"):
        save_upload("notes.pdf", b"text", folder, 1 << 20)
    with pytest.raises(LabError, match=r"got 'xxxxx.*\.\.\.'"):
        save_upload("x" * 5000 + ".exe", b"text", folder, 1 << 20)
    assert len(list(folder.iterdir())) == 2
    for hostile in ["..", ".", "/", "\x00", "../..", "a.txt/"]:
        with pytest.raises(LabError):
            upload_name(hostile, b"x")
    assert upload_name("a/../../b.txt.txt", b"x").startswith("b.txt-")


def test_streamlit_config_caps_uploads_at_200_mb():
    import tomllib

    import streamlit as st

    config = tomllib.loads((Path(__file__).resolve().parents[2] / ".streamlit" / "config.toml").read_text())
    assert config["server"]["maxUploadSize"] == 200
    from pages.parts.training_form import upload_limit_bytes

    assert upload_limit_bytes() == st.get_option("server.maxUploadSize") * 2**20 == 200 * 2**20


def test_training_memory_estimate_counts_parameters_exactly_and_refuses_what_cannot_fit(monkeypatch):
    import core.devices as devices
    from core.models.gpt import GPT

    for sizes in (dict(preset="tiny"), dict(n_layer=3, n_head=2, d_model=24), dict(n_layer=1, n_head=1, d_model=1)):
        cfg = TrainConfig(block_size=40, vocab_size=333, **sizes)
        with torch.device("meta"):
            model = GPT(cfg.gpt_config(vocab_size=333, mask_token_id=None))
        assert parameter_count(cfg, 333) == model.num_params()
    cfg = TrainConfig(preset="tiny", block_size=64, batch_size=4, vocab_size=512)
    need = check_fits(cfg, "cpu")
    monkeypatch.setattr(devices, "free_bytes", lambda device: need - 1)
    with pytest.raises(LabError, match=r"This run needs about .* free on cpu; use fewer layers"):
        check_fits(cfg, "cpu")
    with pytest.raises(LabError, match=r"free on cuda:1"):  # under DDP every GPU holds a replica
        check_fits(cfg, "cuda", [1])
    monkeypatch.setattr(devices, "free_bytes", lambda device: None)
    assert check_fits(cfg, "cpu") == need


# -- Features ----------------------------------------------------------------------------------------

FEAT_PAGE = "pages/features.py"
TEXT = ("ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. "
        "JULIET: O Romeo, Romeo, wherefore art thou Romeo? Deny thy father and refuse thy name. ")


@pytest.fixture(scope="module")
def described(tmp_path_factory, tiny_gptlab_dir: Path) -> tuple[Path, Path]:
    """(model folder, its transcoder set folder) with a collected and described feature store."""
    return described_feature_model(tmp_path_factory.mktemp("extremes-features"), tiny_gptlab_dir, [TEXT * 8] * 3,
                                   steps=20, n_tokens=1024)


@pytest.fixture
def feat_env(tmp_path: Path, monkeypatch) -> SimpleNamespace:
    """Runs under tmp_path, and the job launcher a stand-in that records the command it was given."""
    import pages.parts.features_jobs_view as view

    root = tmp_path / "runs"
    monkeypatch.setenv("GPTLAB_RUNS", str(root))
    monkeypatch.setenv("GPTLAB_DATA_CACHE", str(tmp_path / "token-cache"))
    calls: list = []

    def fake_launch(action, argv, model, output, root=None):
        calls.append((action, list(argv), output))
        raise LabError("captured")

    monkeypatch.setattr(view, "launch", fake_launch)
    return SimpleNamespace(root=root, calls=calls)


def feat_page(model_dir: Path, **state):
    at = open_app(FEAT_PAGE, state={"model_spec": str(model_dir), **state})
    clean(at)
    return at


def test_features_browse_controls_at_their_extremes(described, feat_env):
    from core.interp import FeatureStore, store_path

    model_dir, set_dir = described
    at = feat_page(model_dir)
    with FeatureStore(store_path(set_dir), readonly=True) as store:
        n_features = {i.layer: i.n_features for i in store.layers()}
    for layer in sorted(n_features):
        at.selectbox(key="feat_layer").set_value(layer).run()
        assert limits(at.number_input(key="feat_feature")) == (0, n_features[layer] - 1)
        for feature in (0, n_features[layer] - 1):
            at.number_input(key="feat_feature").set_value(feature).run()
            clean(at)
            assert [s.value for s in at.subheader if s.value.startswith("Feature")] == \
                [f"Feature {feature} · layer {layer}"]
    for sort in ("frequency", "explanation score", "max activation", "feature"):
        for descending in (True, False):
            at.selectbox(key="feat_sort").set_value(sort)
            at.toggle(key="feat_desc").set_value(descending).run()
            clean(at)
    for method in ("detection", "simulation"):
        at.selectbox(key="feat_method").set_value(method).run()
        clean(at)
    for name, query in TEXTS.items():
        at.text_input(key="feat_search").input(query).run()
        clean(at)
        if name == "long":
            (caption,) = [c for c in texts(at.caption) if c.startswith("No explanation contains")]
            assert len(caption) < 120
    at.text_input(key="feat_search").input('" OR * ) ( NEAR AND "').run()  # FTS syntax is plain text
    clean(at)


def test_features_explain_controls_at_their_extremes(described, feat_env):
    model_dir, _ = described
    at = feat_page(model_dir, feat_section="Explain a completion")
    found = {w.key: limits(w) for w in at.number_input if w.key.startswith("feat_x_")}
    assert found == {"feat_x_max_new": (1, 1024), "feat_x_temperature": (0.05, 5.0), "feat_x_seed": (0, 2**31 - 1),
                     "feat_x_top": (1, 20)}

    def explain(prompt: str = "ROMEO:", **values):
        at.text_area(key="feat_x_prompt").input(prompt)
        set_widgets(at, "feat_x_", **values)
        at.run()
        at.button(key="feat_x_run").click()
        return at.run()

    explain(max_new=1, top=1)
    clean(at)
    assert "feat_x_result" in at.session_state
    explain(max_new=1024, top=20)
    one_error(at, "ask for at most")
    explain(max_new=2, greedy=False)
    for temperature, seed in ((0.05, 0), (5.0, 2**31 - 1)):
        explain(max_new=2, temperature=temperature, seed=seed, top=20)
        clean(at)
    for name, prompt in TEXTS.items():
        explain(prompt, max_new=2)
        if name in ("empty", "blank"):
            one_error(at, "Enter a prompt to explain; it is empty.")
        elif name in ("long", "unicode"):  # the tiny model's context is 64 tokens
            one_error(at, "but the model's context is 64")
        else:
            clean(at)
    at.radio(key="feat_x_explainer").set_value("lm").run()
    for name, spec in TEXTS.items():
        at.text_input(key="feat_x_lm").input(spec)
        explain(max_new=2)
        one_error(at, {"empty": "Enter the explainer model", "blank": "Enter the explainer model",
                       "long": "The explainer model 'To be, or not to be", "unicode": "contains a NUL character"}[name])


@pytest.mark.parametrize("name", list(TEXTS))
def test_features_set_folder_text_extremes(described, feat_env, name):
    model_dir, _ = described
    at = feat_page(model_dir)
    at.selectbox(key="feat_set").set_value("other…").run()
    at.text_input(key="feat_set_other").input(TEXTS[name]).run()
    no_exception(at)
    if name in ("empty", "blank"):
        assert any("Enter the folder of a transcoder set" in t for t in texts(at.info))
        assert not at.main.error
    elif name == "long":
        one_error(at, "is not a usable path (File name too long)")
    else:
        one_error(at, "contains a NUL character")


SHAPING = ("activation", "steps", "then_collect", "then_describe")  # fields that show, hide or enable others


def _job(at, action: str, **values):
    """Fill the job form as a user does: the fields that change the form first, then the rest, Start."""
    at.radio(key="feat_j_action").set_value(action).run()
    for name in SHAPING:
        if name in values:
            set_widgets(at, "feat_j_", **{name: values[name]})
            at.run()
    set_widgets(at, "feat_j_", **{k: v for k, v in values.items() if k not in SHAPING})
    at.button(key="feat_j_launch").click()
    return at.run()


def test_features_job_forms_at_min_and_max(described, feat_env):
    model_dir, set_dir = described
    calls = feat_env.calls
    at = feat_page(model_dir)
    jmax = dict(expansion=256, activation="topk", k=4096, lr=1.0, steps=10_000_000, batch_tokens=1_000_000,
                seq_len=8192, seed=2**31 - 1, then_collect=True, then_describe=True, collect_tokens=100_000_000,
                collect_seq_len=4096, top_k=200, n_quantile=100, n_heldout=100, n_negative=100,
                max_features=1_000_000, n_top=100, score=True)
    _job(at, "train", **jmax)
    one_error(at, "captured")
    jmin = dict(expansion=1, activation="relu", l1_coeff=0.0, lr=1e-6, steps=None, train_tokens=1024, batch_tokens=16,
                seq_len=8, seed=0, then_collect=True, then_describe=False, collect_tokens=256, collect_seq_len=8,
                top_k=1, n_quantile=0, n_heldout=0, n_negative=0)
    _job(at, "train", **jmin)
    one_error(at, "captured")
    _job(at, "collect", collect_tokens=100_000_000, collect_seq_len=4096, top_k=200, n_quantile=100, n_heldout=100,
         n_negative=100)
    one_error(at, "captured")
    _job(at, "describe", max_features=1, n_top=1, score=False)
    one_error(at, "captured")
    (a, high, _), (b, low, _), (c, collect, _), (d, describe, _) = calls
    assert (a, b, c, d) == ("train", "train", "collect", "describe")

    def flags(argv: list[str]) -> dict[str, str]:
        return {f: v for f, v in zip(argv, argv[1:] + [""]) if f.startswith("--")}

    assert {k: flags(high)[k] for k in ("--expansion", "--k", "--steps", "--batch-tokens", "--seq-len", "--seed",
                                          "--collect-tokens", "--top-k", "--max-features", "--n-top", "--lr")} == \
        {"--expansion": "256", "--k": "4096", "--steps": "10000000", "--batch-tokens": "1000000", "--seq-len": "8192",
         "--seed": str(2**31 - 1), "--collect-tokens": "100000000", "--top-k": "200", "--max-features": "1000000",
         "--n-top": "100", "--lr": "1.0"}
    assert {k: flags(low)[k] for k in ("--expansion", "--activation", "--l1-coeff", "--train-tokens", "--batch-tokens",
                                         "--seq-len", "--n-quantile")} == \
        {"--expansion": "1", "--activation": "relu", "--l1-coeff": "0.0", "--train-tokens": "1024",
         "--batch-tokens": "16", "--seq-len": "8", "--n-quantile": "0"}
    assert "--no-describe" in low and "--steps" not in low
    assert flags(collect)["--collect-tokens"] == "100000000" and "--no-score" in describe


@pytest.mark.parametrize("field", ["output", "dataset_path", "explainer_spec"])
def test_features_job_text_extremes(described, feat_env, field, tmp_path):
    model_dir, _ = described
    at = feat_page(model_dir)
    for name, text in TEXTS.items():
        before = len(feat_env.calls)
        if field == "explainer_spec":
            at.radio(key="feat_j_action").set_value("describe").run()
            at.radio(key="feat_j_explainer_kind").set_value("lm").run()
        else:
            at.radio(key="feat_j_action").set_value("train").run()
            if field == "dataset_path":
                at.selectbox(key="feat_j_dataset").set_value("path").run()
        at.text_input(key=f"feat_j_{field}").input(text).run()
        at.button(key="feat_j_launch").click().run()
        no_exception(at)
        error = one_error(at)
        started = len(feat_env.calls) > before
        if field == "output":  # empty: the model's own folder; otherwise the path, if usable
            assert started == (name in ("empty", "blank")) or error == "captured"
            if name == "long":
                assert "is not a usable path (File name too long)" in error
            if name == "unicode":
                assert "contains a NUL character" in error
        elif field == "dataset_path":
            assert not started
            assert {"empty": "Enter a local .txt/.jsonl file or folder for the corpus",
                    "blank": "Enter a local .txt/.jsonl file or folder for the corpus",
                    "long": "is not a usable path (File name too long)",
                    "unicode": "contains a NUL character"}[name] in error
        else:
            assert (name in ("empty", "blank")) == ("Enter the explainer" in error)
