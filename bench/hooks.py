"""What the hook points cost a walk nobody hooks: generation and consensus, against the adapter as it
was before hook points existed, in the same run on the same weights.

The baseline is ``core/models/stack.py`` at ``--before`` (default: the last commit without hook
points), loaded beside the current one, so both walk the very same model; goal: within 3%.
Also measured: the same walks with one hook active (zero-ablating one head), to show what a hook costs.

    python bench/hooks.py                          # CPU, float32
    python bench/hooks.py --device cuda --dtype bfloat16
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import IdTokenizer, interleaved, report  # noqa: E402
from core.consensus.engine import ConsensusConfig, run_consensus  # noqa: E402
from core.devices import resolve_dtype  # noqa: E402
from core.generation.autoregressive import SamplingConfig, generate  # noqa: E402
from core.interventions import from_flags, hooks, prepare  # noqa: E402
from core.models.convert import gpt_from_hf_gpt2  # noqa: E402
from core.models.decode_layout import use_decode_layout  # noqa: E402
from core.models.loading import LoadedModel  # noqa: E402
from core.models.stack import stack_for  # noqa: E402

BEFORE = "f25c9f9"   # the last commit of the adapter without hook points


def stack_before(rev: str):
    """``stack_for`` of core/models/stack.py at ``rev``, imported as a sibling of today's module."""
    source = subprocess.run(["git", "show", f"{rev}:core/models/stack.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    name = "core.models._stack_before_hooks"
    spec = importlib.util.spec_from_loader(name, loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "core.models"
    sys.modules[name] = mod
    exec(compile(source, f"{rev}:core/models/stack.py", "exec"), mod.__dict__)
    return mod.stack_for


def cpu_interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Like bench.common.interleaved, but per second of this process's CPU time: on a shared machine
    other processes' load stretches wall time, not the CPU time a walk takes (one thread, see --threads)."""
    rates: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.process_time()
            units = fn()
            rates[name].append(units / (time.process_time() - t0))
    return {k: statistics.median(v) for k, v in rates.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--before", default=BEFORE, help="the commit whose adapter is the baseline (default: %(default)s)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: CPU time is then comparable)")
    ap.add_argument("--wall", action="store_true", help="time by the wall clock (GPU runs) instead of CPU time")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    dtype = resolve_dtype(args.dtype)
    hf = GPT2LMHeadModel(GPT2Config()).eval().to(args.device, dtype)
    ours = gpt_from_hf_gpt2(hf)
    if args.device == "cpu":
        use_decode_layout(ours)
    old_stack_for = stack_before(args.before)

    def loaded(stack):
        return LoadedModel(spec="bench", model=ours, tokenizer=IdTokenizer(), stack=stack, device=args.device,
                           dtype=dtype, source="bench")
    now, before = loaded(stack_for(ours)), loaded(old_stack_for(ours))
    gen = torch.Generator().manual_seed(1)
    prompt = " ".join(map(str, torch.randint(0, 50257, (16,), generator=gen).tolist()))
    prompts = [[int(t) for t in torch.randint(0, 50257, (32,), generator=gen)] for _ in range(4)]
    cfg = SamplingConfig(max_new_tokens=args.new_tokens, greedy=True, n_alternatives=5)
    ccfg = ConsensusConfig(iterations=args.iterations, matrix=True, engine="block")
    steps = args.iterations * now.stack.n_layer * len(prompts)
    head = prepare(now, from_flags(["head:5.3"]))

    def gen_run(lm, fns=None):
        def run() -> float:
            with hooks(lm, fns or {}):
                return len(generate(lm, prompt, cfg).tokens)
        return run

    def cons_run(lm, fns=None):
        def run() -> float:
            with hooks(lm, fns or {}):
                run_consensus(lm, prompts, ccfg)
            return steps
        return run

    same = generate(now, prompt, cfg).completion == generate(before, prompt, cfg).completion
    timed = interleaved if args.wall or args.device != "cpu" else cpu_interleaved
    gen_rates = timed({"before": gen_run(before), "now": gen_run(now), "hooked": gen_run(now, head)}, args.repeats)
    cons_rates = timed({"before": cons_run(before), "now": cons_run(now), "hooked": cons_run(now, head)}, args.repeats)
    clock = "wall-clock" if timed is interleaved else f"CPU-time ({args.threads} thread(s))"
    g, c = gen_rates["now"] / gen_rates["before"], cons_rates["now"] / cons_rates["before"]
    body = (f"GPT-2 small config (random weights), {args.device} {args.dtype}; generation: batch 1, 16-token prompt, "
            f"{args.new_tokens} new tokens, greedy; consensus: 4 prompts x 32 tokens, N = {args.iterations}, engine "
            f"block, matrices on. Baseline: core/models/stack.py at {args.before} (no hook points), same weights, "
            f"same process; median of {args.repeats} interleaved runs, {clock} rates.\n\n"
            "| walk | before (no hook points) | now, no hooks | now / before | now, one head ablated |\n"
            "|---|---:|---:|---:|---:|\n"
            f"| generation, tokens/s | {gen_rates['before']:.1f} | {gen_rates['now']:.1f} | {g:.3f}x | "
            f"{gen_rates['hooked']:.1f} |\n"
            f"| consensus, layer-steps/s | {cons_rates['before']:.2f} | {cons_rates['now']:.2f} | {c:.3f}x | "
            f"{cons_rates['hooked']:.2f} |\n\n"
            f"Goal: no hooks within 3% of before (ratios >= 0.97x): "
            f"{'met' if min(g, c) >= 0.97 else 'NOT met'}. Same greedy tokens before and now: {same}.\n\n"
            "With nothing hooked each named point costs one context-variable lookup; per-head tensors, the "
            "attention pattern (explicit softmax instead of the fused kernel) and the MLP's hidden layer are "
            "only exposed when a hook names them.")
    report(f"Hook points ({args.device}, {args.dtype})", body, write=not args.no_write)


if __name__ == "__main__":
    main()
