"""The GPU checks in one script, a few minutes on one H200; every ratio against a baseline measured
in the same run, all written to bench/RESULTS.md under "GPU checks".

1. generation: our GPT in bfloat16 (KV cache) against transformers' ``generate`` on the same
   weights, GPT-2 small, greedy, batch 1 (goal >= 2x);
2. training MFU of our trainer on GPT-2 124M, context 1024, bfloat16, compiled (goal >= 40%);
3. consensus: our engine against the reference scripts' loop, GPT-2 XL, bfloat16 (goal >= 5x);
4. CUDA graphs on and off: the same consensus run with the graph engine and the block engine;
5. FSDP on one GPU against DDP's path (one process, unsharded, both eager): tokens/s and peak memory.

    python bench/gpu_checks.py                 # on a GPU machine (about 5 minutes on an H200)
    python bench/gpu_checks.py --smoke         # tiny shapes on the CPU, written to a scratch file: the
                                               # script itself is known to work (the tests run this)

A check that fails is reported in its row with its one-line error, and the others still run.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench.common as common  # noqa: E402
from bench.common import IdTokenizer, interleaved, machine  # noqa: E402


@dataclass
class Shape:
    device: str
    gen_layers: int
    gen_width: int
    gen_heads: int
    new_tokens: int
    train_preset: dict
    train_context: int
    train_batch: int
    train_steps: int
    cons_layers: int
    cons_width: int
    cons_heads: int
    cons_tokens: int
    cons_iterations: int
    repeats: int
    vocab: int


GPU = Shape("cuda", 12, 768, 12, 256, dict(preset="gpt2-small"), 1024, 16, 20, 48, 1600, 25, 64, 50, 3, 50304)
SMOKE = Shape("cpu", 2, 64, 2, 8, dict(n_layer=2, n_head=2, d_model=64), 64, 2, 2, 2, 64, 2, 8, 2, 1, 512)


def _result(name: str, fn) -> dict:
    t0 = time.perf_counter()
    try:
        out = fn()
        out.setdefault("ok", True)
    except Exception as e:  # one broken check must not hide the others
        traceback.print_exc()
        out = {"ok": False, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e) else ''}"}
    out["seconds"] = time.perf_counter() - t0
    print(f"[{name}] {out}", flush=True)
    return out


# -- 1. generation ------------------------------------------------------------------------------

def check_generation(s: Shape) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    from core.generation.autoregressive import SamplingConfig, generate
    from core.models.convert import gpt_from_hf_gpt2
    from core.models.loading import LoadedModel
    from core.models.stack import stack_for

    dtype = torch.bfloat16
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=s.gen_layers, n_embd=s.gen_width, n_head=s.gen_heads,
                                    vocab_size=s.vocab)).eval().to(s.device, dtype)
    ours = gpt_from_hf_gpt2(hf)
    lm = LoadedModel(spec="bench", model=ours, tokenizer=IdTokenizer(), stack=stack_for(ours), device=s.device,
                     dtype=dtype, source="bench")
    ids = torch.randint(0, s.vocab, (1, 16), generator=torch.Generator().manual_seed(1))
    prompt = " ".join(map(str, ids[0].tolist()))
    cfg = SamplingConfig(max_new_tokens=s.new_tokens, greedy=True, n_alternatives=0)

    def run_ours() -> float:
        return len(generate(lm, prompt, cfg).tokens)

    def run_hf() -> float:
        with torch.inference_mode():
            out = hf.generate(ids.to(s.device), max_new_tokens=s.new_tokens, min_new_tokens=s.new_tokens,
                              do_sample=False, pad_token_id=0, eos_token_id=None)
        return out.shape[1] - ids.shape[1]

    interleaved({"ours": run_ours, "hf": run_hf}, 1)
    rates = interleaved({"ours": run_ours, "hf": run_hf}, s.repeats)
    return {"ours": rates["ours"], "hf": rates["hf"], "ratio": rates["ours"] / rates["hf"], "goal": 2.0}


# -- 2 and 5. training --------------------------------------------------------------------------

def _train_rate(s: Shape, work: Path, name: str, **over) -> dict:
    from bench.training import SyntheticTrainer
    from core.training.config import TrainConfig
    from core.training.metrics import flops_per_token, peak_flops
    from core.training.trainer import StepLogged

    gpu = s.device == "cuda"
    settings = {"compile": gpu, **over}
    cfg = TrainConfig(**s.train_preset, block_size=s.train_context, batch_size=s.train_batch, amp=True,
                      amp_dtype="bfloat16", device=s.device, log_every=s.train_steps, val_every=0,
                      save_every=0, preview_every=0, keep_last=1, max_steps=100_000, warmup_steps=10, **settings)
    trainer = SyntheticTrainer(cfg, work / name, s.vocab, 1 << (24 if gpu else 16))
    events = trainer.events()
    logged = []
    try:
        for ev in events:
            if isinstance(ev, StepLogged):
                logged.append(ev.metrics)
                if len(logged) == 1 + s.repeats:  # the first interval holds compilation and warm-up
                    break
    finally:
        events.close()
    tps = sorted(m["tokens_per_s"] for m in logged[1:])[len(logged[1:]) // 2]
    gc = trainer.raw.config
    fpt = flops_per_token(trainer.raw.num_params(non_embedding=True), gc.n_layer, gc.d_model, s.train_context)
    peak = peak_flops(trainer.device)
    mem = torch.cuda.max_memory_allocated() / 1e9 if gpu else None
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    return {"tokens_per_s": tps, "mfu": None if peak is None else tps * fpt / peak, "peak_gb": mem,
            "loss": logged[-1]["train_loss"]}


def check_training(s: Shape, work: Path) -> dict:
    out = _train_rate(s, work, "mfu")
    out["goal"] = 0.40
    return out


def check_fsdp_vs_ddp(s: Shape, work: Path) -> dict:
    # both eager: the comparison is the sharding's own cost, not how well each compiles
    ddp = _train_rate(s, work, "ddp", parallel="ddp", compile=False)
    fsdp = _train_rate(s, work, "fsdp", parallel="fsdp", compile=False)
    return {"ddp": ddp, "fsdp": fsdp, "ratio": fsdp["tokens_per_s"] / ddp["tokens_per_s"]}


# -- 3 and 4. consensus and CUDA graphs ---------------------------------------------------------

def check_consensus(s: Shape) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    from bench.consensus import neo_script_loop
    from core.consensus.engine import ConsensusConfig, run_consensus
    from core.models.loading import LoadedModel
    from core.models.stack import stack_for

    dtype = torch.bfloat16
    config = GPT2Config(n_layer=s.cons_layers, n_embd=s.cons_width, n_head=s.cons_heads, vocab_size=s.vocab)
    torch.manual_seed(0)
    with torch.device(s.device):
        hf = GPT2LMHeadModel(config).eval().to(dtype)
    lm = LoadedModel(spec="bench", model=hf, tokenizer=IdTokenizer(), stack=stack_for(hf), device=s.device,
                     dtype=dtype, source="bench")
    ids = torch.randint(0, s.vocab, (1, s.cons_tokens), generator=torch.Generator().manual_seed(1))
    N, L = s.cons_iterations, s.cons_layers
    cfg = ConsensusConfig(iterations=N, matrix=True, memory_budget=64 * 1024 ** 3)
    sink = io.StringIO()

    def engine(name: str):
        def run() -> float:
            run_consensus(lm, ids.tolist(), replace(cfg, engine=name))
            return N * L
        return run

    def reference() -> float:
        with contextlib.redirect_stdout(sink):
            neo_script_loop(hf, ids.to(s.device), N, sink)
        sink.seek(0)
        sink.truncate()
        return N * L

    graphs = s.device == "cuda"
    fns = {"graph": engine("graph"), "block": engine("block"), "reference": reference} if graphs else \
        {"block": engine("block"), "reference": reference}
    interleaved(fns, 1)
    rates = interleaved(fns, s.repeats)
    best = rates.get("graph", rates["block"])
    return {"rates": rates, "ratio": best / rates["reference"], "goal": 5.0,
            "graph_over_block": rates["graph"] / rates["block"] if graphs else None}


# -- report -------------------------------------------------------------------------------------

def _pct(x):
    return "n/a" if x is None else f"{x:.1%}"


def _fail(r: dict) -> str | None:
    return None if r.get("ok") else f"failed: {r.get('error')}"


def report(s: Shape, smoke: bool, r: dict) -> str:
    met = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    rows = ["| check | measured | goal |", "|---|---|---|"]
    g = r["generation"]
    rows.append("| bf16 generation vs transformers `generate` | " + (_fail(g) or
                f"{g['ours']:,.1f} vs {g['hf']:,.1f} tokens/s: **{g['ratio']:.2f}x**") +
                " | >= 2x" + ("" if not g.get("ok") else f" ({met(g['ratio'] >= 2)})") + " |")
    t = r["training"]
    rows.append("| training MFU, GPT-2 124M, context 1024, bf16, compiled | " + (_fail(t) or
                f"{t['tokens_per_s']:,.0f} tokens/s, MFU **{_pct(t['mfu'])}**") + " | >= 40%" +
                ("" if not t.get("ok") or t["mfu"] is None else f" ({met(t['mfu'] >= 0.4)})") + " |")
    c = r["consensus"]
    rows.append("| consensus vs the reference loop, GPT-2 XL, bf16 | " + (_fail(c) or
                ", ".join(f"{k} {v:,.1f}" for k, v in c["rates"].items()) + f" layer-steps/s: **{c['ratio']:.2f}x**")
                + " | >= 5x" + ("" if not c.get("ok") else f" ({met(c['ratio'] >= 5)})") + " |")
    rows.append("| CUDA graphs on / off (consensus engine graph vs block) | " + (_fail(c) or (
                f"**{c['graph_over_block']:.2f}x**" if c["graph_over_block"] is not None else
                "not measured: no CUDA device (block engine only)")) + " | > 1x |")
    f = r["fsdp"]
    if f.get("ok"):
        mem = "" if f["ddp"]["peak_gb"] is None else \
            f"; peak {f['fsdp']['peak_gb']:.1f} GB vs {f['ddp']['peak_gb']:.1f} GB"
        text = (f"FSDP {f['fsdp']['tokens_per_s']:,.0f} vs DDP path {f['ddp']['tokens_per_s']:,.0f} tokens/s: "
                f"**{f['ratio']:.2f}x**{mem}")
    else:
        text = _fail(f)
    rows.append(f"| FSDP on one GPU vs DDP (one process, GPT-2 124M, bf16, eager) | {text} | about 1x (sharding over one GPU only adds "
                f"its bookkeeping) |")
    head = ("Smoke run: tiny shapes on the CPU, to show the script works; the numbers mean nothing."
            if smoke else f"One run of `python bench/gpu_checks.py` on {machine()}.")
    total = sum(v["seconds"] for v in r.values())
    return head + "\n\n" + "\n".join(rows) + f"\n\nWall time of all checks: {total:,.0f} s.\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, results to --results")
    ap.add_argument("--results", type=Path, help="the RESULTS.md to write (default bench/RESULTS.md; with --smoke a "
                                                 "scratch file)")
    ap.add_argument("--only", nargs="*", choices=("generation", "training", "consensus", "fsdp"),
                    help="run only these checks")
    args = ap.parse_args()
    s = SMOKE if args.smoke else GPU
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("No CUDA GPU is visible; run with --smoke for the CPU smoke test.")
    work = Path(tempfile.mkdtemp(prefix="gptlab-gpu-checks-"))
    if args.results is not None:
        common.RESULTS = args.results
    elif args.smoke:
        common.RESULTS = work / "RESULTS.md"
    if s.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    checks = {"generation": lambda: check_generation(s), "training": lambda: check_training(s, work),
              "consensus": lambda: check_consensus(s), "fsdp": lambda: check_fsdp_vs_ddp(s, work)}
    chosen = args.only or list(checks)
    results = {k: (_result(k, checks[k]) if k in chosen else {"ok": False, "error": "not run (--only)", "seconds": 0})
               for k in checks}  # a check left out shows as "not run" in its row
    try:
        body = report(s, args.smoke, results)
        print(body)
        common.write_section("GPU checks" + (" (smoke)" if args.smoke else ""), body)
        print(f"written to {common.RESULTS}")
    finally:
        shutil.rmtree(work / "ddp", ignore_errors=True)
        if args.results is not None or not args.smoke:
            shutil.rmtree(work, ignore_errors=True)
    if not all(results[k]["ok"] for k in chosen):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
