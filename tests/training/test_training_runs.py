"""Runs as separate processes: launch, list, stop (with a checkpoint), resume, delete; safe names;
dead processes never look alive; the `runs` command."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from core.errors import LabError
from core.training import TrainConfig, delete, launch, list_runs, read_metrics, read_status, resume, stop
from core.training.runs import RunFiles, check_run_id, run_path
from tests.conftest import CORPUS, wait_for


def test_run_names_cannot_escape_the_runs_folder(tmp_path):
    for bad in ["..", "../x", "a/b", "", ".hidden", "x" * 101, "a b", "a\\b", "run\n"]:
        with pytest.raises(LabError, match="not allowed"):
            check_run_id(bad)
    for good in ["run-1", "2025.01_a"]:
        assert check_run_id(good) == good
    with pytest.raises(LabError, match="not allowed"):
        run_path("..", tmp_path)
    with pytest.raises(LabError, match="not allowed"):
        launch(TrainConfig(), run_id="../evil", root=tmp_path / "runs")
    assert not (tmp_path / "evil").exists()
    with pytest.raises(LabError, match="No training run"):
        run_path("nope", tmp_path)


def test_a_dead_process_reads_as_failed_and_a_stopped_one_as_stopped(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    folder = tmp_path / "r"
    files = RunFiles(folder)
    files.status("running", pid=proc.pid, host=socket.gethostname(), step=4)
    files.log("step 4/10 | loss 3.0")
    st = read_status(folder)
    assert st["state"] == "failed" and "ended without reporting" in st["reason"]
    assert st["last_log"][-1].endswith("step 4/10 | loss 3.0")
    (folder / "STOP").touch()
    assert read_status(folder)["state"] == "stopped"


def test_launched_run_lists_stops_with_checkpoint_resumes_and_deletes(tmp_path, monkeypatch, capsys):
    from core.commands.cli import main

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    text = tmp_path / "tiny.txt"
    text.write_text(CORPUS * 3)
    cfg = TrainConfig(dataset=str(text), vocab_size=320, data_cache=str(tmp_path / "cache"), n_layer=1, n_head=2,
                      d_model=16, block_size=32, batch_size=4, device="cpu", log_every=1, val_every=0,
                      save_every=0, max_steps=100_000)
    root = tmp_path / "runs"
    info = launch(cfg, run_id="bg", root=root)
    assert info.state == "running" and info.pid
    assert [(r.id, r.state) for r in list_runs(root)] == [("bg", "running")]
    wait_for(lambda: len(read_metrics("bg", root)) >= 3)
    with pytest.raises(LabError, match="running; stop it"):
        delete("bg", root)
    with pytest.raises(LabError, match="still running"):
        resume("bg", root)

    stopped = stop("bg", root, wait=60)
    assert stopped.state == "stopped" and stopped.step >= 3
    assert stopped.checkpoints == [stopped.step]
    assert read_metrics("bg", root)[-1]["step"] == stopped.step
    assert main(["runs", "list", "--root", str(root)]) == 0
    assert "bg" in capsys.readouterr().out
    assert main(["runs", "stop", "bg", "--root", str(root)]) == 2  # not running any more

    target = stopped.step + 3
    resume("bg", root, max_steps=target)
    wait_for(lambda: read_status("bg", root)["state"] != "running")
    st = read_status("bg", root)
    assert st["state"] == "finished" and st["step"] == target, st
    assert [m["step"] for m in read_metrics("bg", root)] == list(range(1, target + 1))
    assert main(["runs", "status", "bg", "--root", str(root)]) == 0
    assert "finished" in capsys.readouterr().out

    delete("bg", root)
    assert not (root / "bg").exists() and list_runs(root) == []


def test_metrics_follower_reads_only_new_complete_lines(tmp_path):
    from core.files import atomic_write_text
    from core.training import MetricsFollower

    folder = tmp_path / "r"
    files = RunFiles(folder)
    files.status("running")
    files.metric({"step": 1})
    follow = MetricsFollower(folder)
    assert follow.poll() == [{"step": 1}]
    assert follow.poll() == []
    with open(folder / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 2}\n{"step": 3, "train_lo')                # a line being written
    assert follow.poll() == [{"step": 2}]
    with open(folder / "metrics.jsonl", "a") as fh:
        fh.write('ss": 1.5}\n')
    assert follow.poll() == [{"step": 3, "train_loss": 1.5}]
    atomic_write_text(folder / "metrics.jsonl", '{"step": 1}\n{"step": 2}\n{"step": 9}\n{"step": 10}\n')  # resumed
    assert [r["step"] for r in follow.poll()] == [1, 2, 9, 10] and len(follow.rows) == 4


def test_the_uploads_folder_name_is_not_a_run_name():
    from core.training.data import UPLOADS_DIR

    with pytest.raises(LabError, match="uploaded datasets"):
        check_run_id(UPLOADS_DIR)
