"""Training under faults: a run killed with SIGKILL, a checkpoint write that dies half-way, CUDA out
of memory, and pickles planted in a run folder. Real processes and real files wherever a fault
can be produced for real; tiny models on a tiny text.

Checkpoint semantics these tests hold the trainer to: ``checkpoints/<step>/`` holds the state
after ``step`` optimizer steps. Resuming truncates ``metrics.jsonl`` to the lines at or before
that step and retrains the steps after it, so a resumed run's metrics list every step from 1 to
max-steps exactly once; the retrained steps repeat the killed run's losses (exact resume).
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.errors import LabError
from core.models.loading import load_model
from core.training import (CheckpointSaved, RunStarted, TrainConfig, read_metrics, read_status, resume_config,
                           train)
from core.training.optim import build_optimizers, resolve_hyper
from core.training.runs import ROOT, checkpoint_steps, run_info
from core.training.trainer import STATE_FILE, Trainer, load_trainer_state
from tests.conftest import wait_for

TOKENS_PER_STEP = 4 * 32  # batch 4 x block 32, one process, per accumulation step


def tiny(text_file, cache, **kw) -> TrainConfig:
    base = dict(dataset=str(text_file), vocab_size=320, data_cache=str(cache), n_layer=2, n_head=2, d_model=32,
                block_size=32, batch_size=4, device="cpu", log_every=1, val_every=0, val_batches=2, save_every=4,
                keep_last=5, max_steps=10, seed=7)
    return TrainConfig(**{**base, **kw})


def cli_flags(text_file, cache) -> list[str]:
    return ["--dataset", str(text_file), "--vocab-size", "320", "--data-cache", str(cache), "--device", "cpu",
            "--n-layer", "2", "--n-head", "2", "--d-model", "32", "--block-size", "32", "--batch-size", "4",
            "--log-every", "1", "--val-every", "0", "--seed", "7"]


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def assert_checkpoint_loads(folder: Path, cfg: TrainConfig) -> None:
    """The folder is a model spec, and its trainer state fits the optimisers resume builds."""
    step = int(folder.name)
    lm = load_model(str(folder))
    assert lm.extra["training"]["step"] == step and lm.tokenizer.vocab_size == 320
    tokens_per_step = TOKENS_PER_STEP * cfg.grad_acc_steps
    state = load_trainer_state(folder)
    assert state["step"] == step and state["tokens"] == step * tokens_per_step
    opts = build_optimizers(lm.model, cfg.optimizer, resolve_hyper(cfg, cfg.max_steps or 1, tokens_per_step))
    for opt, sd in zip(opts, state["optimizers"], strict=True):
        opt.load_state_dict(sd)
        for group in opt.param_groups:
            for p in group["params"]:
                assert opt.state[p]["exp_avg"].shape == p.shape and int(opt.state[p]["step"]) == step


def hidden_leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("."))


# -- 1. kill -9 -------------------------------------------------------------------------------------

def test_sigkilled_run_reads_failed_keeps_loadable_checkpoints_and_resumes_from_the_last(text_file, cache,
                                                                                         tmp_path, capsys):
    from core.commands.cli import main

    run = tmp_path / "run"
    # --min-lr-ratio 1 with a fixed warmup: the learning rate past step 2 does not depend on
    # --max-steps, so the resumed run (given a new --max-steps) must retrace the killed one exactly.
    flags = cli_flags(text_file, cache) + ["--save-every", "4", "--keep-last", "3", "--lr", "1e-3",
                                           "--warmup-steps", "2", "--min-lr-ratio", "1.0"]
    first = flags + ["--max-steps", "100000", "--output-dir", str(run), "--no-progress"]
    with open(tmp_path / "console.txt", "wb") as console:
        proc = subprocess.Popen([sys.executable, "-m", "core", "train", *first], cwd=ROOT, env=child_env(),
                                stdout=console, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def mid_way() -> bool:  # three checkpoints (steps 4, 8, 12 or later), and steps logged past the last
            steps = checkpoint_steps(run)
            rows = read_metrics(run) if (run / "status.json").exists() else []
            return bool(steps) and steps[-1] >= 12 and bool(rows) and rows[-1]["step"] > steps[-1] + 1
        wait_for(mid_way)
        assert read_status(run)["state"] == "running"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    # The dead process never reads as running: failed, with a reason that says how to go on.
    st = read_status(run)
    assert st["state"] == "failed" and f"pid {proc.pid}" in st["reason"] and "--resume" in st["reason"]
    assert json.loads((run / "status.json").read_text())["state"] == "running"  # what the killed process left
    info = run_info(run)
    assert info.state == "failed"

    # Every checkpoint on disk loads; whatever else is there is a hidden leftover nothing lists.
    killed_rows = read_metrics(run)
    killed_at = killed_rows[-1]["step"]
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    steps = sorted(int(n) for n in names if n.isdigit())
    assert steps == checkpoint_steps(run) == info.checkpoints
    # 3 kept, or 4 when the kill fell between a save's rename and the pruning of the oldest
    assert len(steps) in (3, 4) and all(s % 4 == 0 for s in steps) and steps[-1] <= killed_at
    assert all(n.startswith((".tmp-", ".old-", ".del-")) for n in names if not n.isdigit())
    cfg = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    for s in steps:
        assert_checkpoint_loads(run / "checkpoints" / str(s), cfg)
    last = steps[-1]

    # A kill during a save leaves .tmp-<step>-<pid>/ half written (the kill above may or may not
    # have hit one): plant one for a later step, with truncated weights and no trainer state.
    partial = run / "checkpoints" / f".tmp-{last + 4}-4242"
    shutil.copytree(run / "checkpoints" / str(last), partial)
    (partial / STATE_FILE).unlink()
    weights = partial / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert checkpoint_steps(run) == steps

    # Re-running the command without --resume would start over in the same folder: refused.
    before = (run / "metrics.jsonl").read_bytes()
    assert main(["train", *flags, "--max-steps", "3", "--output-dir", str(run), "--no-progress"]) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_bytes() == before and checkpoint_steps(run) == steps

    # Resume the way users do; it continues from the last checkpoint, not from step 0.
    target = killed_at + 2
    done = subprocess.run([sys.executable, "-m", "core", "train", "--resume", str(run), "--max-steps", str(target),
                           "--no-progress"], cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    st = read_status(run)
    assert st["state"] == "finished" and st["step"] == target and st["reason"] is None
    log = (run / "log.txt").read_text()
    assert f"resumed from {run / 'checkpoints' / str(last)} (step {last})" in log
    assert f"partial checkpoint left by an interrupted save: .tmp-{last + 4}-4242" in log
    assert hidden_leftovers(run) == []

    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, target + 1))    # each step once, none missing
    assert [r["tokens"] for r in rows] == [s * TOKENS_PER_STEP for s in range(1, target + 1)]
    killed = {r["step"]: r for r in killed_rows}
    assert rows[:last] == [killed[s] for s in range(1, last + 1)]    # kept as they were
    # Steps last+1..killed_at were lost with the kill and trained again: the whole curve matches
    # an uninterrupted run of the same config (exact resume across a killed process).
    reference = tmp_path / "reference"
    list(train(resume_config(run, max_steps=target), reference))
    ref = read_metrics(reference)
    assert max(abs(a["train_loss"] - b["train_loss"]) for a, b in zip(rows, ref, strict=True)) <= 1e-5
    assert [r["lr"] for r in rows] == [r["lr"] for r in ref]
    final = checkpoint_steps(run)
    assert final[-1] == target and len(final) == 3
    assert_checkpoint_loads(run / "checkpoints" / str(target), resume_config(run))


# -- 2. a checkpoint write that dies half-way ------------------------------------------------------

def _dies_half_way(real):
    """``real`` atomic write whose writer stops half-way through the file, as a crash would."""
    def write(path, writer):
        def half(tmp):
            writer(tmp)
            data = Path(tmp).read_bytes()
            Path(tmp).write_bytes(data[: len(data) // 2])
            raise OSError(5, "Input/output error (injected half-way)", str(path))
        return real(path, half)
    return write


@pytest.mark.parametrize("file", ["model.safetensors", STATE_FILE])
def test_a_checkpoint_write_dying_half_way_leaves_the_previous_one_intact(text_file, cache, tmp_path, monkeypatch,
                                                                          file):
    import core.files
    import core.models.loading
    import core.training.trainer as trainer_mod

    run = tmp_path / "run"
    real = core.files.atomic_write
    saves = []

    def flaky_bytes(path, data):  # save_checkpoint's safetensors write
        if Path(path).name == file and len(saves) == 1:
            return _dies_half_way(real)(path, lambda tmp: Path(tmp).write_bytes(data))
        return core.files.atomic_write_bytes(path, data)

    def flaky_state(path, writer):  # the trainer state's write
        if Path(path).name == file and len(saves) == 1:
            return _dies_half_way(real)(path, writer)
        return real(path, writer)

    monkeypatch.setattr(core.models.loading, "atomic_write_bytes", flaky_bytes)
    monkeypatch.setattr(trainer_mod, "atomic_write", flaky_state)
    before = None
    with pytest.raises(OSError, match="injected half-way"):
        for ev in train(tiny(text_file, cache, max_steps=10), run):
            if isinstance(ev, CheckpointSaved):
                saves.append(ev.step)
                before = digests(run / "checkpoints" / "4")
    assert saves == [4]
    st = read_status(run)
    assert st["state"] == "failed" and "injected half-way" in st["reason"] and st["step"] == 8

    # Step 4 is byte for byte what was saved; step 8 is nowhere, not even as a hidden folder or temp file.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["4"]
    assert digests(run / "checkpoints" / "4") == before
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp-")]
    cfg = tiny(text_file, cache, max_steps=10)
    assert_checkpoint_loads(run / "checkpoints" / "4", cfg)

    monkeypatch.undo()
    events = list(train(resume_config(run), run, resume=True))
    assert isinstance(events[0], RunStarted) and events[0].resumed and events[0].step == 4
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 11))
    assert read_status(run)["state"] == "finished" and checkpoint_steps(run) == [4, 8, 10]


def test_a_prune_dying_half_way_leaves_no_half_checkpoint_listed(text_file, cache, tmp_path, monkeypatch):
    """keep_last deletes old checkpoints; a delete that stops after one file must not leave a
    ``<step>/`` folder that lists as a checkpoint but cannot load."""
    real = shutil.rmtree

    def dies_half_way(path, *a, **kw):
        path = Path(path)
        if path.parent.name == "checkpoints" and path.exists() and (path / "config.json").exists():
            (path / "model.safetensors").unlink()
            raise RuntimeError("killed while deleting (injected)")
        return real(path, *a, **kw)

    run = tmp_path / "run"
    monkeypatch.setattr(shutil, "rmtree", dies_half_way)
    with pytest.raises(RuntimeError, match="injected"):
        list(train(tiny(text_file, cache, save_every=2, keep_last=2), run))
    monkeypatch.undo()
    assert checkpoint_steps(run) == [4, 6] and hidden_leftovers(run) == [".del-2-" + str(os.getpid())]
    cfg = tiny(text_file, cache)
    for s in (4, 6):
        assert_checkpoint_loads(run / "checkpoints" / str(s), cfg)
    events = list(train(resume_config(run), run, resume=True))
    assert events[0].step == 6 and hidden_leftovers(run) == [] and checkpoint_steps(run) == [8, 10]


def test_a_kill_between_the_renames_of_a_resave_restores_that_checkpoint(text_file, cache, tmp_path):
    """Re-saving a step moves ``<step>/`` to ``.old-<step>-<pid>/`` before renaming the new folder in;
    a kill in between leaves that step only in ``.old-*``, which resume puts back and uses. A kill
    while pruning leaves a hidden ``.del-*`` folder, which is removed."""
    run = tmp_path / "run"
    list(train(tiny(text_file, cache, max_steps=8), run))
    ck = run / "checkpoints"
    assert checkpoint_steps(run) == [4, 8]
    saved = digests(ck / "8")
    os.rename(ck / "8", ck / ".old-8-4242")
    shutil.copytree(ck / ".old-8-4242", ck / ".tmp-8-4242")
    (ck / ".tmp-8-4242" / STATE_FILE).write_bytes(b"\x00" * 10)   # the new copy, half written
    shutil.copytree(ck / "4", ck / ".del-0-4242")                 # and a pruned folder, half deleted
    (ck / ".del-0-4242" / "model.safetensors").unlink()
    assert checkpoint_steps(run) == [4]

    events = list(train(resume_config(run, max_steps=10), run, resume=True))
    assert events[0].step == 8                                    # not 4: the .old copy was restored
    assert hidden_leftovers(run) == [] and checkpoint_steps(run) == [4, 8, 10]
    assert digests(ck / "8") == saved
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 11))


# -- 3. CUDA out of memory --------------------------------------------------------------------------

@pytest.mark.parametrize("error", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                 "tried to allocate 2147483648 bytes. Error code 12 (Cannot allocate memory) (simulated)"),
], ids=["cuda", "cpu-allocator"])
@pytest.mark.parametrize("where", ["_train_step", "validate"])
def test_out_of_memory_fails_the_run_with_what_to_change_and_keeps_checkpoints(text_file, cache, tmp_path,
                                                                               monkeypatch, capsys, where, error):
    from core.commands.cli import main

    real = getattr(Trainer, where)

    def oom_at_step_7(self, *a, **kw):
        if self.step == (6 if where == "_train_step" else 7):
            raise error
        return real(self, *a, **kw)

    monkeypatch.setattr(Trainer, where, oom_at_step_7)
    run = tmp_path / "run"
    flags = cli_flags(text_file, cache) + ["--grad-acc-steps", "3", "--save-every", "3", "--max-steps", "20",
                                           "--val-every", "1", "--val-batches", "1"]
    assert main(["train", *flags, "--output-dir", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    st_step = 6 if where == "_train_step" else 7          # validation runs after step 7 completed
    message = err.strip().removeprefix("error: ")
    assert message == (f"cpu ran out of memory after {st_step} steps with micro-batches of 4 x 32 tokens; use "
                       f"--batch-size 2 with --grad-acc-steps 6 (the same 12 sequences per step), a shorter "
                       f"--block-size (now 32), or --amp; the checkpoints saved so far are kept (last: step 6).")
    st = read_status(run)
    assert st["state"] == "failed" and st["reason"] == message and st["step"] == st_step
    assert st["fix"] == {"batch_size": 2, "grad_acc_steps": 6}  # the advice as data, for a one-click retry
    assert checkpoint_steps(run) == [3, 6]
    cfg = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    for s in (3, 6):
        assert_checkpoint_loads(run / "checkpoints" / str(s), cfg)


def test_after_out_of_memory_a_run_resumes_with_the_step_split_into_smaller_micro_batches(text_file, cache, tmp_path,
                                                                                            capsys):
    """The advice above, followed: the same sequences per step in smaller pieces carries on the
    same data and the same loss curve; another number of sequences per step is refused."""
    from core.commands.cli import main

    flags = cli_flags(text_file, cache) + ["--save-every", "3", "--no-progress", "--lr", "1e-3", "--warmup-steps", "2",
                                           "--min-lr-ratio", "1.0"]  # a schedule that --max-steps leaves alone
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(["train", *flags, "--max-steps", "6", "--output-dir", str(whole)]) == 0
    assert main(["train", *flags, "--max-steps", "3", "--output-dir", str(split)]) == 0
    assert main(["train", "--resume", str(split), "--max-steps", "6", "--batch-size", "3", "--no-progress"]) == 2
    assert "product is 4" in capsys.readouterr().err
    assert main(["train", "--resume", str(split), "--max-steps", "6", "--batch-size", "2", "--grad-acc-steps", "2",
                 "--no-progress"]) == 0
    a, b = read_metrics(whole), read_metrics(split)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6] and [r["tokens"] for r in b] == [r["tokens"] for r in a]
    for ra, rb in zip(a, b):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], abs=1e-5), ra["step"]


@pytest.mark.parametrize("batch, amp, advice", [
    (5, True, ("use --batch-size 2 with --grad-acc-steps 3 (6 instead of 5 sequences per step), or a shorter "
               "--block-size (now 32).")),
    (1, False, "use a shorter --block-size (now 32), or --amp."),
])
def test_out_of_memory_advice_fits_the_batch(text_file, cache, tmp_path, monkeypatch, batch, amp, advice):
    def oom(self):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(Trainer, "_train_step", oom)
    with pytest.raises(LabError) as err:
        list(train(tiny(text_file, cache, batch_size=batch, amp=amp), tmp_path / "run"))
    assert str(err.value) == f"cpu ran out of memory after 0 steps with micro-batches of {batch} x 32 tokens; {advice}"
    assert read_status(tmp_path / "run")["reason"] == str(err.value)


# -- 4. pickles planted in a run folder -------------------------------------------------------------

class _Shell:
    """Unpickling this runs a shell command: what a hostile file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Opener:
    """Unpickling this creates a file through builtins.open."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _torch_file(path: Path, marker: Path) -> None:   # a real torch.save archive, hostile inside
    torch.save({"step": 8, "optimizers": [_Shell(marker)]}, path)


def _bare_pickle(path: Path, marker: Path) -> None:  # the legacy, non-zip format
    path.write_bytes(pickle.dumps({"step": 8, "optimizers": _Opener(marker)}, protocol=2))


@pytest.fixture(scope="module")
def trained_run(text_file, cache, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trained") / "run"
    list(train(tiny(text_file, cache, max_steps=8), run))
    return run


@pytest.mark.parametrize("make", [_torch_file, _bare_pickle])
def test_a_hostile_trainer_state_is_refused_and_never_runs(trained_run, tmp_path, capsys, make):
    from core.commands.cli import main

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    marker = tmp_path / "PWNED"
    make(run / "checkpoints" / "8" / STATE_FILE, marker)

    with pytest.raises(LabError, match="Refused to read the trainer state") as err:
        load_trainer_state(run / "checkpoints" / "8")
    assert f"delete the folder {run / 'checkpoints' / '8'}" in str(err.value)
    assert main(["train", "--resume", str(run), "--max-steps", "10", "--no-progress"]) == 2
    out = capsys.readouterr().err
    assert "Refused to read the trainer state" in out and "Traceback" not in out
    st = read_status(run)
    assert st["state"] == "failed" and "Refused to read the trainer state" in st["reason"]
    assert not marker.exists()

    # Doing what the message says: the checkpoint before it carries the run on.
    shutil.rmtree(run / "checkpoints" / "8")
    assert main(["train", "--resume", str(run), "--max-steps", "10", "--no-progress"]) == 0
    assert "resumed from" in (run / "log.txt").read_text() and read_status(run)["step"] == 10
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 11))
    assert not marker.exists()


def test_pickled_weights_dropped_into_a_checkpoint_are_never_unpickled(trained_run, tmp_path, tiny_gpt2_dir):
    from safetensors.torch import load_file

    folder = tmp_path / "ck"
    shutil.copytree(trained_run / "checkpoints" / "8", folder)
    marker = tmp_path / "PWNED"
    for name in ("model.pt", "pytorch_model.bin"):
        _torch_file(folder / name, marker)

    lm = load_model(str(folder))                         # our folder: the safetensors weights, nothing else
    sd = load_file(str(folder / "model.safetensors"))
    assert torch.equal(lm.model.transformer.wte.weight, sd["transformer.wte.weight"])
    (folder / "model.safetensors").unlink()
    with pytest.raises(LabError, match="no model.safetensors"):
        load_model(str(folder))
    assert not marker.exists()

    # A Hugging Face folder whose weights are only a hostile pytorch_model.bin.
    hf = tmp_path / "hf"
    hf.mkdir()
    shutil.copy(tiny_gpt2_dir / "config.json", hf / "config.json")
    _torch_file(hf / "pytorch_model.bin", marker)
    with pytest.raises(LabError, match="pytorch_model.bin|only safetensors|plain tensor"):
        load_model(str(hf))
    assert not marker.exists()
