"""Consensus: apply a model's layer stack again and again and watch the tokens converge.

"Consensus Is All You Get" (Abella, Silvestre, Tabuada, ICML 2025) shows that the token vectors of
a transformer collapse to one point as depth grows. This module runs that experiment on any model
the layer-stack adapter supports, batched over prompts, with every metric computed on the device.

Vocabulary used throughout (and in the CLI's files):

- An *iteration* is every block once, in order, then the final norm; the next iteration starts
  from the final norm's output (positions are embedded once, before iteration 0).
- A *layer-step* ``s`` counts blocks: ``s = 1 + i*L + l`` is "after block ``l`` of iteration
  ``i``" (``L`` blocks per iteration, ``N*L`` layer-steps in all). "After block ``l``" is that
  block's output, the residual stream *before* any final norm, also for the last block.
  Layer-step 0 is the embeddings (token + position).
- A *column* is one recorded layer-step. With ``record_every = k`` the recorded layer-steps are
  ``0, k, 2k, ...`` and always the last one, ``N*L``; ``result.steps`` lists them, so every
  array below is indexed by column, never by raw layer-step.

Metrics per column and prompt (see :mod:`core.consensus.metrics` for the exact formulas):
the reference metric ``1 - mean_j |cos(h_0, h_j)|`` over all the prompt's tokens ``j`` (``j = 0``
included, as the reference scripts computed it), the mean pairwise cosine and the mean pairwise raw
dot product over off-diagonal pairs ``i != j``, the effective rank and the mean distance to the
centroid of the token cloud, and optionally the ``T x T`` cosine matrix.

Re-initialisation (``ConsensusConfig.reinit``) uses :meth:`LayerStack.reinit`, which rewrites the
weights of the model it walks. With ``restore_weights=True`` (the default) a run walks a private
model of the same architecture instead, so the model it was given is never written, not even
while the run is going: in the app that model is shared by every session, and another session may
be generating with it at the same moment. ``restore_weights=False`` re-initialises the given model
in place and leaves it re-initialised (the CLI, which owns its model, saves the copy's memory).

- ``"once"``: ``reinit(seed)`` before the embeddings are taken (so embeddings are random too).
- ``"iteration"`` (the scripts' ``--fullrandom``): ``reinit(seed)`` before the embeddings and
  ``reinit(seed + i + 1)`` after iteration ``i`` (after its final norm), for ``i < N - 1``.
- ``"block"`` (``--const-reset``): ``reinit(seed)`` before the embeddings and ``reinit(seed + s)``
  after layer-step ``s`` (``s = 1 + i*L + l``), for ``s < N*L``.

How the walk is scheduled (``ConsensusConfig.engine``) never changes the numbers: ``"block"``
goes one block at a time (events and stops between any two blocks); ``"iteration"`` runs a whole
iteration as one unit and computes the statistics of its ``L`` block outputs in one batched pass;
``"graph"`` captures that unit once as a CUDA graph and replays it, so a GPU spends its time on
the weights rather than on kernel launches; ``"auto"`` picks ``"graph"`` on a single CUDA device
when the iteration's buffers fit, else ``"block"``.

Long runs are generators of events (:class:`Started`, :class:`Progress`, :class:`Decoded`,
:class:`TokenSampled`, :class:`Finished`); the consumer stops a run by closing the generator.
The result object handed out in :class:`Started` is filled in place, so whatever was computed
before a stop or an error stays readable (``result.steps_done`` says how far each prompt got).
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch

from .config import DEVICE_CHUNK_BUDGET, FUSED_BUDGET, MIN_GRAPH_ITERATIONS, ConsensusConfig, DecodeConfig, PromptLike
from .metrics import token_stats
from .results import (STAT_NAMES, recordings, ConsensusDecodeResult, ConsensusEvent, ConsensusResult, Decoded, Finished,
                      MetricChunk, Progress, Started, TokenSampled)
from .text import readable_text, readable_tokens
from ..errors import LabError, first_line, fmt_bytes, shorten
from ..generation.config import check_seed
from ..generation.sampling import apply_temperature, apply_top_p
from ..models.stack import stack_for

if TYPE_CHECKING:
    from ..models.loading import LoadedModel

# -- planning: everything checked before anything runs ---------------------------------------------

def recorded_steps(total_steps: int, record_every: int) -> np.ndarray:
    """Layer-steps kept with ``record_every = k``: ``0, k, 2k, ...`` and always ``total_steps``."""
    steps = np.arange(0, total_steps + 1, max(1, int(record_every)), dtype=np.int64)
    if steps[-1] != total_steps:
        steps = np.append(steps, np.int64(total_steps))
    return steps


def _n_columns(total_steps: int, k: int) -> int:
    return total_steps // k + 1 + (1 if total_steps % k else 0)


class _Columns:
    """Which column a layer-step is recorded in (-1: not recorded), by arithmetic: a table of
    every layer-step would itself be ``8 * N * L`` bytes, a MemoryError for ``N = 10**9``."""

    def __init__(self, total_steps: int, record_every: int):
        self.total, self.k = int(total_steps), max(1, int(record_every))
        self.last = _n_columns(self.total, self.k) - 1

    def __getitem__(self, step: int) -> int:
        if step % self.k == 0:
            return step // self.k
        return self.last if step == self.total else -1

    def span(self, first: int, n: int) -> np.ndarray:
        """The columns of layer-steps ``first .. first + n - 1``."""
        s = np.arange(first, first + n, dtype=np.int64)
        cols = np.where(s % self.k == 0, s // self.k, -1)
        cols[s == self.total] = self.last
        return cols


def estimate_bytes(lengths: Sequence[int], n_layer: int, d_model: int, cfg: ConsensusConfig,
                   new_tokens: int = 0) -> int:
    """Host bytes a run will record: the five per-column series, the cosine matrices when asked,
    the final hidden states, and (consensus decoding) the per-token traces. The rest of what a run
    allocates is counted by :func:`memory_plan`."""
    B, T = len(lengths), max(lengths, default=0)
    P = _n_columns(int(cfg.iterations) * n_layer, max(1, int(cfg.record_every)))
    if new_tokens:
        return 4 * B * new_tokens * P
    total = 4 * B * P * len(STAT_NAMES) + 4 * B * T * d_model
    if cfg.matrix:
        total += 4 * B * T * T * P
    return total


def _chunk_budget(cfg: ConsensusConfig) -> int:
    """Bytes of statistics a batch buffers on the device between two copies to the host: at most
    :data:`DEVICE_CHUNK_BUDGET`, and a sixteenth of the run's budget, so small budgets stay small."""
    return max(1, min(DEVICE_CHUNK_BUDGET, int(cfg.memory_budget) // 16))


def _capacity(per_col: int, cfg: ConsensusConfig, at_least: int, window: int | None = None) -> int:
    """Columns a recorder buffers (``window=None``: the most it could, for planning)."""
    fit = _chunk_budget(cfg) // max(1, per_col)
    return int(max(1, at_least, fit if window is None else min(window, fit)))


@dataclass
class MemoryPlan:
    """What a run will allocate, in bytes, checked against ``cfg.memory_budget`` before anything
    is: the recorded arrays, the prompts' token ids, a private copy of the weights (re-initialising
    runs that must leave the model untouched), and one batch's working memory (activations, the
    statistics, the device buffer and its host copy, the iteration engine's scratch) at the
    largest batch that fits. Prompts of one length run in batches of at most ``batch``."""

    recordings: int
    prompts: int
    model_copy: int
    working: int
    batch: int

    @property
    def total(self) -> int:
        return self.recordings + self.prompts + self.model_copy + self.working


def _working_bytes(lm: "LoadedModel", b: int, T: int, cfg: ConsensusConfig, new_tokens: int) -> int:
    """One batch of ``b`` prompts of ``T`` tokens (``T + new_tokens`` by the end of decoding)."""
    st = lm.stack
    elem = torch.finfo(st.dtype).bits // 8
    D, H, V, L = st.d_model, st.n_head, st.vocab_size, st.n_layer
    T = T + new_tokens
    acts = elem * T * (19 * D + 2 * H * T)  # one block: norms, q/k/v, scores and softmax, a 4x MLP, residuals
    stats = 4 * T * (3 * D + 7 * T)  # token_stats in float32
    lens = (elem + 4) * T * V if cfg.decode_iterations else (elem + 4) * V if new_tokens else 0
    host = 4 * T * D + 8 * T  # the state copied to the host at a flush, the token ids
    per_col = 4 * b * (len(STAT_NAMES) + (T * T if cfg.matrix and not new_tokens else 0))
    engine = _engine(lm, cfg, b, T) if st.device.type == "cuda" or cfg.engine != "auto" else "block"
    runner = _IterationRunner.scratch_bytes(lm, b, T, cfg.matrix) if engine != "block" else 0
    at_least = L + 2 if engine != "block" else 1
    return b * (acts + stats + lens + host) + 2 * per_col * _capacity(per_col, cfg, at_least) + runner


def memory_plan(lm: "LoadedModel", token_ids: Sequence[Sequence[int]], cfg: ConsensusConfig,
                new_tokens: int = 0, texts: Sequence[str] = ()) -> MemoryPlan:
    """The :class:`MemoryPlan` of a run over prompts with these token ids, at the largest batch
    that fits the budget (1 when none does: :func:`_check_memory` says what to change)."""
    st = lm.stack
    lengths = [len(t) for t in token_ids]
    recordings = estimate_bytes(lengths, st.n_layer, st.d_model, cfg, new_tokens)
    prompts = sum(36 * n + 100 for n in lengths) + sum(4 * len(t) for t in texts)
    copy = (st.num_params() * (torch.finfo(st.dtype).bits // 8)
            if cfg.reinit != "none" and cfg.restore_weights else 0)
    groups: dict[int, int] = {}
    for n in lengths:
        groups[n] = groups.get(n, 0) + 1
    room = int(cfg.memory_budget) - recordings - prompts - copy

    def working(b: int) -> int:
        return max((_working_bytes(lm, min(b, count), T, cfg, new_tokens) for T, count in groups.items()), default=0)

    lo, hi = 1, max(groups.values(), default=1)
    while lo < hi:  # the largest batch whose working memory fits (it grows with the batch)
        mid = (lo + hi + 1) // 2
        if working(mid) <= room:
            lo = mid
        else:
            hi = mid - 1
    return MemoryPlan(recordings, prompts, copy, working(lo), lo)


def _check_memory(lm: "LoadedModel", token_ids: Sequence[Sequence[int]], cfg: ConsensusConfig,
                  new_tokens: int = 0, texts: Sequence[str] = ()) -> MemoryPlan:
    """The run's :class:`MemoryPlan` when it fits the budget; else a :class:`LabError` saying what
    to change, offering (as ``fix``) a ``record_every`` that fits when the recording is what is too big."""
    plan = memory_plan(lm, token_ids, cfg, new_tokens, texts)
    budget = int(cfg.memory_budget)
    if plan.total <= budget:
        return plan
    n = len(token_ids)
    total_steps = int(cfg.iterations) * lm.stack.n_layer

    def fits(k: int) -> bool:
        return memory_plan(lm, token_ids, replace(cfg, record_every=k), new_tokens, texts).total <= budget

    if not fits(total_steps):
        rest = plan.total - plan.recordings
        if rest > budget:
            T = max(len(t) for t in token_ids) + new_tokens
            raise LabError(f"One batch of prompts of {T} tokens needs about {fmt_bytes(rest)} to run (activations, "
                           f"statistics{', weight copy' if plan.model_copy else ''}), over the {fmt_bytes(budget)} "
                           f"memory budget; use fewer or shorter prompts{' or drop the matrices' if cfg.matrix else ''},"
                           f" or raise the memory budget.")
        what = "the token cosine matrices (--matrixerror)" if cfg.matrix else "the recorded arrays"
        raise LabError(f"Even recording only the first and last layer-step, {what} for {n} prompt(s) "
                       f"need more than the {fmt_bytes(budget)} memory budget; use fewer or shorter "
                       f"prompts{' or drop the matrices' if cfg.matrix else ''}.")
    lo, hi = max(1, int(cfg.record_every)), total_steps
    while lo < hi:  # smallest record_every that fits (the need falls as k grows)
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    raise LabError(f"Recording all {total_steps} layer-steps for {n} prompt(s)"
                   f"{' with T x T cosine matrices' if cfg.matrix else ''} needs about {fmt_bytes(plan.total)}, over "
                   f"the {fmt_bytes(budget)} memory budget; keep one layer-step in {lo} "
                   f"(--record-every {lo}) or use fewer prompts or iterations.", fix={"record_every": lo})


def random_prompt_ids(lm: "LoadedModel", n: int, length: int, seed: int = 42) -> list[list[int]]:
    """``n`` prompts of ``length`` token ids drawn uniformly from the vocabulary both the model and
    its tokenizer know, reproducibly for ``seed`` (a private CPU generator)."""
    if int(n) < 1:
        raise LabError(f"The number of random prompts must be at least 1 (got {n}).")
    check_seed(seed)
    if int(length) < 1:
        raise LabError(f"Random prompts need at least 1 token (got a length of {length}).")
    if int(length) > lm.stack.context_length:
        raise LabError(f"Random prompts of {length} tokens exceed the model's context of "
                       f"{lm.stack.context_length} tokens; ask for at most {lm.stack.context_length}.")
    vocab = min(lm.stack.vocab_size, lm.tokenizer.vocab_size or lm.stack.vocab_size)
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, vocab, (int(n), int(length)), generator=gen).tolist()


def _printable(text: str) -> str:
    """``text`` safe to quote inside a one-line message: newlines, tabs and other unprintable
    characters (terminal escapes included) shown as their escapes (``\\n``), not acted on."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@dataclass
class _Group:
    """Prompts of one length, run as one batch."""

    rows: list[int]  # positions in the user's order
    ids: torch.Tensor  # (b, T) long


@dataclass
class _Plan:
    prompts: list[str]
    token_ids: list[list[int]]
    groups: list[_Group]
    n_layer: int
    steps: np.ndarray
    bytes: int
    memory: MemoryPlan


def _plan(lm: "LoadedModel", prompts: Sequence[PromptLike], cfg: ConsensusConfig, new_tokens: int = 0) -> _Plan:
    cfg.check()
    if prompts is None or len(prompts) == 0:
        raise LabError("No prompts to run; type a prompt (or several) or ask for random prompts.")
    stack, tok = lm.stack, lm.tokenizer
    texts, ids = [], []
    for n, p in enumerate(prompts, start=1):
        if isinstance(p, str):
            if not p.strip():
                raise LabError(f"Prompt {n} is empty; type some text or remove it.")
            t = tok.encode(p)
            if not t:
                raise LabError(f"Prompt {n} encodes to no tokens; type some text or remove it.")
            texts.append(p)
        else:
            t = [int(i) for i in p]
            if not t:
                raise LabError(f"Prompt {n} has no tokens; give it at least one token id or remove it.")
            bad = [i for i in t if not 0 <= i < stack.vocab_size]
            if bad:
                raise LabError(f"Prompt {n} has token id {bad[0]} outside the model's vocabulary of "
                               f"{stack.vocab_size}; use ids 0..{stack.vocab_size - 1}.")
            texts.append(readable_text(tok, t))
        limit = stack.context_length - new_tokens
        if len(t) > limit:
            short = _printable(shorten(texts[-1], 43))
            extra = f" plus {new_tokens} new tokens" if new_tokens else ""
            raise LabError(f"Prompt {n} ('{short}') has {len(t)} tokens{extra}, beyond the model's context of "
                           f"{stack.context_length}; shorten it to at most {max(limit, 0)} tokens"
                           f"{' or ask for fewer new tokens' if new_tokens else ''}.")
        ids.append(t)
    memory = _check_memory(lm, ids, cfg, new_tokens, texts)
    by_len: dict[int, list[int]] = {}
    for row, t in enumerate(ids):
        by_len.setdefault(len(t), []).append(row)
    b = memory.batch
    groups = [_Group(rows[i:i + b], torch.tensor([ids[r] for r in rows[i:i + b]], dtype=torch.long))
              for rows in by_len.values() for i in range(0, len(rows), b)]
    steps = recorded_steps(int(cfg.iterations) * stack.n_layer, int(cfg.record_every))
    return _Plan(texts, ids, groups, stack.n_layer, steps, memory.total, memory)


# -- the walk -------------------------------------------------------------------------------------
# Compute happens in small no_grad functions, not in the generators: grad mode is thread-local, so a
# no_grad block around a ``yield`` would leak into (or be overridden by) the consumer's code.

@torch.no_grad()
def _embed(lm: "LoadedModel", ids: torch.Tensor) -> torch.Tensor:
    return lm.stack.embed(ids.to(lm.stack.device))


@torch.no_grad()
def _block(lm: "LoadedModel", layer: int, h: torch.Tensor, skip_mlp: bool) -> torch.Tensor:
    return lm.stack.block(layer, h, skip_mlp=skip_mlp)


@torch.no_grad()
def _final_norm(lm: "LoadedModel", h: torch.Tensor) -> torch.Tensor:
    return lm.stack.final_norm(h)


@torch.no_grad()
def _lens_argmax(lm: "LoadedModel", h: torch.Tensor) -> list[list[int]]:
    """Argmax token at every position of the normed state ``h`` ``(b, T, D)``."""
    return lm.stack.unembed(h).argmax(-1).tolist()


@torch.no_grad()
def _last_logits(lm: "LoadedModel", h: torch.Tensor) -> torch.Tensor:
    """float32 CPU logits ``(b, V)`` of the last position, cut to the tokenizer's vocabulary."""
    logits = lm.stack.unembed(h[:, -1]).float().cpu()
    vocab = lm.tokenizer.vocab_size
    if vocab and vocab < logits.shape[-1]:
        logits[:, vocab:] = float("-inf")
    return logits


class _Recorder:
    """Device buffer for the statistics of one batch, copied to the host in chunks.

    ``record`` only launches device work (the statistics and an indexed write into a
    preallocated buffer); ``flush`` is the one host synchronisation, at event boundaries.
    """

    def __init__(self, rows: list[int], T: int, col_of_step: _Columns, steps: np.ndarray, device: torch.device,
                 cfg: ConsensusConfig, matrix: bool, window: int, sink, token: int | None = None, at_least: int = 1):
        self.rows, self.T, self.col_of_step, self.steps = rows, T, col_of_step, steps
        self.matrix, self.sink, self.token = matrix, sink, token
        b = len(rows)
        per_col = 4 * b * (len(STAT_NAMES) + (T * T if matrix else 0))
        self.capacity = _capacity(per_col, cfg, at_least, window)
        self.buf = torch.empty(b, self.capacity, len(STAT_NAMES), dtype=torch.float32, device=device)
        self.mbuf = (torch.empty(b, self.capacity, T, T, dtype=torch.float32, device=device) if matrix else None)
        self.cols: list[int] = []
        self.step, self.h = -1, None  # the latest layer-step seen and its state (a reference, no copy)
        self.done = -1  # the layer-step the host copy has reached
        self.broken = False
        self._index: dict[tuple[int, ...], torch.Tensor] = {}

    @property
    def full(self) -> bool:
        return len(self.cols) == self.capacity

    @property
    def room(self) -> int:
        return self.capacity - len(self.cols)

    def record_iteration(self, first_step: int, stats: torch.Tensor, cos: torch.Tensor | None,
                         h: torch.Tensor) -> None:
        """Keep the recorded columns among layer-steps ``first_step .. first_step + L - 1`` from one
        iteration's statistics ``(b, L, 5)`` (and cosines ``(b, L, T, T)``); ``h`` is the state after it.
        The caller makes sure there is :attr:`room` for ``L`` columns."""
        L = stats.shape[1]
        self.step, self.h = first_step + L - 1, h
        cols = self.col_of_step.span(first_step, L)
        local = tuple(int(x) for x in np.flatnonzero(cols >= 0))
        if not local:
            return
        n, k = len(self.cols), len(local)
        if k == L:
            self.buf[:, n:n + k] = stats
            if cos is not None:
                self.mbuf[:, n:n + k] = cos
        else:
            idx = self._index.get(local)
            if idx is None:
                idx = self._index[local] = torch.tensor(local, device=stats.device)
            self.buf[:, n:n + k] = stats.index_select(1, idx)
            if cos is not None:
                self.mbuf[:, n:n + k] = cos.index_select(1, idx)
        self.cols.extend(int(c) for c in cols[list(local)])

    def record(self, step: int, h: torch.Tensor) -> None:
        self.step, self.h = step, h
        col = int(self.col_of_step[step])
        if col < 0:
            return
        stats, cos = _stats(h, self.matrix)
        n = len(self.cols)
        self.buf[:, n] = stats.to(self.buf.device, non_blocking=True)
        if cos is not None:
            self.mbuf[:, n] = cos.to(self.mbuf.device, non_blocking=True)
        self.cols.append(col)

    def flush(self, h: torch.Tensor | None = None) -> MetricChunk:
        """Copy the pending columns and the state ``h`` (default: the latest recorded one) to the
        host, hand them to the sink, and return the columns as a chunk. States that stopped being
        numbers (activations overflowing, in a 16-bit dtype soonest) keep the columns before them
        and end the run with a sentence, never a chart of NaN."""
        if self.broken:  # the run ended at a state that was not numbers: nothing after it is kept
            return MetricChunk(rows=list(self.rows), steps=self.steps[:0], token=self.token,
                               **{name: np.zeros((len(self.rows), 0), np.float32) for name in STAT_NAMES})
        h = self.h if h is None else h
        step = self.step
        n = len(self.cols)
        cols = np.asarray(self.cols, dtype=np.int64)
        # copies (not views: on the CPU .cpu() would alias the buffer the next chunk overwrites)
        stats = self.buf[:, :n].to("cpu", copy=True).numpy()  # (b, n, 5): the host synchronisation
        mat = self.mbuf[:, :n].to("cpu", copy=True).numpy() if self.mbuf is not None else None  # (b, n, T, T)
        hidden = h.float().cpu().numpy() if h is not None else None
        self.cols = []
        bad = ~np.isfinite(stats[:, :, _ALWAYS_FINITE]).all(axis=(0, 2))  # (n,) columns that are not numbers
        if bad.any() or (hidden is not None and not np.isfinite(hidden).all()):
            good = int(np.argmax(bad)) if bad.any() else n
            last = int(self.steps[cols[good - 1]]) if good else self.done
            self.sink(self.rows, cols[:good], stats[:, :good], None if mat is None else mat[:, :good], None, last)
            at = int(self.steps[cols[good]]) if good < n else step
            self.h, self.broken = None, True
            raise LabError(f"The hidden states stopped being numbers (NaN or infinity) by layer-step {at}: the "
                           f"activations overflow after so many iterations; load the model in float32 or run fewer "
                           f"iterations. What was computed before is kept.")
        self.sink(self.rows, cols, stats, mat, hidden, step)
        self.done = step
        parts = {name: stats[:, :, k] for k, name in enumerate(STAT_NAMES)}
        return MetricChunk(rows=list(self.rows), steps=self.steps[cols], token=self.token, **parts)


# statistics that are numbers for any finite state (the pairwise means are NaN for a one-token prompt)
_ALWAYS_FINITE = [STAT_NAMES.index(name) for name in ("metric", "effective_rank", "centroid_distance")]


@torch.no_grad()
def _stats(h: torch.Tensor, matrix: bool):
    return token_stats(h, matrix)


class _Clock:
    """Global layer-step counter and the event cadence shared by every batch of a run.

    Events fall due every ``total / max_events`` layer-steps, and at least once a second: a
    consumer can only stop a generator between events, so a very long run on big prompts must
    not go minutes without one.
    """

    def __init__(self, total: int, max_events: int, min_interval: float = 1.0):
        self.total = total
        self.done = 0
        self.every = max(1, math.ceil(total / max(1, max_events)))
        self.min_interval, self.last = min_interval, time.monotonic()

    def tick(self, n: int = 1) -> bool:
        """Count ``n`` layer-steps; True when an event fell due among them."""
        before, self.done = self.done, self.done + n
        now = time.monotonic()
        if self.done // self.every > before // self.every or now - self.last >= self.min_interval:
            self.last = now
            return True
        return False


class _IterationRunner:
    """One whole iteration as a unit: the ``L`` blocks, the final norm, and the statistics of all
    ``L`` block outputs in one batched pass (instead of ``L`` small ones), optionally captured as a
    CUDA graph on the first call and replayed after that.

    With a graph the returned tensors are static buffers, overwritten by the next call: callers
    copy what they keep before calling again. Weights re-initialised in place between calls are
    seen by the replay (same storage).
    """

    def __init__(self, lm: "LoadedModel", b: int, T: int, cfg: ConsensusConfig, graph: bool):
        st = lm.stack
        self.lm, self.skip_mlp, self.matrix, self.L = lm, cfg.skip_mlp, cfg.matrix, st.n_layer
        self.b, self.T = b, T
        self.states = torch.empty(b, st.n_layer, T, st.d_model, dtype=st.dtype, device=st.device)  # (b, L, T, D)
        self.h_in = torch.empty(b, T, st.d_model, dtype=st.dtype, device=st.device)
        self.use_graph, self.graph, self.out = graph, None, None

    @staticmethod
    def scratch_bytes(lm: "LoadedModel", b: int, T: int, matrix: bool) -> int:
        st = lm.stack
        size = torch.finfo(st.dtype).bits // 8
        rows = b * st.n_layer * T
        return rows * st.d_model * (size + 8) + rows * T * 4 * (4 if matrix else 3)  # states, float copies, T x T

    @torch.no_grad()
    def _body(self):
        h = self.h_in
        for layer in range(self.L):
            h = self.lm.stack.block(layer, h, skip_mlp=self.skip_mlp)
            self.states[:, layer].copy_(h)
        out = self.lm.stack.final_norm(h)
        stats, cos = token_stats(self.states.flatten(0, 1), self.matrix)  # (b*L, 5), (b*L, T, T)
        stats = stats.view(self.b, self.L, -1)
        return out, stats, (cos.view(self.b, self.L, self.T, self.T) if cos is not None else None)

    @torch.no_grad()
    def _capture(self) -> None:
        dev = self.h_in.device
        try:
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):  # warm-up: library handles and kernel choices made outside the capture
                for _ in range(2):
                    self._body()
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.out = self._body()
            self.graph = graph
        except _OOM:
            raise
        except RuntimeError as e:  # a model whose blocks cannot be captured still runs, one launch at a time
            warnings.warn(f"CUDA graph capture failed ({first_line(e)}); running without graphs.")
            self.use_graph, self.graph, self.out = False, None, None

    def __call__(self, h: torch.Tensor):
        """``(state after the final norm (b, T, D), stats (b, L, 5), cosines (b, L, T, T) or None)``."""
        self.h_in.copy_(h)
        if self.use_graph and self.graph is None:
            self._capture()
        if self.graph is None:
            return self._body()
        self.graph.replay()
        return self.out


def _engine(lm: "LoadedModel", cfg: ConsensusConfig, b: int, T: int) -> str:
    """The engine a batch of ``b`` prompts of ``T`` tokens runs on (see :data:`ENGINES`)."""
    if cfg.engine != "auto":
        if cfg.engine == "graph" and lm.stack.device.type != "cuda":
            raise LabError("The 'graph' engine needs the model on a CUDA GPU; use engine 'auto' on this device.")
        return cfg.engine
    st = lm.stack
    one_gpu = st.device.type == "cuda" and all(d == st.device for d in st.block_devices())
    per_col = 4 * b * (len(STAT_NAMES) + (T * T if cfg.matrix else 0))
    fits = (_IterationRunner.scratch_bytes(lm, b, T, cfg.matrix) <= FUSED_BUDGET
            and per_col * (st.n_layer + 2) <= DEVICE_CHUNK_BUDGET)
    if one_gpu and fits and cfg.reinit != "block" and int(cfg.iterations) >= MIN_GRAPH_ITERATIONS \
            and not cfg.interventions:  # hooks are Python: kept out of CUDA graphs
        return "graph"
    return "block"


def _iterate(lm: "LoadedModel", h: torch.Tensor, cfg: ConsensusConfig, rec: _Recorder, clock: _Clock,
             on_iteration=None, runner: _IterationRunner | None = None) -> Iterator:
    """N iterations from the embeddings ``h``; yields events, returns the final state.

    ``on_iteration(i, h)`` (a generator) runs after iteration ``i``'s final norm, before any
    per-iteration re-initialisation. With a ``runner`` the iteration is one unit (events and
    stops fall between iterations); without, it goes block by block.
    """
    L, N = lm.stack.n_layer, int(cfg.iterations)
    total = N * L
    rec.record(0, h)
    s = 0
    for i in range(N):
        if runner is not None:
            if rec.room < L:
                yield Progress(clock.done, clock.total, rec.flush())
            h, stats, cos = runner(h)
            rec.record_iteration(s + 1, stats, cos, h)
            s += L
            if clock.tick(L) or rec.room < L:
                yield Progress(clock.done, clock.total, rec.flush(h))
        else:
            for layer in range(L):
                h = _block(lm, layer, h, cfg.skip_mlp)
                s += 1
                rec.record(s, h)
                if cfg.reinit == "block" and s < total:
                    lm.stack.reinit(cfg.seed + s)
                if clock.tick() or rec.full:
                    yield Progress(clock.done, clock.total, rec.flush(h))
            h = _final_norm(lm, h)
        if on_iteration is not None:
            yield from on_iteration(i, h, s)
        if cfg.reinit == "iteration" and i < N - 1:
            lm.stack.reinit(cfg.seed + i + 1)
    yield Progress(clock.done, clock.total, rec.flush(h))
    return h


def _runner_for(lm: "LoadedModel", cfg: ConsensusConfig, b: int, T: int) -> tuple[_IterationRunner | None, int]:
    """The runner for one batch (None: block by block) and the recorder window it needs."""
    engine = _engine(lm, cfg, b, T)
    if engine == "block":
        return None, 0
    return _IterationRunner(lm, b, T, cfg, graph=engine == "graph"), lm.stack.n_layer + 2


def _start(lm: "LoadedModel", cfg: ConsensusConfig, ids: torch.Tensor,
           b: int) -> tuple[torch.Tensor, _IterationRunner | None, int]:
    """Where a run over ``ids`` (``b`` prompts) begins: the weights re-initialised from the seed when
    the run asks for it, then the embeddings, and the runner with the recorder window it needs."""
    if cfg.reinit != "none":
        lm.stack.reinit(cfg.seed)
    h = _embed(lm, ids)
    runner, need = _runner_for(lm, cfg, b, ids.shape[1])
    return h, runner, need


def _framed(lm: "LoadedModel", plan: _Plan, cfg: ConsensusConfig, clock: _Clock, result, t0: float,
            groups) -> Iterator[ConsensusEvent]:
    """What every run does around its work: :class:`Started`, then the events of
    ``groups(lm, under_way)`` (``lm`` the model the run walks, see :func:`_walked_model`;
    ``under_way`` a list that holds the recorder of the chunk in progress), then :class:`Finished`.
    A device out of memory becomes a :class:`LabError` carrying the partial result; however the run
    ends (also stopped mid-chunk) what the device already holds is kept and the run's time is set."""
    lm = _walked_model(lm, cfg)
    under_way: list[_Recorder] = []
    yield Started(_info(lm, plan, cfg, clock.total), result)
    try:
        yield from groups(lm, under_way)
    except _OOM as e:
        raise _oom_error(e, result) from e
    finally:
        if under_way:  # stopped mid-chunk: keep what the device already holds
            try:
                under_way[0].flush()
            except Exception:  # the device may be unusable after a failure; the host copy stands
                pass
        result.seconds = time.perf_counter() - t0
    yield Finished(result)


def _walked_model(lm: "LoadedModel", cfg: ConsensusConfig) -> "LoadedModel":
    """The model a run walks: ``lm`` itself, or a private copy when the run re-initialises weights
    and ``lm`` must stay untouched (see the module docstring)."""
    if cfg.reinit == "none" or not cfg.restore_weights:
        return lm
    return _private_copy(lm)


def _private_copy(lm: "LoadedModel") -> "LoadedModel":
    """Same modules, buffers, devices, dtypes and parameter strides as ``lm``, own parameters.

    A re-init run re-draws every parameter before it reads one, so the copy's parameters are left
    uninitialised rather than copied (no time spent on values that are overwritten). Seeding the
    deepcopy memo with them keeps tied weights tied: each original parameter maps to one new one.
    """
    try:
        memo = {id(p): torch.nn.Parameter(torch.empty_like(p), requires_grad=p.requires_grad)
                for p in lm.model.parameters()}
        model = copy.deepcopy(lm.model, memo)
    except (_OOM, MemoryError) as e:
        raise LabError(f"Re-initialising weights needs a second copy of the model on {lm.stack.device}, and it "
                       f"does not fit; use a 16-bit dtype, a smaller model or the CPU, or the CLI, which "
                       f"re-initialises its own copy in place.") from e
    return replace(lm, model=model, stack=stack_for(model))


def _oom_error(e: Exception, result) -> LabError:
    err = LabError("The device ran out of memory during the consensus run; use fewer or shorter prompts, "
                   "drop the token cosine matrices or record fewer points (record every k-th layer-step), "
                   "or run on the CPU. What was computed before is kept.")
    err.result = result  # type: ignore[attr-defined]
    return err


_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


# -- consensus runs ---------------------------------------------------------------------------------

def consensus_stream(lm: "LoadedModel", prompts: Sequence[PromptLike],
                     cfg: ConsensusConfig | None = None) -> Iterator[ConsensusEvent]:
    """Run consensus on ``prompts`` (texts, or token-id lists used as they are).

    Everything is checked before anything runs, so a bad input raises :class:`LabError` from this
    call itself: no prompts, an empty prompt, one longer than the context, N < 1, decode
    iterations outside ``0..N-1``, or a recording bigger than ``cfg.memory_budget`` (the message
    offers a ``record_every`` that fits). Prompts of different lengths run as separate batches,
    one per length, in order of first appearance. Yields :class:`Started` first, then
    :class:`Progress` (about ``cfg.max_events`` in all) and :class:`Decoded`, and :class:`Finished`
    last. A CUDA out-of-memory error becomes a :class:`LabError` carrying the partial result as
    ``err.result``.
    """
    cfg = cfg or ConsensusConfig()
    plan = _plan(lm, prompts, cfg)
    return _intervened(lm, plan, cfg, _consensus_events(lm, plan, cfg))


def _intervened(lm: "LoadedModel", plan: _Plan, cfg: ConsensusConfig, events: Iterator) -> Iterator:
    """``events`` walked under ``cfg.interventions`` (means of ``:mean`` ablations over the run's prompts)."""
    from ..interventions.run import with_interventions
    from ..interventions.spec import parse_specs
    return with_interventions(lm, events, parse_specs(cfg.interventions), plan.token_ids, cfg.transcoders)


def _new_result(lm: "LoadedModel", plan: _Plan, cfg: ConsensusConfig) -> ConsensusResult:
    B, P = len(plan.token_ids), len(plan.steps)
    T = max(len(t) for t in plan.token_ids)

    def nan(*shape):
        return np.full(shape, np.nan, dtype=np.float32)

    return ConsensusResult(
        model=lm.name, prompts=plan.prompts, token_ids=plan.token_ids, config=cfg, n_layer=plan.n_layer,
        steps=plan.steps, hidden=nan(B, T, lm.stack.d_model), matrix=recordings(B, T, T, P) if cfg.matrix else None,
        decodings={int(i): [None] * B for i in sorted(set(cfg.decode_iterations))},
        lens_tokens={int(i): [None] * B for i in sorted(set(cfg.decode_iterations))},
        steps_done=np.full(B, -1, dtype=np.int64), device=str(lm.stack.device),
        **{name: recordings(B, P) for name in STAT_NAMES})


def _info(lm: "LoadedModel", plan: _Plan, cfg: ConsensusConfig, total: int) -> dict:
    return dict(model=lm.name, prompts=plan.prompts, lengths=[len(t) for t in plan.token_ids],
                groups=[g.rows for g in plan.groups], n_layer=plan.n_layer, iterations=int(cfg.iterations),
                total=total, columns=len(plan.steps), bytes=plan.bytes, device=str(lm.stack.device))


def _consensus_events(lm: "LoadedModel", plan: _Plan, cfg: ConsensusConfig) -> Iterator[ConsensusEvent]:
    result = _new_result(lm, plan, cfg)
    NL = int(cfg.iterations) * plan.n_layer
    clock = _Clock(NL * len(plan.groups), cfg.max_events)
    col_of_step = _Columns(NL, int(cfg.record_every))
    decode_at = set(int(i) for i in cfg.decode_iterations)
    window = clock.every // int(cfg.record_every) + 2
    t0 = time.perf_counter()

    def sink(rows, cols, stats, mat, hidden, step):
        r = np.asarray(rows)
        if len(cols):
            result.reserve(int(cols[-1]) + 1)  # a chunk's columns ascend
        # a chunk's columns are consecutive: slices keep numpy on its fast copy path
        c = slice(int(cols[0]), int(cols[-1]) + 1) if len(cols) and cols[-1] - cols[0] + 1 == len(cols) else cols
        at = (r, c) if isinstance(c, slice) else np.ix_(r, cols)
        for k, name in enumerate(STAT_NAMES):
            getattr(result, name)[at] = stats[:, :, k]
        if mat is not None and len(cols):
            T = mat.shape[-1]
            for i, row in enumerate(rows):
                result.matrix[row, :T, :T][..., c] = mat[i].transpose(1, 2, 0)  # (n, T, T) -> (T, T, n)
        if hidden is not None:
            result.hidden[r, :hidden.shape[1]] = hidden
        result.steps_done[r] = step
        result.seconds = time.perf_counter() - t0

    def lens(lm, rows):
        def on_iteration(i, h, s):
            if i in decode_at:
                ids = _lens_argmax(lm, h)
                texts = [lm.tokenizer.decode(t) for t in ids]
                tokens = [readable_tokens(lm.tokenizer, t) for t in ids]  # per position, aligned with the input
                for r, t, k in zip(rows, texts, tokens):
                    result.decodings[i][r], result.lens_tokens[i][r] = t, k
                yield Decoded(i, list(rows), texts, tokens)
        return on_iteration

    def groups(lm, under_way):
        for g in plan.groups:
            h, runner, need = _start(lm, cfg, g.ids, len(g.rows))
            under_way[:] = [_Recorder(g.rows, g.ids.shape[1], col_of_step, plan.steps, h.device, cfg, cfg.matrix,
                                      window, sink, at_least=need)]
            yield from _iterate(lm, h, cfg, under_way[0], clock, lens(lm, g.rows), runner)
            under_way.clear()

    yield from _framed(lm, plan, cfg, clock, result, t0, groups)


def run_consensus(lm: "LoadedModel", prompts: Sequence[PromptLike],
                  cfg: ConsensusConfig | None = None) -> ConsensusResult:
    """:func:`consensus_stream` run to the end."""
    result = None
    for ev in consensus_stream(lm, prompts, cfg):
        if isinstance(ev, Finished):
            result = ev.result
    return result


# -- consensus decoding -------------------------------------------------------------------------------

def consensus_decode_stream(lm: "LoadedModel", prompts: Sequence[PromptLike], cfg: ConsensusConfig | None = None,
                            decode: DecodeConfig | None = None) -> Iterator[ConsensusEvent]:
    """Generate ``decode.new_tokens`` tokens per prompt, each by running ``cfg.iterations``
    iterations over the whole current sequence (from its embeddings) and sampling from the last
    position of the final state (after the last final norm) with temperature and top-p
    (:mod:`core.generation.sampling`), seeded. Re-initialisation, if any, restarts from ``reinit(seed)``
    for every token, so each token's run is reproducible on its own. Events: :class:`Started`,
    :class:`Progress` (chunks carry ``token``), :class:`TokenSampled` after each token,
    :class:`Finished`. Checks as :func:`consensus_stream`, plus prompt + new tokens within the
    context. Logit-lens decodings and cosine matrices belong to consensus runs, not to this."""
    cfg = cfg or ConsensusConfig()
    decode = decode or DecodeConfig()
    decode.check()
    if cfg.matrix:
        raise LabError("Token cosine matrices are recorded by consensus runs, not by consensus decoding; "
                       "turn the matrices off or run consensus without generating tokens.")
    if cfg.decode_iterations:
        raise LabError("Logit-lens decodings after chosen iterations belong to consensus runs, not to consensus "
                       "decoding; drop the decode iterations or run consensus without generating tokens.")
    plan = _plan(lm, prompts, cfg, new_tokens=int(decode.new_tokens))
    return _intervened(lm, plan, cfg, _decode_events(lm, plan, cfg, decode))


def _decode_events(lm: "LoadedModel", plan: _Plan, cfg: ConsensusConfig,
                   decode: DecodeConfig) -> Iterator[ConsensusEvent]:
    B, K, P = len(plan.token_ids), int(decode.new_tokens), len(plan.steps)
    NL = int(cfg.iterations) * plan.n_layer
    result = ConsensusDecodeResult(
        model=lm.name, prompts=plan.prompts, token_ids=plan.token_ids, new_ids=[[] for _ in range(B)],
        completions=[""] * B, texts=list(plan.prompts), traces=np.full((B, K, P), np.nan, dtype=np.float32),
        steps=plan.steps, config=cfg, decode=decode, n_layer=plan.n_layer, device=str(lm.stack.device))
    clock = _Clock(NL * K * len(plan.groups), cfg.max_events)
    col_of_step = _Columns(NL, int(cfg.record_every))
    window = clock.every // int(cfg.record_every) + 2
    gen = torch.Generator().manual_seed(int(cfg.seed if decode.seed is None else decode.seed))
    t0 = time.perf_counter()

    def sink_for(k):
        def sink(rows, cols, stats, mat, hidden, step):
            result.traces[np.ix_(np.asarray(rows), [k], cols)] = stats[:, None, :, 0]
            result.seconds = time.perf_counter() - t0
        return sink

    def groups(lm, under_way):
        for g in plan.groups:
            seq = g.ids
            for k in range(K):
                h, runner, need = _start(lm, cfg, seq, len(g.rows))
                under_way[:] = [_Recorder(g.rows, seq.shape[1], col_of_step, plan.steps, h.device, cfg, False, window,
                                          sink_for(k), token=k, at_least=need)]
                h = yield from _iterate(lm, h, cfg, under_way[0], clock, None, runner)
                under_way.clear()
                logits = apply_top_p(apply_temperature(_last_logits(lm, h), float(decode.temperature)),
                                     float(decode.top_p))
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=gen)  # (b, 1)
                seq = torch.cat([seq, nxt], dim=1)
                ids = nxt[:, 0].tolist()
                for r, t in zip(g.rows, ids):
                    result.new_ids[r].append(int(t))
                    result.completions[r] = lm.tokenizer.decode(result.new_ids[r])
                    result.texts[r] = lm.tokenizer.decode(lm.tokenizer.strip_prefix(plan.token_ids[r]) + result.new_ids[r])
                yield TokenSampled(k, list(g.rows), ids, readable_tokens(lm.tokenizer, ids))

    yield from _framed(lm, plan, cfg, clock, result, t0, groups)


def consensus_decode(lm: "LoadedModel", prompts: Sequence[PromptLike], cfg: ConsensusConfig | None = None,
                     decode: DecodeConfig | None = None) -> ConsensusDecodeResult:
    """:func:`consensus_decode_stream` run to the end."""
    result = None
    for ev in consensus_decode_stream(lm, prompts, cfg, decode):
        if isinstance(ev, Finished):
            result = ev.result
    return result
