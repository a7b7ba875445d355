"""The paper's continuous-time attention model, simulated: tokens as points on the unit sphere.

"Consensus Is All You Get" (Abella, Silvestre, Tabuada, ICML 2025) studies the idealised
dynamics behind a deep stack of attention layers: ``n`` tokens ``x_i`` on the unit sphere of
``R^d``, each moving along the tangent projection of its attention-weighted average of the tokens,

    dx_i/dt = P_{x_i}( sum_j softmax_j(beta <Q x_i, K x_j>) V x_j ),   P_x(y) = y - <x, y> x,

with the softmax over every ``j`` (``j = i`` included), or over ``j <= i`` with ``causal=True``
(masked attention, as in a GPT). This module integrates it batched over several initial
conditions on any torch device, with the statistics of :mod:`core.consensus.metrics` after every
recorded step, and hands out the same events and (a subclass of) the same result object as
:mod:`core.consensus.engine`, so every chart and download of a model run works on a simulation too.

Conventions, stated once:

- An integration *step* plays the part of a layer-step: column ``s`` of the result is the state
  after ``s`` steps, time ``t = s * dt``; column 0 is the initial condition. ``result.config``
  is a :class:`~core.consensus.engine.ConsensusConfig` with ``iterations = steps`` and ``n_layer = 1``.
- Integrators: explicit ``"euler"`` (``x + dt f(x)``) or classical ``"rk4"``, each followed by
  re-projection onto the sphere (``x / |x|``). The stages are evaluated with the radial
  extension ``P_x(y) = y - (<x, y> / <x, x>) x``, which equals the formula above on the sphere
  and keeps RK4's intermediate points' drift out of the direction of motion.
- Initial conditions: ``batch`` independent clouds of ``n`` points drawn uniformly on the sphere
  (normalised standard Gaussians) from a CPU generator seeded with ``seed``.
- ``Q, K, V`` (see :func:`make_qkv`):

  * ``"identity"``: ``Q = K = V = I_d``.
  * ``"random"``: entries i.i.d. ``N(0, 1/d)`` from a CPU generator seeded with ``seed + 1``
    (so ``|Q x|`` is about 1 for a unit ``x``); ``Q, K, V`` are ``d x d``.
  * ``"layer:K"`` (all heads of block ``K`` of a loaded model, ``d = d_model``): with the
    block's query/key/value weights ``W_Q^h, W_K^h, W_V^h`` (``head_dim x d`` per head ``h``)
    and output projection ``W_O^h`` (``d x head_dim``, head ``h``'s columns),
    ``<Q x, K y> = (1/H) sum_h <W_Q^h x, W_K^h y>`` (the head-averaged query-key product: every
    head's score, averaged) and ``V = sum_h W_O^h W_V^h = W_O W_V`` (the block's full
    value-output map, residual stream to residual stream), i.e. the block's attention if every
    head shared the averaged attention pattern.
  * ``"layer:K:H"``: head ``H`` of block ``K`` alone: ``Q = W_Q^H``, ``K = W_K^H``
    (``head_dim x d``), ``V = W_O^H W_V^H`` (``d x d``, rank ``head_dim``).

  With grouped-query attention (Llama, Mistral, Qwen, Gemma, Phi-3 may share one key/value head
  among several query heads) head ``H``'s ``W_K^H``, ``W_V^H`` are those of the kv head it shares.
  Biases, layer norms, rotary positions and the family's own score scaling (``1/sqrt(head_dim)`` in
  GPT-2, none in GPT-Neo) are left out: ``beta`` is the one temperature. The weights are copied (float32) when
  the run is planned, so later re-initialisation of the model does not touch a simulation.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

from .config import (INTEGRATORS, MAX_DIM, MAX_EVENT_GAP_S, MAX_TOKENS, QKV_KINDS, SimulationConfig,  # noqa: F401
                     parse_qkv)
from .engine import (ConsensusConfig, ConsensusResult, Finished, MetricChunk, Progress, Started, _Columns,
                     estimate_bytes, recorded_steps)
from .metrics import STAT_NAMES, token_stats
from .results import recordings
from .. import devices
from ..errors import LabError, fmt_bytes

if TYPE_CHECKING:
    from ..models.loading import LoadedModel

# -- Q, K, V --------------------------------------------------------------------------------------

@dataclass
class QKV:
    """The three matrices of one simulation, float32 on the CPU until a run moves them."""

    q: torch.Tensor  # (r, d): scores are beta * <q x_i, k x_j>
    k: torch.Tensor  # (r, d)
    v: torch.Tensor  # (d, d)
    source: str  # the spec it came from
    description: str  # one line saying exactly what was taken

    @property
    def dim(self) -> int:
        return int(self.v.shape[0])


def layer_projections(lm: "LoadedModel", layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                 torch.Tensor]:
    """Block ``layer``'s attention weights as ``(W_Q, W_K, W_V, W_O)``, each ``(d, d)`` float32 on
    the CPU, in the ``y = W x`` convention (heads stacked along ``W_Q/W_K/W_V``'s rows and along
    ``W_O``'s columns, head ``h`` at ``h*hs:(h+1)*hs``). Biases are not returned.

    Families store these differently: our GPT's ``c_attn`` is an ``nn.Linear`` ``(3d, d)``;
    Hugging Face GPT-2's ``c_attn`` is a ``Conv1D`` whose weight is ``(d, 3d)`` (``y = x W``, so
    transposed); GPT-Neo has separate ``q_proj/k_proj/v_proj/out_proj`` linears; every other family
    says itself (``LayerStack.attention_weights``). Where heads number ``H * head_dim != d`` (Gemma's
    head size 256), ``W_Q/W_K/W_V`` are ``(H * head_dim, d)`` and ``W_O`` is ``(d, H * head_dim)``.
    With grouped-query attention the key/value rows of each kv head are repeated for every query
    head that shares it, so head ``h`` of ``W_K``/``W_V`` is the one head ``h`` attends with.
    """
    stack = lm.stack
    if not 0 <= int(layer) < stack.n_layer:
        raise LabError(f"Layer {layer} does not exist; the model has blocks 0..{stack.n_layer - 1}.")
    block = stack.blocks[int(layer)]
    d = stack.d_model

    def f32(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", torch.float32).clone()

    if stack.family == "gptlab":
        w = f32(block.attn.c_attn.weight)  # (3d, d)
        wq, wk, wv = w[:d], w[d:2 * d], w[2 * d:]
        wo = f32(block.attn.c_proj.weight)  # (d, d)
    elif stack.family == "gpt2":
        w = f32(block.attn.c_attn.weight).t()  # Conv1D (d, 3d) -> (3d, d)
        wq, wk, wv = w[:d], w[d:2 * d], w[2 * d:]
        wo = f32(block.attn.c_proj.weight).t()  # Conv1D (d, d) -> (d, d) in y = W x
    elif stack.family == "gpt_neo":
        attn = block.attn.attention
        wq, wk, wv = f32(attn.q_proj.weight), f32(attn.k_proj.weight), f32(attn.v_proj.weight)
        wo = f32(attn.out_proj.weight)
    else:
        wq, wk, wv, wo = (f32(w) for w in stack.attention_weights(int(layer)))
        groups = stack.n_head // stack.n_kv_head   # grouped-query attention: one kv head per `groups` query heads
        if groups > 1:
            wk, wv = (w.view(stack.n_kv_head, 1, stack.head_dim, d).expand(-1, groups, -1, -1).reshape(-1, d)
                      for w in (wk, wv))
    return wq.contiguous(), wk.contiguous(), wv.contiguous(), wo.contiguous()


def make_qkv(spec: str, dim: int, seed: int = 42, lm: "LoadedModel | None" = None) -> QKV:
    """The matrices ``spec`` names (see the module docstring for exactly what each one takes)."""
    kind, layer, head = parse_qkv(spec)
    if kind == "identity":
        eye = torch.eye(int(dim))
        return QKV(eye, eye.clone(), eye.clone(), "identity", f"Q = K = V = I ({dim} x {dim})")
    if kind == "random":
        gen = torch.Generator().manual_seed(int(seed) + 1)
        d = int(dim)
        q, k, v = (torch.randn(d, d, generator=gen) / math.sqrt(d) for _ in range(3))
        return QKV(q, k, v, "random", f"Q, K, V with i.i.d. N(0, 1/{d}) entries ({d} x {d}), seed {int(seed) + 1}")
    if lm is None:
        raise LabError(f"Q/K/V '{spec}' come from a loaded model's layer; load a model first or use identity/random.")
    wq, wk, wv, wo = layer_projections(lm, layer)
    H, d = lm.stack.n_head, lm.stack.d_model
    hs = lm.stack.head_dim
    rotary = ", rotary positions" if getattr(lm.stack, "rotary", False) else ""
    left_out = f"biases, norms{rotary} and score scaling left out"
    if head is None:
        scale = 1.0 / math.sqrt(H)  # <s Wq x, s Wk y> = (1/H) sum_h <Wq^h x, Wk^h y>
        return QKV(wq * scale, wk * scale, wo @ wv, spec,
                   f"block {layer} of {lm.name}, all {H} heads: <Qx, Ky> = mean over heads of <W_Q^h x, W_K^h y>, "
                   f"V = W_O W_V ({d} x {d}); {left_out}")
    if not 0 <= head < H:
        raise LabError(f"Head {head} does not exist; block {layer} has heads 0..{H - 1}.")
    rows = slice(head * hs, (head + 1) * hs)
    return QKV(wq[rows].contiguous(), wk[rows].contiguous(), wo[:, rows] @ wv[rows], spec,
               f"block {layer} head {head} of {lm.name}: Q = W_Q^{head}, K = W_K^{head} ({hs} x {d}), "
               f"V = W_O^{head} W_V^{head} ({d} x {d}, rank <= {hs}); {left_out}")


# -- the dynamics ---------------------------------------------------------------------------------

def velocity(x: torch.Tensor, a: torch.Tensor, vt: torch.Tensor, beta: float, causal: bool = False) -> torch.Tensor:
    """``dx/dt`` for the token clouds ``x`` ``(B, n, d)``: the attention update projected on the
    tangent space of each token's sphere (radial extension ``y - (<x, y>/<x, x>) x``).

    ``a = Q^T K`` ``(d, d)`` (so ``<Q x_i, K x_j> = x_i^T a x_j``) and ``vt = V^T`` ``(d, d)``.
    Products are batched ``bmm`` over expanded matrices: for the small clouds simulated here that
    avoids a multi-threaded BLAS call per product, which is slow on a busy CPU.
    """
    B = x.shape[0]
    xt = x.transpose(1, 2)  # (B, d, n)
    scores = beta * torch.bmm(torch.bmm(x, a.expand(B, -1, -1)), xt)  # (B, n, n): beta <Q x_i, K x_j>
    if causal:
        n = x.shape[1]
        mask = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)  # j > i
        scores = scores.masked_fill(mask, float("-inf"))
    y = torch.bmm(scores.softmax(-1), torch.bmm(x, vt.expand(B, -1, -1)))  # (B, n, d): sum_j a_ij V x_j
    radial = (x * y).sum(-1, keepdim=True) / (x * x).sum(-1, keepdim=True)  # (B, n, 1)
    return y - radial * x


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


@torch.no_grad()
def integrate_step(x: torch.Tensor, a: torch.Tensor, vt: torch.Tensor, dt: float, beta: float,
                   integrator: str = "rk4", causal: bool = False) -> torch.Tensor:
    """One step of size ``dt`` from ``x`` ``(B, n, d)``, re-projected onto the sphere
    (``a = Q^T K``, ``vt = V^T``, see :func:`velocity`)."""

    def f(z):
        return velocity(z, a, vt, beta, causal)

    if integrator == "euler":
        return _normalise(x + dt * f(x))
    k1 = f(x)
    k2 = f(x + 0.5 * dt * k1)
    k3 = f(x + 0.5 * dt * k2)
    k4 = f(x + dt * k3)
    return _normalise(x + (dt / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4))


def initial_points(batch: int, tokens: int, dim: int, seed: int = 42) -> torch.Tensor:
    """``(batch, tokens, dim)`` float32 points uniform on the unit sphere, reproducible for ``seed``."""
    gen = torch.Generator().manual_seed(int(seed))
    return _normalise(torch.randn(int(batch), int(tokens), int(dim), generator=gen))


# -- results --------------------------------------------------------------------------------------

@dataclass
class SimulationResult(ConsensusResult):
    """A :class:`~core.consensus.engine.ConsensusResult` whose layer-steps are integration steps.

    ``prompts`` name the initial conditions ("init 0", ...); ``token_ids`` are empty lists (the
    points are not vocabulary items); ``hidden`` is the final state ``[B, n, d]``;
    ``n_layer = 1``; ``config.iterations`` is the number of steps.
    """

    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    qkv_description: str = ""

    @property
    def lengths(self) -> list[int]:
        return [int(self.simulation.tokens)] * len(self.prompts)

    @property
    def times(self) -> np.ndarray:
        """float64 [P]: the time ``t = step * dt`` of each column."""
        return self.steps.astype(np.float64) * float(self.simulation.dt)


# -- planning -------------------------------------------------------------------------------------

def _consensus_config(cfg: SimulationConfig) -> ConsensusConfig:
    return ConsensusConfig(iterations=int(cfg.steps), record_every=int(cfg.record_every), matrix=bool(cfg.matrix),
                           max_events=int(cfg.max_events), memory_budget=int(cfg.memory_budget))


def _check_memory(cfg: SimulationConfig, dim: int) -> int:
    """Bytes the run allocates (the recording plus the integration's working memory, see
    :func:`working_bytes`); a :class:`LabError` offering a ``record_every`` that fits if too many."""
    lengths = [int(cfg.tokens)] * int(cfg.batch)
    work = working_bytes(cfg, dim)

    def need(k: int) -> int:
        return estimate_bytes(lengths, 1, dim, replace(_consensus_config(cfg), record_every=k)) + work

    total = need(int(cfg.record_every))
    if total <= cfg.memory_budget:
        return total
    lo, hi = int(cfg.record_every), int(cfg.steps)
    if need(hi) > cfg.memory_budget:
        raise LabError(f"Even recording only the first and last step, {cfg.batch} initial condition(s) of "
                       f"{cfg.tokens} tokens{' with cosine matrices' if cfg.matrix else ''} need more than the "
                       f"{fmt_bytes(cfg.memory_budget)} memory budget; use fewer tokens or initial conditions"
                       f"{' or drop the matrices' if cfg.matrix else ''}.")
    while lo < hi:  # smallest record_every that fits (the need falls as k grows)
        mid = (lo + hi) // 2
        if need(mid) <= cfg.memory_budget:
            hi = mid
        else:
            lo = mid + 1
    raise LabError(f"Recording all {cfg.steps} steps{' with n x n cosine matrices' if cfg.matrix else ''} needs "
                   f"about {fmt_bytes(total)}, over the {fmt_bytes(cfg.memory_budget)} memory budget; record every "
                   f"{lo} steps (--record-every {lo}) or use fewer steps, tokens or initial conditions.",
                   fix={"record_every": lo})


def working_bytes(cfg: SimulationConfig, dim: int) -> int:
    """Bytes the integration itself holds at once (float32), apart from the recording: Q, K, V
    and the two d x d products, the state with the rk4 stages and their temporaries (about 12
    copies of ``B x n x d``) and the ``B x n x n`` scores, softmax and statistics (about 6)."""
    B, n, d = int(cfg.batch), int(cfg.tokens), int(dim)
    return 4 * (5 * d * d + 12 * B * n * d + 6 * B * n * n)


def _check_working_memory(cfg: SimulationConfig, dim: int, dev: torch.device) -> None:
    """Refuse a simulation whose working tensors cannot fit in the device's free memory, before
    anything is allocated: a d x d matrix or a B x n x n score tensor too big for the machine
    would otherwise end in the out-of-memory killer, not in a message."""
    devices.require_free(working_bytes(cfg, dim), dev, "This simulation needs",
                         "use a smaller d, fewer tokens or fewer initial conditions.",
                         detail=f" of working memory ({cfg.batch} initial condition(s) of {cfg.tokens} tokens in "
                                f"d = {dim})")


def resolve_device(device: str | torch.device | None, lm: "LoadedModel | None" = None) -> torch.device:
    """The device to integrate on: as given, else the loaded model's, else the CPU."""
    if device is None:
        return torch.device(lm.stack.device) if lm is not None else torch.device("cpu")
    if isinstance(device, torch.device):
        return device
    return torch.device(devices.resolve_device(str(device)))  # "auto" -> the first GPU when there is one


# -- the run --------------------------------------------------------------------------------------

def simulation_stream(cfg: SimulationConfig | None = None, lm: "LoadedModel | None" = None,
                      device: str | torch.device | None = None) -> Iterator:
    """Integrate ``cfg``; yields :class:`~core.consensus.engine.Started` (with the live result),
    :class:`~core.consensus.engine.Progress` (about ``cfg.max_events``, and at least every
    :data:`MAX_EVENT_GAP_S` seconds of a slow run, so a stop is never far off) and
    :class:`~core.consensus.engine.Finished`, like a model run; stop by closing the generator.

    Everything is checked before anything runs (bad settings, or working tensors bigger than the
    device's free memory, raise :class:`LabError` from this call). ``lm`` is needed only for
    ``qkv = "layer:..."``; ``device`` defaults to the model's device, else the CPU.
    """
    cfg = cfg or SimulationConfig()
    cfg.check()
    kind = parse_qkv(cfg.qkv)[0]
    dev = resolve_device(device, lm)
    if kind != "layer" or lm is not None:  # before the d x d matrices are made (a layer brings its own d)
        _check_working_memory(cfg, lm.stack.d_model if kind == "layer" else int(cfg.dim), dev)
    qkv = make_qkv(cfg.qkv, int(cfg.dim), int(cfg.seed), lm)
    if kind == "layer" and int(cfg.dim) != qkv.dim:
        cfg = replace(cfg, dim=qkv.dim)
    need = _check_memory(cfg, qkv.dim)
    return _simulation_events(cfg, qkv, dev, need, lm.name if (lm is not None and kind == "layer") else None)


def _new_result(cfg: SimulationConfig, qkv: QKV, steps: np.ndarray, dev: torch.device,
                model: str | None) -> SimulationResult:
    B, n, d, P = int(cfg.batch), int(cfg.tokens), qkv.dim, len(steps)

    def nan(*shape):
        return np.full(shape, np.nan, dtype=np.float32)

    return SimulationResult(
        model=f"{cfg.label()}" + (f" ({model})" if model else ""), prompts=[f"init {b}" for b in range(B)],
        token_ids=[[] for _ in range(B)], config=_consensus_config(cfg), n_layer=1, steps=steps,
        hidden=nan(B, n, d), matrix=recordings(B, n, n, P) if cfg.matrix else None, decodings={},
        steps_done=np.full(B, -1, dtype=np.int64), device=str(dev), simulation=cfg,
        qkv_description=qkv.description, **{name: recordings(B, P) for name in STAT_NAMES})


@torch.no_grad()
def _stats(x: torch.Tensor, matrix: bool):
    return token_stats(x, matrix)


def _simulation_events(cfg: SimulationConfig, qkv: QKV, dev: torch.device, need: int,
                       model: str | None) -> Iterator:
    S = int(cfg.steps)
    steps = recorded_steps(S, int(cfg.record_every))
    col_of_step = _Columns(S, int(cfg.record_every))
    result = _new_result(cfg, qkv, steps, dev, model)
    rows = list(range(int(cfg.batch)))
    every = max(1, math.ceil(S / int(cfg.max_events)))
    a = (qkv.q.t() @ qkv.k).to(dev)  # (d, d): <Q x, K y> = x^T a y
    vt = qkv.v.t().contiguous().to(dev)  # (d, d)
    x = initial_points(cfg.batch, cfg.tokens, qkv.dim, cfg.seed).to(dev)  # (B, n, d)
    pending: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []  # (column, stats (B, 5), cos) on the device
    t0 = last_event = time.perf_counter()
    state = {"x": x, "step": 0}

    def record(step: int, x: torch.Tensor) -> None:
        col = int(col_of_step[step])
        if col >= 0:
            stats, cos = _stats(x, bool(cfg.matrix))
            pending.append((col, stats, cos))

    def flush() -> MetricChunk:
        """The one host synchronisation: pending columns and the current state to the result. A
        state that left the numbers (NaN or infinity: dt or beta too large for the integrator)
        keeps the columns before it and ends the run with a sentence."""
        cols = np.asarray([c for c, _, _ in pending], dtype=np.int64)
        if pending:
            stats = torch.stack([s for _, s, _ in pending], dim=1).cpu().numpy()  # (B, m, 5)
            mat = torch.stack([c for _, _, c in pending], dim=-1).cpu().numpy() if cfg.matrix else None  # (B, n, n, m)
        else:
            stats, mat = np.zeros((len(rows), 0, len(STAT_NAMES)), dtype=np.float32), None
        pending.clear()
        x_host = state["x"].float().cpu().numpy()
        bad = ~np.isfinite(stats).all(axis=(0, 2))  # (m,) columns whose statistics are not numbers
        if bad.any() or not np.isfinite(x_host).all():
            good = int(np.argmax(bad)) if bad.any() else len(cols)
            _keep(cols[:good], stats[:, :good], None if mat is None else mat[..., :good])
            if good:
                result.steps_done[:] = int(steps[cols[good - 1]])
            result.seconds = time.perf_counter() - t0
            at = int(steps[cols[good]]) if good < len(cols) else state["step"]
            err = LabError(f"The simulation stopped being numbers (NaN or infinity) by step {at}: dt = {cfg.dt:g} with "
                           f"beta = {cfg.beta:g} is too large a step for {cfg.integrator}; use a smaller dt or beta. "
                           f"The steps before it are kept.")
            err.result = result  # type: ignore[attr-defined]
            raise err
        _keep(cols, stats, mat)
        result.hidden[:] = x_host
        result.steps_done[:] = state["step"]
        result.seconds = time.perf_counter() - t0
        return MetricChunk(rows=list(rows), steps=steps[cols], **{n: stats[:, :, k] for k, n in enumerate(STAT_NAMES)})

    def _keep(cols: np.ndarray, stats: np.ndarray, mat: np.ndarray | None) -> None:
        if len(cols):
            result.reserve(int(cols.max()) + 1)
        for k, name in enumerate(STAT_NAMES):
            getattr(result, name)[:, cols] = stats[:, :, k]
        if mat is not None:
            result.matrix[..., cols] = mat

    info = dict(model=result.model, prompts=result.prompts, lengths=result.lengths, groups=[rows], n_layer=1,
                iterations=S, total=S, columns=len(steps), bytes=need, device=str(dev),
                qkv=qkv.description, simulation=True)
    yield Started(info, result)
    try:
        record(0, x)
        for s in range(1, S + 1):
            x = integrate_step(x, a, vt, float(cfg.dt), float(cfg.beta), cfg.integrator, bool(cfg.causal))
            state["x"], state["step"] = x, s
            record(s, x)
            if (s % every == 0 or time.perf_counter() - last_event > MAX_EVENT_GAP_S) and s < S:
                last_event = time.perf_counter()
                yield Progress(s, S, flush())
        yield Progress(S, S, flush())
    except torch.OutOfMemoryError as e:
        err = LabError("The device ran out of memory during the simulation; use fewer tokens or initial "
                       "conditions, drop the cosine matrices, or run on the CPU. What was computed before is kept.")
        err.result = result  # type: ignore[attr-defined]
        raise err from e
    finally:
        if pending:  # stopped between two events: keep what the device already holds
            try:
                flush()
            except Exception:  # the device may be unusable after a failure (or the state not numbers); kept so far
                pass
        result.seconds = time.perf_counter() - t0
    yield Finished(result)


def run_simulation(cfg: SimulationConfig | None = None, lm: "LoadedModel | None" = None,
                   device: str | torch.device | None = None) -> SimulationResult:
    """:func:`simulation_stream` run to the end."""
    result = None
    for ev in simulation_stream(cfg, lm, device):
        if isinstance(ev, Finished):
            result = ev.result
    return result
