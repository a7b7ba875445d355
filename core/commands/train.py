"""Train a GPT (autoregressive) or a masked-diffusion LM on Shakespeare, a local text file or folder,
or a Hugging Face dataset. The run folder (config.json, status.json, metrics.jsonl, log.txt,
checkpoints/<step>/) appears under runs/ (or --output-dir) and shows in `python -m core runs list`
and the Training page; every checkpoint folder is a model spec for --model.

Both reference scripts' spellings work: gpt-training-suite.md's (--dataset small, --model-version gpt3,
--n-layer, --d-model, --epochs, --amp --amp-dtype fp16) and diffusion-interpretability.md's
(--train_steps, --grad_acc_steps, --num_layers, --num_heads, --model_dim, --train_seq_len, --cuda 3).
More than one GPU (--cuda 0,1 or --devices 0,1) runs under torchrun: data-parallel (--parallel ddp) or
sharded (--parallel fsdp, FSDP2 with sharded checkpoints); the default picks DDP when a replica fits a GPU.
Several machines: the same command on each with --nnodes N --node-rank R --rdzv-endpoint HOST:PORT.

Examples:
  python -m core train --preset tiny --max-steps 2000 --amp --preview-every 250
  python -m core train --dataset small --model-version gpt3 --block-size 256 --n-layer 8 --n-head 8 \\
      --d-model 512 --epochs 10 --batch-size 32 --val-checking --output-dir checkpoints
  python -m core train --objective diffusion --train_seq_len 1024 --train_steps 20_000 --grad_acc_steps 8 \\
      --num_layers 12 --num_heads 6 --model_dim 384 --cuda 0,1 --val_loss_every 1_000 --save_every 2_000
  python -m core train --resume runs/20250101-120000-ar-tiny --max-steps 4000
  python -m core train --preset gpt2-xl --cuda 0,1,2,3 --parallel fsdp --amp --activation-checkpointing
  python -m core train --preset gpt2-xl --parallel fsdp --amp --output-dir /shared/runs/xl \
      --nnodes 2 --node-rank 0 --rdzv-endpoint node0:29500        # and --node-rank 1 on the second machine
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..errors import LabError
from ..files import parse_json
from ..models.config import PRESETS
from ..training import runs  # torch-free: run folders, names and the writer's lock
from ..training.config import (AMP_DTYPES, DEFAULT_EPOCHS, DEFAULT_PRESET, LIMITS, MODEL_VERSIONS, OBJECTIVES,
                               OPTIMIZERS, PARALLEL_MODES, TRACKERS, TrainConfig)
from .cli import device_arg, float_arg, int_arg, path_arg, trackers_arg

NAME = "train"
HELP = "Train a GPT or a text-diffusion model; writes a run folder with metrics and loadable checkpoints."

_BOOL = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
AMP_ALIASES = {"bf16": "bfloat16", "fp16": "float16"}   # gpt-training-suite.md's spellings
D = TrainConfig()   # the defaults shown in --help are the config's own


def _bool(text: str) -> bool:
    if text.lower() not in _BOOL:
        raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")
    return _BOOL[text.lower()]


def _indices(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GPU indices such as 0 or 0,1, got {text!r}") from None
    if not out or any(i < 0 for i in out):
        raise argparse.ArgumentTypeError(f"expected GPU indices such as 0 or 0,1, got {text!r}")
    return out


def _num(name: str, note: str = ""):
    """The argparse type of a TrainConfig number: its lower bound (and the upper one of a
    fraction) checked as the flag is parsed; the rest of :data:`LIMITS` by TrainConfig.check."""
    limit = LIMITS[name]
    if isinstance(limit.low, int):
        return int_arg(limit.low, note=note)
    high = limit.high if limit.high <= 1 else None
    return float_arg(limit.low, high, low_open=limit.low_open, high_open=limit.high_open and high is not None,
                     note=note)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS  # flags left out keep the config's value (defaults live in TrainConfig)
    off = "; 0 turns it off"
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default=S, metavar="NAME|PATH", type=path_arg,
                   help=f"{D.dataset} (default), small (OpenWebText-10k), large (WikiText-103), fineweb-edu, "
                        "openwebtext, wikitext-103, a hub dataset id, or a local .txt/.jsonl file or folder")
    g.add_argument("--tokenizer", default=S, metavar="SPEC", type=path_arg,
                   help=f"bpe (train our byte-level BPE), gpt2, or a tokenizer.json / model folder "
                        f"(default {D.tokenizer})")
    g.add_argument("--vocab-size", "--vocab_size", dest="vocab_size", type=int_arg(1), default=S, metavar="N",
                   help=f"vocabulary of a trained BPE (default {D.vocab_size})")
    g.add_argument("--val-fraction", dest="val_fraction", type=_num("val_fraction"), default=S, metavar="F",
                   help=f"share of the tokens held out for validation (default {D.val_fraction})")
    g.add_argument("--max-data-tokens", dest="max_data_tokens", type=_num("max_data_tokens"), default=S,
                   metavar="N", help="read at most N tokens of the dataset (large hub datasets)")
    g.add_argument("--data-cache", dest="data_cache", default=S, metavar="DIR", type=path_arg,
                   help="token cache folder (default $GPTLAB_DATA_CACHE or ~/.cache/gptlab/data)")

    m = parser.add_argument_group("model")
    m.add_argument("--objective", choices=OBJECTIVES, default=S,
                   help=f"ar: next-token prediction; diffusion: masked diffusion (bidirectional) "
                        f"(default {D.objective})")
    m.add_argument("--antithetic-t", dest="antithetic_t", default=S,
                   action=argparse.BooleanOptionalAction,
                   help=f"diffusion: draw the masking rates t stratified across the batch, one per 1/B of (0, 1] "
                        f"(MDLM's low-discrepancy sampler: the same unbiased loss, less noise) (default "
                        f"{'on' if D.antithetic_t else 'off'})")
    m.add_argument("--preset", default=S, metavar="NAME",
                   help=f"{', '.join(PRESETS)} (default {DEFAULT_PRESET})")
    m.add_argument("--n-layer", "--num_layers", dest="n_layer", type=_num("n_layer"), default=S, metavar="N")
    m.add_argument("--n-head", "--num_heads", dest="n_head", type=_num("n_head"), default=S, metavar="N")
    m.add_argument("--d-model", "--model_dim", dest="d_model", type=_num("d_model"), default=S, metavar="N")
    m.add_argument("--block-size", "--train_seq_len", dest="block_size", type=_num("block_size"), default=S,
                   metavar="T", help=f"context length in tokens (default {D.block_size})")
    m.add_argument("--val_seq_len", dest="val_seq_len", type=int_arg(1), default=S, metavar="T",
                   help="accepted for the reference script; validation uses the training context")
    m.add_argument("--dropout", type=_num("dropout"), default=S, metavar="P")

    o = parser.add_argument_group("optimisation")
    o.add_argument("--model-version", dest="model_version", choices=MODEL_VERSIONS, default=S,
                   help=f"the paper recipe for AdamW betas, weight decay, warmup, clipping and cosine floor "
                        f"(default {D.model_version}: betas 0.9/0.95, wd 0.1, clip 1.0, cosine to 10%%)")
    o.add_argument("--optimizer", choices=OPTIMIZERS, default=S,
                   help="muon: Muon for the blocks' 2-D weights, AdamW for the rest")
    o.add_argument("--lr", "--learning-rate", dest="lr", type=_num("lr"), default=S, metavar="LR",
                   help="peak learning rate (default from --model-version)")
    o.add_argument("--min-lr-ratio", dest="min_lr_ratio", type=_num("min_lr_ratio"), default=S, metavar="R")
    o.add_argument("--weight-decay", dest="weight_decay", type=_num("weight_decay"), default=S, metavar="WD")
    o.add_argument("--beta1", type=_num("beta1"), default=S)
    o.add_argument("--beta2", type=_num("beta2"), default=S)
    o.add_argument("--grad-clip", dest="grad_clip", type=_num("grad_clip", off), default=S,
                   metavar="C", help="0 = off")
    o.add_argument("--warmup-steps", dest="warmup_steps", type=_num("warmup_steps"), default=S, metavar="N")
    o.add_argument("--batch-size", dest="batch_size", type=_num("batch_size"), default=S, metavar="B",
                   help=f"sequences per micro-batch per GPU (default {D.batch_size})")
    o.add_argument("--grad-acc-steps", "--grad_acc_steps", dest="grad_acc_steps", type=_num("grad_acc_steps"),
                   default=S, metavar="N")
    o.add_argument("--max-steps", "--train_steps", dest="max_steps", type=_num("max_steps"), default=S, metavar="N",
                   help="optimizer steps (default: --epochs worth)")
    o.add_argument("--epochs", type=_num("epochs"), default=S, metavar="E",
                   help=f"passes over the data (default {DEFAULT_EPOCHS:g})")
    o.add_argument("--seed", type=_num("seed"), default=S, help=f"(default {D.seed})")

    p = parser.add_argument_group("precision, devices, speed")
    p.add_argument("--amp", action="store_const", const=True, default=S,
                   help=f"autocast ({D.amp_dtype} unless --amp-dtype)")
    p.add_argument("--amp-dtype", dest="amp_dtype", choices=(*AMP_ALIASES, *AMP_DTYPES), default=S,
                   help="fp16 adds a GradScaler")
    p.add_argument("--compile", action="store_const", const=True, default=S, help="torch.compile the model")
    p.add_argument("--device", default=S, type=device_arg, metavar="DEVICE",
                   help=f"cpu, cuda, cuda:N or auto (default {D.device})")
    p.add_argument("--cuda", dest="cuda", type=_indices, default=S, metavar="N[,M]",
                   help="GPU index as in the reference scripts; several (0,1) train under torchrun (see --parallel)")
    p.add_argument("--devices", dest="cuda", type=_indices, default=S, metavar="N,M", help="same as --cuda")
    p.add_argument("--parallel", choices=PARALLEL_MODES, default=S,
                   help=f"several processes: ddp (a replica per GPU), fsdp (FSDP2: weights, gradients and optimizer "
                        f"state sharded, sharded checkpoints), or auto: DDP when a replica fits, else FSDP "
                        f"(default {D.parallel})")
    p.add_argument("--activation-checkpointing", dest="activation_checkpointing", action="store_const", const=True,
                   default=S, help="recompute each block's activations in the backward pass (less memory, ~1/3 "
                                   "more compute)")

    n = parser.add_argument_group("several processes and machines (torchrun)")
    n.add_argument("--nproc-per-node", dest="nproc_per_node", type=int_arg(1), default=S, metavar="N",
                   help="processes on this machine (default: one per GPU of --cuda; with --nnodes and no --cuda, "
                        "one per visible GPU; else 1). CPU processes use gloo")
    n.add_argument("--nnodes", type=int_arg(1), default=S, metavar="N", help="machines in the run (default 1)")
    n.add_argument("--node-rank", dest="node_rank", type=int_arg(0), default=S, metavar="R",
                   help="this machine's number, 0 .. N-1 (node 0 writes the run folder)")
    n.add_argument("--rdzv-endpoint", dest="rdzv_endpoint", default=S, metavar="HOST:PORT",
                   help="node 0's address and a free port, reachable from every machine")

    b = parser.add_argument_group("validation, previews, checkpoints")
    b.add_argument("--val-every", "--val_loss_every", dest="val_every", type=_num("val_every", off), default=S,
                   metavar="N", help=f"validate every N steps (default {D.val_every}; 0 = only at the end)")
    b.add_argument("--val-checking", dest="val_checking", action="store_true", default=S,
                   help="reference spelling; validation is on by default")
    b.add_argument("--val-batches", dest="val_batches", type=_num("val_batches"), default=S, metavar="N",
                   help=f"(default {D.val_batches})")
    b.add_argument("--preview-every", dest="preview_every", type=_num("preview_every", off), default=S, metavar="N",
                   help=f"sample a short text every N steps (default {D.preview_every}; 0 = off)")
    b.add_argument("--preview-prompt", dest="preview_prompt", default=S, metavar="TEXT")
    b.add_argument("--preview-tokens", dest="preview_tokens", type=_num("preview_tokens"), default=S, metavar="N",
                   help=f"(default {D.preview_tokens})")
    b.add_argument("--save-every", "--save_every", dest="save_every", type=_num("save_every", off), default=S,
                   metavar="N", help=f"checkpoint every N steps (default {D.save_every}; 0 = only at the end or on stop)")
    b.add_argument("--save_model", dest="save_model", type=_bool, default=S, metavar="True|False",
                   help="reference spelling; False keeps only the final checkpoint")
    b.add_argument("--keep-last", dest="keep_last", type=_num("keep_last"), default=S, metavar="K",
                   help=f"(default {D.keep_last})")
    b.add_argument("--log-every", dest="log_every", type=_num("log_every"), default=S, metavar="N",
                   help=f"(default {D.log_every})")

    r = parser.add_argument_group("run")
    r.add_argument("--output-dir", dest="output_dir", default=S, metavar="DIR", type=path_arg,
                   help="the run folder itself: missing or empty (a folder holding a model or another run is "
                        "refused)")
    r.add_argument("--run-name", dest="run_name", default=S, metavar="NAME", help="runs/NAME as the run folder")
    r.add_argument("--ckpt-name", dest="ckpt_name", default=S, metavar="NAME", type=path_arg,
                   help="also export the final model as <run>/NAME/ (reference spelling; .pt is dropped)")
    r.add_argument("--config", default=S, metavar="FILE", type=path_arg, help="a run's config.json to start from")
    r.add_argument("--resume", default=S, metavar="RUN_DIR", type=path_arg, help="continue this run from its last checkpoint")
    r.add_argument("--log-to", dest="log_to", type=trackers_arg, default=S, metavar="NAMES",
                   help=f"also log metrics, config and samples to {', '.join(TRACKERS)} (any of them, comma-separated; "
                        "files under RUN/tracking/; W&B offline unless logged in)")
    r.add_argument("--no-progress", dest="no_progress", action="store_true", default=S,
                   help="no progress bar (runs launched in the background)")


# Flags that change a resumed run without changing what it is.
RESUME_OVERRIDES = ("max_steps", "epochs", "val_every", "val_batches", "preview_every", "preview_prompt",
                    "preview_tokens", "save_every", "keep_last", "log_every", "device", "devices", "compile",
                    "ckpt_name", "batch_size", "grad_acc_steps", "activation_checkpointing", "parallel",
                    "log_to")
# How the command is launched on this machine (torchrun's options), not settings of the run.
LAUNCH_FLAGS = ("nproc_per_node", "nnodes", "node_rank", "rdzv_endpoint")


def _same_sequences_per_step(run: str, cfg: TrainConfig) -> None:
    """A resumed run may split its step differently (after running out of memory: a smaller
    --batch-size, more --grad-acc-steps) but must keep the sequences per step, so the data order,
    the schedule and the loss curve carry on as if nothing had changed."""
    from ..training.trainer import resume_config  # the engine (torch) loads only when a command runs

    saved = resume_config(run)
    n_saved, n_now = saved.batch_size * saved.grad_acc_steps, cfg.batch_size * cfg.grad_acc_steps
    if n_now != n_saved:
        raise LabError(f"--resume keeps {n_saved} sequences per step ({saved.batch_size} x {saved.grad_acc_steps}); "
                       f"choose --batch-size and --grad-acc-steps whose product is {n_saved} (got {cfg.batch_size} "
                       f"x {cfg.grad_acc_steps}).")


def _read_config_file(text: str) -> dict:
    """--config FILE as a dict of settings, or one sentence saying why not (a FIFO is refused
    before it is opened: reading one would wait forever)."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_file():
        raise LabError(f"--config {text} is not a regular file; pass a run's config.json.")
    try:
        base = parse_json(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LabError(f"Could not read --config {text} ({e}); pass a run's config.json.") from None
    if not isinstance(base, dict):
        raise LabError(f"--config {text} holds {type(base).__name__} instead of an object of settings; pass a "
                       f"run's config.json.")
    return base


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the flags describe (on top of --config or the resumed run's config)."""
    from ..training.trainer import resume_config  # the engine (torch) loads only when a command runs

    given = dict(vars(args))
    for k in ("command", "run", "output_dir", "run_name", "config", "resume", "no_progress", *LAUNCH_FLAGS):
        given.pop(k, None)
    if given.pop("val_checking", False) and given.get("val_every") == 0:
        raise LabError("--val-checking asks for validation but --val-every 0 turns it off; drop one of them.")
    if "val_seq_len" in given:
        vsl = given.pop("val_seq_len")
        if vsl != given.get("block_size", vsl):
            raise LabError(f"--val_seq_len {vsl} differs from the training context; GPT Lab validates on windows "
                           f"of the training length, so drop --val_seq_len or make it equal.")
    save_model = given.pop("save_model", None)
    if save_model is False:
        given["save_every"] = 0
    if "cuda" in given:
        idx = given.pop("cuda")
        if len(idx) == 1:
            given["device"] = f"cuda:{idx[0]}"
        else:
            given["devices"] = idx
            given["device"] = "cuda"
    if "amp_dtype" in given:
        given["amp_dtype"] = AMP_ALIASES.get(given["amp_dtype"], given["amp_dtype"])
    if getattr(args, "resume", None):
        folder = Path(args.resume).expanduser()
        if not folder.is_symlink() and not folder.is_dir():
            raise LabError(f"--resume {args.resume} is not a run folder; pick one from `python -m core runs list`.")
        runs.check_links(runs.run_path(folder))  # a run GPT Lab made, not a link to one, with no file linking out
        extra = sorted(set(given) - set(RESUME_OVERRIDES))
        if extra:
            raise LabError(f"--resume continues a run with its own settings; drop {', '.join('--' + e.replace('_', '-') for e in extra)} "
                           f"(only {', '.join('--' + k.replace('_', '-') for k in RESUME_OVERRIDES[:4])}, ... may change).")
        cfg = resume_config(args.resume, **given)
        _same_sequences_per_step(args.resume, cfg)
        cfg.check()
        return cfg
    base = _read_config_file(args.config) if getattr(args, "config", None) else {}
    cfg = TrainConfig.from_dict({**base, **given})
    cfg.check_types()
    _check_flags(cfg, given)
    cfg.check_ranges()
    _check_heads(cfg)
    cfg.check()
    return _absolute_paths(cfg)


def _absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """The run's config with its local paths (dataset, tokenizer, token cache) made absolute: the
    config is the run's record, and a run resumed by `runs resume` or the Training page works in
    another folder, where a relative path would name nothing (or something else)."""
    from dataclasses import replace

    from ..training.config import NAMED_TOKENIZERS
    from ..training.data import ALIASES  # the engine loads only when a command runs

    changes = {}
    dataset = ALIASES.get(cfg.dataset.strip(), cfg.dataset.strip())
    if dataset != "shakespeare" and Path(dataset).expanduser().exists():  # resolve_source's own order
        changes["dataset"] = str(Path(dataset).expanduser().resolve())
    if cfg.tokenizer not in NAMED_TOKENIZERS and Path(cfg.tokenizer).expanduser().exists():
        changes["tokenizer"] = str(Path(cfg.tokenizer).expanduser().resolve())
    if cfg.data_cache:
        changes["data_cache"] = str(Path(cfg.data_cache).expanduser().absolute())
    return replace(cfg, **changes) if changes else cfg


def _check_flags(cfg: TrainConfig, given: dict) -> None:
    """What TrainConfig.check would refuse in its own words, said here in the flags' words."""
    from ..files import check_output_place
    from ..training.data import LOCAL_SUFFIXES, check_regular  # the engine loads only when a command runs

    cache = check_output_place(cfg.data_cache, "--data-cache")  # the token cache is written before the first step
    if cache is not None and (cache / "config.json").exists():
        raise LabError(f"--data-cache {cfg.data_cache} holds a model, run or transcoder set (config.json); the token "
                       f"cache writes folders of its own there, so give it a folder of its own.")

    if "preset" in given and given["preset"] not in PRESETS:
        raise LabError(f"--preset {given['preset']} is not a preset; choose one of {', '.join(PRESETS)}.")
    if cfg.tokenizer == "bpe" and cfg.vocab_size < LIMITS["vocab_size"].low:
        raise LabError(f"--vocab-size {cfg.vocab_size} is too small for our byte-level BPE (256 bytes and the "
                       f"special tokens come first); pass at least {LIMITS['vocab_size'].low}.")
    data = str(cfg.dataset).strip()
    path = Path(data).expanduser()
    if (data.startswith((".", "/", "~")) or path.suffix.lower() in LOCAL_SUFFIXES) and not path.exists():
        raise LabError(f"--dataset {data} does not exist; check the path, or use --dataset shakespeare.")
    if path.exists():
        check_regular(path, f"--dataset {data}")


def _check_heads(cfg: TrainConfig) -> None:
    """The head count must divide the width; said in the flags' words, with a count that fits."""
    sizes = cfg.model_sizes()
    d, h = sizes["d_model"], sizes["n_head"]
    if h >= 1 and d % h:
        fit = next(k for k in range(h, 0, -1) if d % k == 0)
        raise LabError(f"--d-model {d} is not divisible by --n-head {h}; pick a head count that divides it "
                       f"(e.g. --n-head {fit}).")


def run_folder(args: argparse.Namespace, cfg: TrainConfig) -> Path:
    """The run's folder: --resume's, --output-dir (checked: never a model or another run),
    runs/--run-name, or a new name under the runs root."""
    if getattr(args, "resume", None):
        return Path(args.resume)
    if getattr(args, "output_dir", None):
        folder = Path(args.output_dir)
        if int(os.environ.get("RANK", "0")) == 0 and _node_rank(args) == 0:  # rank 0 writes the folder
            runs.check_output_folder(folder)
        return folder
    if getattr(args, "run_name", None):
        folder = runs.runs_root() / runs.check_run_id(args.run_name)
        if folder.exists() and _node_rank(args) == 0:
            raise LabError(f"Run {folder} already exists; pick another --run-name or resume it with --resume {folder}.")
        return folder
    return runs.runs_root() / runs.new_run_id(cfg)


def _node_rank(args: argparse.Namespace) -> int:
    return int(getattr(args, "node_rank", 0) or 0)


def launch_plan(args: argparse.Namespace, cfg: TrainConfig) -> tuple[int, int, int, str | None]:
    """``(processes on this machine, machines, this machine's rank, rendezvous endpoint)`` from the
    flags, checked: one process on one machine means no torchrun."""
    nnodes = int(getattr(args, "nnodes", 1) or 1)
    node_rank, endpoint = _node_rank(args), getattr(args, "rdzv_endpoint", None)
    if nnodes > 1:
        from ..training.distributed import split_endpoint

        split_endpoint(endpoint)
        if node_rank >= nnodes:
            raise LabError(f"--node-rank {node_rank} is not below --nnodes {nnodes}; number the machines 0 .. {nnodes - 1}.")
        if not any(getattr(args, k, None) for k in ("output_dir", "run_name", "resume")):
            raise LabError("A run over several machines needs the same run folder on each: give --output-dir on storage "
                           "every node sees (or --run-name with a shared $GPTLAB_RUNS).")
    elif node_rank or endpoint:
        raise LabError("--node-rank and --rdzv-endpoint go with --nnodes 2 or more; drop them for a one-machine run.")
    nproc = getattr(args, "nproc_per_node", None)
    if nproc is None:
        if cfg.devices:
            nproc = len(cfg.devices)
        elif nnodes > 1:
            import torch  # only a multi-machine run needs it here

            nproc = torch.cuda.device_count() if torch.cuda.is_available() and cfg.device != "cpu" else 1
        else:
            nproc = 1
    elif cfg.devices and nproc != len(cfg.devices):
        raise LabError(f"--nproc-per-node {nproc} differs from the {len(cfg.devices)} GPUs of --cuda; give one of them.")
    return int(nproc), nnodes, node_rank, endpoint


def _exec_torchrun(cfg: TrainConfig, folder: Path, resume: bool, lock, plan: tuple[int, int, int, str | None]) -> None:
    """Re-run this command as torchrun's workers, one per chosen GPU (or ``--nproc-per-node`` CPU
    processes); this process becomes torchrun, and keeps the run's lock for them. Node 0 prepares the
    run folder; the other nodes pass the same settings through a config file of their own."""
    import tempfile

    import torch  # only a multi-process run needs it here

    from ..training.distributed import torchrun_command

    nproc, nnodes, node_rank, endpoint = plan
    if cfg.devices:
        if not torch.cuda.is_available():
            raise LabError("Several devices were chosen but no CUDA GPU is visible; use one device (--device cpu).")
        n = torch.cuda.device_count()
        bad = [i for i in cfg.devices if i >= n]
        if bad:
            raise LabError(f"GPU index {bad[0]} does not exist: this machine has {n} GPU(s) (0..{n - 1}).")
    if resume:
        args = ["--resume", str(folder)]
    elif node_rank == 0:
        runs.prepare_run(folder, cfg)
        args = ["--config", str(folder / "config.json"), "--output-dir", str(folder)]
    else:
        fd, local = tempfile.mkstemp(prefix="gptlab-node-config-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(cfg.to_dict(), fh)
        args = ["--config", local, "--output-dir", str(folder)]
    cmd = torchrun_command(args + ["--no-progress"], nproc, nnodes=nnodes, node_rank=node_rank, endpoint=endpoint)
    env = dict(os.environ)
    if cfg.devices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in cfg.devices)
    if lock is not None:
        lock.keep_across_exec()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(cmd[0], cmd, env)


def run(args: argparse.Namespace) -> int:
    # the engine (torch) is imported here, not at the top, so `train --help` stays torch-free
    from ..devices import resolve_device
    from ..training.memory import check_fits
    from ..training.trainer import train

    cfg = config_from_args(args)
    worker = "WORLD_SIZE" in os.environ  # a torchrun worker: the command that started torchrun holds the lock
    plan = launch_plan(args, cfg) if not worker else (1, 1, 0, None)
    nproc, nnodes, node_rank, _ = plan
    if int(os.environ.get("RANK", "0")) == 0:  # before any folder or data: an impossible size costs nothing
        check_fits(cfg, resolve_device(cfg.device), cfg.devices if cfg.devices and len(cfg.devices) > 1 else None,
                   nnodes=nnodes, nproc=nproc)
    folder = run_folder(args, cfg)
    resume = bool(getattr(args, "resume", None))
    fresh = not resume and not worker and runs.is_new_folder(folder)  # a run this command makes from nothing
    # one writer per run, for as long as this command trains it (node 0's command, on a multi-node run)
    lock = None if worker or node_rank > 0 else runs.lock_run(folder)
    try:
        if lock is not None and not resume and int(os.environ.get("RANK", "0")) == 0:
            # judged again under the lock: a second `train` into the same folder that passed the first check
            # while this one was starting finds this run here (or this one finds its run), never writes over it
            runs.check_output_folder(folder)
        if (nproc > 1 or nnodes > 1) and not worker:
            _exec_torchrun(cfg, folder, resume, lock, plan)
        events = train(cfg, folder, resume=resume)
        if bool(getattr(args, "no_progress", False)) or int(os.environ.get("RANK", "0")) != 0:
            for _ in events:  # the run folder gets everything; nothing to show
                pass
            return 0
        _show(events)
        return 0
    except (Exception, KeyboardInterrupt):  # not SystemExit: the torchrun handover ends this process on purpose
        if fresh:  # ended before its first step (e.g. its dataset): leave no empty run behind
            runs.discard_unstarted(folder)
        raise
    finally:
        if lock is not None:
            lock.release()


def _show(events) -> None:
    """Draw the run on stderr: a header line, a progress bar, notes above it, and how it ended."""
    from ..training.trainer import CheckpointSaved, Previewed, RunEnded, RunStarted, StepLogged, Validated  # engine
    from .cli import progress  # looked up when called: a job's runner wraps it to record progress

    end = None
    for ev in events:  # until the run knows its step count (after data preparation)
        if isinstance(ev, RunStarted):
            print(f"run {ev.run_dir}: {ev.n_params:,} parameters, {ev.max_steps} steps of {ev.tokens_per_step:,} "
                  f"tokens on {ev.device}" + (f" x{ev.world_size}" if ev.world_size > 1 else "")
                  + (f", resumed at step {ev.step}" if ev.resumed else ""), file=sys.stderr)
            break
    else:
        return
    shown = progress(events, ev.max_steps, "train",
                     position=lambda e: e.step if isinstance(e, StepLogged) else None,
                     status=lambda e: f"loss {e.metrics['train_loss']:.4f}" if isinstance(e, StepLogged) else None)
    for ev in shown:
        if isinstance(ev, Validated):
            _note(f"step {ev.step}: validation loss {ev.val_loss:.4f}")
        elif isinstance(ev, Previewed):
            _note(f"step {ev.step}: {ev.prompt}{ev.text}")
        elif isinstance(ev, CheckpointSaved):
            _note(f"step {ev.step}: checkpoint {ev.path}")
        elif isinstance(ev, RunEnded):
            end = ev
    if end is not None:
        val = f", validation loss {end.val_loss:.4f}" if end.val_loss is not None else ""
        print(f"{end.state} at step {end.step}{val}; model: {end.checkpoint}", file=sys.stderr)
        if end.state == "stopped":
            print(f"resume with: python -m core train --resume {end.run_dir}", file=sys.stderr)


def _note(text: str) -> None:
    """A line above the progress bar (tqdm.write keeps the bar intact)."""
    try:
        from tqdm.auto import tqdm  # optional: a plain line without it

        tqdm.write(text, file=sys.stderr)
    except ImportError:
        print("\n" + text, file=sys.stderr)
