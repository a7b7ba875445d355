"""Our GPT's config and the training presets, the dtypes a model loads in, and what ``validate``
compares by default: plain data, no torch, so the CLI's ``--help`` and the pages can list them
without loading the engine."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from numbers import Integral, Real
from typing import Any

from ..errors import LabError, shorten

DTYPE_NAMES = ("float32", "bfloat16", "float16")  # the CLI's --dtype choices and the sidebar's list
DEFAULT_DTYPE = DTYPE_NAMES[0]
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# How our GPT tells positions apart. GPT-2's learned table keeps a causal model loadable as
# GPT2LMHeadModel; a bidirectional (masked-diffusion) model gets rotary positions, because with a
# learned table it must first learn, from random vectors, which position is its neighbour, and on the
# Shakespeare corpus it sat at the unigram loss for thousands of steps (with RoPE: broken out in 200).
POSITIONS = ("learned", "rotary")
ROTARY_BASE = 10000.0
EXPORT_FORMATS = ("hf",)  # `export --format`: hf, a folder transformers loads as GPT2LMHeadModel

# The largest sizes a config may name. Far above any GPT that exists (GPT-3 davinci: 96 layers,
# width 12288), they exist so that a corrupt or hostile config.json ("n_layer": 100000, a vocabulary
# of 10**12) is refused in a sentence instead of being built until the machine gives up.
LIMITS = {"vocab_size": 1 << 21, "block_size": 1 << 20, "n_layer": 1024, "n_head": 1024, "d_model": 1 << 16,
          "mlp_expansion": 64}


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 1024          # context length
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    mlp_expansion: int = 4
    dropout: float = 0.0
    bias: bool = True
    causal: bool = True             # False: bidirectional (masked diffusion)
    tie_weights: bool = True
    layer_norm_eps: float = 1e-5
    mask_token_id: int | None = None  # the absorbing [MASK] token of a diffusion model
    positions: str = "learned"      # "learned" (GPT-2's table) or "rotary" (RoPE on queries and keys)
    extra: dict = field(default_factory=dict)  # free-form provenance (e.g. "untrained": true)

    def __post_init__(self) -> None:
        """Types and ranges, checked before anything is built from the config."""
        for name, high in LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Integral):
                raise LabError(f"{name} must be a whole number (got {shorten(repr(value), 40)}).")
            if not 1 <= value <= high:
                raise LabError(f"{name} must be between 1 and {high:,} (got {value:,}).")
        for name in ("dropout", "layer_norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
                raise LabError(f"{name} must be a finite number (got {shorten(repr(value), 40)}).")
        for name in ("bias", "causal", "tie_weights"):
            if not isinstance(getattr(self, name), bool):
                raise LabError(f"{name} must be true or false (got {shorten(repr(getattr(self, name)), 40)}).")
        if not isinstance(self.extra, dict):
            raise LabError(f"extra must be a mapping (got {shorten(repr(self.extra), 40)}).")
        if self.d_model % self.n_head:
            raise LabError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                           f"pick a head count that divides it (e.g. {_divisor_hint(self.d_model, self.n_head)}).")
        if not 0.0 <= self.dropout < 1.0:
            raise LabError(f"dropout must be in [0, 1) (got {self.dropout}).")
        if not 0.0 < self.layer_norm_eps < 1.0:
            raise LabError(f"layer_norm_eps must be in (0, 1) (got {self.layer_norm_eps}).")
        if self.positions not in POSITIONS:
            raise LabError(f"positions must be one of {', '.join(POSITIONS)} (got {shorten(repr(self.positions), 40)}).")
        if self.positions == "rotary" and self.head_dim % 2:
            raise LabError(f"Rotary positions need an even head size; d_model={self.d_model} / n_head={self.n_head} "
                           f"is {self.head_dim}.")
        m = self.mask_token_id
        if m is not None and (isinstance(m, bool) or not isinstance(m, Integral) or not 0 <= m < self.vocab_size):
            raise LabError(f"mask_token_id must be a token id in 0..{self.vocab_size - 1} or null "
                           f"(got {shorten(repr(m), 40)}).")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def n_params(self) -> int:
        """Parameters of our GPT with this config, counted from the shapes (instant even for 175B,
        so a loader can refuse a model that cannot fit before building it)."""
        d, m, b = self.d_model, self.mlp_expansion, int(self.bias)
        ln = d * (1 + b)
        block = 2 * ln + (3 * d * d + 3 * d * b) + (d * d + d * b) + (m * d * d + m * d * b) + (m * d * d + d * b)
        head = 0 if self.tie_weights else self.vocab_size * d
        table = self.block_size * d if self.positions == "learned" else 0
        return self.vocab_size * d + table + self.n_layer * block + ln + head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> "GPTConfig":
        """The config a checkpoint's ``"model"`` entry describes; anything that is not a mapping of
        known fields with sensible values is a :class:`LabError` (unknown keys are ignored)."""
        if not isinstance(d, dict):
            raise LabError(f"The model config must be a JSON object of sizes (got {shorten(repr(d), 40)}).")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _divisor_hint(d_model: int, n_head: int) -> int:
    return min((h for h in range(1, d_model + 1) if d_model % h == 0), key=lambda h: abs(h - n_head))


# gpt-training-suite.md's tier tables (vocab and context are set by the tokenizer and run).
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=4, n_head=4, d_model=128),
    "gpt2-small": dict(n_layer=12, n_head=12, d_model=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, d_model=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, d_model=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, d_model=1600),
    "gpt3-ada": dict(n_layer=12, n_head=12, d_model=768),
    "gpt3-babbage": dict(n_layer=24, n_head=16, d_model=1024),
    "gpt3-curie": dict(n_layer=48, n_head=32, d_model=2048),
    "gpt3-davinci": dict(n_layer=96, n_head=96, d_model=12288),
}


def preset_config(name: str, **overrides) -> GPTConfig:
    if name not in PRESETS:
        raise LabError(f"Unknown preset '{name}'; choose one of {', '.join(PRESETS)}.")
    return GPTConfig(**{**PRESETS[name], **overrides})


# -- validate: what our GPT is compared with transformers' on, unless told otherwise -----------------

LOGITS_TOLERANCE = 1e-4
VALIDATE_PROMPT = "The quick brown fox"
VALIDATE_GEN_PROMPT = ("Hello, my name is Larry and I'm currently building a GPT model from scratch - but "
                       "loading")
VALIDATE_NEW_TOKENS = 40
