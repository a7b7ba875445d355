"""Transcoders for a model's MLP layers: train them, collect what their features fire on, describe
the features in words (with held-out scores), and explain a completion layer by layer.

  train     one transcoder per MLP layer (reads blocks.{i}.ln2.hook_normalized, writes
            blocks.{i}.hook_mlp_out); writes DIR/config.json, DIR/layer_{i}.safetensors and
            DIR/metrics.json (per layer: fve, l0, dead_fraction, replacement losses), then by
            default runs collect and a built-in describe so DIR/features.sqlite is ready too
            (--no-collect / --no-describe to stop earlier); a features.sqlite already in DIR
            describes the weights being replaced and is removed before the first save
  collect   top-k contexts, quantile samples, held-out windows, histograms and promoted /
            suppressed tokens per feature into DIR/features.sqlite (a fresh store)
  describe  explanations per feature, scores on held-out windows, per-layer and total descriptions,
            by the built-in explainer (offline), a language model (--explainer google/flan-t5-base) or
            a model behind an OpenAI-compatible server (--explainer http://127.0.0.1:8000/v1
            --explainer-model NAME, key in GPTLAB_EXPLAINER_KEY or OPENAI_API_KEY)
  explain   generate from --prompt and print what each layer did and a total description, scored
  export    write a set as SAELens folders (--format saelens: per layer cfg.json,
            sae_weights.safetensors, sparsity.safetensors) or its feature store as the JSON
            Neuronpedia / SAEDashboard load (--format neuronpedia)
  import    read SAELens transcoder folders (a folder, or ORG/NAME[/PATH][@REV] from the Hugging
            Face cache) into a set folder; folds ln2's affine in where they read the stream before
            it (TransformerLens' fold_ln), then evaluates, collects and describes like train

Order: train -> collect -> describe -> explain (train does the first three by default); import
stands in for train.
A model's own set lives in <model folder>/transcoders/ (`default`: assets/default/transcoders/;
hub models: ~/.cache/gptlab/transcoders/<id>/); --transcoders DIR picks another.

The reference scripts' flags work. --train_folder + --checkpoint_name name the model (a run folder
and state_step020000.pt -> its checkpoint 20000), --cuda N is --device cuda:N, and the architecture
flags --num_layers/--num_heads/--model_dim/--max_seq_len must match the model's own config. The
scripts shared one parser, so every action takes the training flags --train_seq_len, --val_seq_len,
--train_steps, --grad_acc_steps, --save_model, --val_loss_every and --save_every: train uses them
(--val_seq_len aside), collect reads --train_seq_len as its window and --train_steps (times
--grad_acc_steps) as batches to scan, and a flag that means nothing to an action is named in one
note line on stderr and ignored.

Examples:
  python -m core transcoders train --model default --output-dir assets/default/transcoders
  python -m core transcoders train --train_folder runs/shakespeare --checkpoint_name state_step020000.pt \\
      --train_steps 2000 --train_seq_len 128 --cuda 0
  python -m core transcoders describe --model default --explainer google/flan-t5-base --max-features 200
  python -m core transcoders explain --model default --prompt "ROMEO:"
  python -m core transcoders describe --model default --explainer http://127.0.0.1:8000/v1 --explainer-model NAME
  python -m core transcoders export --model default --to out/saelens --format saelens
  python -m core transcoders import --model gpt2 --from ORG/gpt2-transcoders --to gpt2-transcoders
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import cli  # cli.load_from_args through the module, so a test's stand-in for it is seen here
from .cli import add_model_args, device_arg, float_arg, int_arg, model_given, path_arg, progress, trackers_arg
from .cli import resolve_reference_model  # noqa: F401 (moved to core.cli; still importable here)
from ..errors import LabError
from ..files import atomic_write_json, check_output, check_output_dir
from ..jobs.lock import acquire
from ..interp.config import (TRAIN_ACTIVATIONS, DESCRIBE_BATCH, DESCRIBE_N_TOP, EXPLAIN_MAX_NEW_TOKENS, EXPLAIN_TOP_FEATURES,
                             EXPLAIN_TOP_FEATURES_MAX, EXPORT_FORMATS, FOLD_LN, NEURONPEDIA_SET, SAVE_DTYPES,
                             CollectConfig, TranscoderTrainConfig,
)
from ..interp.config import MAX_KEPT, SCORE_METHODS, SIM_ANSWER_TOKENS, SIM_SCALE, SIM_WINDOWS, check_score_methods
from ..serve.config import EXPLAINER_KEY_ENVS

# Every flag's default comes from the engine's torch-free configs, so --help and the engine agree.
TRAIN = TranscoderTrainConfig()
COLLECT = CollectConfig()

NAME = "transcoders"
HELP = "Train transcoders on a model's MLPs, collect and describe their features, explain a completion."
ACTIONS = ("train", "collect", "describe", "explain", "export", "import")


def _bool(text: str) -> bool:
    table = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if text.lower() not in table:
        raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")
    return table[text.lower()]


def _layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer indices such as 0,2,3, got {text!r}") from None


# -- flags ----------------------------------------------------------------------------------------

def _common(p: argparse.ArgumentParser) -> None:
    add_model_args(p)  # --model ... and the reference --train_folder, --checkpoint_name, --cuda, sizes
    p.add_argument("--transcoders", metavar="DIR", type=path_arg,
                   help="the transcoder set folder (default: the model's own, <model folder>/transcoders/)")


# The training flags of the reference scripts' shared parser: (type, metavar) for each.
REFERENCE_TRAINING_FLAGS = {
    "train_seq_len": (int_arg(1), "T"), "val_seq_len": (int_arg(1), "T"), "train_steps": (int_arg(1), "N"),
    "grad_acc_steps": (int_arg(1), "N"), "save_model": (_bool, "True|False"), "val_loss_every": (int_arg(0), "N"),
    "save_every": (int_arg(0), "N"),
}


def _no_effect_flags(p: argparse.ArgumentParser, action: str, names: tuple[str, ...]) -> None:
    """Reference flags that mean nothing to ``action``: accepted (the scripts shared one parser, so
    their users pass them everywhere) and named in one note line by :func:`_note_no_effect`."""
    g = p.add_argument_group("reference-script flags with no effect here",
                             f"  accepted because the reference scripts shared one parser; a note on stderr\n"
                             f"  names the ones given, which `transcoders {action}` ignores.")
    for name in names:
        kind, metavar = REFERENCE_TRAINING_FLAGS[name]
        g.add_argument(f"--{name}", type=kind, metavar=metavar, help="no effect here")
    p.set_defaults(no_effect=names)


def _note_no_effect(args: argparse.Namespace) -> None:
    given = ["--" + n for n in getattr(args, "no_effect", ()) if getattr(args, n, None) is not None]
    if args.action == "collect" and args.grad_acc_steps is not None and args.collect_batches is None:
        given.append("--grad_acc_steps (it multiplies --train_steps, which was not given)")
    if given:
        verb = "has" if len(given) == 1 else "have"
        print(f"note: {', '.join(given)} {verb} no effect on `transcoders {args.action}`; ignored.", file=sys.stderr)


def _train_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("transcoders")
    g.add_argument("--output-dir", "--output_dir", dest="output_dir", metavar="DIR", type=path_arg,
                   help="where the set goes (default: --transcoders, else the model's own folder)")
    g.add_argument("--layers", type=_layers, metavar="I,J", help="layers to train (default: all)")
    g.add_argument("--expansion", type=int_arg(1), default=TRAIN.expansion, metavar="E",
                   help="features = E x d_model (default: %(default)s)")
    g.add_argument("--activation", choices=TRAIN_ACTIVATIONS, default=TRAIN.activation,
                   help="topk: exactly --k features per token; relu: sparsity from --l1-coeff (default: %(default)s)")
    g.add_argument("--k", type=int_arg(1), default=TRAIN.k, metavar="K",
                   help="active features per token with topk (default: %(default)s)")
    g.add_argument("--l1-coeff", "--l1_coeff", dest="l1_coeff", type=float_arg(0), default=TRAIN.l1_coeff, metavar="C",
                   help="L1 weight with relu (default: %(default)s)")
    g.add_argument("--train-tokens", "--train_tokens", dest="train_tokens", type=int_arg(1), default=TRAIN.train_tokens,
                   metavar="N", help="tokens per layer (default: %(default)s)")
    g.add_argument("--steps", "--train_steps", dest="steps", type=int_arg(1), default=TRAIN.steps, metavar="N",
                   help="optimiser steps (overrides --train-tokens)")
    g.add_argument("--batch-tokens", "--batch_tokens", dest="batch_tokens", type=int_arg(1), default=TRAIN.batch_tokens,
                   metavar="N", help="tokens per step (default: %(default)s)")
    g.add_argument("--grad_acc_steps", type=int_arg(1), default=1, metavar="N",
                   help="reference spelling: multiplies --batch-tokens (default: %(default)s)")
    g.add_argument("--lr", type=float_arg(0, low_open=True), default=TRAIN.lr,
                   help="Adam learning rate (default: %(default)s)")
    g.add_argument("--seq-len", "--train_seq_len", dest="seq_len", type=int_arg(1), default=TRAIN.seq_len, metavar="T",
                   help="tokens per corpus window the model reads (default: %(default)s)")
    g.add_argument("--dataset", default=TRAIN.dataset, metavar="NAME|PATH", type=path_arg,
                   help="the corpus: shakespeare, a local .txt/.jsonl file or folder, or a hub dataset "
                        "(default: %(default)s)")
    g.add_argument("--eval-every", "--val_loss_every", dest="eval_every", type=int_arg(0), default=TRAIN.eval_every,
                   metavar="N", help="print a quick validation FVE every N steps (default: only at the end)")
    g.add_argument("--save-every", "--save_every", dest="save_every", type=int_arg(0), default=TRAIN.save_every,
                   metavar="N", help="save the set every N steps (default: at the end, and when stopped)")
    g.add_argument("--save_model", type=_bool, default=True, metavar="True|False",
                   help="reference spelling; False trains and reports without writing the set")
    g.add_argument("--save-dtype", dest="save_dtype", choices=SAVE_DTYPES, default=TRAIN.save_dtype,
                   help="weights on disk; float16 halves the size (default: %(default)s)")
    g.add_argument("--seed", type=int_arg(), default=TRAIN.seed)
    g.add_argument("--no-collect", dest="collect", action="store_false",
                   help="stop after training (the folder is then left without a feature store: the one of the "
                        "weights replaced is removed)")
    g.add_argument("--no-describe", dest="describe", action="store_false", help="stop after collecting")
    g.add_argument("--log-to", dest="log_to", type=trackers_arg, default=[], metavar="NAMES",
                   help="also log the training curves and settings to tensorboard, wandb and/or mlflow "
                        "(comma-separated; files under DIR/tracking/<time>/)")


def _collect_flags(p: argparse.ArgumentParser, prefix: bool = False) -> None:
    g = p.add_argument_group("collection")
    g.add_argument("--collect-tokens", "--n-tokens", dest="n_tokens", type=int_arg(1), default=COLLECT.n_tokens,
                   metavar="N", help="corpus tokens scanned (default: %(default)s)")
    g.add_argument("--collect-seq-len", dest="collect_seq_len", type=int_arg(1), default=COLLECT.seq_len, metavar="T",
                   help="window the model reads while collecting (default: %(default)s)")
    g.add_argument("--top-k", "--top_k", dest="top_k", type=int_arg(1), default=COLLECT.top_k, metavar="K",
                   help="strongest contexts kept per feature (default: %(default)s)")
    g.add_argument("--n-quantile", dest="n_quantile", type=int_arg(0), default=COLLECT.n_quantile, metavar="N",
                   help="contexts sampled across the activation range (default: %(default)s)")
    g.add_argument("--n-heldout", dest="n_heldout", type=int_arg(0), default=COLLECT.n_heldout, metavar="N",
                   help="held-out activating windows for scoring (default: %(default)s)")
    g.add_argument("--n-negative", dest="n_negative", type=int_arg(0), default=COLLECT.n_negative, metavar="N",
                   help="held-out silent windows for scoring (default: %(default)s)")
    g.add_argument("--n-hard", dest="n_hard", type=int_arg(0), default=COLLECT.n_hard, metavar="N",
                   help="held-out hard negatives for scoring: windows holding one of the feature's top tokens where "
                        "it is silent (default: %(default)s)")
    g.add_argument("--window", type=int_arg(0), nargs=2, default=(COLLECT.window_before, COLLECT.window_after),
                   metavar=("BEFORE", "AFTER"), help=f"context tokens kept around an activation (default: "
                                                     f"{COLLECT.window_before} {COLLECT.window_after})")
    g.add_argument("--collect-batch", dest="collect_batch", type=int_arg(1), default=COLLECT.batch_size, metavar="B",
                   help="windows per forward pass (default: %(default)s)")
    if prefix:
        g.add_argument("--store", metavar="FILE", type=path_arg, help="the store to write (default: DIR/features.sqlite)")
        g.add_argument("--dataset", default=COLLECT.dataset, metavar="NAME|PATH", type=path_arg,
                       help="the corpus (default: %(default)s)")
        g.add_argument("--train_steps", dest="collect_batches", type=int_arg(1), metavar="N",
                       help="reference spelling: scan N steps of --grad_acc_steps batches (N x G x --collect-batch x "
                            "--collect-seq-len tokens)")
        g.add_argument("--train_seq_len", dest="collect_seq_len", type=int_arg(1), metavar="T", help="= --collect-seq-len")
        g.add_argument("--grad_acc_steps", type=int_arg(1), metavar="G",
                       help="reference spelling: batches per --train_steps step (default 1), as a step of "
                            "`transcoders train --grad_acc_steps G` reads G times the tokens")
        g.add_argument("--seed", type=int_arg(), default=COLLECT.seed)


def _describe_flags(p: argparse.ArgumentParser, in_train: bool = False) -> None:
    g = p.add_argument_group("explanations")
    if not in_train:
        _explainer_flags(g)
        g.add_argument("--layers", type=_layers, metavar="I,J", help="layers to describe (default: all)")
        g.add_argument("--store", metavar="FILE", type=path_arg, help="the store (default: DIR/features.sqlite)")
        batches = ", ".join(f"{n} {kind}" for kind, n in DESCRIBE_BATCH.items())
        g.add_argument("--batch-size", dest="explain_batch", type=int_arg(1), metavar="B",
                       help=f"features per explainer call and per commit (default: {batches})")
    g.add_argument("--max-features", dest="max_features", type=int_arg(1), metavar="N",
                   help="explain at most N features per layer, most frequent first (default: all)")
    g.add_argument("--n-top", dest="n_top", type=int_arg(1), default=DESCRIBE_N_TOP, metavar="N",
                   help="top contexts shown to the explainer (default: %(default)s)")
    g.add_argument("--no-score", dest="score", action="store_false", help="skip the held-out scores")
    _score_flags(g)


def _scores_arg(text: str) -> tuple[str, ...]:
    try:
        return check_score_methods(text)
    except LabError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _score_flags(g: argparse._ArgumentGroup) -> None:
    """--scores and --n-sim: which held-out scores, and how many windows simulation reads."""
    g.add_argument("--scores", type=_scores_arg, default=SCORE_METHODS, metavar=",".join(SCORE_METHODS),
                   help="the held-out scores to compute, comma-separated (default: all)")
    per, extra = SIM_ANSWER_TOKENS
    g.add_argument("--n-sim", dest="n_sim", type=int_arg(1, MAX_KEPT), metavar="N",
                   help=f"simulation windows per side: the first N firing and N silent held-out windows (default: "
                        f"{SIM_WINDOWS['lm']} for a language model, every one for builtin). A language model answers "
                        f"one call per window, each token's activation 0-{SIM_SCALE}, in at most {per} tokens per "
                        f"window token + {extra}: 2N calls per feature")


def _explainer_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--explainer", default="builtin", metavar="SPEC|URL", type=path_arg,
                   help="builtin (offline; default); a seq2seq/causal LM: hub id (google/flan-t5-base) or folder, whose "
                        "own Python code runs only with --trust-remote-code; or an OpenAI-compatible server, "
                        "http://HOST:PORT/v1 (vLLM, llama.cpp, Ollama, python -m core serve, a hosted API; a URL "
                        f"ending in /completions uses plain completions), its key read from {EXPLAINER_KEY_ENVS[0]} "
                        f"or {EXPLAINER_KEY_ENVS[1]}")
    g.add_argument("--explainer-model", dest="explainer_model", metavar="NAME",
                   help="the model to ask at --explainer URL (default: the one model the server lists)")
    g.add_argument("--explainer-device", dest="explainer_device", type=device_arg, default="cpu", metavar="DEVICE",
                   help="(default: %(default)s)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="<action>", title="actions")
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("train", help="train one transcoder per MLP layer (then collect and describe)",
                       description="Train transcoders; writes DIR/config.json, layer_{i}.safetensors, metrics.json, "
                                   "and (unless --no-collect) features.sqlite; a features.sqlite of the weights it replaces is "
                                   "removed.", formatter_class=fmt)
    _common(p)
    _train_flags(p)
    _collect_flags(p)
    _describe_flags(p, in_train=True)
    _no_effect_flags(p, "train", ("val_seq_len",))
    p = sub.add_parser("collect", help="collect contexts, histograms and logit effects into a fresh feature store")
    _common(p)
    _collect_flags(p, prefix=True)
    g = p.add_argument_group("layers")
    g.add_argument("--layers", type=_layers, metavar="I,J", help="layers to collect (default: all in the set)")
    _no_effect_flags(p, "collect", ("val_seq_len", "save_model", "val_loss_every", "save_every"))
    p = sub.add_parser("describe", help="explain and score features; describe each layer and the whole set")
    _common(p)
    _describe_flags(p)
    _no_effect_flags(p, "describe", tuple(REFERENCE_TRAINING_FLAGS))
    p = sub.add_parser("explain", help="generate from a prompt and explain each layer's part in it")
    _common(p)
    g = p.add_argument_group("prompt and generation")
    g.add_argument("--prompt", action="append", metavar="TEXT",
                   help="a prompt (repeatable; default: read from stdin, one per line)")
    g.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int_arg(1),
                   default=EXPLAIN_MAX_NEW_TOKENS, metavar="K", help="(default: %(default)s)")
    g.add_argument("--temperature", type=float_arg(0, low_open=True), metavar="T",
                   help="sample at temperature T (default: greedy)")
    g.add_argument("--top-p", "--top_p", dest="top_p", type=float_arg(0, 1, low_open=True, note="; 1 turns it off"),
                   default=1.0, metavar="P")
    g.add_argument("--seed", type=int_arg(), default=0)
    g.add_argument("--steps", type=int_arg(1), metavar="N", help="denoising steps of a diffusion model (default: one per token)")
    g = p.add_argument_group("explanation")
    _explainer_flags(g)
    g.add_argument("--store", metavar="FILE", type=path_arg, help="the feature store (default: DIR/features.sqlite)")
    g.add_argument("--top-features", dest="top_features", type=int_arg(1, EXPLAIN_TOP_FEATURES_MAX),
                   default=EXPLAIN_TOP_FEATURES, metavar="N", help="features listed per layer (default: %(default)s)")
    g.add_argument("--json", metavar="FILE", type=path_arg, help="also write the full result as JSON")
    g.add_argument("--format", choices=("text", "reference"), default="text",
                   help="reference: the lines generate_descriptions.py printed (continuation=, per layer "
                        "description=, total description=, models output score=, ...)")
    g.add_argument("--save", action="store_true", help="also keep the result in the feature store's history")
    _no_effect_flags(p, "explain", tuple(REFERENCE_TRAINING_FLAGS))
    _export_parser(sub, fmt)
    _import_parser(sub, fmt)


def _export_parser(sub, fmt) -> None:
    p = sub.add_parser("export", help="write a set as SAELens folders, or its feature store as Neuronpedia JSON",
                       formatter_class=fmt, description=(
                           "saelens: per layer DIR/blocks.{i}.ln2.hook_normalized/ with cfg.json, "
                           "sae_weights.safetensors and sparsity.safetensors (log10 feature densities from the "
                           "feature store), loadable with sae_lens.SAE.load_from_disk.\n"
                           "neuronpedia: per layer DIR/{i}-SET/ with SAEDashboard's batch-N.json, explanations.json "
                           "(with scores) and run_settings.json, read from the feature store alone."))
    _common(p)
    g = p.add_argument_group("export")
    g.add_argument("--to", "--output-dir", dest="to", required=True, metavar="DIR",
                   help="the folder to write: new or empty (nothing is written over an existing one)")
    g.add_argument("--format", dest="export_format", choices=EXPORT_FORMATS, default=EXPORT_FORMATS[0],
                   help="(default: %(default)s)")
    g.add_argument("--layers", type=_layers, metavar="I,J", help="layers to export (default: all)")
    g.add_argument("--store", metavar="FILE", help="the feature store (default: DIR/features.sqlite of the set)")
    g.add_argument("--save-dtype", dest="save_dtype", choices=SAVE_DTYPES, default="float32",
                   help="saelens: the weights' dtype on disk (default: %(default)s)")
    g.add_argument("--model-id", dest="model_id", metavar="NAME",
                   help="neuronpedia: the model's id there (default: the store's model spec)")
    g.add_argument("--sae-set", dest="sae_set", default=NEURONPEDIA_SET, metavar="NAME",
                   help="neuronpedia: the source set; layer i's source is i-NAME (default: %(default)s)")


def _import_parser(sub, fmt) -> None:
    p = sub.add_parser("import", help="read SAELens transcoder folders into a set (then evaluate, collect, describe)",
                       formatter_class=fmt, description=(
                           "--from: one SAE folder (cfg.json + sae_weights.safetensors), a folder of them (one per "
                           "layer), or ORG/NAME[/PATH][@REVISION] from the local Hugging Face cache. Each must read "
                           "blocks.{i}.ln2.hook_normalized and write blocks.{i}.hook_mlp_out (kinds: transcoder, "
                           "jumprelu_transcoder, topk). --model defaults to the folders' model_name."))
    add_model_args(p)
    g = p.add_argument_group("import")
    g.add_argument("--from", dest="from_", required=True, metavar="DIR|ORG/NAME",
                   help="the SAELens folder(s), or a Hugging Face repo id (ORG/NAME[/PATH][@REVISION])")
    g.add_argument("--to", "--output-dir", dest="to", metavar="DIR",
                   help="the set folder to write, new or empty (default: the model's own, <model folder>/transcoders/)")
    g.add_argument("--layers", type=_layers, metavar="I,J", help="layers to import (default: all found)")
    g.add_argument("--fold-ln", dest="fold_ln", choices=FOLD_LN, default=FOLD_LN[0],
                   help="fold ln2's weight and bias into the encoder: auto reads the folders' "
                        "model_from_pretrained_kwargs (TransformerLens folds by default) (default: %(default)s)")
    g.add_argument("--dataset", default=TRAIN.dataset, metavar="NAME|PATH",
                   help="the corpus to evaluate and collect on (default: %(default)s)")
    g.add_argument("--seq-len", dest="seq_len", type=int_arg(1), default=TRAIN.seq_len, metavar="T",
                   help="window the quality is measured on (default: %(default)s)")
    g.add_argument("--val-windows", dest="val_windows", type=int_arg(1), default=TRAIN.val_windows, metavar="N",
                   help="held-out windows the quality is measured on (default: %(default)s)")
    g.add_argument("--seed", type=int_arg(), default=TRAIN.seed)
    g.add_argument("--no-eval", dest="evaluate", action="store_false",
                   help="skip the quality numbers (FVE, L0, losses)")
    g.add_argument("--no-collect", dest="collect", action="store_false", help="stop before collecting")
    g.add_argument("--no-describe", dest="describe", action="store_false", help="stop after collecting")
    _collect_flags(p)
    _describe_flags(p, in_train=True)


# -- shared steps ---------------------------------------------------------------------------------
# Engine imports stay inside the functions below: they pull in torch (and numpy, sqlite, transformers),
# which `python -m core transcoders --help` must not pay for.

def _load(args: argparse.Namespace):
    lm = cli.load_from_args(args)  # resolves --train_folder/--checkpoint_name/--cuda, checks the sizes
    if lm.untrained:
        print(f"note: {lm.name} has random weights; its features describe noise.", file=sys.stderr)
    return lm


def _set_dir(args: argparse.Namespace, lm) -> Path:
    from ..interp.transcoder import transcoder_dir_for

    return Path(args.transcoders).expanduser() if args.transcoders else transcoder_dir_for(lm)


def _collect_config(args: argparse.Namespace, layers=None) -> CollectConfig:
    n_tokens = args.n_tokens
    if getattr(args, "collect_batches", None):  # the reference --train_steps (x --grad_acc_steps) batches
        batches = args.collect_batches * (getattr(args, "grad_acc_steps", None) or 1)
        n_tokens = batches * args.collect_batch * args.collect_seq_len
    cfg = CollectConfig(layers=layers, n_tokens=n_tokens, seq_len=args.collect_seq_len, batch_size=args.collect_batch,
                        top_k=args.top_k, n_quantile=args.n_quantile, n_heldout=args.n_heldout,
                        n_negative=args.n_negative, n_hard=args.n_hard, window_before=args.window[0],
                        window_after=args.window[1],
                        dataset=args.dataset, seed=args.seed)
    cfg.check()
    return cfg


def _run_collect(lm, tset, cfg: CollectConfig, out: Path) -> None:
    from ..interp.collect import CollectFinished, CollectProgress, CollectStarted, collect_features

    events = collect_features(lm, tset, cfg, out=out)
    first = next(events)
    assert isinstance(first, CollectStarted)
    for ev in progress(events, first.total, "collect",
                       position=lambda e: e.done if isinstance(e, CollectProgress) else None,
                       status=lambda e: e.phase if isinstance(e, CollectProgress) else None):
        if isinstance(ev, CollectFinished):
            alive = ", ".join(f"layer {i}: {n}" for i, n in ev.alive.items())
            print(f"collected {first.n_windows} windows in {ev.seconds:.1f}s; live features {alive}; wrote {ev.path}",
                  file=sys.stderr)


def _run_describe(store, explainer, layers, args: argparse.Namespace) -> None:
    from ..interp.explain import DescribeFinished, DescribeStarted, FeatureExplained, LayerDescribed, describe_store

    events = describe_store(store, explainer, layers=layers, max_features=args.max_features, n_top=args.n_top,
                            score=args.score, batch_size=getattr(args, "explain_batch", None),
                            methods=getattr(args, "scores", None), n_sim=getattr(args, "n_sim", None))
    first = next(events)
    assert isinstance(first, DescribeStarted)
    for ev in progress(events, first.total, f"describe ({explainer.name})",
                       position=lambda e: e.done if isinstance(e, FeatureExplained) else None):
        if isinstance(ev, LayerDescribed):
            score = f" (mean detection AUC {ev.mean_score:.2f})" if ev.mean_score is not None else ""
            print(f"layer {ev.layer}: {ev.text}{score}")
        elif isinstance(ev, DescribeFinished):
            print(f"total: {ev.total_description}")
            print(f"[{first.total} features described by {ev.explainer} in {ev.seconds:.1f}s]", file=sys.stderr)


def _explainer(args: argparse.Namespace, device: str):
    """The explainer --explainer names; an LM's own code runs only with --trust-remote-code."""
    from ..interp.explain import load_explainer

    model = getattr(args, "explainer_model", None)
    extra = {"model": model} if model is not None else {}  # only a server URL takes a model name
    return load_explainer(args.explainer, device=device, trust_remote_code=bool(args.trust_remote_code), **extra)


# -- actions --------------------------------------------------------------------------------------

def _train(args: argparse.Namespace) -> int:
    from ..interp.transcoder import check_set_output
    from ..training.config import check_trackers

    check_trackers(args.log_to)  # a tracker's missing package is said before the model loads

    flag = "--output-dir" if args.output_dir else "--transcoders"
    named = args.output_dir or args.transcoders
    if named and args.save_model:  # a folder the set cannot go to costs nothing: checked before the model loads
        check_set_output(named, flag)
    lm = _load(args)
    out = Path(args.output_dir).expanduser() if args.output_dir else _set_dir(args, lm)
    if args.save_model:
        check_set_output(out, flag if named else "The model's own transcoder folder")
    cfg = TranscoderTrainConfig(
        layers=args.layers, expansion=args.expansion, activation=args.activation, k=args.k, l1_coeff=args.l1_coeff,
        train_tokens=args.train_tokens, steps=args.steps, batch_tokens=args.batch_tokens * args.grad_acc_steps,
        lr=args.lr, seq_len=args.seq_len, dataset=args.dataset, eval_every=args.eval_every,
        save_every=args.save_every, save_dtype=args.save_dtype, seed=args.seed)
    cfg.check()
    save_dir = out if args.save_model else None
    # one writer per set: a job started from the app already holds this (re-entrant); a second
    # `transcoders train` into the same folder is refused here rather than interleaving its files
    lock = acquire(out, "Transcoder set", "wait for the job writing it to finish or stop it first.") \
        if save_dir is not None else None
    try:
        return _train_into(args, lm, cfg, out, save_dir)
    finally:
        if lock is not None:
            lock.release()


def _train_into(args: argparse.Namespace, lm, cfg: TranscoderTrainConfig, out: Path, save_dir: Path | None) -> int:
    from ..interp.explain import BuiltinExplainer
    from ..interp.store import FeatureStore, store_path
    from ..interp.train import Evaluated, Saved, TrainFinished, TrainProgress, TrainStarted, Validated, \
        quality_record, tracker_record, train_transcoders

    events = train_transcoders(lm, cfg, out_dir=save_dir)
    tset = None
    first = next(events)
    assert isinstance(first, TrainStarted)
    print(f"training {len(first.layers)} transcoders of {first.n_features} features on {lm.name} "
          f"({first.total_steps} steps of {first.batch_tokens} tokens from {first.corpus})", file=sys.stderr)

    def status(e):
        if isinstance(e, TrainProgress):
            return "nmse " + " ".join(f"{v:.3f}" for v in e.mse.values()) + f"  {e.tokens_per_s:,.0f} tok/s"
        return None

    trackers = _open_trackers(args, lm, cfg, out)
    step, state = 0, "failed"
    try:
        for ev in progress(events, first.total_steps, "train",
                           position=lambda e: e.step if isinstance(e, TrainProgress) else None, status=status):
            record = tracker_record(ev)
            if record is not None:
                step = record["step"]
                trackers.metrics(record)
            if isinstance(ev, Validated):
                print(f"\nstep {ev.step}: fve " + ", ".join(f"{i}: {v:.3f}" for i, v in ev.fve.items()),
                      file=sys.stderr)
            elif isinstance(ev, Evaluated):
                trackers.metrics(quality_record(step, ev.quality))
                _print_quality(ev.quality)
            elif isinstance(ev, Saved):
                if ev.dropped_store is not None:
                    rebuilt = "collected anew after training" if args.collect else \
                        "`transcoders collect` builds the new weights' store"
                    print(f"removed {ev.dropped_store}: it described the previous weights; {rebuilt}",
                          file=sys.stderr)
                print(f"saved {ev.folder} (step {ev.step})", file=sys.stderr)
            elif isinstance(ev, TrainFinished):
                tset, state = ev.transcoders, "finished"
                print(f"[trained in {ev.seconds:.1f}s]", file=sys.stderr)
    except KeyboardInterrupt:
        state = "stopped"
        raise
    finally:
        trackers.close(state)
    assert tset is not None
    if save_dir is None or not args.collect:
        return 0
    _run_collect(lm, tset, _collect_config(args), store_path(out))
    if args.describe:
        with FeatureStore(store_path(out)) as store:
            _run_describe(store, BuiltinExplainer(), None, args)
    return 0


def _open_trackers(args: argparse.Namespace, lm, cfg: TranscoderTrainConfig, out: Path):
    """``--log-to``: the trackers this training logs to, their files under
    ``<set>/tracking/<start time>/`` (each training of a set is its own tracker run)."""
    from datetime import datetime

    from ..training.trackers import TRACKING_DIR, Trackers, open_trackers

    if not args.log_to:
        return Trackers()
    started = f"{datetime.now():%Y%m%d-%H%M%S}"
    return open_trackers(args.log_to, out / TRACKING_DIR / started, run_name=f"{out.name}-{started}",
                         config={"model": lm.spec, **cfg.to_dict()},
                         log=lambda line: print(line, file=sys.stderr))


def _print_quality(quality) -> None:
    print(f"{'layer':>5} {'FVE':>7} {'L0':>7} {'dead':>6} {'loss':>8} {'spliced':>8} {'ablated':>8} {'recovered':>9}")
    for i, q in sorted(quality.items()):
        print(f"{i:>5} {q.fve:>7.3f} {q.l0:>7.1f} {q.dead_fraction:>6.1%} {q.loss_clean:>8.4f} {q.loss_replaced:>8.4f} "
              f"{q.loss_ablated:>8.4f} {q.loss_recovered:>9.1%}")


def _collect(args: argparse.Namespace) -> int:
    from ..interp.store import check_store_output, store_path
    from ..interp.transcoder import find_transcoder_set

    check_store_output(args.store, "--store")  # before the model loads: a place it cannot go costs nothing
    lm = _load(args)
    tset = find_transcoder_set(lm, args.transcoders)
    out = Path(args.store).expanduser() if args.store else store_path(tset.folder)
    check_store_output(out, "--store")
    _run_collect(lm, tset, _collect_config(args, args.layers), out)
    return 0


def _open_store(args: argparse.Namespace, lm, readonly: bool):
    from ..files import check_folder_links
    from ..interp.store import FeatureStore, store_path
    from ..interp.transcoder import SET_WHAT

    if args.store:
        path = Path(args.store).expanduser()
    else:
        folder = _set_dir(args, lm)
        if folder.is_dir():  # a set folder is used only whole: none of its files may lead out of it
            check_folder_links(folder, SET_WHAT)
        path = store_path(folder)
    if not path.is_file():
        raise LabError(f"No feature store at {path}; run `python -m core transcoders collect --model {lm.spec}` first.")
    return FeatureStore(path, readonly=readonly)


def _describe(args: argparse.Namespace) -> int:
    from ..devices import resolve_device

    explainer_device = resolve_device(args.explainer_device)  # a missing GPU fails before the model loads
    lm = _load(args)
    explainer = _explainer(args, explainer_device)
    with _open_store(args, lm, readonly=False) as store:
        _run_describe(store, explainer, args.layers, args)
    return 0


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = args.prompt
    if not prompts:
        if sys.stdin is None or sys.stdin.isatty():
            raise LabError("No prompt: pass --prompt TEXT (repeatable) or pipe prompts on stdin, one per line.")
        text = cli.read_stdin("prompts, one per line,")  # bytes that are not UTF-8 are a sentence, not a traceback
        prompts = [line for line in (text or "").split("\n") if line.strip()]
    if not prompts or any(not p.strip() for p in prompts):
        raise LabError("A prompt is empty; pass --prompt TEXT with some text.")
    return prompts


def _explain(args: argparse.Namespace) -> int:
    from ..devices import resolve_device
    from ..interp.completion import CompletionExplained, completion_settings, explain_completion
    from ..interp.transcoder import find_transcoder_set

    check_output(args.json, "--json")  # before the work: an hour of explaining never ends in "cannot write there"
    prompts = _read_prompts(args)
    explainer_device = resolve_device(args.explainer_device)
    lm = _load(args)
    tset = find_transcoder_set(lm, args.transcoders)
    explainer = _explainer(args, explainer_device)
    store = None
    try:
        store = _open_store(args, lm, readonly=not args.save)
    except LabError as e:
        print(f"note: {e} Features are shown without explanations.", file=sys.stderr)
    results = []
    try:
        for prompt in prompts:
            settings = completion_settings(lm, args.max_new_tokens, temperature=args.temperature,
                                           top_p=args.top_p, seed=args.seed, steps=args.steps)
            t0 = time.perf_counter()
            for ev in explain_completion(lm, tset, prompt, store=store, explainer=explainer, settings=settings,
                                         top_features=args.top_features):
                if isinstance(ev, CompletionExplained):
                    (_print_reference if args.format == "reference" else _print_explanation)(ev.result)
                    results.append(ev.result)
                    if args.save and store is not None:
                        store.add_completion(prompt, ev.result.completion, explainer.name, ev.result.to_json())
            print(f"[explained in {time.perf_counter() - t0:.2f}s]", file=sys.stderr)
    finally:
        if store is not None:
            store.close()
    if args.json:
        atomic_write_json(args.json, [r.to_json() for r in results])
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _print_explanation(r) -> None:
    print(f"prompt: {r.prompt!r}")
    print(f"completion: {r.completion!r}")
    for layer in r.layers:
        print(f"layer {layer.layer} ({layer.share:.0%} of attribution): {layer.description}")
        for fa in layer.features:
            where = ", ".join(f"{tok!r}" for _, tok, _, _ in fa.positions[:3])
            sc = f"; held-out detection AUC {fa.score:.2f}" if fa.score is not None else ""
            text = fa.explanation or "(no explanation)"
            print(f"    #{fa.feature:<6} {fa.attribution:+.3f}  at {where or '-'}: {text}{sc}")
    print(f"total description: {r.total_description}")
    print(f"quality: {r.quality.text()}    interpretability: {r.interpretability.text()}")
    if r.steps:
        print("step by step (each denoising step: the tokens it revealed, and the features that drove them):")
        for step in r.steps:
            revealed = " ".join(f"{tok!r}" for _, tok in step.revealed)
            print(f"  step {step.step}: revealed {revealed}")
            for sf in step.features:
                print(f"      layer {sf.layer} #{sf.feature:<6} {sf.attribution:+.3f}: {sf.explanation or '(no explanation)'}")
    print()


def _print_reference(r) -> None:
    """The layout of the reference generate_descriptions.py, one completion per block."""
    print(f"input: {r.prompt}")
    print("iteration: 1")
    print(f"        continuation={r.prompt}{r.completion}")
    print(f"        per layer description={r.layer_descriptions}")
    print(f"        total description={r.total_description}")
    print(f"        models output score={r.output_score}")
    print(f"        models mechanistic interpretability score={r.interpretability_score}")


def _export(args: argparse.Namespace) -> int:
    from ..interp.store import FeatureStore, store_path

    to = check_output_dir(args.to, "--to")  # before any work: new or empty, writable
    if args.export_format == "neuronpedia":
        from ..interp.neuronpedia import export_neuronpedia

        path = Path(args.store).expanduser() if args.store else store_path(
            Path(args.transcoders).expanduser() if args.transcoders else _set_dir(args, _load(args)))
        if not path.is_file():
            raise LabError(f"No feature store at {path}; run `python -m core transcoders collect` first, or pass "
                           f"--store FILE.")
        with FeatureStore(path, readonly=True) as store:
            folders = export_neuronpedia(store, to, model_id=args.model_id, sae_set=args.sae_set, layers=args.layers)
        print(f"wrote {len(folders)} Neuronpedia source(s) to {to}: {', '.join(f.name for f in folders)}",
              file=sys.stderr)
        return 0
    from ..interp.saelens import export_saelens
    from ..interp.transcoder import load_transcoder_set

    folder = Path(args.transcoders).expanduser() if args.transcoders else _set_dir(args, _load(args))
    tset = load_transcoder_set(folder)
    path = Path(args.store).expanduser() if args.store else store_path(folder)
    store = FeatureStore(path, readonly=True) if path.is_file() else None
    if store is None:
        print(f"note: no feature store at {path}, so no sparsity.safetensors (feature densities) is written; run "
              f"`transcoders collect` first to have them.", file=sys.stderr)
    try:
        folders = export_saelens(tset, to, store=store, layers=args.layers, dtype=args.save_dtype)
    finally:
        if store is not None:
            store.close()
    print(f"wrote {len(folders)} SAELens folder(s) to {to} (load one with "
          f"sae_lens.SAE.load_from_disk(\"{folders[0]}\"))", file=sys.stderr)
    return 0


def _import(args: argparse.Namespace) -> int:
    from ..files import atomic_folder
    from ..interp.saelens import import_saelens, source_model_name
    from ..interp.transcoder import transcoder_dir_for

    if args.to:
        check_output_dir(args.to, "--to")  # before the model loads
    if not (model_given(args) or args.checkpoint or args.weights or args.train_folder):
        named = source_model_name(args.from_)
        if named:
            args.model = named
    lm = _load(args)
    out = check_output_dir(args.to or transcoder_dir_for(lm), "--to")
    tset = import_saelens(args.from_, lm, layers=args.layers, fold_ln=args.fold_ln)
    dtype = tset.origin.get("dtype", "float32")
    with atomic_folder(out) as tmp:  # the set appears whole or not at all
        tset.save(tmp, dtype)
    tset.folder = out
    lock = acquire(out, "Transcoder set", "wait for the job writing it to finish or stop it first.")
    try:
        return _import_into(args, lm, tset, out, dtype)
    finally:
        lock.release()


def _import_into(args: argparse.Namespace, lm, tset, out: Path, dtype: str) -> int:
    from ..interp.activations import corpus_tokens
    from ..interp.explain import BuiltinExplainer
    from ..interp.quality import evaluate_transcoders, metrics_json
    from ..interp.store import FeatureStore, store_path

    c = tset.config
    print(f"imported {len(tset.layers)} transcoder(s) of {c.n_features:,} features ({c.activation}) for layers "
          f"{tset.layers} of {lm.name} into {out}", file=sys.stderr)
    for note in tset.origin.get("notes", [])[1:]:
        print(f"  {note}", file=sys.stderr)
    if args.evaluate:
        corpus = corpus_tokens(lm, args.dataset)
        seq_len = min(args.seq_len, lm.stack.context_length)
        split = "val" if corpus.val.size >= seq_len else "train"
        quality = evaluate_transcoders(lm, tset, corpus.windows(split, seq_len, args.val_windows),
                                       batch_size=TRAIN.model_batch, seed=args.seed)
        tset.metrics = metrics_json(quality, imported=True, target_centered=c.target_centered)
        tset.save(out, dtype)
        _print_quality(quality)
    if not args.collect:
        return 0
    _run_collect(lm, tset, _collect_config(args), store_path(out))
    if args.describe:
        with FeatureStore(store_path(out)) as store:
            _run_describe(store, BuiltinExplainer(), None, args)
    return 0


def run(args: argparse.Namespace) -> int:
    action = getattr(args, "action", None)
    if action is None:
        raise LabError(f"Say what to do: python -m core transcoders {{{','.join(ACTIONS)}}} ..., e.g. "
                       f"`python -m core transcoders explain --prompt TEXT` (see `python -m core transcoders --help`).")
    _note_no_effect(args)
    return {"train": _train, "collect": _collect, "describe": _describe, "explain": _explain, "export": _export,
            "import": _import}[action](args)
