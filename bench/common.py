"""Shared bits of the benchmarks: timing with warm-up and interleaving, and RESULTS.md sections."""
from __future__ import annotations

import argparse
import platform
import re
import statistics
import time
from datetime import date
from pathlib import Path
from typing import Callable

import torch

from core.models.tokenizer import Tokenizer

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def interleaved(fns: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Run each ``fn`` (returns work units done) ``repeats`` times, alternating, so a noisy machine
    affects all candidates alike; return the median units per second of each."""
    rates: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            units = fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            rates[name].append(units / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in rates.items()}


def generation_args(description: str) -> argparse.ArgumentParser:
    """The flags every generation benchmark takes (device, dtype, how much to generate, how often,
    --no-write); a benchmark adds its own to the parser returned."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    return ap


def report(title: str, body: str, write: bool = True) -> None:
    """Print a benchmark's section and, unless ``write`` is off (``--no-write``), keep it in RESULTS.md."""
    print(body)
    if write:
        write_section(title, body)


def write_section(title: str, body: str) -> None:
    """Replace (or append) the ``## title`` section of RESULTS.md, leaving other sections alone."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nRatios against a baseline measured in the same run.\n"
    section = f"## {title}\n\n_{date.today().isoformat()}, {machine()}, torch {torch.__version__}_\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    RESULTS.write_text(text)


class IdTokenizer(Tokenizer):
    """Ids in, ids out: the benchmark measures the model, not a tokenizer."""

    name, vocab_size, eos_id = "ids", 50257, None

    def encode(self, text, add_special_tokens=True):
        return [int(t) for t in text.split()]

    def decode(self, ids):
        return " ".join(str(i) for i in ids)
