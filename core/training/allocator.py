"""Keep a CPU training process's freed memory for reuse.

A training step allocates and frees the same few hundred MB of activations every step. glibc's
malloc serves blocks above its mmap threshold (at most 32 MB) with fresh ``mmap`` calls and hands
them back on ``free``, so each step faults all of its large activations in anew: ~70,000 page
faults a step for the shipped default's shape (batch 8 x 256 tokens, vocabulary 8192), 10-20% of a
CPU step, more inside a virtual machine. Serving everything from the heap and never trimming it
turns those into reuse, as CUDA's caching allocator does on a GPU. The price is that the process
keeps its peak memory until it exits, which is what a training process does anyway.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_KEEP = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 2**31 - 1}
# glibc's defaults once its dynamic mmap threshold has risen to its ceiling: what a long-running
# process that never called mallopt converges to (bench/training.py times its plain loop so).
_GLIBC = {_M_MMAP_MAX: 65536, _M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: 64 << 20}


def _mallopt():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other libcs without mallopt
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


def keep_freed_memory(keep: bool = True) -> bool:
    """Ask glibc (Linux) to serve large blocks from the heap and never trim it; True if it took.

    Process-wide and lasting, so only training processes call it (``keep=False`` goes back to
    glibc's settings). Elsewhere (macOS, musl, Windows) it does nothing and returns False.
    """
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return all(bool(mallopt(k, v)) for k, v in (_KEEP if keep else _GLIBC).items())
