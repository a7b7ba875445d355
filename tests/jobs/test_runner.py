"""The one runner for detached jobs (core.jobs): reaping, liveness, events, the writer lock, the
job's own process. The acceptance check of issue "One house" item 2 is the first test: after
five training runs and three transcoder jobs launched the way the app launches them have
finished, no defunct child is left under the launching process."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.conftest import CORPUS, kill_process_groups, leftover_pids, wait_for

from core.commands import cli
from core.commands import runs as runs_cmd
from core.errors import LabError
from core.interp import jobs as tjobs
from core.jobs import child, runner
from core.jobs.events import EventLog, last_error, last_progress, read_events
from core.jobs.folder import StatusFile, mark, marker_kind, read_status_file
from core.jobs.lock import LOCK_FILE, acquire, holder
from core.jobs.process import process_alive, process_start, process_state
from core.training import runs as runs_mod
from core.training.config import TrainConfig
from core.training.data import prepare_data

ROOT = Path(__file__).resolve().parents[2]


def zombie_children() -> list[str]:
    """``ps`` lines of this process's children that finished and were never waited for."""
    out = subprocess.run(["ps", "-o", "pid=,stat=,args=", "--ppid", str(os.getpid())], capture_output=True,
                         text=True, check=False).stdout
    return [line for line in out.splitlines() if line.split()[1].startswith("Z")]


@pytest.fixture
def jobs_cleanup(runs_root: Path):
    """Transcoder jobs started in the test are killed afterwards (runs_root does it for runs)."""
    before = set(tjobs._CHILDREN)
    yield runs_root
    ours = {proc.pid: proc for folder, proc in tjobs._CHILDREN.items() if folder not in before}
    kill_process_groups({**ours, **leftover_pids(tjobs.jobs_root(runs_root).glob("*/status.json"), ours)})


def tiny_run(text: Path, cache: Path) -> TrainConfig:
    return TrainConfig(dataset=str(text), vocab_size=320, data_cache=str(cache), n_layer=1, n_head=2, d_model=16,
                       block_size=32, batch_size=4, device="cpu", log_every=1, val_every=0, save_every=0,
                       max_steps=2)


def tiny_transcoder_job(corpus: Path, model: Path, out: Path) -> tuple[list[str], str]:
    values = dict(device="cpu", dtype="float32", expansion=2, activation="topk", k=4, lr=1e-3, steps=2,
                  train_tokens=1024, batch_tokens=64, seq_len=16, dataset=str(corpus), seed=0, layers=[0],
                  collect=False)
    return tjobs.job_argv("train", values, str(model), out)


def test_no_defunct_child_after_five_runs_and_three_transcoder_jobs(jobs_cleanup, cache, tmp_path,
                                                                   tiny_gptlab_dir):
    root = jobs_cleanup
    text = tmp_path / "tiny.txt"
    text.write_text(CORPUS * 3)
    cfg = tiny_run(text, cache)
    prepare_data(cfg.dataset, cfg.tokenizer, cfg.vocab_size, val_fraction=cfg.val_fraction, need_mask=False,
                 cache_dir=cache, log=lambda _: None)  # tokenised once, not five times at once
    t0 = time.monotonic()
    runs = [runs_mod.launch(cfg, run_id=f"r{i}", root=root) for i in range(5)]
    jobs = []
    for i in range(3):
        argv, out = tiny_transcoder_job(text, tiny_gptlab_dir, tmp_path / f"set{i}")
        jobs.append(tjobs.launch("train", argv, str(tiny_gptlab_dir), out, root=root))
    pids = [r.pid for r in runs] + [j.pid for j in jobs]
    assert all(pids) and len(set(pids)) == 8

    def all_ended() -> bool:
        states = [runs_mod.read_status(r.path)["state"] for r in runs] + [tjobs.read_job(j.path).state for j in jobs]
        return "running" not in states

    wait_for(all_ended, timeout=180, every=0.2)
    for r in runs:
        st = runs_mod.read_status(r.path)
        assert st["state"] == "finished" and st["step"] == 2, (st, runs_mod.log_tail(r.path))
    for j in jobs:
        done = tjobs.read_job(j.path)
        assert done.state == "finished", (done.reason, tjobs.console_lines(done))
        p = tjobs.progress(done)
        assert (p.stage, p.done, p.total) == ("train", 2, 2)  # the bar, as data

    # the processes exit right after writing their status; then nothing of them may remain
    wait_for(lambda: all(process_state(pid) is None for pid in pids), timeout=30, every=0.05)
    assert zombie_children() == []
    assert not set(pids) & set(runner.children())
    assert time.monotonic() - t0 < 180


def test_reap_and_liveness_of_a_child_started_here(tmp_path):
    folder = tmp_path / "job"
    folder.mkdir()
    StatusFile(folder).update("running", pid=None)
    pid = runner.start(folder, ["runs", "list", "--root", str(tmp_path)], kind="test")
    st = read_status_file(folder)
    assert st["pid"] == pid and st["pid_start"] and st["host"]
    wait_for(lambda: read_status_file(folder)["state"] != "running", timeout=60)
    assert read_status_file(folder)["state"] == "finished"
    wait_for(lambda: process_state(pid) is None, timeout=30, every=0.05)
    assert pid not in runner.children() and runner.reap() == []
    assert [e["kind"] for e in read_events(folder)] == ["state", "state"]  # running, then finished


def test_live_status_tells_a_dead_or_recycled_process(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / "f"
    folder.mkdir()
    st = {"state": "running", "pid": dead.pid, "host": os.uname().nodename}
    assert runner.live_status(folder, st)["state"] == "failed" and runner.live_status(folder, st)["lost"]
    (folder / "STOP").touch()
    assert runner.live_status(folder, st)["state"] == "stopped"
    me = {"state": "running", "pid": os.getpid(), "pid_start": process_start(os.getpid())}
    assert runner.live_status(folder, me) == me
    recycled = {**me, "pid_start": "1"}  # this pid, but a process that started at another time
    assert runner.live_status(folder, recycled)["state"] == "stopped"
    assert runner.live_status(folder, {"state": "finished", "pid": dead.pid})["state"] == "finished"
    other_host = {"state": "running", "pid": dead.pid, "host": "elsewhere"}
    assert runner.live_status(folder, other_host)["state"] == "running"  # cannot be told from here
    # no pid yet: alive while the launcher may still be writing it, failed once that cannot be
    StatusFile(folder).update("running", pid=None)
    assert runner.live_status(folder, {"state": "running"})["state"] == "running"
    old = time.time() - runner.START_GRACE_S - 5
    os.utime(folder / "status.json", (old, old))
    assert runner.live_status(folder, {"state": "running"})["state"] in ("failed", "stopped")
    assert not process_alive(dead.pid) and process_alive(os.getpid())


def test_events_are_whole_lines_throttled_and_read_back(tmp_path, monkeypatch):
    log = EventLog(tmp_path)
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    for done in range(1, 51):  # fifty steps inside half a second: first, then only the last
        log.progress("train", done, 50, text=f"loss {done}")
    assert [e["done"] for e in read_events(tmp_path, "progress")] == [1, 50]
    clock[0] += 1.0
    log.progress("collect", 3, None)
    err = LabError("Use fewer prompts; the record takes too much memory.", fix={"record_every": 4})
    log.error(err)
    log.error(err)  # the same exception seen twice (the trainer, then the job's runner) is one event
    with open(tmp_path / "events.jsonl", "a") as fh:
        fh.write('{"t": 1, "kind": "progress", "stage": "train", "do')  # a line being written
    p = last_progress(tmp_path)
    assert (p.stage, p.done, p.total, p.fraction) == ("collect", 3, None, 0.0)
    assert {k: last_error(tmp_path)[k] for k in ("message", "fix", "error")} == \
        {"message": str(err), "fix": {"record_every": 4}, "error": "LabError"}
    assert len(read_events(tmp_path, "error")) == 1
    (tmp_path / "events.jsonl").write_text('[1]\n"x"\n{"kind": "progress", "done": "7", "total": 9}\n')
    assert last_progress(tmp_path) is None  # junk is skipped, never raised


def test_the_lock_has_one_holder_and_dies_with_it(tmp_path):
    folder = tmp_path / "set"
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from core.jobs.lock import acquire; "
            f"acquire({str(folder)!r}, 'Set', 'wait'); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        info = holder(folder)
        assert info["pid"] == proc.pid
        with pytest.raises(LabError, match=rf"Set {folder} is being written by another process \(pid {proc.pid}"):
            acquire(folder, "Set", "wait")
        os.kill(proc.pid, signal.SIGKILL)  # no clean-up at all: the kernel drops the lock
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert holder(folder) is None
    lock = acquire(folder, "Set", "wait")
    again = acquire(folder, "Set", "wait")  # re-entrant within a process
    assert again is lock and holder(folder)["pid"] == os.getpid()
    again.release()
    assert (folder / LOCK_FILE).exists()
    lock.release()
    assert not (folder / LOCK_FILE).exists() and holder(folder) is None


def test_a_planted_lock_link_is_not_followed(tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (folder / LOCK_FILE).symlink_to(victim)
    with pytest.raises(LabError, match="is a symbolic link"):
        acquire(folder, "Set", "wait")
    assert victim.read_text() == "keep me"


def test_the_child_records_a_refusal_with_its_fix_and_an_unexpected_error(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "job"
    folder.mkdir()
    StatusFile(folder).update("running")

    def refuse(args):
        raise LabError("Too much to record; record every 4th iteration.", fix={"record_every": 4})

    log = EventLog(folder)
    seen: dict = {}

    def failed(e):  # what the child hands the CLI: the exception on its way to becoming a line
        seen["error"] = e
        log.error(e)

    monkeypatch.setattr(runs_cmd, "run", refuse)
    assert cli.main(["runs", "list"], on_error=failed) == 2
    child.record_end(folder, 2, seen["error"], log)
    st = read_status_file(folder)
    assert st["state"] == "failed" and st["reason"].startswith("Too much") and st["fix"] == {"record_every": 4}
    assert last_error(folder)["fix"] == {"record_every": 4}

    StatusFile(folder).update("running", reason=None, fix=None)
    child.record_end(folder, 1, ZeroDivisionError("division by zero"), log)
    assert read_status_file(folder)["reason"] == "ZeroDivisionError: division by zero"
    StatusFile(folder).update("running")
    (folder / "STOP").touch()
    child.record_end(folder, 130, None, log)
    assert read_status_file(folder)["reason"].startswith("on request")
    StatusFile(folder).update("finished", reason=None)  # the command reported itself (a trainer): kept
    child.record_end(folder, 0, None, log)
    assert read_status_file(folder)["state"] == "finished"
    assert child.main(["no-dashes"]) == 2 and "usage" in capsys.readouterr().err


def test_a_failing_job_command_leaves_its_sentence_not_a_scrape(tmp_path, runs_root):
    """A real child whose command refuses its input: reason and error event come from the
    LabError itself."""
    folder = tmp_path / "job"
    folder.mkdir()
    mark(folder, "test-job")
    StatusFile(folder).update("running", pid=None)
    pid = runner.start(folder, ["runs", "status", "no-such-run"], kind="test")
    wait_for(lambda: read_status_file(folder)["state"] != "running", timeout=60)
    st = read_status_file(folder)
    assert st["state"] == "failed" and st["reason"].startswith("No training run at") and st["returncode"] == 2
    assert last_error(folder)["message"] == st["reason"]
    assert marker_kind(folder) == "test-job"
    wait_for(lambda: process_state(pid) is None, timeout=30, every=0.05)


def test_two_jobs_never_write_one_set(jobs_cleanup, tmp_path, tiny_gptlab_dir):
    """A writer this page does not know of (another server, a shell) holds the set's lock: the
    launch is refused before any job folder or process exists."""
    root = jobs_cleanup
    text = tmp_path / "c.txt"
    text.write_text(CORPUS)
    out = tmp_path / "set"
    argv, folder = tiny_transcoder_job(text, tiny_gptlab_dir, out)
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from core.jobs.lock import acquire; "
            f"acquire({folder!r}, 'Set', 'wait'); print('held', flush=True); time.sleep(60)")
    other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "held"
        with pytest.raises(LabError, match=rf"Transcoder set {out.resolve()} is being written by another process "
                                           rf"\(pid {other.pid}"):
            tjobs.launch("train", argv, str(tiny_gptlab_dir), folder, root=root)
        assert tjobs.list_jobs(root) == []
    finally:
        other.kill()
        other.wait()


def test_unreadable_and_legacy_job_folders(tmp_path):
    root = tmp_path / "runs"
    jobs = tjobs.jobs_root(root)
    legacy = jobs / "20240101-000000-train"
    legacy.mkdir(parents=True)
    (legacy / "config.json").write_text(json.dumps({"kind": "transcoders", "action": "train", "argv": ["x"],
                                                    "model": "default", "output": None}))
    (legacy / "status.json").write_text(json.dumps({"state": "finished"}))
    broken = jobs / "20240102-000000-collect"
    shutil.copytree(legacy, broken)
    (broken / "status.json").write_text("{not json")
    (jobs / "stray").mkdir()  # not a job: no config
    listed = {j.id: j for j in tjobs.list_jobs(root)}
    assert set(listed) == {legacy.name, broken.name}
    assert listed[legacy.name].state == "finished"
    assert listed[broken.name].state == "unreadable" and "not valid JSON" in listed[broken.name].reason


def test_a_relative_runs_root_means_the_same_folder_to_the_job(tmp_path, monkeypatch):
    """Jobs run in runner.ROOT (the checkout, or site-packages when installed); a relative
    $GPTLAB_RUNS set where they were started from must not move with them."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GPTLAB_RUNS", "my-runs")
    monkeypatch.setenv("GPTLAB_DATA_CACHE", "~/cache")
    monkeypatch.delenv("GPTLAB_TRANSCODERS", raising=False)
    env = runner.child_env()
    assert env["GPTLAB_RUNS"] == str(tmp_path / "my-runs")
    assert env["GPTLAB_DATA_CACHE"] == os.path.expanduser("~/cache")
    assert "GPTLAB_TRANSCODERS" not in env
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(runner.ROOT)
