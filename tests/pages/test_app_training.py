"""The Training page, driven through app.py with AppTest (see app_harness.py).

One test launches a real tiny CPU run from the form (a separate ``python -m core train``
process), watches its curve grow, is refused a delete while it runs, stops it (a checkpoint is
written) and deletes it. The others use run folders written here (as a CLI run would leave
them) to check the table, overlaid charts, failure display and the "Open in" buttons without a
process. Every process a test starts is killed at teardown.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
from app_harness import chart_data, open_app, set_widgets, texts

from core.errors import LabError
from core.jobs.events import EventLog
from core.jobs.process import process_start, this_host
from core.training import runs as runs_mod
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
    by_tokens = chart_data(at, "Loss by tokens seen")
    assert by_tokens[by_tokens["run"] == "cli-failed"]["tokens"].tolist()[:3] == [128, 256, 384]
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
