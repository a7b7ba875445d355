"""Writes a GPT Lab checkpoint as a folder other tools read. `--format hf`: a folder transformers
loads as GPT2LMHeadModel with a PreTrainedTokenizerFast (eos, bos and unk <|endoftext|>), so
lm-eval-harness, TransformerLens, nnsight and vLLM can use any model trained here. Before anything
is written, the converted model's float32 logits are checked against ours (within 1e-4).

Examples:
  python -m core export --model default --to exports/default-hf --format hf
  python -m core export --model runs/<run> --to exports/my-run          # the run's latest checkpoint
  python -m core export --model runs/<run>/checkpoints/2000 --to exports/my-run-2000 --dtype bfloat16

Then: AutoModelForCausalLM.from_pretrained("exports/default-hf"), AutoTokenizer.from_pretrained(...).

--to must be a new or empty folder (checked before the model loads; nothing is ever written over a
folder that holds anything), and it appears complete or not at all. The folder holds safetensors
and JSON only. Masked-diffusion checkpoints are refused (their attention is bidirectional; a
GPT2LMHeadModel is causal), and so are Hugging Face models, which transformers reads already.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli import latest_checkpoint
from ..errors import fmt_count
from ..files import check_output_dir
from ..models.config import DEFAULT_DTYPE, DTYPE_NAMES, EXPORT_FORMATS
from ..models.shipped import is_shipped

NAME = "export"
HELP = "Write a GPT Lab checkpoint as a Hugging Face GPT-2 folder (transformers, lm-eval, vLLM, ...)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", metavar="SPEC",
                        help="a GPT Lab model: default (the shipped model), a checkpoint folder, or a run folder "
                             "(its latest checkpoint) (default: %(default)s)")
    parser.add_argument("--to", required=True, metavar="DIR",
                        help="the folder to write: new or empty (required)")
    parser.add_argument("--format", default=EXPORT_FORMATS[0], choices=EXPORT_FORMATS,
                        help="hf: a transformers GPT2LMHeadModel folder (default: %(default)s)")
    parser.add_argument("--dtype", default=DEFAULT_DTYPE, choices=DTYPE_NAMES,
                        help="dtype of the saved weights (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from ..models.export import export_model  # torch and transformers: loaded only to run, not for --help

    check_output_dir(args.to, "--to")  # before any work: a bad --to costs nothing
    spec = (args.model or "default").strip()
    if not is_shipped(spec) and Path(spec).expanduser().is_dir():
        spec = str(latest_checkpoint(Path(spec).expanduser()))
        if Path(spec).resolve() != Path(args.model).expanduser().resolve():
            print(f"note: exporting {spec}, the latest checkpoint of {args.model}", file=sys.stderr)
    result = export_model(spec, args.to, format=args.format, dtype=args.dtype,
                          log=lambda msg: print(f"... {msg}", file=sys.stderr))
    print(f"wrote {result.folder} ({result.format}: GPT2LMHeadModel, {fmt_count(result.parameters)} parameters in "
          f"{result.dtype}; float32 logits within {result.logits_max_abs_diff:.1e} of ours)")
    print(f"  files: {', '.join(result.files)}")
    print(f"  load it: AutoModelForCausalLM.from_pretrained({str(result.folder)!r})")
    return 0

