"""Memory order of weight matrices for decoding on the CPU.

Decoding one token multiplies a single row by every weight matrix once, so it is bound by how
fast the CPU streams the matrices. Measured on this project's x86 CPUs (oneDNN, 2 threads), a
matrix stored ``(in, out)`` streams at ~18 GB/s and one stored ``(out, in)`` (``nn.Linear``'s
order) at ~11 GB/s, except where ``in`` is the larger side (the MLP's down projection), which
streams faster the other way round. Re-storing each matrix in its faster order keeps its values
and its shape (only the strides change, so every module, hook and state-dict name still works)
and makes CPU decoding ~1.2-1.4x faster; ``bench/generation.py`` measures it.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def _conv1d_type() -> type | None:
    try:  # here, not at the top: transformers costs a second, and only its models have Conv1D layers
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers missing or moved: our own GPT still benefits
        return None
    return Conv1D


def _restride(p: nn.Parameter, row_major: bool) -> bool:
    """Store ``p`` row-major (``row_major``) or column-major; True if anything moved."""
    if row_major:
        if p.is_contiguous():
            return False
        p.data = p.data.contiguous()
    else:
        if p.t().is_contiguous():
            return False
        p.data = p.data.t().contiguous().t()
    return True


@torch.no_grad()
def use_decode_layout(model: nn.Module) -> int:
    """Re-store ``model``'s projection matrices in the order the CPU streams fastest.

    Meant for models loaded for inference on the CPU (``core.models.loading.load_model`` calls it); the
    values are untouched and tied weights stay tied. Returns how many matrices moved.
    """
    conv1d = _conv1d_type()
    moved = 0
    seen: set[int] = set()
    for module in model.modules():
        w = getattr(module, "weight", None)
        if not isinstance(w, nn.Parameter) or w.dim() != 2 or id(w) in seen or w.device.type != "cpu":
            continue
        if isinstance(module, nn.Linear):
            n_out, n_in = w.shape  # row-major here is (out, in) storage
            moved += _restride(w, row_major=n_out < n_in)
        elif conv1d is not None and isinstance(module, conv1d):
            n_in, n_out = w.shape
            moved += _restride(w, row_major=n_out >= n_in)
        else:
            continue
        seen.add(id(w))
    return moved
