"""Everything a training run needs to be repeated, in one JSON-able dataclass.

A run folder's ``config.json`` is this object; ``python -m core train``, ``launch()`` and the
Training page all build one, and ``--resume`` reads it back, so the three front ends cannot
drift apart. Optimiser fields left at ``None`` take the ``--model-version`` recipe
(:data:`core.training.optim.RECIPES`).

The defaults live in the dataclass, the choice lists and the valid range of every number in
:data:`LIMITS` here, once: the CLI's flags and the Training form read them. :meth:`TrainConfig.check`
refuses wrong types (a config.json typed by hand: ``"batch_size": "16"``) and sizes out of range
(``n_layer: 100000``) in one sentence, before any data is read or any memory allocated.
Torch-free, so ``python -m core train --help`` and the form cost no torch import.
"""
from __future__ import annotations

import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import PurePath
from typing import Any

from ..errors import LabError, shorten
from ..models.config import PRESETS, GPTConfig
from ..generation.config import SAMPLER_OF_OBJECTIVE

OBJECTIVES = tuple(SAMPLER_OF_OBJECTIVE)  # what a model can be trained as: each has its sampler
OPTIMIZERS = ("adamw", "muon")
AMP_DTYPES = ("bfloat16", "float16")
PARALLEL_MODES = ("auto", "ddp", "fsdp")  # auto: DDP when a replica fits one device, FSDP otherwise
MODEL_VERSIONS = ("gpt2", "gpt3")       # the recipes of core.training.optim.RECIPES (a test keeps them equal)
NAMED_TOKENIZERS = ("bpe", "gpt2")      # besides a tokenizer.json or model folder
DEFAULT_PRESET = "tiny"                 # the model when neither a preset nor sizes are given
DEFAULT_EPOCHS = 1.0                    # when neither max_steps nor epochs is given
# Experiment trackers a run can mirror metrics.jsonl to (--log-to; core.training.trackers), each an
# optional package: tracker -> (the module it needs, what to pip install). Runs and transcoder training alike.
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard==2.21.0"),
    "wandb": ("wandb", "wandb==0.31.0"),
    "mlflow": ("mlflow", "mlflow-skinny==3.18.0 sqlalchemy==2.1.9 alembic==1.20.1"),
}


@dataclass(frozen=True)
class Limit:
    """The valid range of a number: ``[low, high]``, either end open when flagged."""
    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def allows(self, v: float) -> bool:
        above = v > self.low if self.low_open else v >= self.low
        below = v < self.high if self.high_open else v <= self.high
        return above and below

    def describe(self) -> str:
        if self.low_open and not self.high_open and self.high >= 1e6:
            return f"above {self.low:g}"
        if self.high_open or self.low_open or isinstance(self.low, float):
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low == 0:
            return f"0 (off) or a count up to {int(self.high):,}"
        return f"between {int(self.low):,} and {int(self.high):,}"


# Every number a run takes, with the range the engine accepts (the form's widgets use the same).
LIMITS: dict[str, Limit] = {
    "vocab_size": Limit(300, 1 << 20),
    "val_fraction": Limit(0.0, 0.5, high_open=True),
    "max_data_tokens": Limit(1, 10**15),
    "n_layer": Limit(1, 1024),
    "n_head": Limit(1, 1024),
    "d_model": Limit(1, 65536),
    "block_size": Limit(1, 131072),
    "dropout": Limit(0.0, 1.0, high_open=True),
    "lr": Limit(0.0, 10.0, low_open=True),
    "min_lr_ratio": Limit(0.0, 1.0),
    "weight_decay": Limit(0.0, 10.0),
    "beta1": Limit(0.0, 1.0, high_open=True),
    "beta2": Limit(0.0, 1.0, high_open=True),
    "grad_clip": Limit(0.0, 1e6),
    "warmup_steps": Limit(0, 10_000_000),
    "batch_size": Limit(1, 65536),
    "grad_acc_steps": Limit(1, 65536),
    "max_steps": Limit(1, 100_000_000),
    "epochs": Limit(0.0, 100_000.0, low_open=True),
    "seed": Limit(0, 2**31 - 1),
    "val_every": Limit(0, 100_000_000),
    "val_batches": Limit(1, 100_000),
    "preview_every": Limit(0, 100_000_000),
    "preview_tokens": Limit(1, 100_000),
    "save_every": Limit(0, 100_000_000),
    "keep_last": Limit(1, 100_000),
    "log_every": Limit(1, 100_000_000),
}
LABELS = {"lr": "learning rate", "n_layer": "n_layer", "n_head": "n_head", "d_model": "d_model"}


def label(name: str) -> str:
    """A field's name in messages: ``batch_size`` -> ``batch size``."""
    return LABELS.get(name, name.replace("_", " "))


@dataclass
class TrainConfig:
    # data
    dataset: str = "shakespeare"        # preset name, local .txt/.jsonl file or folder, or a hub dataset id
    tokenizer: str = "bpe"              # bpe (train ours), gpt2, or a tokenizer.json / model folder
    vocab_size: int = 8192              # for tokenizer=bpe
    val_fraction: float = 0.05
    max_data_tokens: int | None = None  # stop reading the source after this many tokens
    data_cache: str | None = None       # None: $GPTLAB_DATA_CACHE or ~/.cache/gptlab/data
    # model
    objective: str = "ar"
    antithetic_t: bool = True           # diffusion: rates t stratified across the batch (unbiased, less variance)
    preset: str | None = None           # core.models.gpt.PRESETS; None with no sizes given = DEFAULT_PRESET
    n_layer: int | None = None
    n_head: int | None = None
    d_model: int | None = None
    block_size: int = 256
    dropout: float = 0.0
    # optimisation
    model_version: str = "gpt3"         # which paper's AdamW recipe fills the None fields below
    optimizer: str = "adamw"
    lr: float | None = None
    min_lr_ratio: float | None = None
    weight_decay: float | None = None
    beta1: float | None = None
    beta2: float | None = None
    grad_clip: float | None = None      # 0 = no clipping (the norm is still reported)
    warmup_steps: int | None = None
    batch_size: int = 16                # sequences per micro-batch per process
    grad_acc_steps: int = 1
    max_steps: int | None = None
    epochs: float | None = None         # used when max_steps is None (default DEFAULT_EPOCHS)
    # precision and speed
    amp: bool = False
    amp_dtype: str = "bfloat16"
    compile: bool = False
    device: str = "auto"
    devices: list[int] | None = None    # GPU indices; more than one runs under torchrun
    parallel: str = "auto"              # ddp | fsdp | auto (core.training.parallel)
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass
    seed: int = 1337
    # bookkeeping
    val_every: int = 200                # 0 = only at the end
    val_batches: int = 20
    preview_every: int = 200            # 0 = off
    preview_prompt: str | None = None   # None: the dataset's own default prompt
    preview_tokens: int = 64
    save_every: int = 500               # 0 = only at the end / on stop
    keep_last: int = 3
    log_every: int = 10
    ckpt_name: str | None = None        # also export the final model as <run>/<name>/
    log_to: list[str] = field(default_factory=list)  # TRACKERS mirroring metrics.jsonl (rank 0 only)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> "TrainConfig":
        if not isinstance(d, dict):
            raise LabError(f"A training config is a JSON object of settings (got {type(d).__name__}); pass a run's "
                           f"config.json.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in set(d) - known)
        if unknown:
            raise LabError(f"Unknown training setting(s) {shorten(', '.join(unknown), 120)}; remove them from the "
                           f"config.")
        return cls(**d)

    def model_sizes(self) -> dict:
        """n_layer / n_head / d_model from the preset, overridden by explicit sizes."""
        if self.preset is not None and self.preset not in PRESETS:
            raise LabError(f"Unknown preset '{self.preset}'; choose one of {', '.join(PRESETS)}.")
        explicit = {k: getattr(self, k) for k in ("n_layer", "n_head", "d_model") if getattr(self, k) is not None}
        base = PRESETS[self.preset or DEFAULT_PRESET]
        return {**base, **explicit}

    def gpt_config(self, vocab_size: int, mask_token_id: int | None) -> GPTConfig:
        """The model this run trains (GPTConfig raises on impossible shapes)."""
        diffusion = self.objective == "diffusion"
        return GPTConfig(vocab_size=vocab_size, block_size=self.block_size, dropout=self.dropout,
                         causal=not diffusion, mask_token_id=mask_token_id if diffusion else None,
                         positions="rotary" if diffusion else "learned",
                         **self.model_sizes())

    def check_types(self) -> None:
        """Raise LabError naming the first setting whose value has the wrong type."""
        hints = _field_types()
        for f in fields(self):
            value = getattr(self, f.name)
            problem = _type_problem(value, hints[f.name])
            if problem:
                raise LabError(f"{label(f.name)} must be {problem} (got {shorten(repr(value), 40)}); fix it in the "
                               f"config.")

    def check_ranges(self) -> None:
        """Raise LabError for a choice not on its list or a number outside :data:`LIMITS` (a model of
        100,000 layers is refused here, long before anything is built)."""
        for name, allowed in (("objective", OBJECTIVES), ("optimizer", OPTIMIZERS), ("amp_dtype", AMP_DTYPES),
                              ("model_version", MODEL_VERSIONS), ("parallel", PARALLEL_MODES)):
            if getattr(self, name) not in allowed:
                raise LabError(f"{label(name)} must be one of {', '.join(allowed)} (got '{getattr(self, name)}').")
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            if value is None or (name == "vocab_size" and self.tokenizer != "bpe"):
                continue
            if not limit.allows(value):
                raise LabError(_range_message(name, value, limit))

    def check(self) -> None:
        """Raise LabError naming the setting to change; cheap, so it runs before any data work."""
        self.check_types()
        self.check_ranges()
        check_trackers(self.log_to)
        if self.devices is not None and (not self.devices or any(int(i) < 0 for i in self.devices)):
            raise LabError("devices must be a list of GPU indices such as 0,1.")
        if not self.dataset.strip():
            raise LabError("dataset is empty; name shakespeare, a local .txt/.jsonl file or folder, or a hub dataset.")
        if self.ckpt_name is not None:
            from .runs import check_run_id  # runs imports this module

            stem = PurePath(self.ckpt_name).stem
            if stem == "checkpoints":
                raise LabError("--ckpt-name checkpoints would overwrite the run's checkpoints; pick another name.")
            check_run_id(stem)
        self.gpt_config(vocab_size=max(self.vocab_size, 1), mask_token_id=None)  # shape errors early


def parse_trackers(text: str) -> list[str]:
    """``"tensorboard,wandb"`` as a list of tracker names, each once, in the order given; an
    unknown name is one sentence listing the known ones."""
    names = [n.strip().lower() for n in str(text).split(",") if n.strip()]
    if not names:
        raise LabError(f"names no tracker; give one or more of {', '.join(TRACKERS)} (comma-separated), or leave "
                       f"--log-to out.")
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise LabError(f"'{shorten(unknown[0], 40)}' is not a tracker GPT Lab logs to; choose from "
                       f"{', '.join(TRACKERS)} (comma-separated).")
    return list(dict.fromkeys(names))


def missing_tracker_package(name: str) -> str | None:
    """The sentence to show when tracker ``name``'s package is not installed, or None."""
    import importlib.util

    module, pip = TRACKERS[name]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if found:
        return None
    return (f"Logging to {name} needs the {module} package, which is not installed here; install it with "
            f"`pip install {pip}` (or `pip install 'gptlab[trackers]'`), or leave {name} out of --log-to.")


def check_trackers(names: list[str]) -> None:
    """Raise LabError for a tracker name that is not one of :data:`TRACKERS`, or whose package is
    missing: said before any data is read, never after hours of training."""
    for name in names:
        if name not in TRACKERS:
            raise LabError(f"log to must name trackers from {', '.join(TRACKERS)} (got '{shorten(str(name), 40)}').")
        problem = missing_tracker_package(name)
        if problem:
            raise LabError(problem)


def _range_message(name: str, value: float, limit: Limit) -> str:
    shown = f"{value:,}" if isinstance(value, int) else f"{value:g}"
    if limit.low_open and value <= limit.low:
        return f"{label(name)} must be above {limit.low:g} (got {value})."
    if name == "vocab_size" and value < limit.low:
        return (f"vocab size must be at least {int(limit.low)} for our byte-level BPE (got {value}); 256 bytes and "
                f"the special tokens come first.")
    if not isinstance(limit.low, float) and value < limit.low:
        least = "0 (off) or more" if limit.low == 0 else f"at least {int(limit.low)}"
        return f"{label(name)} must be {least} (got {shown})."
    if not isinstance(limit.high, float) and value > limit.high:
        return f"{label(name)} must be at most {int(limit.high):,} (got {shown}); that size cannot be trained here."
    return f"{label(name)} must be {limit.describe()} (got {shown})."


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _type_problem(value: Any, hint: Any) -> str | None:
    """What ``value`` should be for the annotation ``hint`` (None when it fits)."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    origin = typing.get_origin(hint) or hint
    if origin is bool:
        return None if isinstance(value, bool) else "true or false"
    if origin is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "a whole number"
    if origin is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok else "a finite number"
    if origin is str:
        return None if isinstance(value, str) else "text"
    if origin is list and args and args[0] is str:
        return None if isinstance(value, list) and all(isinstance(i, str) for i in value) else "a list of names"
    if origin is list:
        ok = isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)
        return None if ok else "a list of whole numbers"
    if origin is dict:
        return None if isinstance(value, dict) else "an object"
    return None
