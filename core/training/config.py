"""Everything a training run needs to be repeated, in one JSON-able dataclass.

A run folder's ``config.json`` is this object; ``python -m core train``, ``launch()`` and the
Training page all build one, and ``--resume`` reads it back, so the three front ends cannot
drift apart. Optimiser fields left at ``None`` take the ``--model-version`` recipe
(:data:`core.training.optim.RECIPES`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import LabError
from ..models.config import PRESETS, GPTConfig

OBJECTIVES = ("ar", "diffusion")
OPTIMIZERS = ("adamw", "muon")
AMP_DTYPES = ("bfloat16", "float16")


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
    preset: str | None = None           # core.models.gpt.PRESETS; None with no sizes given = tiny
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
    epochs: float | None = None         # used when max_steps is None (default 1 epoch)
    # precision and speed
    amp: bool = False
    amp_dtype: str = "bfloat16"
    compile: bool = False
    device: str = "auto"
    devices: list[int] | None = None    # GPU indices; more than one runs under torchrun (DDP)
    seed: int = 1337
    # bookkeeping
    val_every: int = 200                # 0 = only at the end
    val_batches: int = 20
    preview_every: int = 0              # 0 = off
    preview_prompt: str | None = None   # None: the dataset's own default prompt
    preview_tokens: int = 64
    save_every: int = 500               # 0 = only at the end / on stop
    keep_last: int = 3
    log_every: int = 10
    ckpt_name: str | None = None        # also export the final model as <run>/<name>/
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LabError(f"Unknown training setting(s) {', '.join(unknown)}; remove them from the config.")
        return cls(**d)

    def model_sizes(self) -> dict:
        """n_layer / n_head / d_model from the preset, overridden by explicit sizes."""
        if self.preset is not None and self.preset not in PRESETS:
            raise LabError(f"Unknown preset '{self.preset}'; choose one of {', '.join(PRESETS)}.")
        explicit = {k: getattr(self, k) for k in ("n_layer", "n_head", "d_model") if getattr(self, k) is not None}
        base = PRESETS[self.preset or "tiny"]
        return {**base, **explicit}

    def gpt_config(self, vocab_size: int, mask_token_id: int | None) -> GPTConfig:
        """The model this run trains (GPTConfig raises on impossible shapes)."""
        diffusion = self.objective == "diffusion"
        return GPTConfig(vocab_size=vocab_size, block_size=self.block_size, dropout=self.dropout,
                         causal=not diffusion, mask_token_id=mask_token_id if diffusion else None,
                         **self.model_sizes())

    def check(self) -> None:
        """Raise LabError naming the setting to change; cheap, so it runs before any data work."""
        if self.objective not in OBJECTIVES:
            raise LabError(f"objective must be one of {', '.join(OBJECTIVES)} (got '{self.objective}').")
        if self.optimizer not in OPTIMIZERS:
            raise LabError(f"optimizer must be one of {', '.join(OPTIMIZERS)} (got '{self.optimizer}').")
        if self.amp_dtype not in AMP_DTYPES:
            raise LabError(f"amp dtype must be one of {', '.join(AMP_DTYPES)} (got '{self.amp_dtype}').")
        from .optim import RECIPES

        if self.model_version not in RECIPES:
            raise LabError(f"model version must be one of {', '.join(RECIPES)} (got '{self.model_version}').")
        for name in ("batch_size", "grad_acc_steps", "block_size", "keep_last", "log_every", "val_batches",
                     "preview_tokens"):
            if int(getattr(self, name)) < 1:
                raise LabError(f"{name.replace('_', ' ')} must be at least 1 (got {getattr(self, name)}).")
        for name in ("val_every", "save_every", "preview_every"):
            if int(getattr(self, name)) < 0:
                raise LabError(f"{name.replace('_', ' ')} must be 0 (off) or a positive step count.")
        if self.max_steps is not None and self.max_steps < 1:
            raise LabError(f"max steps must be at least 1 (got {self.max_steps}).")
        if self.epochs is not None and not self.epochs > 0:
            raise LabError(f"epochs must be above 0 (got {self.epochs}).")
        if not 0.0 <= self.val_fraction < 0.5:
            raise LabError(f"val fraction must be in [0, 0.5) (got {self.val_fraction}).")
        if self.lr is not None and not self.lr > 0:
            raise LabError(f"learning rate must be above 0 (got {self.lr}).")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise LabError(f"warmup steps must be 0 or more (got {self.warmup_steps}).")
        if self.min_lr_ratio is not None and not 0.0 <= self.min_lr_ratio <= 1.0:
            raise LabError(f"min lr ratio must be in [0, 1] (got {self.min_lr_ratio}).")
        if self.max_data_tokens is not None and self.max_data_tokens < 1:
            raise LabError(f"max data tokens must be at least 1 (got {self.max_data_tokens}).")
        if self.tokenizer == "bpe" and self.vocab_size < 300:
            raise LabError(f"vocab size must be at least 300 for our byte-level BPE (got {self.vocab_size}).")
        if self.devices is not None and (not self.devices or any(int(i) < 0 for i in self.devices)):
            raise LabError("devices must be a list of GPU indices such as 0,1.")
        if self.ckpt_name is not None:
            from pathlib import Path

            from .runs import check_run_id

            stem = Path(self.ckpt_name).stem
            if stem == "checkpoints":
                raise LabError("--ckpt-name checkpoints would overwrite the run's checkpoints; pick another name.")
            check_run_id(stem)
        self.gpt_config(vocab_size=max(self.vocab_size, 1), mask_token_id=None)  # shape errors early
