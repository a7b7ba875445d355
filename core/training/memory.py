"""Whether a training run fits its devices, told before its process starts, under DDP and under FSDP.

The trainer checks a GPU batch once its model is built (``Trainer._check_memory``); a model too
big to build at all (the Training page goes up to 1024 layers of width 65536), or any run on the
CPU, would instead start a process that dies in the kernel's out-of-memory killer, or takes a
neighbour with it. This check needs no model: the parameter count follows from the config, and
the bytes from :func:`core.training.metrics.estimate_training_bytes`, the trainer's own estimate.

Under DDP every GPU holds a whole replica: weights, gradients and AdamW's two moments in float32
(16 bytes a parameter) plus the activations of its micro-batch. Under FSDP those 16 bytes are
split over the processes, and each GPU also holds, for a moment, the gathered weights and
gradients of the block it computes (two blocks with prefetching) and of the root (embeddings and
head); activations are per process either way, and activation checkpointing keeps only each
block's input. :func:`fits_table` turns this into "which preset fits on how many GPUs", for
``python -m core models`` and the Training form.
"""
from __future__ import annotations

import math

from .. import devices as _devices
from ..errors import LabError
from ..models.config import PRESETS
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


def training_bytes(n_params: int, *, n_layer: int, d_model: int, vocab_size: int, batch_size: int, context: int,
                   amp: bool, parallel: str = "ddp", world: int = 1, activation_checkpointing: bool = False) -> int:
    """A rough upper estimate of one GPU's training memory under ``parallel`` over ``world`` GPUs."""
    tokens = batch_size * context
    act_bytes = 1 if amp else 2  # estimate_training_bytes counts 34 * d bytes per token and layer at 16 bits
    full = estimate_training_bytes(n_params, batch_size=batch_size, context=context, n_layer=n_layer,
                                   d_model=d_model, vocab_size=vocab_size, amp=amp)
    states = n_params * 16
    activations = tokens * n_layer * 34 * d_model * act_bytes
    if activation_checkpointing:  # each block's input kept, one block's activations live at a time
        activations = tokens * d_model * (2 * act_bytes) * n_layer + tokens * 34 * d_model * act_bytes
    rest = full - states - tokens * n_layer * 34 * d_model * act_bytes  # logits and their gradient
    if parallel != "fsdp":
        return int(states + activations + rest)
    w = 2 if amp else 4
    block = 12 * d_model * d_model + 13 * d_model
    root = max(0, n_params - n_layer * block)
    gathered = 2 * 2 * block * w + 2 * root * w  # two blocks' weights and gradients in flight, and the root's
    return int(math.ceil(states / max(1, world)) + gathered + activations + rest)


def check_fits(cfg: TrainConfig, device: str, devices: list[int] | None = None, nnodes: int = 1,
               nproc: int | None = None) -> int:
    """Raise LabError, saying what to shrink or how many GPUs would hold it, when the run cannot fit in
    the free memory of its devices; returns the estimate in bytes (per GPU). Under DDP every GPU holds
    a whole replica; under FSDP (``--parallel fsdp``, or ``auto`` when a replica does not fit) the
    states are split over every process of every node. A device whose free memory cannot be told passes."""
    sizes = cfg.model_sizes()
    vocab = vocab_for(cfg)
    params = parameter_count(cfg, vocab)
    world = max(1, (len(devices or []) or int(nproc or 1)) * max(1, nnodes))
    kw = dict(n_layer=int(sizes["n_layer"]), d_model=int(sizes["d_model"]), vocab_size=vocab,
              batch_size=int(cfg.batch_size), context=int(cfg.block_size), amp=bool(cfg.amp),
              activation_checkpointing=bool(cfg.activation_checkpointing))
    ddp = training_bytes(params, parallel="ddp", world=world, **kw)
    fsdp = training_bytes(params, parallel="fsdp", world=world, **kw)
    targets = [f"cuda:{i}" for i in devices] if devices else [device]
    free = [_devices.free_bytes(t) for t in targets]
    least = min((f for f in free if f is not None), default=None)
    mode = cfg.parallel
    if mode == "auto":
        mode = "ddp" if least is None or ddp <= least or world == 1 else "fsdp"
    need = fsdp if mode == "fsdp" else ddp
    if least is not None and need > least:
        hint = ""
        if targets[0].startswith("cuda"):
            gpus = gpus_needed(params, least, **kw)
            hint = " --activation-checkpointing also helps" + \
                (f", and FSDP over {gpus} such GPUs would hold it (--parallel fsdp, more --cuda or --nnodes)"
                 if gpus is not None and gpus > world else "") + "."
        for target in targets:
            _devices.require_free(need, target, "This run needs",
                                  "use fewer layers, a smaller d_model, a smaller batch size or a shorter block size."
                                  + hint,
                                  detail=f" per {'GPU' if targets[0].startswith('cuda') else 'process'} under "
                                         f"{mode.upper()} ({params / 1e6:,.1f} M parameters with their gradients and "
                                         f"optimizer state, and micro-batches of {cfg.batch_size} x "
                                         f"{cfg.block_size} tokens)")
    return need


def gpus_needed(params: int, device_bytes: int, **kw) -> int | None:
    """The fewest GPUs of ``device_bytes`` each that hold the run under FSDP (None: not even 4096,
    because the activations or the gathered blocks alone exceed one GPU)."""
    n = 1
    while n <= 4096:
        if training_bytes(params, parallel="fsdp", world=n, **kw) <= device_bytes:
            return n
        n *= 2
    return None


REFERENCE_GPU_BYTES = 80 * 10**9   # an 80 GB GPU (A100/H100) when no GPU is visible here


def fits_table(device_bytes: int | None = None, *, vocab_size: int = GPT2_VOCAB, context: int = 1024,
               batch_size: int = 1, amp: bool = True) -> dict:
    """Per preset: memory per GPU under DDP (and whether one GPU holds it), and the GPUs FSDP needs
    with activation checkpointing and the memory each then uses; for GPUs of ``device_bytes``."""
    if device_bytes is None:
        device_bytes = REFERENCE_GPU_BYTES
    rows = []
    for name, sizes in PRESETS.items():
        cfg = TrainConfig(preset=name, block_size=context, batch_size=batch_size, amp=amp, tokenizer="gpt2")
        params = parameter_count(cfg, vocab_size)
        kw = dict(n_layer=sizes["n_layer"], d_model=sizes["d_model"], vocab_size=vocab_size, batch_size=batch_size,
                  context=context, amp=amp)
        ddp = training_bytes(params, parallel="ddp", **kw)
        ckpt = dict(kw, activation_checkpointing=True)
        gpus = gpus_needed(params, device_bytes, **ckpt)
        rows.append({"preset": name, "parameters": params, "ddp_gb_per_gpu": round(ddp / 1e9, 1),
                     "ddp_fits": ddp <= device_bytes, "fsdp_gpus": gpus,
                     "fsdp_gb_per_gpu": None if gpus is None else
                     round(training_bytes(params, parallel="fsdp", world=gpus, **ckpt) / 1e9, 1)})
    return {"gpu_gb": round(device_bytes / 1e9, 1), "batch": batch_size, "context": context, "amp": amp,
            "rows": rows}


def describe_fit(cfg: TrainConfig, device_bytes: int | None = None) -> str:
    """One line for the Training form: this run's memory per GPU under DDP, and under FSDP the GPUs
    it needs (of ``device_bytes`` each, the visible GPU's or 80 GB)."""
    try:
        sizes = cfg.model_sizes()
    except LabError:
        return ""
    gpu = device_bytes or REFERENCE_GPU_BYTES
    vocab = vocab_for(cfg)
    params = parameter_count(cfg, vocab)
    kw = dict(n_layer=int(sizes["n_layer"]), d_model=int(sizes["d_model"]), vocab_size=vocab,
              batch_size=int(cfg.batch_size), context=int(cfg.block_size), amp=bool(cfg.amp),
              activation_checkpointing=bool(cfg.activation_checkpointing))
    ddp = training_bytes(params, parallel="ddp", **kw)
    gpus = gpus_needed(params, gpu, **kw)
    fsdp = "no number of GPUs (shrink the micro-batch or context)" if gpus is None else \
        f"{gpus} GPU{'s' if gpus > 1 else ''} at {training_bytes(params, parallel='fsdp', world=gpus, **kw) / 1e9:,.1f} GB each"
    return (f"{params / 1e6:,.1f} M parameters: about {ddp / 1e9:,.1f} GB per GPU under DDP "
            f"({'fits' if ddp <= gpu else 'does not fit'} a {gpu / 1e9:,.0f} GB GPU); under FSDP: {fsdp}.")


def visible_gpu_bytes() -> int | None:
    """The memory of this machine's first GPU, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.get_device_properties(0).total_memory)


def fit_lines(table: dict, measured: bool) -> list[str]:
    """:func:`fits_table` as the lines ``python -m core models`` prints under the presets."""
    where = f"GPUs of {table['gpu_gb']:g} GB (this machine's)" if measured else \
        f"GPUs of {table['gpu_gb']:g} GB (none visible here)"
    lines = [f"Memory to train each preset on {where} (micro-batch {table['batch']} x {table['context']} tokens, "
             f"{'bf16 autocast' if table['amp'] else 'float32'}, AdamW):",
             f"  {'name':<14}{'DDP, per GPU':>16}  FSDP with activation checkpointing"]
    for r in table["rows"]:
        ddp = f"{r['ddp_gb_per_gpu']:,.1f} GB" + ("" if r["ddp_fits"] else " (no)")
        if r["fsdp_gpus"] is None:
            fsdp = "does not fit any number of GPUs"
        else:
            fsdp = f"{r['fsdp_gpus']} GPU{'s' if r['fsdp_gpus'] > 1 else ''} x {r['fsdp_gb_per_gpu']:,.1f} GB"
        lines.append(f"  {r['preset']:<14}{ddp:>16}  {fsdp}")
    return lines
