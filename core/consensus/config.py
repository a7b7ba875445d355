"""Consensus settings, their defaults and choice lists, stated once: the CLI's flags and the
Consensus page's widgets read them from here. No torch: ``python -m core consensus --help`` stays fast.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ..errors import LabError, shorten
from ..generation.config import check_seed
from ..interventions.spec import parse_specs

REINIT_MODES = ("none", "once", "iteration", "block")
# "block": one block at a time, statistics after each (finest stopping, least memory);
# "iteration": a whole iteration at a time, the statistics of its L block outputs in one batched pass;
# "graph": "iteration" captured once as a CUDA graph and replayed (no per-kernel launch cost);
# "auto": "graph" on a single CUDA device when the iteration's buffers fit, else "block".
ENGINES = ("auto", "block", "iteration", "graph")
FUSED_BUDGET = 1024 ** 3  # bytes of device scratch an iteration-at-a-time engine may use
MIN_GRAPH_ITERATIONS = 8  # below this, warm-up and capture (about 3 iterations) cost more than they save
DEFAULT_ITERATIONS = 1000  # the GPT-Neo script's default for --size (the GPT-2 script used 2000)
DEFAULT_MEMORY_BUDGET = 2 * 1024 ** 3  # bytes a run may allocate, all told (see engine.memory_plan)
MAX_MEMORY_BUDGET = 1 << 50  # 1 PiB: a budget above any machine is a typo, not a wish
GB = 1024 ** 3  # the unit budgets are typed in (--memory-budget)
DEVICE_CHUNK_BUDGET = 256 * 1024 ** 2  # bytes of device buffer between two copies to the host (at most)
# A run's time is measured, not guessed (core.consensus.estimate): after PACE_SAMPLE_S seconds the CLI
# knows its pace, and a run that will take longer than LONG_RUN_S in all is announced with how to stop
# or shrink it (never refused: long runs are what the paper's experiments are).
PACE_SAMPLE_S = 2.0
LONG_RUN_S = 10 * 60

# The Consensus page starts smaller than the scripts, so a first run answers in seconds (the scripts'
# values are a click away): its starting values are stated here, beside the defaults they shadow.
PAGE_ITERATIONS = 20
PAGE_NEW_TOKENS = 10
PAGE_INITS = 4

PromptLike = str | Sequence[int]


@dataclass
class ConsensusConfig:
    """What to run. ``iterations`` is the scripts' ``--size N``."""

    iterations: int = DEFAULT_ITERATIONS
    skip_mlp: bool = False
    reinit: str = "none"  # one of REINIT_MODES, see the module docstring for the seed sequences
    seed: int = 42
    record_every: int = 1  # keep every k-th layer-step (plus 0 and the last)
    matrix: bool = False  # record the T x T token cosine matrix at every recorded column
    decode_iterations: tuple[int, ...] = ()  # logit-lens argmax decoding after these iterations (0-based)
    memory_budget: int = DEFAULT_MEMORY_BUDGET  # bytes; a bigger recording raises LabError up front
    max_events: int = 100  # about this many Progress events per run, however long it is
    restore_weights: bool = True  # re-init runs leave the given model untouched (they walk a private copy)
    engine: str = "auto"  # one of ENGINES: how the walk is scheduled (same numbers, different speed)
    interventions: tuple[str, ...] = ()  # --ablate / --steer specs (core.interventions.spec), applied every iteration
    transcoders: str | None = None  # the transcoder set feature interventions use (default: the model's own)

    def check(self) -> None:
        """Raise :class:`LabError` for settings no run can honour."""
        if int(self.iterations) < 1:
            raise LabError(f"The number of iterations N must be at least 1 (got {self.iterations}).")
        if self.reinit not in REINIT_MODES:
            raise LabError(f"Unknown re-initialisation '{self.reinit}'; use one of {', '.join(REINIT_MODES)}.")
        if int(self.record_every) < 1:
            raise LabError(f"record every must be at least 1 (got {self.record_every}).")
        if self.engine not in ENGINES:
            raise LabError(f"Unknown consensus engine '{self.engine}'; use one of {', '.join(ENGINES)}.")
        if self.engine == "graph" and self.reinit == "block":
            raise LabError("Re-initialising after every block cannot run inside a CUDA graph; use engine 'auto' "
                           "or 'block'.")
        if int(self.max_events) < 1:
            raise LabError(f"max events must be at least 1 (got {self.max_events}).")
        check_budget(self.memory_budget)
        check_seed(self.seed)
        parse_specs(self.interventions)
        bad = [i for i in self.decode_iterations if not 0 <= int(i) < self.iterations]
        if bad:
            raise LabError(f"Decode iteration(s) {', '.join(map(str, bad))} are outside 0..{self.iterations - 1}; "
                           f"iterations are counted from 0 and there are N = {self.iterations}.")


def check_budget(memory_budget: float) -> None:
    """Raise :class:`LabError` for a memory budget no run can mean: not above 0, or above
    :data:`MAX_MEMORY_BUDGET` (where byte counts stop being numbers a machine has)."""
    if not (isinstance(memory_budget, (int, float)) and 0 < memory_budget <= MAX_MEMORY_BUDGET):
        raise LabError(f"The memory budget must be above 0 and at most {MAX_MEMORY_BUDGET // GB:,} GB "
                       f"(got {memory_budget!r} bytes); pass a size in GB such as 2.")


def parse_iterations(text: str | None, flag: str = "Decode iterations") -> tuple[int, ...]:
    """``"0, 4,9"`` -> ``(0, 4, 9)`` (sorted, without repeats); anything else is a sentence naming ``flag``."""
    if not text or not text.strip():
        return ()
    try:
        return tuple(sorted({int(x) for x in text.replace(" ", "").split(",") if x}))
    except ValueError:
        raise LabError(f"{flag} takes iterations as comma-separated whole numbers like 0,4,9 "
                       f"(got '{shorten(text, 40)}').") from None


@dataclass
class DecodeConfig:
    """Consensus decoding: ``new_tokens`` tokens, each sampled after a full consensus run."""

    new_tokens: int = 50
    top_p: float = 0.8
    temperature: float = 1.0
    seed: int | None = None  # sampling seed; None uses the ConsensusConfig's seed

    def check(self) -> None:
        """Raise :class:`LabError` for impossible values."""
        if int(self.new_tokens) < 1:
            raise LabError(f"The number of tokens to generate must be at least 1 (got {self.new_tokens}).")
        if not 0.0 < self.top_p <= 1.0:
            raise LabError(f"top-p must be in (0, 1] (got {self.top_p}); 1 turns it off.")
        if not 0 < self.temperature < math.inf:
            raise LabError(f"temperature must be above 0 and finite (got {self.temperature}).")
        check_seed(self.seed)


# -- the continuous-time simulation (core.consensus.simulation) ------------------------------------

INTEGRATORS = ("euler", "rk4")
QKV_KINDS = ("identity", "random", "layer:K", "layer:K:H")
MAX_TOKENS = 4096  # n; the attention matrix is n x n per initial condition
MAX_DIM = 65536  # d; a model layer brings its own
MAX_EVENT_GAP_S = 1.0  # a Progress event at least this often, so a consumer can stop a slow run soon


@dataclass
class SimulationConfig:
    """One simulation: ``batch`` initial conditions of ``tokens`` points on the sphere in ``R^dim``.

    ``dim`` is ignored for ``qkv = "layer:..."`` (the model's width is used).
    """

    tokens: int = 32  # n
    dim: int = 16  # d
    qkv: str = "identity"  # "identity", "random", "layer:K" or "layer:K:H" (see the module docstring)
    dt: float = 0.1
    beta: float = 1.0  # inverse temperature of the softmax
    steps: int = 200
    seed: int = 42
    batch: int = 1  # initial conditions, integrated together
    integrator: str = "rk4"  # "euler" or "rk4"
    causal: bool = False  # token i attends to j <= i only (masked attention, as in a GPT)
    record_every: int = 1  # keep every k-th step (plus 0 and the last)
    matrix: bool = False  # record the n x n cosine matrix at every recorded column
    max_events: int = 100  # about this many Progress events per run
    memory_budget: int = DEFAULT_MEMORY_BUDGET

    def check(self) -> None:
        """Raise :class:`LabError` for settings no simulation can honour."""
        if int(self.tokens) < 2:
            raise LabError(f"A simulation needs at least 2 tokens to reach consensus (got n = {self.tokens}).")
        if int(self.tokens) > MAX_TOKENS:
            raise LabError(f"n = {self.tokens} tokens is more than this simulator handles ({MAX_TOKENS}); "
                           f"use fewer tokens.")
        if int(self.dim) < 2:
            raise LabError(f"The sphere needs a dimension d of at least 2 (got d = {self.dim}).")
        if int(self.dim) > MAX_DIM:
            raise LabError(f"d = {self.dim} is more than this simulator handles ({MAX_DIM}); use a smaller d.")
        if not (math.isfinite(float(self.dt)) and float(self.dt) > 0):
            raise LabError(f"The step size dt must be a positive number (got {self.dt}).")
        if not math.isfinite(float(self.beta)):
            raise LabError(f"beta must be a finite number (got {self.beta}).")
        if int(self.steps) < 1:
            raise LabError(f"The number of integration steps must be at least 1 (got {self.steps}).")
        if int(self.batch) < 1:
            raise LabError(f"The number of initial conditions must be at least 1 (got {self.batch}).")
        if self.integrator not in INTEGRATORS:
            raise LabError(f"Unknown integrator '{self.integrator}'; use one of {', '.join(INTEGRATORS)}.")
        if int(self.record_every) < 1:
            raise LabError(f"record every must be at least 1 (got {self.record_every}).")
        if int(self.max_events) < 1:
            raise LabError(f"max events must be at least 1 (got {self.max_events}).")
        check_budget(self.memory_budget)
        check_seed(self.seed)
        parse_qkv(self.qkv)

    def label(self) -> str:
        """Short name for charts and overlays, e.g. ``"sim identity n=32 d=16 beta=1"``."""
        return (f"sim {self.qkv} n={self.tokens} d={self.dim} beta={self.beta:g} dt={self.dt:g}"
                f"{' causal' if self.causal else ''}")


def parse_qkv(spec: str) -> tuple[str, int | None, int | None]:
    """``"identity" -> ("identity", None, None)``, ``"layer:3" -> ("layer", 3, None)``,
    ``"layer:3:0" -> ("layer", 3, 0)``; anything else raises :class:`LabError`."""
    s = str(spec).strip().lower()
    if s in ("identity", "random"):
        return s, None, None
    parts = s.split(":")
    if parts[0] == "layer" and len(parts) in (2, 3) and all(p.strip().lstrip("-").isdigit() for p in parts[1:]):
        layer = int(parts[1])
        head = int(parts[2]) if len(parts) == 3 else None
        return "layer", layer, head
    raise LabError(f"Unknown Q/K/V source '{spec}'; use identity, random, layer:K (block K of the loaded model, "
                   f"all heads) or layer:K:H (head H of block K).")
