"""Settings of the app's server process, made once when its first page runs: they keep the page's
own work (decoding, drawing) from waiting on things that are not the page's.

- **Torch threads.** The browser showing the page usually runs on the same machine, and it draws
  while the engine decodes (the live text, Streamlit's running indicator). With one torch thread
  per core, a parallel operation waits at its end for the thread the browser's drawing pushed off
  its core: on a 2-core machine the Generate page wrote 50 tokens of the default model at 72-246
  tokens/s with torch's default of 2 threads, and at 279-385 with 1. So the server leaves a core:
  ``min(torch's default, usable cores - 1)`` threads, at least 1. ``OMP_NUM_THREADS`` set by the
  user wins. The command line, with no browser beside it, keeps torch's default.
- **Garbage collection.** A full collection walks every tracked object (~110 ms for the imports
  alone on this CPU) and holds the interpreter lock meanwhile, so the page's messages wait behind
  it. Streamlit's collection after every script run is off in .streamlit/config.toml
  (``runner.postScriptGC``), and what the imports built (torch, transformers, Streamlit: ~300,000
  objects that live as long as the process) is set aside from the collections Python still starts
  by itself. Models are not set aside: a model the cache drops must stay collectable.
"""
from __future__ import annotations

import gc
import os

import torch

from core.devices import usable_cores

_PREPARED = False


def server_threads(default: int, cores: int) -> int:
    """Torch threads for the app's server: one core left to the browser, never more than torch's
    ``default``, at least 1."""
    return max(1, min(default, cores - 1))


def prepare_server_process() -> None:
    """Once per process: the torch threads and the garbage collector, as the module docstring says."""
    global _PREPARED
    if _PREPARED:
        return
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(server_threads(torch.get_num_threads(), usable_cores()))
    gc.collect()  # only what is alive is set aside
    gc.freeze()
    _PREPARED = True
