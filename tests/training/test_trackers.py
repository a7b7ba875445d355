"""Experiment trackers (--log-to): what TensorBoard, W&B (offline) and MLflow (a store under the run)
hold after a tiny run, read back with each tool's own reader and compared with metrics.jsonl, the
config and previews.jsonl exactly; a resumed run continues the same tracker runs; a missing package
or an unknown name is one sentence before anything starts; a tracker that breaks mid-run is dropped
and the run goes on; a CLI run that fails before its first step leaves no folder behind."""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from core.commands.cli import main
from core.errors import LabError
from core.training import read_metrics, read_previews, read_status, resume_config, train
from core.training import config as config_mod
from core.training import trackers as trackers_mod
from core.training.config import TRACKERS, TrainConfig, parse_trackers
from core.training.trackers import TRACKING_DIR, config_text, preview_text, wandb_mode

pytest.importorskip("tensorboard")


def tiny(text_file, cache, **kw) -> TrainConfig:
    base = dict(dataset=str(text_file), vocab_size=320, data_cache=str(cache), n_layer=1, n_head=2, d_model=32,
                block_size=32, batch_size=4, device="cpu", log_every=1, val_every=3, val_batches=1, save_every=3,
                max_steps=6, seed=7, preview_every=3, preview_tokens=4)
    return TrainConfig(**{**base, **kw})


def cli_flags(text_file, cache) -> list[str]:
    return ["--dataset", str(text_file), "--vocab-size", "320", "--data-cache", str(cache), "--n-layer", "1",
            "--n-head", "2", "--d-model", "32", "--block-size", "32", "--batch-size", "4", "--device", "cpu",
            "--max-steps", "4", "--val-every", "2", "--val-batches", "1", "--no-progress"]


def numbers(record: dict) -> dict[str, float]:
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and v is not None}


# -- TensorBoard --------------------------------------------------------------------------------------

def tensorboard_events(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / TRACKING_DIR / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def tb_scalars(acc, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


def tb_text(acc, tag: str) -> dict[int, str]:
    return {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors(f"{tag}/text_summary")}


def test_tensorboard_holds_every_metrics_record_the_config_and_the_samples(text_file, cache, tmp_path):
    run = tmp_path / "run"
    cfg = tiny(text_file, cache, log_to=["tensorboard"])
    list(train(cfg, run))
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    acc = tensorboard_events(run)
    tags = set(acc.Tags()["scalars"])
    assert tags == {k for r in records for k in numbers(r)}  # every number of metrics.jsonl, nothing else
    for tag in tags:  # TensorBoard keeps float32: each value is the record's, rounded once to float32
        expected = {r["step"]: float(np.float32(r[tag])) for r in records if r.get(tag) is not None}
        assert tb_scalars(acc, tag) == expected, tag
    assert sorted(tb_scalars(acc, "val_loss")) == [3, 6]
    previews = read_previews(run)
    assert tb_text(acc, "preview") == {p["step"]: preview_text(p["prompt"], p["text"]) for p in previews}
    assert sorted(tb_text(acc, "preview")) == [3, 6]
    assert tb_text(acc, "config") == {0: config_text(cfg.to_dict())}
    assert json.loads((run / "config.json").read_text())["log_to"] == ["tensorboard"]


def test_a_resumed_run_replaces_the_events_after_its_checkpoint(text_file, cache, tmp_path):
    run = tmp_path / "run"
    events = train(tiny(text_file, cache, log_to=["tensorboard"], save_every=3), run)
    for ev in events:
        if getattr(ev, "step", 0) == 5 and type(ev).__name__ == "StepLogged":
            break
    events.close()  # stopped at step 5 with a checkpoint there; steps 1..5 were logged
    assert read_status(run)["state"] == "stopped"
    list(train(resume_config(run), run, resume=True))
    records = read_metrics(run)
    acc = tensorboard_events(run)
    assert tb_scalars(acc, "train_loss") == {r["step"]: float(np.float32(r["train_loss"])) for r in records}
    assert sorted(tb_scalars(acc, "train_loss")) == [1, 2, 3, 4, 5, 6]  # each step once


# -- W&B, offline ---------------------------------------------------------------------------------------

def wandb_records(run: Path) -> list:
    """Every record of the run's .wandb file, read with W&B's own protobuf definitions. The file is
    W&B's LevelDB-style log: a 7-byte header, then 32 KiB blocks of chunks (crc32, length, type,
    data) where a record may span blocks (types: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = (run / TRACKING_DIR / "wandb").glob("offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, out, parts = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(parts)
            out.append(rec)
    return out


def test_wandb_offline_run_holds_the_records_and_the_config(text_file, cache, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    cfg = tiny(text_file, cache, log_to=["wandb"])
    list(train(cfg, run))
    records = wandb_records(run)
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history[row["_step"]] = row
    expected = {m["step"]: numbers(m) for m in read_metrics(run)}
    assert sorted(history) == [1, 2, 3, 4, 5, 6]
    for step, values in expected.items():  # JSON doubles: the very values of metrics.jsonl
        assert {k: history[step][k] for k in values} == values
    previews = read_previews(run)
    assert [p["step"] for p in previews] == [3, 6]
    assert [s for s in history if "preview._type" in history[s]] == [3, 6]  # a table of samples at each
    (run_record,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {i.key: json.loads(i.value_json) for i in run_record.config.update if i.key != "_wandb"}
    assert config == cfg.to_dict()
    assert (run_record.display_name, run_record.project) == (run.name, "gptlab")
    ids = json.loads((run / TRACKING_DIR / "trackers.json").read_text())
    assert ids["wandb"] == run_record.run_id


def test_wandb_is_offline_unless_logged_in(tmp_path):
    netrc = tmp_path / "netrc"
    assert wandb_mode({}, netrc) == "offline"  # no file
    netrc.write_text("machine api.wandb.ai\n  login user\n  password secret-key\n")
    netrc.chmod(0o600)
    assert wandb_mode({}, netrc) == "online"
    assert wandb_mode({"WANDB_MODE": "offline"}, netrc) == "offline"
    assert wandb_mode({"WANDB_BASE_URL": "https://wandb.example.org"}, netrc) == "offline"  # another host
    assert wandb_mode({"WANDB_API_KEY": "k"}, tmp_path / "none") == "online"
    assert wandb_mode({"WANDB_MODE": "disabled", "WANDB_API_KEY": "k"}, netrc) == "disabled"


# -- MLflow, in a store under the run ----------------------------------------------------------------------

def test_mlflow_run_holds_metrics_params_config_and_samples(text_file, cache, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    run = tmp_path / "run"
    cfg = tiny(text_file, cache, log_to=["mlflow"])
    list(train(cfg, run))
    store = run / TRACKING_DIR / "mlflow"
    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    run_id = json.loads((run / TRACKING_DIR / "trackers.json").read_text())["mlflow"]
    info = client.get_run(run_id)
    assert info.info.status == "FINISHED" and info.info.run_name == run.name
    assert client.get_experiment(info.info.experiment_id).name == "gptlab"
    records = read_metrics(run)
    for key in ("train_loss", "val_loss", "lr", "tokens", "tokens_per_s"):
        history = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        assert history == {r["step"]: float(r[key]) for r in records if r.get(key) is not None}, key
    params = info.data.params
    assert (params["max_steps"], params["dataset"], params["lr"], params["log_to"]) == \
        ("6", str(text_file), "null", '["mlflow"]')
    local = Path(client.download_artifacts(run_id, "", str(tmp_path / "dl")))
    assert json.loads((local / "config.json").read_text()) == cfg.to_dict()
    for p in read_previews(run):
        assert (local / "previews" / f"step_{p['step']:08d}.txt").read_text() == preview_text(p["prompt"], p["text"])


# -- all three from the command line, and transcoder training -----------------------------------------------

def test_cli_logs_to_all_three_and_resume_continues_the_same_tracker_runs(text_file, cache, tmp_path, monkeypatch):
    for name in ("wandb", "mlflow", "sqlalchemy"):
        pytest.importorskip(name)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    assert main(["train", *cli_flags(text_file, cache), "--output-dir", str(run),
                 "--log-to", "tensorboard, wandb,mlflow,tensorboard"]) == 0
    assert json.loads((run / "config.json").read_text())["log_to"] == ["tensorboard", "wandb", "mlflow"]
    ids = json.loads((run / TRACKING_DIR / "trackers.json").read_text())
    assert main(["train", "--resume", str(run), "--max-steps", "6", "--no-progress"]) == 0
    assert json.loads((run / TRACKING_DIR / "trackers.json").read_text()) == ids  # the same tracker runs
    assert sorted(tb_scalars(tensorboard_events(run), "train_loss")) == [2, 4, 6]  # log every 10: logged at val steps
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run / TRACKING_DIR / 'mlflow' / 'mlflow.db'}")
    assert sorted(m.step for m in client.get_metric_history(ids["mlflow"], "train_loss")) == [2, 4, 6]
    assert client.get_run(ids["mlflow"]).info.status == "FINISHED"


def test_transcoder_training_logs_its_curves(tiny_gptlab_dir, text_file, tmp_path, capsys):
    out = tmp_path / "set"
    assert main(["transcoders", "train", "--model", str(tiny_gptlab_dir), "--output-dir", str(out), "--steps", "4",
                 "--batch-tokens", "64", "--dataset", str(text_file), "--eval-every", "2", "--expansion", "2",
                 "--k", "4", "--no-collect", "--log-to", "tensorboard"]) == 0
    (folder,) = (out / TRACKING_DIR).iterdir()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    layers = json.loads((out / "config.json").read_text())["layers"]
    assert {f"layer_{i}/nmse" for i in layers} | {"lr", "tokens", "tokens_per_s"} <= tags
    assert [e.step for e in acc.Scalars(f"layer_{layers[0]}/nmse")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars(f"val/layer_{layers[0]}/fve")] == [2]
    assert [e.value for e in acc.Scalars("tokens")] == [64.0, 128.0, 192.0, 256.0]
    final = json.loads((out / "metrics.json").read_text())["layers"][str(layers[0])]
    (fve,) = acc.Scalars(f"final/layer_{layers[0]}/fve")
    assert fve.step == 4 and fve.value == float(np.float32(final["fve"]))
    # the set folder with its tracking/ is still a set that trains again in place
    assert main(["transcoders", "train", "--model", str(tiny_gptlab_dir), "--output-dir", str(out), "--steps", "2",
                 "--batch-tokens", "64", "--dataset", str(text_file), "--expansion", "2", "--k", "4",
                 "--no-collect"]) == 0


# -- refusals, and failures that must not cost the run ---------------------------------------------------------

def test_a_missing_tracker_package_is_one_sentence_before_anything_starts(text_file, cache, tmp_path, monkeypatch,
                                                                          capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    monkeypatch.setenv("GPTLAB_RUNS", str(tmp_path / "runs"))
    with pytest.raises(LabError) as e:
        tiny(text_file, cache, log_to=["tensorboard", "wandb"]).check()
    assert str(e.value) == ("Logging to wandb needs the wandb package, which is not installed here; install it with "
                            f"`pip install {TRACKERS['wandb'][1]}` (or `pip install 'gptlab[trackers]'`), or leave "
                            f"wandb out of --log-to.")
    assert main(["train", *cli_flags(text_file, cache), "--log-to", "wandb"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {e.value}"
    assert not (tmp_path / "runs").exists()  # no run folder
    model = tmp_path / "no-model"
    assert main(["transcoders", "train", "--model", str(model), "--log-to", "wandb"]) == 2  # before the model loads
    assert "Logging to wandb needs the wandb package" in capsys.readouterr().err


def test_unknown_tracker_names_are_refused_while_parsing(text_file, cache, capsys):
    assert parse_trackers(" TensorBoard ,,mlflow, tensorboard") == ["tensorboard", "mlflow"]
    with pytest.raises(LabError, match=r"^'comet' is not a tracker GPT Lab logs to; choose from tensorboard, wandb, "
                                       r"mlflow \(comma-separated\)\.$"):
        parse_trackers("tensorboard,comet")
    assert main(["train", *cli_flags(text_file, cache), "--log-to", "comet"]) == 2
    err = capsys.readouterr().err
    assert "--log-to" in err and "'comet' is not a tracker GPT Lab logs to" in err and "Traceback" not in err
    for empty in ("", " , "):
        assert main(["train", *cli_flags(text_file, cache), "--log-to", empty]) == 2
        assert "names no tracker; give one or more of tensorboard, wandb, mlflow" in capsys.readouterr().err
    with pytest.raises(LabError, match="log to must name trackers from tensorboard, wandb, mlflow"):
        TrainConfig.from_dict({"log_to": ["comet"]}).check()
    with pytest.raises(LabError, match="log to must be a list of names"):
        TrainConfig.from_dict({"log_to": "tensorboard"}).check()


def test_a_tracker_that_breaks_mid_run_is_dropped_and_the_run_finishes(text_file, cache, tmp_path, monkeypatch):
    calls = []

    def broken(self, step, values):
        calls.append(step)
        if step == 3:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(trackers_mod.TensorBoardTracker, "log_metrics", broken)
    run = tmp_path / "run"
    list(train(tiny(text_file, cache, log_to=["tensorboard"]), run))
    assert read_status(run)["state"] == "finished" and [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5, 6]
    assert calls == [1, 2, 3]  # dropped after the failure
    log = (run / "log.txt").read_text()
    assert "tensorboard: logging metrics failed (OSError: [Errno 28] No space left on device); no more logging to " \
           "tensorboard in this run (metrics.jsonl has everything)" in log


def test_a_cli_run_that_fails_before_its_first_step_leaves_no_folder(text_file, cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GPTLAB_RUNS", str(tmp_path / "runs"))
    flags = [f for f in cli_flags(text_file, cache)]
    flags[flags.index("--batch-size") + 1] = "4000"  # more than the text holds: fails while preparing the data
    assert main(["train", *flags]) == 2
    assert "fewer than one batch" in capsys.readouterr().err
    assert not any((tmp_path / "runs").iterdir())  # no run folder left (named by time)
    assert main(["train", *flags, "--run-name", "mine"]) == 2
    assert not (tmp_path / "runs" / "mine").exists()
    out = tmp_path / "out"
    assert main(["train", *flags, "--output-dir", str(out)]) == 2
    assert not out.exists()
    # a run that has logged steps keeps its folder when it fails later (its metrics and checkpoints matter)
    import core.training.trainer as trainer_mod

    real = trainer_mod.Trainer.validate

    def fail_at_4(self):
        if self.step == 4:
            raise LabError("injected at step 4")
        return real(self)

    monkeypatch.setattr(trainer_mod.Trainer, "validate", fail_at_4)
    kept = tmp_path / "kept"
    assert main(["train", *cli_flags(text_file, cache), "--output-dir", str(kept)]) == 2
    assert read_status(kept)["state"] == "failed" and read_status(kept)["step"] == 4


def test_tracker_names_are_stated_once():
    from core.commands.train import add_arguments

    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    action = next(a for a in p._actions if a.dest == "log_to")
    assert all(name in action.help for name in TRACKERS)
    assert list(TRACKERS) == ["tensorboard", "wandb", "mlflow"]
    assert config_mod.TrainConfig().log_to == [] and config_mod.TrainConfig().preview_every == 200


def test_only_rank_0_logs_to_the_trackers_under_torchrun(text_file, tmp_path):
    import os
    import subprocess

    root = Path(__file__).resolve().parents[2]
    run = tmp_path / "ddp"
    flags = ["--dataset", str(text_file), "--vocab-size", "320", "--data-cache", str(tmp_path / "cache"),
             "--n-layer", "1", "--n-head", "2", "--d-model", "16", "--block-size", "32", "--device", "cpu",
             "--log-every", "1", "--val-every", "2", "--val-batches", "1", "--save-every", "0", "--max-steps", "4",
             "--batch-size", "4", "--output-dir", str(run), "--no-progress", "--log-to", "tensorboard"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "core", "train",
           *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(list((run / TRACKING_DIR / "tensorboard").iterdir())) == 1  # one writer: rank 0's event file
    acc = tensorboard_events(run)
    records = read_metrics(run)
    assert [e.step for e in acc.Scalars("train_loss")] == [r["step"] for r in records] == [1, 2, 3, 4]
    assert tb_scalars(acc, "train_loss") == {r["step"]: float(np.float32(r["train_loss"])) for r in records}
