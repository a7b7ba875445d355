"""Tokens/s of building a token cache: the batch encoder on every core against the single-threaded
path it replaced (one ``encode`` call per 64K-character piece), on the Shakespeare corpus.

Both write the same shards through the same train/validation router, so the difference is the
encoding alone; the two runs alternate, so a noisy machine slows both alike. The machine's load
average is recorded with the result: on a shared machine the cores the batch encoder can use
are the cores nobody else is using.

    python bench/data_prep.py               # goal >= 1.8x on 2 cores
    python bench/data_prep.py --repeats 1   # quicker
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import interleaved, write_section  # noqa: E402
from core.models.loading import DEFAULT_DIR  # noqa: E402
from core.models.tokenizer import BPETokenizer  # noqa: E402
from core.training.data import (ShakespeareSource, _build_cache, _pieces, _SplitRouter,  # noqa: E402
                                token_dtype)

GOAL = 1.8


def single_threaded(source, tokenizer_path: Path, folder: Path) -> int:
    """The cache build as it was: each piece encoded on its own, on one thread."""
    tok = BPETokenizer(tokenizer_path)
    folder.mkdir(parents=True)
    router = _SplitRouter(folder, token_dtype(tok.vocab_size), 0.05)
    n = 0
    for text, ends in _pieces(source):
        ids = tok.encode(text)
        if ends and tok.eos_id is not None:
            ids.append(tok.eos_id)
        router.add(ids)
        n += len(ids)
    router.close()
    return n


def batched(source, tokenizer_path: Path, folder: Path) -> int:
    """The cache build as it is now (core.training.data._build_cache)."""
    _build_cache(source, tokenizer_path, folder, 0.05, None, log=lambda _: None)
    import json

    meta = json.loads((folder / "meta.json").read_text())
    return meta["train_tokens"] + meta["val_tokens"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    source, tok = ShakespeareSource(), DEFAULT_DIR / "tokenizer.json"
    work = Path(tempfile.mkdtemp(prefix="gptlab-bench-data-"))
    count = {"i": 0}

    def fresh() -> Path:
        count["i"] += 1
        return work / f"run{count['i']}"

    load_before = os.getloadavg()
    cpu0 = os.times()
    try:
        rates = interleaved({"single-threaded (one encode per piece)": lambda: single_threaded(source, tok, fresh()),
                             "batch encoder, every core": lambda: batched(source, tok, fresh())}, args.repeats)
        a = sorted((work).glob("run1/*.bin"))
        b = sorted((work).glob("run2/*.bin"))
        same = [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cpu1 = os.times()
    load_after = os.getloadavg()
    base, ours = rates.values()
    ratio = ours / base
    cores = os.cpu_count() or 1
    body = ["| path | tokens/s |", "|---|---:|"]
    body += [f"| {k} | {v:,.0f} |" for k, v in rates.items()]
    met = "met" if ratio >= GOAL else "not met"
    body += ["", f"Ratio (batch / single-threaded): **{ratio:.2f}x** (goal >= {GOAL}x on 2 cores: {met}). "
                 f"Shards identical: {same}. Shakespeare (shipped 8192-token BPE), median of {args.repeats} "
                 f"interleaved builds, {cores} core(s).",
             "",
             f"Load average while measuring (1, 5, 15 min): before {', '.join(f'{x:.1f}' for x in load_before)}; "
             f"after {', '.join(f'{x:.1f}' for x in load_after)}. CPU time of this process "
             f"{cpu1.user - cpu0.user + cpu1.system - cpu0.system:,.1f} s."
             + (" The load was above the core count, so the batch encoder's extra threads competed with other "
                "processes: this ratio understates what an idle machine gives." if max(load_before + load_after) > cores
                else "")]
    print("\n".join(body))
    write_section("Data preparation", "\n".join(body))


if __name__ == "__main__":
    main()
