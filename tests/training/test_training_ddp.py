"""Data-parallel training under torchrun with gloo on the CPU: two processes with batch B give the
same losses as one process with batch 2B, and only rank 0 writes the run folder."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from core.training import TrainConfig, read_metrics, read_status, train
from tests.conftest import CORPUS

ROOT = Path(__file__).resolve().parents[2]


def test_two_process_ddp_on_cpu_matches_one_process_with_twice_the_batch(tmp_path):
    text = tmp_path / "tiny.txt"
    text.write_text(CORPUS * 3)
    common = dict(dataset=str(text), vocab_size=320, data_cache=str(tmp_path / "cache"), n_layer=1, n_head=2,
                  d_model=16, block_size=32, device="cpu", log_every=1, val_every=2, val_batches=2, save_every=0,
                  max_steps=4, grad_acc_steps=2, seed=3)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        list(train(TrainConfig(batch_size=8, **common), tmp_path / "single"))
    finally:
        torch.set_num_threads(n)

    flags = ["--dataset", str(text), "--vocab-size", "320", "--data-cache", str(tmp_path / "cache"), "--n-layer", "1",
             "--n-head", "2", "--d-model", "16", "--block-size", "32", "--device", "cpu", "--log-every", "1",
             "--val-every", "2", "--val-batches", "2", "--save-every", "0", "--max-steps", "4", "--grad-acc-steps", "2",
             "--seed", "3", "--batch-size", "4", "--output-dir", str(tmp_path / "ddp"), "--no-progress"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "core", "train",
           *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    single, ddp = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "ddp")
    assert [m["step"] for m in ddp] == [1, 2, 3, 4]               # rank 0 alone wrote the file
    for a, b in zip(single, ddp):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-4
        assert a["tokens"] == b["tokens"] == a["step"] * 8 * 2 * 32
        assert abs(a.get("val_loss", 0.0) - b.get("val_loss", 0.0)) < 1e-4
    st = read_status(tmp_path / "ddp")
    assert st["state"] == "finished" and st["world_size"] == 2 and st["distributed"] is True
    assert (tmp_path / "ddp" / "checkpoints" / "4" / "model.safetensors").is_file()


def test_several_gpu_indices_rerun_the_command_under_torchrun(tmp_path, monkeypatch, capsys):
    """`--cuda 0,1` (and launch() with two devices) turn the process into torchrun with one worker per GPU."""
    import json

    from core.commands.cli import main

    out = tmp_path / "run"
    argv = ["train", "--cuda", "0,1", "--output-dir", str(out), "--max-steps", "3", "--no-progress"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(argv) == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().err

    calls = []

    def fake_exec(file, args, env):
        calls.append((file, args, env))
        raise SystemExit(0)  # execvpe never returns

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(os, "execvpe", fake_exec)
    try:
        main(argv)
    except SystemExit:
        pass
    (file, args, env), = calls
    assert args[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m"]
    assert args[6:8] == ["core", "train"] and "--config" in args and str(out) in args
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["devices"] == [0, 1] and cfg["max_steps"] == 3
    assert main(["train", "--cuda", "0,7", "--output-dir", str(tmp_path / "x")]) == 2
    assert "GPU index 7 does not exist" in capsys.readouterr().err
