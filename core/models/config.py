"""Our GPT's config and the training presets: plain data, no torch, so the CLI's ``--help`` and the
Training form can list presets without loading the engine."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from ..errors import LabError


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
    extra: dict = field(default_factory=dict)  # free-form provenance (e.g. "untrained": true)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "mlp_expansion"):
            if int(getattr(self, name)) < 1:
                raise LabError(f"{name} must be at least 1 (got {getattr(self, name)}).")
        if self.d_model % self.n_head:
            raise LabError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                           f"pick a head count that divides it (e.g. {_divisor_hint(self.d_model, self.n_head)}).")
        if not 0.0 <= self.dropout < 1.0:
            raise LabError(f"dropout must be in [0, 1) (got {self.dropout}).")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
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
