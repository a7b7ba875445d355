"""The Training page, driven through app.py with AppTest (see app_harness.py).

One test launches a real tiny CPU run from the form (a separate ``python -m core train``
process), watches its curve grow, is refused a delete while it runs, stops it (a checkpoint is
written) and deletes it. The others use run folders written here (as a CLI run would leave
them) to check the table, overlaid charts, failure display and the "Open in" buttons without a
process. Every process a test starts is killed at teardown.

At the end every number field goes to its minimum and its maximum and the text fields go in empty,
blank, very long and in odd Unicode before Launch is pressed (the launcher a stand-in that records
the run it was given): an impossible run gets one st.error saying what to change and starts nothing.
The upload (a .txt/.jsonl file saved under the runs folder's data/) is tested through AppTest's file
uploader, down to a real tiny run training on the saved copy.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from app_harness import ODD, TEXTS, chart_data, clean, limits, no_exception, one_error, open_app, set_widgets, texts

from core.errors import LabError
from core.jobs.events import EventLog
from core.jobs.process import process_start, this_host
from core.training import runs as runs_mod
from core.training.config import TrainConfig
from core.training.data import save_upload, upload_name, uploads_dir
from core.training.memory import check_fits, parameter_count
from pages.parts.training_form import config_from_values, devices_config

PAGE = "pages/training.py"
CORPUS = ("ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun.\n"
          "JULIET: O Romeo, Romeo, wherefore art thou Romeo? Deny thy father and refuse thy name.\n") * 60
TINY = dict(preset="tiny", n_layer=1, n_head=2, d_model=32, block_size=32, batch_size=4, vocab_size=300,
            max_steps=5000, val_every=10, log_every=5, save_every=0, preview_every=0)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS, encoding="utf-8")
    return path


# -- helpers -------------------------------------------------------------------------------------

def fill_form(at, **values) -> None:
    set_widgets(at, "tr_", **values)


def launch(at, **values):
    fill_form(at, devices=["cpu"], **values)
    return at.button(key="tr_launch").click().run()


def chart_titles(at) -> list[str]:
    return [json.loads(c.proto.spec).get("title") for c in at.get("vega_lite_chart")]


def table(at) -> pd.DataFrame:
    return at.dataframe[0].value


def shown_step(at) -> int:
    value = next(m.value for m in at.metric if m.label == "Step")
    return int(value.split("/")[0].replace(",", ""))


def wait_for(at, predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        at.run()
        assert not at.exception
        if predicate(at):
            return at
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; errors: {texts(at.error)}; "
                                 f"table: {table(at).to_dict('records') if at.dataframe else None}")
        time.sleep(0.5)


def write_run(root: Path, run_id: str, status: dict, metrics: list[dict], config: dict | None = None,
              log: str = "") -> Path:
    """A run folder as the trainer leaves it (config, status, metrics, log)."""
    folder = root / run_id
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"objective": "ar", "preset": "tiny", "dataset": "shakespeare",
                                                    **(config or {})}))
    (folder / "status.json").write_text(json.dumps(status))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (folder / "log.txt").write_text(log)
    return folder


def fake_metrics(n: int, start: float) -> list[dict]:
    return [{"step": s, "tokens": 128 * s, "train_loss": start - 0.1 * s, "lr": 1e-3, "grad_norm": 1.0 + s,
             "tokens_per_s": 1000.0 + s, "mfu": None, "gpu_mem_gb": None, "time": float(s),
             **({"val_loss": start - 0.1 * s + 0.05} if s % 2 == 0 else {})} for s in range(1, n + 1)]


# -- a real run ----------------------------------------------------------------------------------

def test_launch_watch_stop_and_delete_a_tiny_cpu_run(runs_root: Path, corpus: Path):
    at = open_app(PAGE)
    assert not at.exception and not at.error
    assert any("No runs under" in t for t in texts(at.info))
    launch(at, dataset="path", dataset_path=str(corpus), **TINY)
    assert not at.exception and not at.error, texts(at.error)
    assert any("Launched run" in t for t in texts(at.success))
    (folder,) = [p for p in runs_root.iterdir()]
    run_id = folder.name
    cfg = json.loads((folder / "config.json").read_text())
    assert (cfg["n_layer"], cfg["n_head"], cfg["d_model"], cfg["block_size"], cfg["batch_size"]) == (1, 2, 32, 32, 4)
    assert (cfg["dataset"], cfg["device"], cfg["devices"], cfg["amp"], cfg["max_steps"]) == \
        (str(corpus), "cpu", None, False, 5000)
    assert at.session_state["tr_show"] == [run_id]
    assert at.session_state["tr_new_run"] is False  # the form folds away so the run's view is in sight
    assert table(at)["state"].tolist() == ["running"]

    # the curve grows between two reads a couple of seconds apart
    wait_for(at, lambda a: shown_step(a) >= 10 and "Loss by step" in chart_titles(a), 60, "the first metrics")
    step1, rows1 = shown_step(at), len(chart_data(at, "Loss by step"))
    time.sleep(2.0)
    wait_for(at, lambda a: shown_step(a) > step1, 20, "more steps")
    loss = chart_data(at, "Loss by step")
    assert len(loss) > rows1
    assert set(loss["run"]) == {run_id}
    assert set(loss["split"]) == {"train", "validation"}  # val every 10 steps
    on_disk = runs_mod.read_metrics(folder)
    assert loss[loss["split"] == "train"]["step"].max() <= on_disk[-1]["step"]
    assert not any("MFU" in t for t in chart_titles(at))
    assert any("MFU" in t and "null on the CPU" in t for t in texts(at.caption))

    # delete is refused while it runs
    at.button(key=f"tr_delete_{run_id}").click().run()
    assert not at.exception
    assert any("is running; stop it before deleting" in t for t in texts(at.error))
    assert folder.is_dir()
    at.run()  # the next refresh of the live view still shows the refusal
    assert any("is running; stop it before deleting" in t for t in texts(at.error))

    # stop: status "stopped", a checkpoint at the stop step, Resume offered instead of Stop
    at.button(key=f"tr_stop_{run_id}").click().run()
    assert not at.exception and not at.error
    assert any("Stop requested" in t for t in texts(at.success))
    wait_for(at, lambda a: table(a)["state"].tolist() == ["stopped"], 30, "the run to stop")
    status = runs_mod.read_status(folder)
    assert status["state"] == "stopped"
    steps = runs_mod.checkpoint_steps(folder)
    assert steps == [status["step"]] and steps[0] > step1
    assert (folder / "checkpoints" / str(steps[0]) / "model.safetensors").is_file()
    assert at.selectbox(key=f"tr_ckpt_{run_id}").options == [f"step {steps[0]:,}"]
    assert shown_step(at) == steps[0]
    keys = [b.key for b in at.button]
    assert f"tr_resume_{run_id}" in keys and f"tr_stop_{run_id}" not in keys

    # delete works on the stopped run
    at.button(key=f"tr_delete_{run_id}").click().run()
    assert not at.exception and not at.error
    assert any(f"Deleted run {run_id}" in t for t in texts(at.success))
    assert not folder.exists()
    assert any("No runs under" in t for t in texts(at.info))


def test_hub_dataset_offline_fails_with_the_engines_message(runs_root: Path):
    at = open_app(PAGE)
    launch(at, dataset="fineweb-edu", max_steps=10)
    assert not at.exception and not at.error
    wait_for(at, lambda a: table(a)["state"].tolist() == ["failed"], 60, "the offline dataset to fail")
    errors = texts(at.error)
    assert len(errors) == 1
    assert "Dataset 'fineweb-edu' is not in the local Hugging Face cache" in errors[0]
    assert "--dataset shakespeare" in errors[0]


# -- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("values, message", [
    (dict(d_model=30, n_head=4), "d_model=30 is not divisible by n_head=4"),
    (dict(dataset="path", dataset_path="/no/such/corpus.txt"), "/no/such/corpus.txt does not exist"),
    (dict(dataset="path", dataset_path=""), "Enter a local .txt/.jsonl file or folder"),
    (dict(run_name="../escape"), "Run name '../escape' is not allowed"),
])
def test_bad_input_shows_error_and_starts_nothing(runs_root: Path, values: dict, message: str):
    at = open_app(PAGE)
    launch(at, **values)
    assert not at.exception
    errors = texts(at.error)
    assert len(errors) == 1 and message in errors[0], errors
    assert not at.success
    assert not runs_root.exists() or not any(runs_root.iterdir())


def test_form_values_map_onto_the_config(tmp_path: Path):
    base = dict(dataset="shakespeare", dataset_path="", tokenizer="bpe", vocab_size=512, objective="diffusion",
                preset="gpt2-small", n_layer=None, n_head=None, d_model=None, block_size=64, model_version="gpt2",
                optimizer="muon", lr=None, weight_decay=0.05, warmup_steps=None, batch_size=2, grad_acc_steps=3,
                max_steps=None, epochs=2.5, compile=True, seed=7, val_every=0, preview_every=5, save_every=0,
                keep_last=2, log_every=1, devices=["cpu"], precision="bfloat16", run_name=" mine ")
    cfg, name = config_from_values(base)
    assert name == "mine"
    assert (cfg.objective, cfg.preset, cfg.model_sizes()) == ("diffusion", "gpt2-small",
                                                               dict(n_layer=12, n_head=12, d_model=768))
    assert (cfg.lr, cfg.weight_decay, cfg.warmup_steps, cfg.model_version, cfg.optimizer) == \
        (None, 0.05, None, "gpt2", "muon")
    assert (cfg.max_steps, cfg.epochs, cfg.grad_acc_steps, cfg.amp, cfg.amp_dtype, cfg.compile) == \
        (None, 2.5, 3, True, "bfloat16", True)
    cfg, name = config_from_values({**base, "precision": "float16", "n_layer": 2, "run_name": ""})
    assert (cfg.amp, cfg.amp_dtype, cfg.model_sizes()["n_layer"], name) == (True, "float16", 2, None)
    assert config_from_values({**base, "precision": "float32"})[0].amp is False
    assert devices_config(["cpu"]) == ("cpu", None)
    assert devices_config(["cuda:1"]) == ("cuda:1", None)
    assert devices_config(["cuda:2", "cuda:0"]) == ("cuda", [0, 2])  # several GPUs: torchrun
    for bad, message in ([[], "Choose a device"], [["cpu", "cuda:0"], "not both"]):
        with pytest.raises(LabError, match=message):
            devices_config(bad)


# -- runs left by the CLI ------------------------------------------------------------------------

def test_runs_from_the_cli_listed_overlaid_and_failures_shown(runs_root: Path):
    write_run(runs_root, "cli-finished", {"state": "finished", "step": 6, "max_steps": 6, "train_loss": 4.4,
                                          "val_loss": 4.45}, fake_metrics(6, 5.0))
    failed = {"state": "failed", "step": 3, "reason": "The training loss became nan at step 3",
              "last_log": ["step 2/9 | loss 7.1", "run failed: loss became nan"]}
    folder = write_run(runs_root, "cli-failed", failed, fake_metrics(3, 8.0), config={"objective": "diffusion"})
    samples = [{"step": s, "prompt": "ROMEO:", "text": f" take {s}"} for s in (1, 2, 3, 4)]
    (folder / "previews.jsonl").write_text("".join(json.dumps(p) + "\n" for p in samples))
    at = open_app(PAGE, state={"tr_show": ["cli-finished", "cli-failed"]})
    assert not at.exception
    rows = table(at).set_index("run")
    assert rows.loc["cli-finished", "state"] == "finished" and rows.loc["cli-finished", "step"] == "6 / 6"
    assert rows.loc["cli-failed", "state"] == "failed" and rows.loc["cli-failed", "objective"] == "diffusion"
    # overlaid: one chart, both runs, exact values from metrics.jsonl
    loss = chart_data(at, "Loss by step")
    train = loss[loss["split"] == "train"]
    assert sorted(set(train["run"])) == ["cli-failed", "cli-finished"]
    assert train[train["run"] == "cli-finished"]["loss"].tolist() == pytest.approx([5.0 - 0.1 * s for s in range(1, 7)])
    val = loss[(loss["split"] == "validation") & (loss["run"] == "cli-finished")]
    assert val["step"].tolist() == [2, 4, 6]
    at.radio(key="tr_x_axis").set_value("tokens").run()
    by_tokens = chart_data(at, "Loss by tokens seen")
    assert by_tokens[by_tokens["run"] == "cli-failed"]["x"].tolist()[:3] == [128, 256, 384]
    at.radio(key="tr_x_axis").set_value("step").run()
    assert chart_data(at, "Gradient norm")["grad_norm"].max() == 7.0
    assert "Tokens / s" in chart_titles(at) and "Learning rate" in chart_titles(at)
    assert "MFU" not in chart_titles(at) and "GPU memory (GB)" not in chart_titles(at)
    # the failure: reason as an error, last log lines below it; finished runs resume to a larger step
    assert texts(at.error) == ["Run failed: The training loss became nan at step 3"]
    assert "step 2/9 | loss 7.1\nrun failed: loss became nan" in texts(at.code)
    assert at.number_input(key="tr_more_cli-finished").value == 12
    assert [t.value for t in at.text] == ["ROMEO: take 4", "ROMEO: take 3", "ROMEO: take 2"]  # newest samples first
    keys = [b.key for b in at.button]
    assert {"tr_resume_cli-finished", "tr_resume_cli-failed"} <= set(keys)
    assert not any(k.startswith("tr_stop_") for k in keys)
    assert json.loads(at.get("vega_lite_chart")[0].proto.spec)["layer"][0]["encoding"]["y"]["scale"] == {"zero": False}
    at.toggle(key="tr_log_loss").set_value(True).run()
    assert json.loads(at.get("vega_lite_chart")[0].proto.spec)["layer"][0]["encoding"]["y"]["scale"] == {"type": "log"}
    # fewer runs shown: the charts follow the selection
    at.multiselect(key="tr_show").set_value(["cli-failed"]).run()
    assert set(chart_data(at, "Loss by step")["run"]) == {"cli-failed"}


def test_open_checkpoint_in_generate(runs_root: Path, tiny_gptlab_dir: Path):
    folder = write_run(runs_root, "with-ckpt", {"state": "stopped", "step": 20, "reason": "stop requested"},
                       fake_metrics(2, 5.0))
    for step in (10, 20):
        shutil.copytree(tiny_gptlab_dir, folder / "checkpoints" / str(step))
    at = open_app(PAGE)
    assert not at.exception
    pick = at.selectbox(key="tr_ckpt_with-ckpt")
    assert pick.options == ["step 20", "step 10"] and pick.value == 20
    assert any("Stopped: stop requested" in t for t in texts(at.caption))
    # a new checkpoint is followed while the newest is shown; a deliberately picked older one stays
    shutil.copytree(tiny_gptlab_dir, folder / "checkpoints" / "30")
    at.run()
    assert at.selectbox(key="tr_ckpt_with-ckpt").value == 30
    at.selectbox(key="tr_ckpt_with-ckpt").set_value(10).run()
    shutil.copytree(tiny_gptlab_dir, folder / "checkpoints" / "40")
    at.run()
    pick = at.selectbox(key="tr_ckpt_with-ckpt")
    assert pick.options == ["step 40", "step 30", "step 20", "step 10"] and pick.value == 10
    at.button(key="tr_open_generate_with-ckpt").click().run()
    assert not at.exception and not at.error
    assert at.session_state["model_spec"] == str(folder / "checkpoints" / "10")
    assert [t.value for t in at.title] == ["Generate"]
    assert str(folder / "checkpoints" / "10") in " ".join(texts(at.sidebar.caption))
    consensus = Path(__file__).resolve().parents[2] / "pages" / "consensus.py"
    at.switch_page(PAGE).run()
    keys = [b.key for b in at.button]
    assert ("tr_open_consensus_with-ckpt" in keys) == consensus.is_file()
    assert "tr_open_features_with-ckpt" not in keys or (consensus.parent / "features.py").is_file()


def test_gpu_metrics_are_charted_when_reported(runs_root: Path):
    metrics = [{**m, "mfu": 0.4 + 0.01 * m["step"], "gpu_mem_gb": 10.5} for m in fake_metrics(4, 5.0)]
    write_run(runs_root, "gpu-run", {"state": "finished", "step": 4, "max_steps": 4}, metrics)
    at = open_app(PAGE)
    assert not at.exception and not at.error
    assert chart_data(at, "MFU")["mfu"].tolist() == pytest.approx([0.41, 0.42, 0.43, 0.44])
    assert chart_data(at, "GPU memory (GB)")["gpu_mem_gb"].tolist() == [10.5] * 4
    assert not any("not reported" in t for t in texts(at.caption))


def test_a_broken_run_is_shown_unreadable_and_the_others_as_usual(runs_root: Path):
    write_run(runs_root, "good", {"state": "finished", "step": 6, "max_steps": 6, "train_loss": 4.4},
              fake_metrics(6, 5.0))
    broken = write_run(runs_root, "broken", {"state": "finished"}, fake_metrics(2, 5.0))
    (broken / "status.json").write_text('{"state": "finished", "step": "six"')
    at = open_app(PAGE, state={"tr_show": ["good", "broken"]})
    assert not at.exception
    rows = table(at).set_index("run")
    assert rows.loc["good", "state"] == "finished" and rows.loc["good", "step"] == "6 / 6"
    assert rows.loc["broken", "state"] == "unreadable"
    (error,) = texts(at.error)
    assert error.startswith("Run unreadable: ") and "status.json is not valid JSON" in error
    keys = [b.key for b in at.button]
    assert "tr_resume_good" in keys and "tr_resume_broken" not in keys and "tr_stop_broken" not in keys
    at.button(key="tr_delete_broken").click().run()
    assert not at.exception and not broken.exists()
    assert table(at)["run"].tolist() == ["good"]


def test_a_running_runs_progress_bar_comes_from_its_events_file(runs_root: Path):
    status = {"state": "running", "step": 8, "max_steps": 20, "pid": os.getpid(),
              "pid_start": process_start(os.getpid()), "host": this_host()}
    folder = write_run(runs_root, "live", status, fake_metrics(8, 5.0))
    at = open_app(PAGE)
    assert [p.proto.text for p in at.get("progress")] == ["preparing data…"]  # no event yet
    log = EventLog(folder)
    log.progress("train", 9, 20, text="loss 4.1000")
    at.run()
    (bar,) = at.get("progress")
    assert bar.proto.text == "train step 9 / 20 · loss 4.1000" and bar.proto.value == 45
    (folder / "console.txt").write_text("train:  99%|#########| 19/20 [00:01<00:00]\n")  # never parsed
    at.run()
    assert [p.proto.text for p in at.get("progress")] == ["train step 9 / 20 · loss 4.1000"]


# -- every field at its extremes --------------------------------------------------------------------

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


def nothing_started(root: Path) -> bool:
    return not root.exists() or not any(p for p in root.iterdir())


def test_training_form_limits_are_the_ones_tested(runs_root):
    at = open_app(PAGE)
    found = {w.key[3:]: limits(w) for w in at.number_input if w.key.startswith("tr_")}
    assert found == {k: (TR_MIN[k], TR_MAX[k]) for k in TR_MAX}
    assert at.selectbox(key="tr_dataset").options[-1] == "Upload a .txt/.jsonl file…"
    uploader = at.file_uploader(key="tr_upload")
    assert uploader.allowed_type == [".txt", ".jsonl"] and uploader.proto.max_upload_size_mb == 200


def test_training_every_maximum_is_refused_before_a_process_starts(runs_root, launched):
    at = open_app(PAGE)
    launch(at, **TR_MAX)
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
    at = open_app(PAGE)
    base = {**TR_MIN, "lr": None, "epochs": None}
    launch(at, **{**base, **values})
    one_error(at, message)
    assert not launched and nothing_started(runs_root)


def test_training_valid_extremes_reach_the_launch_with_those_values(runs_root, launched):
    """Every count at its maximum on a tiny model, then every setting at its smallest valid value:
    the config handed to the launcher carries them (the launcher is a stand-in here)."""
    at = open_app(PAGE)
    counts = {k: TR_MAX[k] for k in ("lr", "weight_decay", "warmup_steps", "seed", "max_steps", "val_every",
                                     "log_every", "preview_every", "save_every", "keep_last", "grad_acc_steps")}
    launch(at, n_layer=1, n_head=1, d_model=8, block_size=16, batch_size=1, vocab_size=300, **counts)
    one_error(at, "captured")
    launch(at, **{**TR_MIN, "lr": None, "epochs": None})
    one_error(at, "captured")
    (high, _), (low, _) = launched
    assert {k: getattr(high, k) for k in counts} == counts
    assert (high.n_layer, high.d_model, high.block_size) == (1, 8, 16)
    assert {k: getattr(low, k) for k in TR_MIN if k not in ("lr", "epochs")} == \
        {k: v for k, v in TR_MIN.items() if k not in ("lr", "epochs")}
    assert nothing_started(runs_root)


@pytest.mark.parametrize("field, name", [(f, n) for f in ("run_name", "dataset_path") for n in TEXTS])
def test_training_text_extremes(runs_root, launched, field, name):
    at = open_app(PAGE)
    values = {"run_name": "", "dataset": "shakespeare", "dataset_path": ""}
    if field == "dataset_path":
        values["dataset"] = "path"
    values[field] = TEXTS[name]
    launch(at, **values)
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


# -- uploads ---------------------------------------------------------------------------------------

def upload(at, name: str, data: bytes, mime: str = "text/plain") -> None:
    at.file_uploader(key="tr_upload").set_value((name, data, mime))


def saved_uploads(root: Path) -> list[Path]:
    folder = uploads_dir(root)
    return sorted(folder.iterdir()) if folder.is_dir() else []


def test_upload_trains_a_run_on_the_saved_copy_with_every_minimum(runs_root):
    """The whole path: a file uploaded with a hostile name is saved under the runs folder's data/,
    the run's dataset is that copy, and a run with every setting at its smallest valid value
    (one layer of width 1, a one-token context, one step) trains on it to the end."""
    at = open_app(PAGE)
    data = CORPUS.encode("utf-8")
    upload(at, "../../../etc/my corpus.txt", data)
    launch(at, dataset="upload", **{**TR_MIN, "lr": None, "epochs": None})
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
    at = open_app(PAGE)
    launch(at, dataset="upload")
    one_error(at, "Choose a .txt or .jsonl file under 'Upload a dataset file', or pick another dataset.")
    upload(at, "big.txt", b"x" * 1001)
    launch(at, dataset="upload")
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
        launch(at, dataset="upload")
        one_error(at, message)
    assert not launched and not saved_uploads(runs_root)


def test_upload_of_odd_and_long_names_and_unicode_text(runs_root, launched):
    at = open_app(PAGE)
    text = (ODD + "\n").encode("utf-8")
    # (no NUL in a name: no file system has one, and Streamlit refuses such an upload itself)
    for name in [ODD.replace("\x00", "") + ".txt", "x" * 20_000 + ".jsonl", "..\\..\\windows.TXT", ".hidden.txt"]:
        data = text if not name.endswith(".jsonl") else json.dumps({"text": ODD}).encode() + b"\n"
        upload(at, name, data)
        launch(at, dataset="upload")
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


# -- the dashboard: colours, legend, smoothing, x axis, previews, the launch banner, trackers -----------------

def loss_spec(at) -> dict:
    return next(json.loads(c.proto.spec) for c in at.get("vega_lite_chart")
                if str(json.loads(c.proto.spec).get("title", "")).startswith("Loss by"))


def three_runs(root: Path) -> list[str]:
    ids = ["a-run-with-a-rather-long-name-20261203-120000-ar-gpt2-medium", "second", "third"]
    for i, rid in enumerate(ids):
        write_run(root, rid, {"state": "finished", "step": 6, "max_steps": 6}, fake_metrics(6, 5.0 + i))
    return ids


def test_runs_are_told_apart_by_colour_and_splits_by_line_style(runs_root: Path):
    from pages.parts.training_charts import LOSS_HEIGHT, RUN_COLORS

    ids = three_runs(runs_root)
    at = open_app(PAGE, state={"tr_show": [ids[2], ids[0], ids[1]]})
    no_exception(at)
    spec = loss_spec(at)
    enc = spec["layer"][0]["encoding"]
    assert enc["color"]["scale"] == {"domain": [ids[2], ids[0], ids[1]], "range": RUN_COLORS[:3]}  # order picked
    assert len(set(RUN_COLORS)) == len(RUN_COLORS) == 10
    for small in ("Gradient norm", "Tokens / s"):  # each run keeps its colour in every chart
        small_spec = next(json.loads(c.proto.spec) for c in at.get("vega_lite_chart")
                          if json.loads(c.proto.spec).get("title") == small)
        assert small_spec["encoding"]["color"]["scale"] == enc["color"]["scale"]
        assert small_spec["encoding"]["color"]["legend"] is None
    dash = enc["strokeDash"]
    assert dash["scale"] == {"domain": ["train", "validation"], "range": [[1, 0], [6, 4]]}  # solid, dashed
    assert dash["legend"]["symbolType"] == "stroke" and enc["color"]["legend"]["symbolType"] == "stroke"
    assert dash["legend"]["orient"] == enc["color"]["legend"]["orient"] == "bottom"  # never beside a plot
    assert spec["height"] == LOSS_HEIGHT  # the plot's own height: the legend adds to it, never takes from it
    assert spec["autosize"] == {"type": "fit-x", "contains": "padding"}
    marks = [(layer["mark"]["type"], layer["encoding"].get("strokeDash", {}).get("field")) for layer in spec["layer"]]
    assert marks == [("line", "split"), ("line", "split"), ("circle", None), ("circle", None)]
    assert [[t["filter"] for t in layer["transform"]] for layer in spec["layer"]] == [
        ["(datum.split === 'train')"], ["(datum.split === 'validation')"],   # train, validation,
        ["(datum.split === 'validation')"], ["(datum.split === 'train')", "datum.last"]]  # its dots, where each run is
    loss = chart_data(at, "Loss by step")
    assert set(loss["split"]) == {"train", "validation"} and set(loss["run"]) == set(ids)
    newest = loss[loss["last"]]
    assert sorted(newest["run"]) == sorted(ids) and set(newest["step"]) == {6} and set(newest["split"]) == {"train"}


def test_a_run_with_one_logged_step_shows_a_dot(runs_root: Path):
    write_run(runs_root, "young", {"state": "finished", "step": 1, "max_steps": 1}, fake_metrics(1, 5.0))
    at = open_app(PAGE)
    no_exception(at)
    loss = chart_data(at, "Loss by step")
    assert loss[["step", "split", "loss", "last"]].to_dict("records") == [
        {"step": 1, "split": "train", "loss": pytest.approx(4.9), "last": True}]
    axis = loss_spec(at)["layer"][0]["encoding"]
    assert axis["x"]["axis"]["format"] == ",~f" and axis["y"]["axis"]["format"] == ".4~f"  # 10, not 10.000000
    grad = next(json.loads(c.proto.spec) for c in at.get("vega_lite_chart")
                if json.loads(c.proto.spec).get("title") == "Gradient norm")
    assert grad["mark"]["point"] is True  # a line of one point would be invisible


def test_smoothing_is_tensorboards_debiased_average_with_the_raw_curve_kept(runs_root: Path):
    from pages.parts.training_charts import smooth

    assert smooth(pd.Series([1.0, 2.0, 3.0]), 0.5).tolist() == pytest.approx([1.0, 5 / 3, 17 / 7], abs=1e-12)
    got = smooth(pd.Series([4.0, float("nan"), 2.0]), 0.5).tolist()
    assert got[0] == 4.0 and got[1] != got[1] and got[2] == pytest.approx((0.25 * 4 + 0.5 * 2) / 0.75)
    assert smooth(pd.Series([1.0, 5.0]), 0.0).tolist() == [1.0, 5.0]
    ids = three_runs(runs_root)
    at = open_app(PAGE, state={"tr_show": ids[:2]})
    slider = at.slider(key="tr_smoothing")
    assert (slider.value, slider.min, slider.max) == (0.0, 0.0, 0.99)
    raw = chart_data(at, "Loss by step")
    assert len(loss_spec(at)["layer"]) == 4  # no faint raw curve while nothing is smoothed
    slider.set_value(0.6).run()
    no_exception(at)
    layers = loss_spec(at)["layer"]
    assert len(layers) == 5 and layers[0]["mark"]["opacity"] == 0.25 and layers[0]["encoding"]["y"]["field"] == "raw"
    loss = chart_data(at, "Loss by step")
    for i, rid in enumerate(ids[:2]):
        train = loss[(loss["run"] == rid) & (loss["split"] == "train")]
        values = [5.0 + i - 0.1 * s for s in range(1, 7)]
        assert train["raw"].tolist() == pytest.approx(values)
        expected, last = [], 0.0
        for n, v in enumerate(values, 1):  # each run smoothed on its own
            last = 0.6 * last + 0.4 * v
            expected.append(last / (1 - 0.6 ** n))
        assert train["loss"].tolist() == pytest.approx(expected, rel=1e-12)
        val = loss[(loss["run"] == rid) & (loss["split"] == "validation")]
        assert val["loss"].tolist() == val["raw"].tolist() == \
            raw[(raw["run"] == rid) & (raw["split"] == "validation")]["loss"].tolist()  # validation never smoothed
    grad = chart_data(at, "Gradient norm")
    assert grad[grad["run"] == ids[0]]["grad_norm"].tolist()[0] == pytest.approx(2.0)  # debiased: starts on the value
    assert chart_data(at, "Learning rate")["lr"].tolist() == [1e-3] * 12  # the schedule is shown as it is


def test_x_axis_by_step_tokens_or_training_time(runs_root: Path):
    long = [{**m, "time": 400.0 * m["step"]} for m in fake_metrics(6, 5.0)]
    write_run(runs_root, "slow", {"state": "finished", "step": 6, "max_steps": 6}, long)
    at = open_app(PAGE)
    assert at.radio(key="tr_x_axis").options == ["step", "tokens seen", "training time"]
    assert chart_data(at, "Loss by step")["x"].tolist()[:3] == [1, 2, 3]
    at.radio(key="tr_x_axis").set_value("time").run()
    no_exception(at)
    spec = loss_spec(at)
    assert spec["title"] == "Loss by training time" and spec["layer"][0]["encoding"]["x"]["title"] == \
        "training time (min)"
    data = chart_data(at, "Loss by training time")
    train = data[data["split"] == "train"]
    assert train["x"].tolist() == pytest.approx([400 * s / 60 for s in range(1, 7)])
    grad = next(json.loads(c.proto.spec) for c in at.get("vega_lite_chart")
                if json.loads(c.proto.spec).get("title") == "Gradient norm")
    assert grad["encoding"]["x"]["title"] == "training time (min)"  # every chart follows the axis
    at.radio(key="tr_x_axis").set_value("tokens").run()
    assert loss_spec(at)["layer"][0]["encoding"]["x"]["title"] == "tokens seen"
    assert loss_spec(at)["layer"][0]["encoding"]["x"]["axis"]["format"] == "~s"  # 41k, 1.2M
    assert chart_data(at, "Loss by tokens seen")["x"].tolist()[:2] == [128, 256]


def test_previews_are_on_by_default(runs_root, launched):
    at = open_app(PAGE)
    assert at.number_input(key="tr_preview_every").value == TrainConfig().preview_every == 200
    launch(at)
    one_error(at, "captured")
    ((cfg, _),) = launched
    assert cfg.preview_every == 200


def test_the_launch_banner_goes_after_a_few_seconds(runs_root: Path):
    import pages.training as page_mod

    write_run(runs_root, "r", {"state": "finished", "step": 6, "max_steps": 6}, fake_metrics(6, 5.0))
    at = open_app(PAGE, state={"tr_notice": ("Launched run **r** on cpu", time.monotonic())})
    assert texts(at.success) == ["Launched run **r** on cpu"]
    at.session_state["tr_notice"] = ("Launched run **r** on cpu", time.monotonic() - page_mod.NOTICE_SHOW_S - 0.1)
    at.run()
    assert not at.success and "tr_notice" not in at.session_state
    assert 2 < page_mod.NOTICE_SHOW_S <= 10


def test_log_to_trackers_from_the_form(runs_root, launched, monkeypatch):
    import importlib.util

    at = open_app(PAGE)
    box = at.multiselect(key="tr_log_to")
    assert box.options == ["TensorBoard", "Weights & Biases", "MLflow"] and box.value == []
    launch(at, log_to=["tensorboard", "mlflow"])
    one_error(at, "captured")
    assert launched[-1][0].log_to == ["tensorboard", "mlflow"]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    launch(at, log_to=["mlflow"])
    one_error(at, "Logging to mlflow needs the mlflow package, which is not installed here; install it with "
                  "`pip install mlflow-skinny")
    assert len(launched) == 1 and nothing_started(runs_root)
