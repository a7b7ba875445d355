"""Device and dtype choice, shared by every command and page."""
from __future__ import annotations

import os

import torch

from .errors import LabError, fmt_bytes
from .models.config import DEFAULT_DTYPE, DTYPE_NAMES

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}  # the names are stated once, torch-free


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity where the system tells it, which a
    container or `taskset` narrows below the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def available_devices() -> list[str]:
    """Devices a user can pick: ``cpu``, each ``cuda:N``, and ``auto`` when a GPU exists."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        out.insert(0, "auto")
    return out


def resolve_device(device: str | None) -> str:
    """Turn ``None``/``auto``/``cuda``/``cuda:N``/``cpu`` into a concrete device string.

    ``auto`` stays ``auto`` only for Hugging Face loading (accelerate's device_map); everything
    else needs a single device, so callers that cannot shard get ``cuda:0`` or ``cpu``.
    """
    d = (device or "cpu").strip().lower()
    if d == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if d == "cuda":
        d = "cuda:0"
    if d == "cpu":
        return d
    if d.startswith("cuda:") and d[5:].isdigit():
        if not torch.cuda.is_available():
            raise LabError(f"Device {d} was asked for but no CUDA GPU is visible; use --device cpu.")
        n = torch.cuda.device_count()
        if int(d[5:]) >= n:
            raise LabError(f"Device {d} does not exist: this machine has {n} GPU(s) (cuda:0..cuda:{n - 1}).")
        return d
    raise LabError(f"Unknown device '{device}'; use cpu, cuda, cuda:N or auto.")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return DTYPES[DEFAULT_DTYPE]
    if isinstance(dtype, torch.dtype):
        return dtype
    key = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(dtype, dtype)
    if key not in DTYPES:
        raise LabError(f"Unknown dtype '{dtype}'; use one of {', '.join(DTYPES)}.")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype).replace("torch.", ""))


def free_bytes(device: str | torch.device) -> int | None:
    """Memory a new allocation on ``device`` can still get: MemAvailable for the CPU (Linux), the
    free memory the driver reports for a GPU; None where it cannot be told. Jobs check their
    estimated need against it up front, so an impossible size ends in a message instead of the
    kernel's out-of-memory killer ending the process (or a neighbour)."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):  # "auto" and the like: not one device
        return None
    if d.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(d)[0])
        except Exception:  # no driver, a busy or lost device: nothing to go by
            return None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def require_free(need: int, device: str | torch.device, what: str, advice: str, detail: str = "") -> None:
    """Refuse, before anything is allocated, work whose ``need`` in bytes exceeds what ``device``
    has free (a device whose free memory cannot be told passes). The one sentence reads
    "{what} about {need}{detail}, more than the {free} free on {device}; {advice}"."""
    free = free_bytes(device)
    if free is not None and need > free:
        raise LabError(f"{what} about {fmt_bytes(need)}{detail}, more than the {fmt_bytes(free)} free on {device}; "
                       f"{advice}")
