"""Loads a GPT-2 model with transformers, converts it to our GPT, and reports: parameter counts,
weight parity (max |diff| per tensor after the Conv1D transposes), the logit difference on a
prompt (pass below 1e-4 in float32) and both models' greedy generations side by side.
Exit code 0 when every check passes, 1 when one fails, 2 for a bad input.

Examples:
  python -m core validate --model gpt2
  python -m core validate --model gpt2 --weights data/gpt2_weights.pt --max_new_tokens 70 \\
      --prompt "The quick brown fox" --gen_prompt "Hello, my name is Larry and"
  python -m core validate --model path/to/hf-gpt2-folder

As in gpt2-reproduction, data/gpt2_weights.pt (in the working folder) is used when it exists and
neither --model nor --weights is given; a note says so, and --weights auto loads the hub weights.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli import (REFERENCE_WEIGHTS, GivenAction, add_device_arg, add_trust_remote_code_arg, int_arg, path_arg,
                  remote_code_allowed, use_reference_weights)
from ..errors import LabError
from ..files import atomic_write_json, check_output
from ..models.shipped import is_shipped, shipped_dir
from ..models.config import VALIDATE_GEN_PROMPT, VALIDATE_NEW_TOKENS, VALIDATE_PROMPT

NAME = "validate"
HELP = "Check our GPT against transformers' GPT-2: parameters, weights, logits, greedy generations."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="gpt2", metavar="SPEC", action=GivenAction, type=path_arg,
                        help="a GPT-2 hub id (gpt2 ... gpt2-xl) or a local Hugging Face GPT-2 folder; with "
                             "--weights, the architecture of the state dict (default: %(default)s)")
    parser.add_argument("--weights", metavar="FILE|auto", type=path_arg,
                        help=f"a bare GPT-2 state dict (.pt/.safetensors) to validate instead of the hub weights; "
                             f"'auto' loads the model --model names (default: {REFERENCE_WEIGHTS} when it exists "
                             f"and --model is not given, else auto)")
    parser.add_argument("--prompt", default=VALIDATE_PROMPT, help="text for the logit comparison (default: %(default)r)")
    parser.add_argument("--gen-prompt", "--gen_prompt", dest="gen_prompt", default=VALIDATE_GEN_PROMPT,
                        help="text both models continue greedily")
    parser.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int_arg(1), default=VALIDATE_NEW_TOKENS,
                        metavar="K", help="tokens to generate (default: %(default)s)")
    add_device_arg(parser, default="cpu", sharded=False)
    parser.add_argument("--tokenizer", "--tokenizer-path", dest="tokenizer", metavar="PATH", type=path_arg,
                        help="tokenizer to use instead of the model's own")
    parser.add_argument("--json", metavar="FILE", type=path_arg, help="also write the full report (every tensor) as JSON")
    add_trust_remote_code_arg(parser)


def _check_paths(args: argparse.Namespace) -> None:
    """Paths that do not exist, or an output that cannot be written, fail here, before the first
    progress line, so the error is the only line."""
    check_output(args.json, "--json")
    for flag, text in (("--prompt", args.prompt), ("--gen-prompt", args.gen_prompt)):
        if not str(text).strip():
            raise LabError(f"The {flag} text is empty; pass some text (or leave {flag} out for the default).")
    spec = (args.model or "").strip()
    if spec.startswith((".", "/", "~")) and not Path(spec).expanduser().exists():
        raise LabError(f"--model {spec} does not exist; check the path, or pass a GPT-2 hub id such as gpt2.")
    if is_shipped(spec) and args.weights is None:
        raise LabError(f"--model {spec} is a GPT Lab model ({shipped_dir(spec)}); validate compares transformers' "
                       f"GPT-2 with ours, so pass gpt2 ... gpt2-xl or a GPT-2 folder.")
    weights = args.weights
    if weights is not None and weights.strip().lower() != "auto" and not Path(weights).expanduser().is_file():
        raise LabError(f"--weights {weights} does not exist; check the path, or use --weights auto.")


def run(args: argparse.Namespace) -> int:
    from ..models.validate import format_report, validate_gpt2  # torch: loaded only to run, not for --help

    use_reference_weights(args)
    _check_paths(args)
    report = validate_gpt2(args.model, prompt=args.prompt, gen_prompt=args.gen_prompt,
                           max_new_tokens=args.max_new_tokens, weights=args.weights, device=args.device,
                           tokenizer=args.tokenizer, log=lambda msg: print(f"... {msg}", file=sys.stderr),
                           trust_remote_code=remote_code_allowed(args))
    print(format_report(report))
    if args.json:
        atomic_write_json(args.json, report.to_dict())
        print(f"wrote {args.json}", file=sys.stderr)
    return 0 if report.passed else 1
