"""Train a GPT (autoregressive) or a masked-diffusion LM on Shakespeare, a local text file or folder,
or a Hugging Face dataset. The run folder (config.json, status.json, metrics.jsonl, log.txt,
checkpoints/<step>/) appears under runs/ (or --output-dir) and shows in `python -m core runs list`
and the Training page; every checkpoint folder is a model spec for --model.

Both reference scripts' spellings work: gpt-training-suite.md's (--dataset small, --model-version gpt3,
--n-layer, --d-model, --epochs, --amp --amp-dtype fp16) and diffusion-interpretability.md's
(--train_steps, --grad_acc_steps, --num_layers, --num_heads, --model_dim, --train_seq_len, --cuda 3).
More than one GPU (--cuda 0,1 or --devices 0,1) runs data-parallel under torchrun.

Examples:
  python -m core train --preset tiny --max-steps 2000 --amp --preview-every 250
  python -m core train --dataset small --model-version gpt3 --block-size 256 --n-layer 8 --n-head 8 \\
      --d-model 512 --epochs 10 --batch-size 32 --val-checking --output-dir checkpoints
  python -m core train --objective diffusion --train_seq_len 1024 --train_steps 20_000 --grad_acc_steps 8 \\
      --num_layers 12 --num_heads 6 --model_dim 384 --cuda 0,1 --val_loss_every 1_000 --save_every 2_000
  python -m core train --resume runs/20250101-120000-ar-tiny --max-steps 4000
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..errors import LabError

NAME = "train"
HELP = "Train a GPT or a text-diffusion model; writes a run folder with metrics and loadable checkpoints."

_BOOL = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli import device_arg, float_arg, int_arg

    S = argparse.SUPPRESS  # flags left out keep the config's value (defaults live in TrainConfig)
    count, steps = int_arg(1), int_arg(0, note="; 0 turns it off")  # ranges as TrainConfig.check has them
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default=S, metavar="NAME|PATH",
                   help="shakespeare (default), small (OpenWebText-10k), large (WikiText-103), fineweb-edu, "
                        "openwebtext, wikitext-103, a hub dataset id, or a local .txt/.jsonl file or folder")
    g.add_argument("--tokenizer", default=S, metavar="SPEC",
                   help="bpe (train our byte-level BPE; default), gpt2, or a tokenizer.json / model folder")
    g.add_argument("--vocab-size", "--vocab_size", dest="vocab_size", type=count, default=S, metavar="N",
                   help="vocabulary of a trained BPE (default 8192)")
    g.add_argument("--val-fraction", dest="val_fraction", type=float_arg(0, 0.5, high_open=True), default=S,
                   metavar="F",
                   help="share of the tokens held out for validation (default 0.05)")
    g.add_argument("--max-data-tokens", dest="max_data_tokens", type=count, default=S, metavar="N",
                   help="read at most N tokens of the dataset (large hub datasets)")
    g.add_argument("--data-cache", dest="data_cache", default=S, metavar="DIR",
                   help="token cache folder (default $GPTLAB_DATA_CACHE or ~/.cache/gptlab/data)")

    m = parser.add_argument_group("model")
    m.add_argument("--objective", choices=("ar", "diffusion"), default=S,
                   help="ar: next-token prediction (default); diffusion: masked diffusion (bidirectional)")
    m.add_argument("--preset", default=S, metavar="NAME",
                   help="tiny (default), gpt2-small|medium|large|xl, gpt3-ada|babbage|curie|davinci")
    m.add_argument("--n-layer", "--num_layers", dest="n_layer", type=count, default=S, metavar="N")
    m.add_argument("--n-head", "--num_heads", dest="n_head", type=count, default=S, metavar="N")
    m.add_argument("--d-model", "--model_dim", dest="d_model", type=count, default=S, metavar="N")
    m.add_argument("--block-size", "--train_seq_len", dest="block_size", type=count, default=S, metavar="T",
                   help="context length in tokens (default 256)")
    m.add_argument("--val_seq_len", dest="val_seq_len", type=count, default=S, metavar="T",
                   help="accepted for the reference script; validation uses the training context")
    m.add_argument("--dropout", type=float_arg(0, 1, high_open=True), default=S, metavar="P")

    o = parser.add_argument_group("optimisation")
    o.add_argument("--model-version", dest="model_version", choices=("gpt2", "gpt3"), default=S,
                   help="the paper recipe for AdamW betas, weight decay, warmup, clipping and cosine floor "
                        "(default gpt3: betas 0.9/0.95, wd 0.1, clip 1.0, cosine to 10%%)")
    o.add_argument("--optimizer", choices=("adamw", "muon"), default=S,
                   help="muon: Muon for the blocks' 2-D weights, AdamW for the rest")
    o.add_argument("--lr", "--learning-rate", dest="lr", type=float_arg(0, low_open=True), default=S, metavar="LR",
                   help="peak learning rate (default from --model-version)")
    o.add_argument("--min-lr-ratio", dest="min_lr_ratio", type=float_arg(0, 1), default=S, metavar="R")
    o.add_argument("--weight-decay", dest="weight_decay", type=float_arg(0), default=S, metavar="WD")
    o.add_argument("--beta1", type=float_arg(0, 1, high_open=True), default=S)
    o.add_argument("--beta2", type=float_arg(0, 1, high_open=True), default=S)
    o.add_argument("--grad-clip", dest="grad_clip", type=float_arg(0, note="; 0 turns it off"), default=S,
                   metavar="C", help="0 = off")
    o.add_argument("--warmup-steps", dest="warmup_steps", type=int_arg(0), default=S, metavar="N")
    o.add_argument("--batch-size", dest="batch_size", type=count, default=S, metavar="B",
                   help="sequences per micro-batch per GPU (default 16)")
    o.add_argument("--grad-acc-steps", "--grad_acc_steps", dest="grad_acc_steps", type=count, default=S, metavar="N")
    o.add_argument("--max-steps", "--train_steps", dest="max_steps", type=count, default=S, metavar="N",
                   help="optimizer steps (default: --epochs worth)")
    o.add_argument("--epochs", type=float_arg(0, low_open=True), default=S, metavar="E",
                   help="passes over the data (default 1)")
    o.add_argument("--seed", type=int, default=S)

    p = parser.add_argument_group("precision, devices, speed")
    p.add_argument("--amp", action="store_const", const=True, default=S, help="autocast (bfloat16 unless --amp-dtype)")
    p.add_argument("--amp-dtype", dest="amp_dtype", choices=("bf16", "bfloat16", "fp16", "float16"), default=S,
                   help="fp16 adds a GradScaler")
    p.add_argument("--compile", action="store_const", const=True, default=S, help="torch.compile the model")
    p.add_argument("--device", default=S, type=device_arg, metavar="DEVICE", help="cpu, cuda, cuda:N or auto (default auto)")
    p.add_argument("--cuda", dest="cuda", type=_indices, default=S, metavar="N[,M]",
                   help="GPU index as in the reference scripts; several (0,1) train with DDP under torchrun")
    p.add_argument("--devices", dest="cuda", type=_indices, default=S, metavar="N,M", help="same as --cuda")

    b = parser.add_argument_group("validation, previews, checkpoints")
    b.add_argument("--val-every", "--val_loss_every", dest="val_every", type=steps, default=S, metavar="N",
                   help="validate every N steps (default 200; 0 = only at the end)")
    b.add_argument("--val-checking", dest="val_checking", action="store_true", default=S,
                   help="reference spelling; validation is on by default")
    b.add_argument("--val-batches", dest="val_batches", type=count, default=S, metavar="N")
    b.add_argument("--preview-every", dest="preview_every", type=steps, default=S, metavar="N",
                   help="sample a short text every N steps (default off)")
    b.add_argument("--preview-prompt", dest="preview_prompt", default=S, metavar="TEXT")
    b.add_argument("--preview-tokens", dest="preview_tokens", type=count, default=S, metavar="N")
    b.add_argument("--save-every", "--save_every", dest="save_every", type=steps, default=S, metavar="N",
                   help="checkpoint every N steps (default 500; 0 = only at the end or on stop)")
    b.add_argument("--save_model", dest="save_model", type=_bool, default=S, metavar="True|False",
                   help="reference spelling; False keeps only the final checkpoint")
    b.add_argument("--keep-last", dest="keep_last", type=count, default=S, metavar="K", help="(default 3)")
    b.add_argument("--log-every", dest="log_every", type=count, default=S, metavar="N", help="(default 10)")

    r = parser.add_argument_group("run")
    r.add_argument("--output-dir", dest="output_dir", default=S, metavar="DIR", help="the run folder itself")
    r.add_argument("--run-name", dest="run_name", default=S, metavar="NAME", help="runs/NAME as the run folder")
    r.add_argument("--ckpt-name", dest="ckpt_name", default=S, metavar="NAME",
                   help="also export the final model as <run>/NAME/ (reference spelling; .pt is dropped)")
    r.add_argument("--config", default=S, metavar="FILE", help="a run's config.json to start from")
    r.add_argument("--resume", default=S, metavar="RUN_DIR", help="continue this run from its last checkpoint")
    r.add_argument("--no-progress", dest="no_progress", action="store_true", default=S,
                   help="no progress bar (runs launched in the background)")


# Flags that change a resumed run without changing what it is.
RESUME_OVERRIDES = ("max_steps", "epochs", "val_every", "val_batches", "preview_every", "preview_prompt",
                    "preview_tokens", "save_every", "keep_last", "log_every", "device", "devices", "compile",
                    "ckpt_name", "batch_size", "grad_acc_steps")


def _same_sequences_per_step(run: str, cfg) -> None:
    """A resumed run may split its step differently (after running out of memory: a smaller
    --batch-size, more --grad-acc-steps) but must keep the sequences per step, so the data order,
    the schedule and the loss curve carry on as if nothing had changed."""
    from ..training.trainer import resume_config

    saved = resume_config(run)
    n_saved, n_now = saved.batch_size * saved.grad_acc_steps, cfg.batch_size * cfg.grad_acc_steps
    if n_now != n_saved:
        raise LabError(f"--resume keeps {n_saved} sequences per step ({saved.batch_size} x {saved.grad_acc_steps}); "
                       f"choose --batch-size and --grad-acc-steps whose product is {n_saved} (got {cfg.batch_size} "
                       f"x {cfg.grad_acc_steps}).")


def config_from_args(args: argparse.Namespace):
    """The TrainConfig the flags describe (on top of --config or the resumed run's config)."""
    from ..training.config import TrainConfig
    from ..training.trainer import resume_config

    given = dict(vars(args))
    for k in ("command", "run", "output_dir", "run_name", "config", "resume", "no_progress"):
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
        given["amp_dtype"] = {"bf16": "bfloat16", "fp16": "float16"}.get(given["amp_dtype"], given["amp_dtype"])
    if getattr(args, "resume", None):
        if not Path(args.resume).expanduser().is_dir():
            raise LabError(f"--resume {args.resume} is not a run folder; pick one from `python -m core runs list`.")
        extra = sorted(set(given) - set(RESUME_OVERRIDES))
        if extra:
            raise LabError(f"--resume continues a run with its own settings; drop {', '.join('--' + e.replace('_', '-') for e in extra)} "
                           f"(only {', '.join('--' + k.replace('_', '-') for k in RESUME_OVERRIDES[:4])}, ... may change).")
        cfg = resume_config(args.resume, **given)
        _same_sequences_per_step(args.resume, cfg)
        return cfg
    base: dict = {}
    if getattr(args, "config", None):
        try:
            base = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise LabError(f"Could not read --config {args.config} ({e}); pass a run's config.json.") from None
    cfg = TrainConfig.from_dict({**base, **given})
    _check_flags(cfg, given)
    cfg.check()
    return cfg


def _check_flags(cfg, given: dict) -> None:
    """What TrainConfig.check would refuse in its own words, said here in the flags' words."""
    from ..models.gpt import PRESETS
    from ..training.data import LOCAL_SUFFIXES

    if "preset" in given and given["preset"] not in PRESETS:
        raise LabError(f"--preset {given['preset']} is not a preset; choose one of {', '.join(PRESETS)}.")
    sizes = cfg.model_sizes()
    d, h = sizes["d_model"], sizes["n_head"]
    if h >= 1 and d % h:
        fit = next(k for k in range(h, 0, -1) if d % k == 0)
        raise LabError(f"--d-model {d} is not divisible by --n-head {h}; pick a head count that divides it "
                       f"(e.g. --n-head {fit}).")
    if cfg.tokenizer == "bpe" and cfg.vocab_size < 300:
        raise LabError(f"--vocab-size {cfg.vocab_size} is too small for our byte-level BPE (256 bytes and the "
                       f"special tokens come first); pass at least 300.")
    data = str(cfg.dataset).strip()
    path = Path(data).expanduser()
    if (data.startswith((".", "/", "~")) or path.suffix.lower() in LOCAL_SUFFIXES) and not path.exists():
        raise LabError(f"--dataset {data} does not exist; check the path, or use --dataset shakespeare.")


def run_folder(args: argparse.Namespace, cfg) -> Path:
    from ..training.runs import check_run_id, new_run_id, runs_root

    if getattr(args, "resume", None):
        return Path(args.resume)
    if getattr(args, "output_dir", None):
        return Path(args.output_dir)
    if getattr(args, "run_name", None):
        folder = runs_root() / check_run_id(args.run_name)
        if folder.exists():
            raise LabError(f"Run {folder} already exists; pick another --run-name or resume it with --resume {folder}.")
        return folder
    return runs_root() / new_run_id(cfg)


def _exec_torchrun(cfg, folder: Path, resume: bool) -> None:
    """Re-run this command as torchrun's workers, one per chosen GPU (this process becomes torchrun)."""
    import torch

    from ..files import atomic_write_json
    from ..training.distributed import torchrun_command

    if not torch.cuda.is_available():
        raise LabError("Several devices were chosen but no CUDA GPU is visible; use one device (--device cpu).")
    n = torch.cuda.device_count()
    bad = [i for i in cfg.devices if i >= n]
    if bad:
        raise LabError(f"GPU index {bad[0]} does not exist: this machine has {n} GPU(s) (0..{n - 1}).")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "config.json", cfg.to_dict())
    args = ["--resume", str(folder)] if resume else ["--config", str(folder / "config.json"), "--output-dir", str(folder)]
    cmd = torchrun_command(args + ["--no-progress"], len(cfg.devices))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in cfg.devices)}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(cmd[0], cmd, env)


def run(args: argparse.Namespace) -> int:
    from ..training.trainer import CheckpointSaved, Previewed, RunEnded, RunStarted, StepLogged, Validated, train

    from ..training.memory import check_fits

    cfg = config_from_args(args)
    if int(os.environ.get("RANK", "0")) == 0:  # before any folder or data: an impossible size costs nothing
        from ..devices import resolve_device

        check_fits(cfg, resolve_device(cfg.device), cfg.devices if cfg.devices and len(cfg.devices) > 1 else None)
    folder = run_folder(args, cfg)
    resume = bool(getattr(args, "resume", None))
    if cfg.devices and len(cfg.devices) > 1 and "WORLD_SIZE" not in os.environ:
        _exec_torchrun(cfg, folder, resume)
    events = train(cfg, folder, resume=resume)
    if bool(getattr(args, "no_progress", False)) or int(os.environ.get("RANK", "0")) != 0:
        for _ in events:  # the run folder gets everything; nothing to show
            pass
        return 0
    from .cli import progress

    end = None
    for ev in events:  # until the run knows its step count (after data preparation)
        if isinstance(ev, RunStarted):
            print(f"run {ev.run_dir}: {ev.n_params:,} parameters, {ev.max_steps} steps of {ev.tokens_per_step:,} "
                  f"tokens on {ev.device}" + (f" x{ev.world_size}" if ev.world_size > 1 else "")
                  + (f", resumed at step {ev.step}" if ev.resumed else ""), file=sys.stderr)
            break
    else:
        return 0
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
    return 0


def _note(text: str) -> None:
    """A line above the progress bar (tqdm.write keeps the bar intact)."""
    try:
        from tqdm.auto import tqdm

        tqdm.write(text, file=sys.stderr)
    except ImportError:
        print("\n" + text, file=sys.stderr)
