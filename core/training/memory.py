"""Whether a training run fits its device, told before its process starts.

The trainer checks a GPU batch once its model is built (``Trainer._check_memory``); a model too
big to build at all (the Training page goes up to 1024 layers of width 65536), or any run on the
CPU, would instead start a process that dies in the kernel's out-of-memory killer, or takes a
neighbour with it. This check needs no model: the parameter count follows from the config, and
the bytes from :func:`core.training.metrics.estimate_training_bytes`, the trainer's own estimate.
"""
from __future__ import annotations

from .. import devices as _devices
from .config import TrainConfig
from .metrics import estimate_training_bytes

GPT2_VOCAB = 50257


def vocab_for(cfg: TrainConfig) -> int:
    """The vocabulary the run's model gets, at most (our BPE: the size asked for; GPT-2's: 50,257)."""
    return GPT2_VOCAB if cfg.tokenizer in ("gpt2", "tiktoken", "tiktoken:gpt2") else int(cfg.vocab_size)


def parameter_count(cfg: TrainConfig, vocab_size: int) -> int:
    """``GPT(cfg.gpt_config(...)).num_params()`` without building the model: per block two layer
    norms, attention (4 d^2 + 4 d) and the 4x MLP (8 d^2 + 5 d); token and position embeddings
    (the output layer shares the token embedding); the final norm."""
    sizes = cfg.model_sizes()
    L, d = int(sizes["n_layer"]), int(sizes["d_model"])
    return L * (12 * d * d + 13 * d) + (int(vocab_size) + int(cfg.block_size)) * d + 2 * d


def check_fits(cfg: TrainConfig, device: str, devices: list[int] | None = None) -> int:
    """Raise LabError, saying what to shrink, when the run cannot fit in the free memory of its
    device (under DDP every GPU holds a whole replica); returns the estimate in bytes. A device
    whose free memory cannot be told passes."""
    sizes = cfg.model_sizes()
    vocab = vocab_for(cfg)
    params = parameter_count(cfg, vocab)
    need = estimate_training_bytes(params, batch_size=int(cfg.batch_size), context=int(cfg.block_size),
                                   n_layer=int(sizes["n_layer"]), d_model=int(sizes["d_model"]), vocab_size=vocab,
                                   amp=bool(cfg.amp))
    for target in ([f"cuda:{i}" for i in devices] if devices else [device]):
        _devices.require_free(need, target, "This run needs",
                              "use fewer layers, a smaller d_model, a smaller batch size or a shorter block size.",
                              detail=f" ({params / 1e6:,.1f} M parameters with their gradients and optimizer state, "
                                     f"and micro-batches of {cfg.batch_size} x {cfg.block_size} tokens)")
    return need
