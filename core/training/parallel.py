"""Sharded data parallelism (FSDP2) for our GPT, and the choice between it and DDP.

``--parallel fsdp`` shards every parameter, gradient and optimizer moment over the processes
with PyTorch's own ``fully_shard``: once per transformer block, then once at the root (the
embeddings, the final norm and the tied head), as torchtitan does. A block's full weights exist
only while it computes: gathered before its forward and its backward, freed after.

The model is built on the meta device (shapes, no memory), sharded, and only then given storage,
so a model larger than one device is never materialised whole. Its initial weights are still
exactly those of a one-process run with the same seed: the random draws of ``GPT.__init__`` are
replayed one module at a time, then ``GPT.reset_parameters`` runs over one full parameter at a
time, of which each rank keeps its shard. That is what lets the tests compare an FSDP run with a
single process step for step.

``--amp`` under FSDP is a :class:`MixedPrecisionPolicy`: parameters are gathered in the 16-bit
type and gradients reduced in float32, while the sharded master weights and the optimizer stay
in float32. ``--activation-checkpointing`` (either mode) keeps only each block's input for the
backward pass and recomputes the rest.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..errors import LabError
from ..models.gpt import GPT, GPTConfig


def choose_parallel(asked: str, replica_bytes: int, free_bytes: int | None) -> tuple[str, str]:
    """``(mode, why)``: the mode asked for, or for ``auto`` DDP when a whole replica (weights,
    gradients, optimizer state, activations) fits the device's free memory, FSDP otherwise."""
    if asked in ("ddp", "fsdp"):
        return asked, f"--parallel {asked}"
    if free_bytes is None or replica_bytes <= free_bytes:
        room = "" if free_bytes is None else f" in the {free_bytes / 1e9:,.1f} GB free"
        return "ddp", f"auto: a whole replica (about {replica_bytes / 1e9:,.1f} GB) fits{room}"
    return "fsdp", (f"auto: a whole replica needs about {replica_bytes / 1e9:,.1f} GB, more than the "
                    f"{free_bytes / 1e9:,.1f} GB free, so the model is sharded")


def check_fsdp_options(optimizer: str) -> None:
    if optimizer == "muon":
        raise LabError("--optimizer muon needs each weight matrix whole, which --parallel fsdp splits over the "
                       "processes; use --optimizer adamw with FSDP, or --parallel ddp.")


def checkpoint_blocks(model: GPT) -> None:
    """Activation checkpointing: each block keeps only its input during training and recomputes
    its activations in the backward pass (non-reentrant, so it composes with FSDP's hooks, which
    gather the block's weights before its backward and so before the recompute)."""
    for block in model.transformer.h:
        inner = block.forward

        @functools.wraps(inner)
        def forward(x, cache=None, layer=0, _inner=inner, _block=block):
            if cache is None and _block.training and torch.is_grad_enabled():
                return checkpoint(_inner, x, None, layer, use_reentrant=False)
            return _inner(x, cache, layer)

        block.forward = forward


def device_mesh(device: torch.device, world: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world,))


def build_sharded_gpt(config: GPTConfig, *, seed: int, device: torch.device, world: int,
                      param_dtype: torch.dtype | None, activation_checkpointing: bool) -> GPT:
    """Our GPT sharded over the process group with FSDP2, initialised as a one-process run with
    ``torch.manual_seed(seed)`` would be, without ever holding the whole model."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(config)
    if any(True for _ in model.buffers()):
        raise LabError("The model has buffers, which meta-device initialisation does not fill; use --parallel ddp.")
    _replay_constructor_draws(model)  # the CPU generator now stands where GPT(config) leaves it
    if activation_checkpointing:
        checkpoint_blocks(model)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    mesh = device_mesh(device, world)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    model.to_empty(device=device)
    GPT.reset_parameters(_OneParameterAtATime(model))
    return model


def _replay_constructor_draws(model: GPT) -> None:
    """Draw, and drop, the random numbers ``GPT.__init__`` draws when built on the CPU: each
    module's own default initialisation, in construction (= registration) order, on a throwaway
    CPU twin of that one module. Modules without random draws are skipped; a parametrised module
    of an unknown kind is an error, so a change to the GPT cannot silently change the init."""
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
        elif isinstance(mod, nn.Embedding):
            nn.Embedding(mod.num_embeddings, mod.embedding_dim, padding_idx=mod.padding_idx)
        elif isinstance(mod, nn.LayerNorm):
            continue  # ones and zeros
        elif any(True for _ in mod.parameters(recurse=False)):
            raise LabError(f"Cannot initialise a {type(mod).__name__} on the meta device; use --parallel ddp.")


class _OneParameterAtATime:
    """Stands in for the model in ``GPT.reset_parameters``: it hands out each parameter as a
    full-size CPU tensor, and once the init has filled it, copies this rank's shard into the
    sharded parameter and lets the full tensor go. Peak memory: the largest single parameter."""

    def __init__(self, model: GPT):
        self.model, self.config = model, model.config

    def named_parameters(self):
        from torch.distributed.tensor import DTensor, distribute_tensor

        for name, p in self.model.named_parameters():
            full = torch.empty(p.shape, dtype=p.dtype, device="cpu")
            yield name, full
            with torch.no_grad():
                if isinstance(p, DTensor):
                    local = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
                    p.to_local().copy_(local)
                else:
                    p.copy_(full)


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a gradient norm, say); any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t
