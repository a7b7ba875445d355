"""Layer-steps per second of our consensus engine against the reference scripts' loops, same run.

Two faithful copies of the scripts' loops run on the same Hugging Face model, each computing
the same metrics: after every block, a Python loop over the prompts computes the GPT-Neo
script's diagnostic (``1 - mean |cos(h_0, h_j)|``) and the GPT-2 script's Eplot pair and
token-by-token matrix on ``ln_f`` of the state, each written into a preallocated tensor as the
scripts did; a print per iteration (to a null sink); the final norm after each pass.

- ``gpt2-script``: GPT-2-Consensus.py's structure: one forward per prompt (``for prompt in
  prompts: model(tokens)``), the only script with every metric on.
- ``neo-script``: GPTConsensus.py's structure: the blocks run on the whole batch at once, the
  metrics in the per-prompt loop.

Our engine records the same metrics plus the spread measures (effective rank, centroid
distance), all batched on the device, one host copy per event.

    python bench/consensus.py           # CPU: GPT-2 small config, 4 prompts x 32 tokens, N=5 (goal >= 1.1x)
    python bench/consensus.py --gpu     # GPU: GPT-2 XL config, bfloat16, 1 prompt x 64 tokens, N=200
                                        # (goal >= 5x, and the fraction of the weight-bandwidth bound)

A layer-step is one block applied to the whole batch; rates are layer-steps per second.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import IdTokenizer, interleaved, machine, write_section  # noqa: E402
from core.consensus.engine import ConsensusConfig, run_consensus  # noqa: E402
from core.models.loading import LoadedModel  # noqa: E402
from core.models.stack import stack_for  # noqa: E402

# Peak memory bandwidth in GB/s by device-name fragment (vendor data sheets); --bandwidth overrides.
BANDWIDTH_GBS = {"H200": 4800, "H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100": 3350,
                 "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935, "A100": 1555, "L40S": 864, "RTX 4090": 1008}


def _prompt_metrics(tr, hidden, y, diag, err, err2, col, u):
    """The scripts' per-prompt metric loop after one block (``y = ln_f(hidden)``)."""
    for b in range(hidden.shape[0]):
        hn = hidden[b]
        y1 = hn / hn.norm(dim=1, keepdim=True)
        diag[b, col] = 1 - torch.abs(y1[0] @ y1.T).mean()
        if y is None:
            continue
        ya = y[b]
        z1 = torch.div(ya, torch.norm(ya, dim=1).unsqueeze(1))
        aux = torch.abs((ya[0, :] / torch.norm(ya[0, :])) @ z1.T)
        aux2 = z1 @ z1.T
        err2[b, :, :, u] = aux2
        err[b, u, 0] = torch.mean(aux)
        err[b, u, 1] = torch.mean(aux2)


@torch.no_grad()
def neo_script_loop(model, ids: torch.Tensor, N: int, sink) -> np.ndarray:
    """GPTConsensus.py's loop (batched blocks) with every metric; returns its diag [B, 1+N*L]."""
    tr = model.transformer
    B, T = ids.shape
    L = len(tr.h)
    hidden = tr.wte(ids) + tr.wpe(torch.arange(T, device=ids.device).unsqueeze(0))
    diag = torch.zeros((B, N * L + 1), dtype=torch.float32, device=ids.device)
    err = torch.zeros((B, L * N, 2), device=ids.device)
    err2 = torch.zeros((B, T, T, L * N), device=ids.device)
    _prompt_metrics(tr, hidden, None, diag, err, err2, 0, 0)
    u = 0
    for i in range(N):
        print(f"consensus step {i + 1}/{N}", file=sink)
        for layer, block in enumerate(tr.h):
            out = block(hidden)
            hidden = out[0] if isinstance(out, (tuple, list)) else out
            _prompt_metrics(tr, hidden, tr.ln_f(hidden), diag, err, err2, 1 + i * L + layer, u)
            u += 1
        hidden = tr.ln_f(hidden)
    return diag.float().cpu().numpy()


def gpt2_script_loop(model, ids: torch.Tensor, N: int, sink) -> np.ndarray:
    """GPT-2-Consensus.py's structure: the same loop, one prompt at a time."""
    return np.concatenate([neo_script_loop(model, ids[b:b + 1], N, sink) for b in range(ids.shape[0])])


def block_weight_bytes(model) -> int:
    block = model.transformer.h[0]
    return sum(p.numel() * p.element_size() for p in block.parameters())


def card_bandwidth(override: float | None) -> float | None:
    if override:
        return override * 1e9
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    for frag, gbs in BANDWIDTH_GBS.items():
        if frag in name:
            return gbs * 1e9
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="the GPU configuration (GPT-2 XL, bfloat16, 64 tokens, N=200)")
    ap.add_argument("--prompts", type=int, help="prompts in the batch (CPU 4, GPU 1)")
    ap.add_argument("--tokens", type=int, help="tokens per prompt (CPU 32, GPU 64)")
    ap.add_argument("--size", type=int, help="iterations N (CPU 5, GPU 200)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", help="where the --gpu configuration runs (default: cuda)")
    ap.add_argument("--threads", type=int, help="CPU threads for both (default: torch's choice)")
    ap.add_argument("--bandwidth", type=float, metavar="GB/S", help="the card's memory bandwidth, if not in the table")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpu:
        device = args.device or "cuda"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit("--gpu needs a CUDA GPU; run without --gpu for the CPU configuration.")
        dtype, config = torch.bfloat16, GPT2Config(n_layer=48, n_head=25, n_embd=1600)
        B, T, N, goal = args.prompts or 1, args.tokens or 64, args.size or 200, 5.0
    else:
        device, dtype, config = "cpu", torch.float32, GPT2Config()
        B, T, N, goal = args.prompts or 4, args.tokens or 32, args.size or 5, 1.1
    torch.manual_seed(0)
    with torch.device(device):
        hf = GPT2LMHeadModel(config).eval().to(dtype)
    lm = LoadedModel(spec="bench", model=hf, tokenizer=IdTokenizer(), stack=stack_for(hf), device=device,
                     dtype=dtype, source="bench")
    ids = torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    prompts = ids.tolist()
    L = config.n_layer
    cfg = ConsensusConfig(iterations=N, matrix=True, memory_budget=64 * 1024 ** 3)
    sink = io.StringIO()

    # same numbers first: the engine and the copies of the scripts agree on the reference metric
    ours = run_consensus(lm, prompts, cfg).metric
    loops = {"gpt2-script": gpt2_script_loop, "neo-script": neo_script_loop}
    if B == 1:  # one prompt: the two scripts' loops are the same loop
        loops = {"scripts": neo_script_loop}
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    diffs = {}
    for name, loop in loops.items():
        diffs[name] = float(np.abs(ours - loop(hf, ids.to(device), N, sink)).max())
        if not diffs[name] < tol:
            raise SystemExit(f"engine and {name} loop disagree on the metric (max abs diff {diffs[name]:.2e}); "
                             f"not timing.")

    def run_ours() -> float:
        run_consensus(lm, prompts, cfg)
        return N * L

    def run_ours_blockwise() -> float:  # the GPU engine without CUDA graphs, for the record
        run_consensus(lm, prompts, replace(cfg, engine="block"))
        return N * L

    def timed(loop):
        def run() -> float:
            with contextlib.redirect_stdout(sink):
                loop(hf, ids.to(device), N, sink)
            sink.seek(0)
            sink.truncate()
            return N * L
        return run

    candidates = {"ours": run_ours, **({"ours, block engine": run_ours_blockwise} if args.gpu else {}),
                  **{name: timed(loop) for name, loop in loops.items()}}
    rates = interleaved(candidates, args.repeats)
    first = next(iter(loops))
    ratio = rates["ours"] / rates[first]
    threads = f", {torch.get_num_threads()} CPU thread(s)" if not args.gpu else ""
    lines = [f"{'GPU' if args.gpu else 'CPU'}: GPT-2 {'XL' if args.gpu else 'small'} config (random weights, HF "
             f"GPT2LMHeadModel), {str(dtype).replace('torch.', '')}, {B} prompt(s) x {T} tokens, N = {N} "
             f"({N * L} layer-steps){threads}, all metrics on (matrices included); median of {args.repeats} "
             f"interleaved runs.",
             "",
             "| engine | layer-steps/s | ours / it |",
             "|---|---|---|",
             f"| ours (core.consensus.engine, engine auto: {'graph' if args.gpu else 'block'}) | {rates['ours']:.2f} | |"]
    if args.gpu:
        lines.append(f"| ours, block engine (no CUDA graph) | {rates['ours, block engine']:.2f} | |")
    lines += [f"| {name} loop | {rates[name]:.2f} | {rates['ours'] / rates[name]:.2f}x |" for name in loops]
    lines += ["",
              f"Ratio against the {first} loop: **{ratio:.2f}x** (goal >= {goal}x: "
              f"{'met' if ratio >= goal else 'NOT met'}). Metric agreement (max abs diff): "
              + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()) + "."]
    if not args.gpu:
        lines += ["",
                  "On the CPU a layer-step is compute-bound: the block's matrix products are most of it in "
                  "every loop (they are the same Hugging Face modules), so against the neo-script loop, which "
                  "already runs the blocks on the whole batch, the engine mainly saves the per-prompt metric "
                  "loop, and that ratio is close to 1 and sensitive to machine noise; the gpt2-script loop also "
                  "pays for one small forward per prompt instead of one batched one. The GPU configuration "
                  "(`--gpu`) is where the per-block launches and host round trips the engine removes dominate."]
    if args.gpu:
        bw = card_bandwidth(args.bandwidth)
        wbytes = block_weight_bytes(hf)
        if bw:
            bound = bw / wbytes
            lines.append(f"Weight-bandwidth bound: one block's weights ({wbytes / 1e6:.1f} MB) per layer-step at "
                         f"{bw / 1e9:.0f} GB/s = {bound:.0f} layer-steps/s; ours reaches "
                         f"**{100 * rates['ours'] / bound:.1f}%** of it (aim >= 30%).")
        else:
            lines.append(f"Weight-bandwidth bound: unknown bandwidth for {machine()}; pass --bandwidth GB/S.")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("Consensus" + (" (GPU)" if args.gpu else ""), text)


if __name__ == "__main__":
    main()
