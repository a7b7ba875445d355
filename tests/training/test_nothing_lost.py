"""Nothing lost (issue "Nothing lost", items 1, 2, 4 and 7), tried as an attacker or a tired user
would: only folders the runs machinery made are runs, and only those inside the runs root are
ever deleted; --output-dir never writes over a model, a checkpoint or another run; one writer
per run (two resumes at once: one is refused); stale token-cache builds are swept; broken or
random status.json and config.json files never hide the other runs; symbolic links are not
followed; a FIFO is never read as a corpus; config files with wrong types or absurd sizes end
in one sentence before anything is built; a full disk while checkpointing is named as such."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.conftest import wait_for

from core.commands.cli import main
from core.errors import LabError
from core.jobs import runner
from core.jobs.folder import MARKER_FILE
from core.jobs.lock import holder
from core.jobs.process import process_start, this_host
from core.training import runs
from core.training.config import LIMITS, TrainConfig
from core.training.data import prepare_data, resolve_source

ROOT = Path(__file__).resolve().parents[2]
STATES = ("running", "finished", "failed", "stopped", "unreadable", "unknown")


def flags(text_file, cache, steps: int = 2) -> list[str]:
    return ["--dataset", str(text_file), "--vocab-size", "320", "--data-cache", str(cache), "--device", "cpu",
            "--n-layer", "1", "--n-head", "2", "--d-model", "16", "--block-size", "32", "--batch-size", "4",
            "--log-every", "1", "--val-every", "0", "--max-steps", str(steps), "--no-progress"]


def child_env(root: Path) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "GPTLAB_RUNS": str(root)}


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def legacy_run(folder: Path, state: str = "finished") -> Path:
    """A run folder as GPT Lab wrote it before the marker existed."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"objective": "ar", "preset": "tiny", "dataset": "shakespeare"}))
    (folder / "status.json").write_text(json.dumps({"state": state, "step": 3}))
    (folder / "metrics.jsonl").write_text('{"step": 1, "train_loss": 5.0}\n')
    return folder


@pytest.fixture
def trained(text_file, cache, tmp_path) -> Path:
    """A real two-step run with a checkpoint, outside any runs root (marked by the trainer)."""
    run = tmp_path / "elsewhere" / "run"
    assert main(["train", *flags(text_file, cache), "--save-every", "2", "--output-dir", str(run)]) == 0
    assert (run / MARKER_FILE).is_file() and runs.checkpoint_steps(run) == [2]
    return run


# -- 1. what counts as a run --------------------------------------------------------------------------

@pytest.mark.parametrize("action", ["status", "stop", "resume", "delete"])
def test_runs_commands_refuse_a_model_folder(action, tmp_path, tiny_gptlab_dir, capsys):
    model = tmp_path / "assets" / "default"
    shutil.copytree(tiny_gptlab_dir, model)
    (model / "status.json").write_text(json.dumps({"state": "finished"}))  # even one that looks half like a run
    before = snapshot(model)
    root = tmp_path / "runs"
    root.mkdir()
    for target in (str(model), f"{model}/", str(model.relative_to(tmp_path))):
        with contextlib.chdir(tmp_path):
            assert main(["runs", action, target, "--root", str(root)]) == 2
        line = error_line(capsys.readouterr().err)
        assert "is not a training run GPT Lab made" in line or "No training run at" in line, line
    assert snapshot(model) == before


def test_the_shipped_model_is_never_a_run(capsys):
    shipped = ROOT / "assets" / "default"
    if not (shipped / "config.json").is_file():
        pytest.skip("no shipped model in this checkout")
    before = sorted(p.name for p in shipped.iterdir())
    with contextlib.chdir(ROOT):
        assert main(["runs", "delete", "assets/default"]) == 2
    assert "is not a training run GPT Lab made" in error_line(capsys.readouterr().err)
    assert sorted(p.name for p in shipped.iterdir()) == before


def test_a_marked_run_outside_the_root_is_a_run_but_is_deleted_only_from_its_root(trained, tmp_path, capsys):
    root = tmp_path / "runs"
    root.mkdir()
    assert main(["runs", "status", str(trained), "--root", str(root)]) == 0
    assert "finished" in capsys.readouterr().out
    assert main(["runs", "delete", str(trained), "--root", str(root)]) == 2
    assert "outside the runs folder" in error_line(capsys.readouterr().err) and trained.is_dir()
    assert main(["runs", "delete", str(trained), "--root", str(trained.parent)]) == 0
    assert not trained.exists()


def test_older_runs_in_the_root_are_adopted_and_the_same_layout_elsewhere_is_not(tmp_path, capsys):
    root = tmp_path / "runs"
    old = legacy_run(root / "old-run")
    stray = legacy_run(tmp_path / "somewhere" / "copy")
    (root / "not-a-run").mkdir()
    (root / "not-a-run" / "config.json").write_text("{}")  # a model-ish folder in the root: not listed
    assert [(r.id, r.state) for r in runs.list_runs(root)] == [("old-run", "finished")]
    with pytest.raises(LabError, match="is not a training run GPT Lab made"):
        runs.read_status(str(stray), root)
    with pytest.raises(LabError, match="is not a training run GPT Lab made"):
        runs.delete(root / "not-a-run", root)
    runs.delete("old-run", root)
    assert not old.exists() and stray.is_dir() and (root / "not-a-run").is_dir()


# -- 1. --output-dir ---------------------------------------------------------------------------------

def test_output_dir_never_writes_over_a_model_a_checkpoint_or_another_run(text_file, cache, trained, tmp_path,
                                                                         tiny_gptlab_dir, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_gptlab_dir, model)
    checkpoint = trained / "checkpoints" / "2"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"model_type": "gpt2"}')
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    link = tmp_path / "link"
    link.symlink_to(empty)
    cases = [(model, "holds a model or a checkpoint"), (checkpoint, "holds a model or a checkpoint"),
             (trained, "already holds a training run"), (foreign, "holds a model or another run's files"),
             (a_file, "is a file"), (link, "is a symbolic link")]
    for folder, message in cases:
        before = snapshot(folder) if folder.is_dir() else folder.read_bytes()
        assert main(["train", *flags(text_file, cache), "--output-dir", str(folder)]) == 2
        line = error_line(capsys.readouterr().err)
        assert message in line, (folder, line)
        assert (snapshot(folder) if folder.is_dir() else folder.read_bytes()) == before
    assert list(empty.iterdir()) == []


# -- 2. one writer per run ----------------------------------------------------------------------------

def test_two_resumes_at_once_one_is_refused_and_metrics_never_interleave(trained, tmp_path):
    cmd = [sys.executable, "-m", "core", "train", "--resume", str(trained), "--max-steps", "100000", "--no-progress"]
    env = child_env(tmp_path / "runs")
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for _ in range(2)]
    try:
        loser = wait_for(lambda: next((p for p in procs if p.poll() is not None), None), timeout=120)
        winner = procs[1 - procs.index(loser)]
        out, err = loser.communicate(timeout=30)
        assert loser.returncode == 2, (out, err)
        line = error_line(err)
        assert f"Run {trained.resolve()} is being written by another process (pid {winner.pid}" in line, line
        assert winner.poll() is None and holder(trained)["pid"] == winner.pid
        wait_for(lambda: len(runs.read_metrics(trained)) >= 6, timeout=120)
        runs.stop(trained, wait=60)
        winner.wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    steps = [m["step"] for m in runs.read_metrics(trained)]
    assert steps == list(range(1, len(steps) + 1))  # each step once, in order
    assert runs.read_status(trained)["state"] == "stopped" and holder(trained) is None


def test_a_writer_killed_with_sigkill_leaves_the_run_resumable(trained, tmp_path, capsys):
    cmd = [sys.executable, "-m", "core", "train", "--resume", str(trained), "--max-steps", "100000", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(tmp_path / "runs"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: (holder(trained) or {}).get("pid") == proc.pid and len(runs.read_metrics(trained)) >= 3,
                 timeout=120)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert holder(trained) is None and runs.read_status(trained)["state"] == "failed"
    assert main(["train", "--resume", str(trained), "--max-steps", "4", "--no-progress"]) == 0
    assert runs.read_status(trained)["state"] == "finished"


def test_stop_never_signals_a_pid_the_status_file_merely_names(tmp_path, monkeypatch):
    """A status.json naming this very process (or pid 0 or 1, or a recycled pid) as the run: Stop
    writes the STOP request but sends no signal to it."""
    root = tmp_path / "runs"
    sent = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append((pid, sig)))
    monkeypatch.setattr(os, "killpg", lambda pid, sig: sent.append((pid, sig)))
    for i, (pid, start) in enumerate([(os.getpid(), process_start(os.getpid())), (0, "0"), (1, process_start(1)),
                                      (os.getppid(), "not its start time")]):
        folder = legacy_run(root / f"r{i}", state="running")
        st = {"state": "running", "pid": pid, "pid_start": start, "host": this_host()}
        (folder / "status.json").write_text(json.dumps(st))
        runner.stop(folder, pid, start, sig=signal.SIGTERM, group=False)
        assert (folder / "STOP").exists()
    assert sent == []


# -- 7. leftovers -------------------------------------------------------------------------------------

def test_stale_token_cache_builds_of_dead_processes_are_swept(text_file, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tokens = tmp_path / "cache" / "tokens"
    tokens.mkdir(parents=True)
    old_style = tokens / f".{'a' * 16}.tmp-{dead.pid}"
    new_style = tokens / f".{'b' * 16}.tmp-{this_host()}-{dead.pid}"
    building = tokens / f".{'c' * 16}.tmp-{this_host()}-{os.getppid()}"    # a live build (its pid lives)
    other_host = tokens / f".{'d' * 16}.tmp-another-machine-{dead.pid}"     # a shared cache: not ours to judge
    for d in (old_style, new_style, building, other_host):
        (d / "train_0000.bin").parent.mkdir()
        (d / "train_0000.bin").write_bytes(b"\0" * 64)
    notes = tokens / "notes.txt"
    notes.write_text("mine")
    logs: list[str] = []
    data = prepare_data(str(text_file), "bpe", 320, val_fraction=0.05, need_mask=False,
                        cache_dir=tmp_path / "cache", log=logs.append)
    assert data.train.n_tokens > 0
    assert not old_style.exists() and not new_style.exists()
    assert building.is_dir() and other_host.is_dir() and notes.read_text() == "mine"
    assert sum("left in the token cache by a build that was killed" in line for line in logs) == 2
    assert not [p for p in tokens.iterdir() if ".tmp-" in p.name and str(os.getpid()) in p.name]


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
STATUS_LIKE = st.fixed_dictionaries(
    {"state": st.sampled_from(["running", "finished", "failed", "stopped", "weird"]) | JSON},
    optional={k: JSON | st.integers(-5, 2**70) for k in ("step", "max_steps", "pid", "pid_start", "host",
                                                          "train_loss", "val_loss", "last_log", "reason")})
FILE_TEXT = (JSON.map(json.dumps) | STATUS_LIKE.map(json.dumps) | st.text(max_size=40)
             | st.binary(max_size=40).map(lambda b: b.decode("latin-1")))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(status=FILE_TEXT, config=FILE_TEXT)
def test_one_broken_run_never_hides_the_others(tmp_path_factory, status, config):
    root = tmp_path_factory.mktemp("runs")
    good = legacy_run(root / "good")
    bad = root / "bad"
    bad.mkdir()
    (bad / MARKER_FILE).write_text(json.dumps({"kind": runs.RUN_KIND}))
    (bad / "status.json").write_text(status, encoding="utf-8", errors="surrogatepass")
    (bad / "config.json").write_text(config, encoding="utf-8", errors="surrogatepass")
    listed = {r.id: r for r in runs.list_runs(root)}
    assert set(listed) == {"good", "bad"}
    assert (listed["good"].state, listed["good"].step) == ("finished", 3)
    assert listed["bad"].state in STATES
    assert listed["bad"].state != "unreadable" or listed["bad"].reason
    json.dumps(listed["bad"].to_json(), default=str)
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()):
        assert main(["runs", "list", "--root", str(root)]) == 0
        assert main(["runs", "list", "--root", str(root), "--json"]) == 0
    assert "good" in out.getvalue()
    assert good.is_dir()


def test_a_broken_status_reads_as_unreadable_with_a_reason(tmp_path, capsys):
    root = tmp_path / "runs"
    legacy_run(root / "good")
    for name, text, words in [("b1", "{not json", "not valid JSON"), ("b2", "[]", "holds list"),
                              ("b3", '{"state": "running", "pid": "12"}', "pid = '12'"),
                              ("b4", '{"state": "done"}', "state 'done'"),
                              ("b5", '{"state": "finished", "step": -4}', "step = -4")]:
        legacy_run(root / name)
        (root / name / "status.json").write_text(text)
        info = runs.run_info(name, root)
        assert info.state == "unreadable" and words in info.reason, (name, info.reason)
        with pytest.raises(LabError, match="cannot be resumed"):
            runs.resume(name, root)
    assert main(["runs", "list", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert out.count("unreadable") == 5 and "good" in out
    runs.delete("b1", root)  # a broken run can still be removed
    assert not (root / "b1").exists()


def test_symlinked_run_folders_are_refused_not_followed(trained, tmp_path, capsys):
    root = tmp_path / "runs"
    root.mkdir()
    link = root / "linked"
    link.symlink_to(trained, target_is_directory=True)
    before = snapshot(trained)
    (listed,) = runs.list_runs(root)
    assert listed.id == "linked" and listed.state == "unreadable" and "symbolic link" in listed.reason
    for argv in (["runs", "status", "linked"], ["runs", "resume", "linked"], ["runs", "delete", "linked"],
                 ["runs", "stop", "linked"], ["runs", "delete", str(link)]):
        assert main([*argv, "--root", str(root)]) == 2
        assert "is a symbolic link" in error_line(capsys.readouterr().err)
    assert main(["train", "--resume", str(link), "--max-steps", "4", "--no-progress"]) == 2
    assert "is a symbolic link" in error_line(capsys.readouterr().err)
    assert link.is_symlink() and snapshot(trained) == before
    assert [p.name for p in root.iterdir()] == ["linked"]  # no fresh default run appeared anywhere


# -- 4. bad input -------------------------------------------------------------------------------------

def test_a_fifo_is_never_read_as_a_corpus(text_file, cache, tmp_path):
    fifo = tmp_path / "corpus.txt"
    os.mkfifo(fifo)
    with pytest.raises(LabError, match="is not a regular file or folder"):
        resolve_source(str(fifo))
    done = subprocess.run([sys.executable, "-m", "core", "train", *flags(text_file, cache), "--dataset", str(fifo),
                           "--output-dir", str(tmp_path / "run")], cwd=ROOT, env=child_env(tmp_path / "runs"),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "is not a regular file or folder" in error_line(done.stderr)
    assert not (tmp_path / "run").exists()
    from core.interp.jobs import _dataset

    with pytest.raises(LabError, match="is not a regular file or folder"):
        _dataset(str(fifo))
    cfg = tmp_path / "config.json"
    os.mkfifo(cfg)
    done = subprocess.run([sys.executable, "-m", "core", "train", "--config", str(cfg)], cwd=ROOT,
                          env=child_env(tmp_path / "runs"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "is not a regular file" in error_line(done.stderr)


@pytest.mark.parametrize("settings_, words", [
    ({"batch_size": "16"}, "batch size must be a whole number (got '16')"),
    ({"n_layer": 100_000}, "n_layer must be at most 1,024 (got 100,000)"),
    ({"d_model": 10**9, "n_head": 1}, "d_model must be at most 65,536"),
    ({"block_size": 2**40}, "block size must be at most 131,072"),
    ({"lr": True}, "learning rate must be a finite number (got True)"),
    ({"devices": "0,1"}, "devices must be a list of whole numbers"),
    ({"objective": ["ar"]}, "objective must be text"),
    ({"preset": "gpt5"}, "Unknown preset 'gpt5'; choose one of tiny"),
    ({"dropout": 1.5}, "dropout must be in [0, 1) (got 1.5)"),
    ({"epochs": 0}, "epochs must be above 0 (got 0)"),
    ({"max_steps": -1}, "max steps must be at least 1 (got -1)"),
    ({"no_such_setting": 1}, "Unknown training setting(s) no_such_setting"),
])
def test_config_files_with_wrong_types_or_absurd_sizes_end_in_one_sentence(tmp_path, capsys, monkeypatch, settings_,
                                                                            words):
    import core.training.trainer as trainer_mod

    monkeypatch.setenv("GPTLAB_RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(trainer_mod.Trainer, "__init__", lambda *a, **k: pytest.fail("reached the trainer"))
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**TrainConfig(device="cpu").to_dict(), **settings_}))
    assert main(["train", "--config", str(path)]) == 2
    assert words in error_line(capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()
    path.write_text("[1, 2]")
    assert main(["train", "--config", str(path)]) == 2
    assert "instead of an object of settings" in error_line(capsys.readouterr().err)


FIELDS = list(TrainConfig().to_dict())


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS), JSON | st.integers(-2**40, 2**40) | st.floats(), max_size=6))
def test_any_config_is_checked_or_refused_in_one_sentence(values):
    try:
        cfg = TrainConfig.from_dict(values)
        cfg.check()
    except LabError as e:
        assert "\n" not in str(e) and str(e)
        return
    for name, limit in LIMITS.items():  # a config that passes is within every limit
        value = getattr(cfg, name)
        assert value is None or limit.allows(value) or (name == "vocab_size" and cfg.tokenizer != "bpe")


def test_a_full_disk_while_checkpointing_names_the_folder_and_the_free_space(text_file, cache, tmp_path, capsys,
                                                                            monkeypatch):
    import core.training.trainer as trainer_mod

    def full(*a, **k):  # what torch's zip writer raises when a write fails for want of space
        raise RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 64 vs 0: PytorchStreamWriter "
                           "failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(trainer_mod, "free_space", lambda folder: 10_000)
    run = tmp_path / "run"
    assert main(["train", *flags(text_file, cache), "--save-every", "1", "--output-dir", str(run)]) == 2
    line = error_line(capsys.readouterr().err)
    assert line == (f"error: The disk is full while writing {run / 'checkpoints'} (9.8 KB free); free space on that "
                    f"disk, then resume with `python -m core train --resume {run}` (checkpoints already saved are "
                    f"intact).")
    st_ = runs.read_status(run)
    assert st_["state"] == "failed" and st_["reason"] == line.removeprefix("error: ")
    assert runs.checkpoint_steps(run) == [] and not [p for p in (run / "checkpoints").iterdir()]
    # the same torch error with room to spare is a bug, reported as one (not dressed up as a full disk)
    monkeypatch.setattr(trainer_mod, "free_space", lambda folder: 10**15)
    assert main(["train", *flags(text_file, cache), "--save-every", "1", "--output-dir", str(tmp_path / "r2")]) == 1
    assert "unexpected RuntimeError" in error_line(capsys.readouterr().err)


def test_runs_started_in_the_same_second_never_share_a_folder(tmp_path):
    cfg = TrainConfig()
    ids = {runs.new_run_id(cfg, tmp_path) for _ in range(5)}
    assert len(ids) == 5 and all((tmp_path / i).is_dir() for i in ids)  # each folder exists once named
