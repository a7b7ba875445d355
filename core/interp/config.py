"""What decides a transcoder set, its feature store and an explained completion, torch-free.

Every default, choice list and limit of the features workbench is stated here once: the engine's
dataclasses and signatures use them, ``python -m core transcoders`` takes its flags' defaults
from them (so its ``--help`` never imports torch), and the Features page's widgets read the same
numbers, so the three can never drift apart. The dataclasses round-trip through
``to_dict`` / ``from_dict`` (unknown keys are ignored, so a file written by a newer version loads).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence, TypeVar

from ..errors import LabError
from ..generation.config import check_seed
from ..models.hooks import act_name

TRAIN_ACTIVATIONS = ("topk", "relu")            # TopK: exactly k features a token; ReLU: sparsity from an L1 penalty
ACTIVATIONS = TRAIN_ACTIVATIONS + ("jumprelu",)  # JumpReLU (a learnt threshold per feature): imported sets only
SAVE_DTYPES = ("float32", "float16", "bfloat16")

# What a transcoder reads and writes, as activation points (core.models.hooks): the MLP's input
# after its norm, and the MLP's output. SAELens calls these an SAE's hook_name and hook_name_out.
HOOK_POINT = "ln2_normalized"
HOOK_POINT_OUT = "mlp_out"

# Formats a set and its feature store are written in (`transcoders export --format`): SAELens'
# folders (cfg.json + sae_weights.safetensors + sparsity.safetensors per layer, see
# core.interp.saelens) and the JSON Neuronpedia / SAEDashboard load (see core.interp.neuronpedia).
EXPORT_FORMATS = ("saelens", "neuronpedia")
# Whether an imported transcoder read ln2.hook_normalized *before* the norm's weight and bias (a
# TransformerLens model loaded with fold_ln, its default), so that affine must be folded into its
# encoder: "auto" reads the folder's metadata (model_from_pretrained_kwargs), "yes" / "no" decide.
FOLD_LN = ("auto", "yes", "no")
NEURONPEDIA_SET = "gptlab-tc"                    # Neuronpedia source set: layer 3's source is "3-gptlab-tc"

DESCRIBE_N_TOP = 10                              # top contexts an explainer is shown per feature
DESCRIBE_BATCH = {"builtin": 256, "lm": 16}      # features per explainer call and per commit
EXPLAIN_MAX_NEW_TOKENS = 24                      # tokens generated for an explained completion
EXPLAIN_TOP_FEATURES = 5                         # features listed per layer of an explained completion
EXPLAIN_TOP_FEATURES_MAX = 20
MAX_STEPS = 100_000_000                          # transcoder training steps (the trainer's own --max-steps limit)
MAX_KEPT = 100_000                               # contexts kept per feature and kind (top, quantile, held-out)
MAX_WINDOW = 1 << 20                             # context tokens around an activation (the longest context a model has)

# Explanation scores (core.interp.scoring): `transcoders describe --scores` picks among these.
SCORE_METHODS = ("detection", "fuzzing", "simulation")
# Simulation windows per side (firing, and silent: random and hard negatives mixed in the store's
# ratio), taken in the store's random order: None is every held-out window. A language-model
# simulator makes one call per window, so it gets a small sample by default; the rule simulator
# costs nothing and reads them all (its sample starts with the LM's, so the two compare).
SIM_WINDOWS = {"builtin": None, "lm": 10}
SIM_SCALE = 10                                   # an LM simulator predicts each token's activation as 0..SIM_SCALE
SIM_ANSWER_TOKENS = (5, 24)                      # an LM simulator's answer: at most 5 tokens per window token + 24

C = TypeVar("C")


def check_score_methods(methods: "Sequence[str] | str | None") -> tuple[str, ...]:
    """Scores to compute, in :data:`SCORE_METHODS` order: None is all of them; a string is a
    comma-separated list (``--scores detection,simulation``). LabError names an unknown one."""
    if methods is None:
        return SCORE_METHODS
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in SCORE_METHODS]
    if unknown:
        raise LabError(f"--scores takes {', '.join(SCORE_METHODS)} (comma-separated); '{unknown[0]}' is none of them.")
    if not methods:
        raise LabError(f"--scores names no score; pass some of {', '.join(SCORE_METHODS)}, or --no-score for none.")
    return tuple(m for m in SCORE_METHODS if m in methods)


def transcoder_hooks(layer: int) -> tuple[str, str]:
    """``(the activation transcoder `layer` reads, the one it writes)``, e.g.
    ``("blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out")``."""
    return act_name(HOOK_POINT, layer), act_name(HOOK_POINT_OUT, layer)


class _Dict:
    """``to_dict`` / ``from_dict`` for a config dataclass (SAELens' habit: a config is plain data)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class TranscoderConfig(_Dict):
    """The shape and sparsity rule of one transcoder (the same for every layer of a set)."""

    d_model: int
    n_features: int
    activation: str = "topk"        # one of ACTIVATIONS
    k: int = 32                     # active features per token (topk)
    l1_coeff: float = 3e-4          # L1 weight on activations (relu), relative to the normalised MSE
    # What it was trained to write: hook_mlp_out (False), or hook_mlp_out less its mean over d_model
    # (True: a TransformerLens model with center_writing_weights, its default). Splicing it in is the
    # same either way (every norm after it removes the mean); FVE is measured against this target.
    target_centered: bool = False

    def check(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise LabError(f"Transcoder activation must be one of {', '.join(ACTIVATIONS)} (got '{self.activation}').")
        if self.d_model < 1 or self.n_features < 1:
            raise LabError(f"Transcoder sizes must be positive (d_model={self.d_model}, features={self.n_features}).")
        if self.activation == "topk" and not 1 <= self.k <= self.n_features:
            raise LabError(f"--k must be between 1 and the number of features ({self.n_features}); got {self.k}.")
        if self.activation == "relu" and self.l1_coeff < 0:
            raise LabError(f"--l1-coeff must be 0 or more (got {self.l1_coeff}).")


@dataclass
class TranscoderTrainConfig(_Dict):
    """Everything that decides what a training run makes (saved in the set's config.json)."""

    layers: list[int] | None = None     # None: every layer
    expansion: int = 8                  # features = expansion * d_model
    activation: str = TranscoderConfig.activation
    k: int = TranscoderConfig.k
    l1_coeff: float = TranscoderConfig.l1_coeff
    train_tokens: int = 500_000         # tokens per layer; ignored when steps is set
    steps: int | None = None
    batch_tokens: int = 1024            # tokens per optimiser step
    lr: float = 1e-3
    warmup_steps: int = 50
    decay_fraction: float = 0.2         # the final share of steps decays linearly to 0
    seq_len: int = 128                  # corpus windows the model reads (capped at its context)
    model_batch: int = 16               # windows per model forward
    buffer_batches: int = 8             # model batches mixed in one shuffle buffer
    aux_k: int = 64                     # topk: dead features used by the auxiliary loss
    aux_coeff: float = 1 / 32
    dead_tokens: int = 200_000          # a feature silent this long counts as dead (aux loss)
    dataset: str = "shakespeare"
    max_corpus_tokens: int | None = None
    val_windows: int = 64               # validation windows for the final quality numbers
    eval_every: int = 0                 # quick validation FVE every N steps (0 = only at the end)
    save_every: int = 0                 # save the set every N steps when out_dir is given (0 = end only)
    save_dtype: str = "float32"         # one of SAVE_DTYPES
    seed: int = 0

    def check(self) -> None:
        if self.activation not in TRAIN_ACTIVATIONS:
            raise LabError(f"--activation must be one of {', '.join(TRAIN_ACTIVATIONS)} (got '{self.activation}'); "
                           f"other kinds come in through `transcoders import`.")
        positive = ("expansion", "batch_tokens", "seq_len", "model_batch", "buffer_batches", "val_windows")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise LabError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)}).")
        if self.steps is not None and self.steps < 1:
            raise LabError(f"--steps must be at least 1 (got {self.steps}).")
        if self.steps is None and self.train_tokens < self.batch_tokens:
            raise LabError(f"--train-tokens ({self.train_tokens}) is less than one step of --batch-tokens "
                           f"({self.batch_tokens}); raise it.")
        if self.total_steps > MAX_STEPS:
            flag = "--steps" if self.steps is not None else "--train-tokens / --batch-tokens"
            raise LabError(f"{flag} asks for {self.total_steps:,} steps, more than the {MAX_STEPS:,} GPT Lab trains; "
                           f"ask for fewer.")
        check_seed(self.seed)
        if not self.lr > 0:
            raise LabError(f"--lr must be above 0 (got {self.lr}).")
        if self.save_dtype not in SAVE_DTYPES:
            raise LabError(f"--save-dtype must be one of {', '.join(SAVE_DTYPES)} (got '{self.save_dtype}').")
        if not 0 <= self.decay_fraction <= 1:
            raise LabError(f"decay_fraction must be in [0, 1] (got {self.decay_fraction}).")

    @property
    def total_steps(self) -> int:
        return self.steps if self.steps is not None else max(1, self.train_tokens // self.batch_tokens)


@dataclass
class CollectConfig(_Dict):
    """What a feature store is collected from and how much of it is kept."""

    layers: list[int] | None = None   # None: every layer of the set
    n_tokens: int = 262_144           # corpus tokens scanned
    seq_len: int = 64                 # window the model reads (capped at its context)
    batch_size: int = 32              # windows per forward pass
    top_k: int = 20                   # strongest windows kept per feature (shown to explainers)
    n_quantile: int = 10              # samples across the activation range
    n_heldout: int = 50               # held-out activating windows (scoring only)
    n_negative: int = 50              # held-out windows where the feature is silent (scoring only)
    n_hard: int = 25                  # held-out windows holding one of its top tokens, yet silent (scoring only)
    n_hard_tokens: int = 5            # how many of its top tokens make a window a hard negative
    holdout_every: int = 5            # every N-th window is held out
    window_before: int = 12           # context tokens kept before the activation
    window_after: int = 4             # and after it
    n_logit_tokens: int = 10          # promoted / suppressed tokens listed
    n_top_tokens: int = 10            # most frequent activating tokens listed
    dataset: str = "shakespeare"
    seed: int = 0

    def check(self) -> None:
        for name in ("n_tokens", "seq_len", "batch_size", "top_k", "holdout_every"):
            if int(getattr(self, name)) < 1:
                raise LabError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)}).")
        for name in ("n_quantile", "n_heldout", "n_negative", "n_hard", "n_hard_tokens", "window_before",
                     "window_after", "n_logit_tokens", "n_top_tokens"):
            if int(getattr(self, name)) < 0:
                raise LabError(f"--{name.replace('_', '-')} must be 0 or more (got {getattr(self, name)}).")
        if self.holdout_every < 2 and (self.n_heldout or self.n_negative or self.n_hard):
            raise LabError("--holdout-every must be at least 2 so some windows are held out for scoring.")
        for name in ("top_k", "n_quantile", "n_heldout", "n_negative", "n_hard"):
            if int(getattr(self, name)) > MAX_KEPT:
                raise LabError(f"--{name.replace('_', '-')} must be at most {MAX_KEPT:,} contexts per feature "
                               f"(got {getattr(self, name):,}).")
        for name in ("window_before", "window_after"):
            if int(getattr(self, name)) > MAX_WINDOW:
                raise LabError(f"--window takes at most {MAX_WINDOW:,} tokens on each side (got {getattr(self, name):,} "
                               f"{name.split('_')[1]}).")
        check_seed(self.seed)


__all__ = ["ACTIVATIONS", "TRAIN_ACTIVATIONS", "EXPORT_FORMATS", "FOLD_LN", "NEURONPEDIA_SET", "SAVE_DTYPES", "HOOK_POINT", "HOOK_POINT_OUT", "DESCRIBE_N_TOP", "DESCRIBE_BATCH",
           "EXPLAIN_MAX_NEW_TOKENS", "EXPLAIN_TOP_FEATURES", "EXPLAIN_TOP_FEATURES_MAX", "SCORE_METHODS", "SIM_WINDOWS",
           "SIM_SCALE", "SIM_ANSWER_TOKENS", "check_score_methods", "TranscoderConfig",
           "TranscoderTrainConfig", "CollectConfig", "transcoder_hooks"]
