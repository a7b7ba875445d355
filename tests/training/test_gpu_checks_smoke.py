"""bench/gpu_checks.py runs every one of its checks in --smoke mode on the CPU (tiny shapes, a scratch
RESULTS.md), so the script a GPU machine runs is known to work before it gets one."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_checks_smoke_runs_every_check_and_writes_its_table(tmp_path):
    results = tmp_path / "RESULTS.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "bench/gpu_checks.py", "--smoke", "--results", str(results)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = results.read_text()
    assert "## GPU checks (smoke)" in text and "Smoke run: tiny shapes on the CPU" in text
    for row in ("| bf16 generation vs transformers `generate` |", "| training MFU, GPT-2 124M",
                "| consensus vs the reference loop", "| CUDA graphs on / off", "| FSDP on one GPU vs DDP"):
        line = next(ln for ln in text.splitlines() if ln.startswith(row))
        assert "failed" not in line, line
    assert not (ROOT / "bench" / "RESULTS.md").read_text().count("GPU checks (smoke)")   # the real file untouched
