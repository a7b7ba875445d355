"""FSDP2 on the CPU with gloo: two processes give the loss curve of one process with the same global
batch; sharded checkpoints resume exactly on 2 -> 1 and 1 -> 2 processes and load as a model; a killed
rank fails the run with a sentence, and the run resumes. Tiny model, so the file runs in about a minute."""
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
import torch

from core.training import TrainConfig, read_metrics, read_status, train
from core.training.checkpoint import is_sharded
from core.training.trainer import CheckpointSaved
from tests.conftest import CORPUS

ROOT = Path(__file__).resolve().parents[2]
STEPS = 20
TOL = 1e-5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp")
    text = folder / "tiny.txt"
    text.write_text(CORPUS * 3)
    return folder, text


def common(folder: Path, text: Path, **over) -> dict:
    d = dict(dataset=str(text), vocab_size=320, data_cache=str(folder / "cache"), n_layer=2, n_head=2, d_model=16,
             block_size=32, device="cpu", log_every=1, val_every=5, val_batches=2, save_every=10, max_steps=STEPS,
             seed=3, warmup_steps=2)
    d.update(over)
    return d


def flags(d: dict) -> list[str]:
    out = []
    for k, v in d.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def torchrun(args: list[str], nproc: int = 2, timeout: float = 120, wait: bool = True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "core",
           "train", *args, "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def one_thread(fn):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(n)


def same_curve(a: list[dict], b: list[dict], steps: range) -> None:
    by_a, by_b = {m["step"]: m for m in a}, {m["step"]: m for m in b}
    for s in steps:
        assert abs(by_a[s]["train_loss"] - by_b[s]["train_loss"]) < TOL, (s, by_a[s], by_b[s])
        assert abs(by_a[s].get("val_loss", 0.0) - by_b[s].get("val_loss", 0.0)) < TOL, s
        assert by_a[s]["tokens"] == by_b[s]["tokens"]


@pytest.fixture(scope="module")
def reference(corpus):
    """One process, unsharded, global batch 8: the curve every FSDP run must retrace."""
    folder, text = corpus
    run = folder / "single"
    one_thread(lambda: list(train(TrainConfig(batch_size=8, **common(folder, text)), run)))
    return run


@pytest.fixture(scope="module")
def fsdp_run(corpus):
    """Two processes under torchrun, FSDP, batch 4 each (global 8)."""
    folder, text = corpus
    run = folder / "fsdp2"
    torchrun(flags(common(folder, text, batch_size=4, parallel="fsdp", preview_every=10, ckpt_name="final"))
             + ["--output-dir", str(run)])
    return run


def test_two_process_fsdp_matches_one_process_with_the_same_global_batch(reference, fsdp_run):
    single, fsdp = read_metrics(reference), read_metrics(fsdp_run)
    assert [m["step"] for m in fsdp] == list(range(1, STEPS + 1))        # rank 0 alone wrote the file
    same_curve(single, fsdp, range(1, STEPS + 1))
    st = read_status(fsdp_run)
    assert st["state"] == "finished" and st["world_size"] == 2
    ck = fsdp_run / "checkpoints" / "20"
    assert is_sharded(ck) and not (ck / "model.safetensors").exists()
    assert sorted(p.name for p in (ck / "shards").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert "parallel: FSDP2, sharded over 2 process(es) (--parallel fsdp)" in (fsdp_run / "log.txt").read_text()
    previews = [json.loads(line) for line in (fsdp_run / "previews.jsonl").read_text().splitlines()]
    assert [p["step"] for p in previews] == [10, 20] and all(p["text"] for p in previews)  # sampled by every rank
    from safetensors.torch import load_file   # --ckpt-name: the final model gathered into one file

    final, ref = load_file(str(fsdp_run / "final" / "model.safetensors")), \
        load_file(str(reference / "checkpoints" / "20" / "model.safetensors"))
    assert final.keys() == ref.keys() and all(torch.allclose(final[k], ref[k], atol=1e-5) for k in ref)


def test_a_sharded_checkpoint_loads_as_a_model_with_the_weights_of_the_one_process_run(reference, fsdp_run, tmp_path):
    from core.commands.cli import main
    from core.models.loading import load_model

    ours = load_model(str(fsdp_run / "checkpoints" / "20"))
    ref = load_model(str(reference / "checkpoints" / "20"))
    ref_sd = ref.model.state_dict()
    for name, t in ours.model.state_dict().items():
        assert torch.allclose(t, ref_sd[name], atol=1e-5), name
    ids = torch.tensor([[5, 9, 11, 3]])
    assert torch.allclose(ours.model(ids), ref.model(ids), atol=1e-4)
    assert main(["export", "--model", str(fsdp_run), "--to", str(tmp_path / "hf")]) == 0   # consolidated on load
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def _copy_until(run: Path, dest: Path, step: int) -> Path:
    """The run as it was right after its checkpoint ``step``: later checkpoints gone (resume truncates
    the metrics after the checkpoint it resumes from)."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns(".writer.lock"))
    for ck in (dest / "checkpoints").iterdir():
        if int(ck.name) > step:
            shutil.rmtree(ck)
    return dest


def test_two_process_checkpoint_resumes_exactly_in_one_process(corpus, reference, fsdp_run):
    folder, _ = corpus
    run = _copy_until(fsdp_run, folder / "two-to-one", 10)
    from core.training.trainer import resume_config

    cfg = resume_config(run)
    events = one_thread(lambda: list(train(cfg, run, resume=True)))
    assert events[0].step == 10 and events[0].world_size == 1
    same_curve(read_metrics(reference), read_metrics(run), range(1, STEPS + 1))
    assert "batch size 8 per process keeps 8 sequences per step" in (run / "log.txt").read_text()
    assert json.loads((run / "config.json").read_text())["batch_size"] == 8
    assert is_sharded(run / "checkpoints" / "20")


def test_one_process_fsdp_checkpoint_resumes_exactly_on_two_processes(corpus, reference):
    folder, text = corpus
    run = folder / "one-to-two"

    def first_half():
        gen = train(TrainConfig(batch_size=8, parallel="fsdp", **common(folder, text)), run)
        for ev in gen:
            if isinstance(ev, CheckpointSaved) and ev.step == 10:
                gen.close()                                              # stops there, as a killed run would
                return

    one_thread(first_half)
    assert is_sharded(run / "checkpoints" / "10") and read_status(run)["state"] == "stopped"
    torchrun(["--resume", str(run)])
    same_curve(read_metrics(reference), read_metrics(run), range(1, STEPS + 1))
    assert json.loads((run / "config.json").read_text())["batch_size"] == 4
    assert read_status(run)["state"] == "finished"


def _children(parent: int) -> list[int]:
    """The pids of a running process's children (none once it is gone)."""
    try:
        return [int(pid) for task in Path(f"/proc/{parent}/task").iterdir()
                for pid in (task / "children").read_text().split()]
    except OSError:
        return []


def _worker_with_rank(parent: int, rank: int, timeout: float = 60) -> int:
    """The pid of torchrun's worker process with RANK=rank."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in _children(parent):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return pid
        time.sleep(0.2)
    raise AssertionError(f"no worker with RANK={rank}")


def _between_checkpoints(run) -> bool:
    """At least 8 steps logged, the last of them 1 or 2 steps past the newest checkpoint on disk."""
    folder = run / "checkpoints"
    saved = [int(c.name) for c in folder.iterdir() if c.name.isdigit()] if folder.is_dir() else []
    if not saved:   # the run folder itself may not be there yet
        return False
    steps = [m["step"] for m in read_metrics(run)]
    return len(steps) >= 8 and max(steps) - max(saved) in (1, 2)


def test_a_killed_rank_fails_the_run_with_a_sentence_and_the_run_resumes(corpus):
    folder, text = corpus
    run = folder / "killed"
    # a constant learning rate, so the resumed run may stop earlier and still retrace the steps it shares
    d = common(folder, text, batch_size=4, parallel="fsdp", max_steps=1_000_000, save_every=5, val_every=0,
               min_lr_ratio=1.0, warmup_steps=0)
    proc = torchrun(flags(d) + ["--output-dir", str(run)], wait=False)
    try:
        victim = _worker_with_rank(proc.pid, 1)
        deadline = time.monotonic() + 90
        # killed mid-way between checkpoints (every 5 steps), so logged steps past the last one are
        # retraced. Which checkpoints are on disk changes as old ones are rotated away (a fast machine
        # is dozens of steps further at each look), so the last one is compared with the last step.
        while not _between_checkpoints(run):
            if proc.poll() is not None:
                raise AssertionError(proc.stdout.read()[-3000:])
            assert time.monotonic() < deadline, "the run was never seen 1-2 steps past a checkpoint"
            time.sleep(0.02)
        os.kill(victim, signal.SIGKILL)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:   # the test failed with the run still going: its workers go too
            for pid in _children(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    before = {m["step"]: m["train_loss"] for m in read_metrics(run)}
    st = read_status(run)
    assert st["state"] == "failed", st
    assert st["reason"].startswith("Another process of this 2-process run stopped"), st["reason"]
    assert f"resume with `python -m core train --resume {run}`" in st["reason"]
    last = max(int(c.name) for c in (run / "checkpoints").iterdir() if c.name.isdigit())
    assert max(before) > last   # steps past the last checkpoint were logged, and are retraced below
    from core.training.trainer import resume_config

    # what is left of the run's machines may be fewer: here one process continues it
    one_thread(lambda: list(train(resume_config(run, max_steps=last + 3), run, resume=True)))
    after = {m["step"]: m["train_loss"] for m in read_metrics(run)}
    assert read_status(run)["state"] == "finished" and max(after) == last + 3
    for s in range(last + 1, min(max(before), last + 3) + 1):
        assert abs(after[s] - before[s]) < TOL, (s, after[s], before[s])


def test_two_nodes_on_one_machine_each_build_their_own_cache_and_train_as_one(corpus, reference):
    """Two `train --nnodes 2 --node-rank R` commands (one process each, a rendezvous on localhost)
    whose cache folders differ: the trainer finds the folder is not shared, each node builds its own
    token cache, and the run retraces the one-process curve."""
    import socket

    folder, text = corpus
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = folder / "two-nodes"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = []
    for rank in (0, 1):
        d = common(folder, text, batch_size=4, parallel="fsdp", max_steps=6, data_cache=folder / f"node{rank}-cache")
        cmd = [sys.executable, "-m", "core", "train", *flags(d), "--output-dir", str(run), "--no-progress",
               "--nnodes", "2", "--node-rank", str(rank), "--rdzv-endpoint", f"127.0.0.1:{port}"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    log = (run / "log.txt").read_text()
    assert "token cache: built on each node" in log
    assert list((folder / "node1-cache" / "tokens").glob("*/meta.json"))       # node 1 built its own
    short = folder / "short"
    one_thread(lambda: list(train(TrainConfig(batch_size=8, **common(folder, text, max_steps=6)), short)))
    same_curve(read_metrics(short), read_metrics(run), range(1, 7))
    assert read_status(run)["world_size"] == 2
