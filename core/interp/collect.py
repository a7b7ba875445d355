"""Collecting what makes each feature fire, into a new feature store.

Two passes over ``n_tokens`` of the model's corpus, cut into windows of ``seq_len`` tokens:

1. *Scan*: every layer's feature activations for every token. Per feature: how often it fires,
   its mean and max, a histogram of its activations, which tokens it fires on, and, per window,
   its strongest activation. Windows are split into an *explain* part and a *held-out* part
   (every ``holdout_every``-th window). From the explain part we keep the ``top_k`` windows with
   the strongest activation and a uniform random sample of activating windows (random-priority
   reservoir) from which ``n_quantile`` samples spread over the activation range are picked.
   From the held-out part we keep random activating windows (``heldout``) and random windows
   where the feature never fires (``negative``): the material of honest explanation scores.
2. *Contexts*: the kept windows and every held-out window are run again. Kept windows are cut to
   ``window_before`` tokens before and ``window_after`` after the activation, with the feature's
   activation on every token. In the held-out windows we look for *hard negatives* (``hard``):
   places holding one of the feature's ``n_hard_tokens`` top tokens (known only after the scan)
   where the feature is silent on the whole cut-out window: an explanation that only lists tokens
   calls these "fires", a good one does not.

Scoring windows are written packed (:meth:`FeatureStore.put_scoring`), pointing into the held-out
corpus windows stored once (:meth:`FeatureStore.put_windows`).

The decoder direction of each feature is read through the unembedding to list the output tokens
it promotes and suppresses (see :func:`logit_effects` for the final-norm caveat).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Union

import numpy as np
import torch
import torch.nn.functional as TF

from ..errors import LabError
from .activations import CorpusTokens, corpus_tokens, iter_batches, mlp_io, model_inputs
from .config import CollectConfig
from .store import HIST_EDGES, Context, FeatureStats, FeatureStore, store_path, writer_lock

if TYPE_CHECKING:
    from ..models.loading import LoadedModel
    from .transcoder import Transcoder, TranscoderSet


@dataclass
class CollectStarted:
    layers: list[int]
    n_windows: int
    total: int                        # progress units: scan batches + context batches


@dataclass
class CollectProgress:
    phase: str                        # "scan" | "contexts" | "write"
    done: int                         # progress units done (over both passes)
    total: int


@dataclass
class CollectFinished:
    path: Path
    alive: dict[int, int]             # features that fired at least once, per layer
    seconds: float


CollectEvent = Union[CollectStarted, CollectProgress, CollectFinished]


# -- streaming selections ---------------------------------------------------------------------------

class _TopK:
    """Per-feature running top-``k`` of (key, window, position, value), merged batch by batch."""

    def __init__(self, k: int, n_features: int, device):
        self.k = k
        self.key = torch.full((k, n_features), float("-inf"), device=device)
        self.win = torch.full((k, n_features), -1, dtype=torch.long, device=device)
        self.pos = torch.zeros((k, n_features), dtype=torch.long, device=device)
        self.val = torch.zeros((k, n_features), device=device)

    def add(self, key: torch.Tensor, win: torch.Tensor, pos: torch.Tensor, val: torch.Tensor) -> None:
        """All ``(b, F)``; entries with key -inf are never kept."""
        if self.k == 0:
            return
        keys = torch.cat([self.key, key])                                            # (k + b, F)
        top = keys.topk(min(self.k, keys.shape[0]), dim=0)
        self.key = top.values
        self.win = torch.cat([self.win, win]).gather(0, top.indices)
        self.pos = torch.cat([self.pos, pos]).gather(0, top.indices)
        self.val = torch.cat([self.val, val]).gather(0, top.indices)

    def entries(self, f: int) -> list[tuple[int, int, float]]:
        """``(window, position, value)`` of feature ``f``, by key, best first."""
        if not hasattr(self, "_np"):  # read back once, then per-feature lookups stay on the host
            self._np = tuple(t.cpu().numpy() for t in (self.key, self.win, self.pos, self.val))
        key, win, pos, val = self._np
        ok = np.isfinite(key[:, f])
        return [(int(w), int(p), float(v)) for w, p, v in zip(win[ok, f], pos[ok, f], val[ok, f])]


class _TokenCounts:
    """Sparse (feature, token) -> (count, activation sum): raw events are buffered and reduced to
    unique keys only when the buffer grows past ``reduce_at`` (and at the end)."""

    def __init__(self, vocab: int, reduce_at: int = 1 << 22):
        self.vocab, self.reduce_at = vocab, reduce_at
        self.keys = torch.zeros(0, dtype=torch.long)
        self.count = torch.zeros(0, dtype=torch.long)
        self.mass = torch.zeros(0)
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.n_pending = 0

    def add(self, feats: torch.Tensor, toks: torch.Tensor, vals: torch.Tensor) -> None:
        self.pending.append(((feats * self.vocab + toks).cpu(), vals.float().cpu()))
        self.n_pending += feats.numel()
        if self.n_pending >= self.reduce_at:
            self._reduce()

    def _reduce(self) -> None:
        if not self.pending:
            return
        new_keys = torch.cat([k for k, _ in self.pending])
        keys = torch.cat([self.keys, new_keys])
        count = torch.cat([self.count, torch.ones_like(new_keys)])
        mass = torch.cat([self.mass, torch.cat([v for _, v in self.pending])])
        uniq, inv = keys.unique(return_inverse=True)
        self.keys = uniq
        self.count = torch.zeros(len(uniq), dtype=torch.long).index_add_(0, inv, count)
        self.mass = torch.zeros(len(uniq)).index_add_(0, inv, mass)
        self.pending, self.n_pending = [], 0

    def top(self, n: int) -> dict[int, list[tuple[int, int]]]:
        """``{feature: [(token, count), ...]}`` by activation mass, strongest first."""
        self._reduce()
        feats = (self.keys // self.vocab).numpy()
        toks = (self.keys % self.vocab).numpy()
        order = np.lexsort((-self.mass.numpy(), feats))
        out: dict[int, list[tuple[int, int]]] = {}
        count = self.count.numpy()
        for i in order:
            lst = out.setdefault(int(feats[i]), [])
            if len(lst) < n:
                lst.append((int(toks[i]), int(count[i])))
        return out


class _LayerScan:
    def __init__(self, n_features: int, vocab: int, cfg: CollectConfig, device, gen: torch.Generator):
        F = n_features
        self.cfg, self.gen, self.device = cfg, gen, device
        self.count = torch.zeros(F, dtype=torch.long, device=device)
        self.total = torch.zeros(F, dtype=torch.float64, device=device)
        self.max = torch.zeros(F, device=device)
        self.edges = torch.tensor(HIST_EDGES, device=device)
        self.hist = torch.zeros(F, len(HIST_EDGES), dtype=torch.long, device=device)
        self.tokens = _TokenCounts(vocab)
        self.top = _TopK(cfg.top_k, F, device)
        self.reservoir = _TopK(max(4 * cfg.n_quantile, cfg.n_quantile + cfg.top_k) if cfg.n_quantile else 0, F, device)
        self.heldout = _TopK(cfg.n_heldout, F, device)
        self.negative = _TopK(cfg.n_negative, F, device)
        self.hard = _TopK(cfg.n_hard, F, device)
        self.hard_map: tuple[torch.Tensor, torch.Tensor] | None = None   # (tokens, features) sorted by token

    def is_held(self, window: np.ndarray) -> np.ndarray:
        h = self.cfg.holdout_every
        return (window % h == h - 1) if self.cfg.n_heldout or self.cfg.n_negative or self.cfg.n_hard else \
            np.zeros(len(window), dtype=bool)

    def plan_hard(self) -> None:
        """After the scan: which (token, feature) pairs make a hard negative (each feature's top tokens)."""
        if not self.cfg.n_hard or not self.cfg.n_hard_tokens:
            return
        pairs = [(t, f) for f, toks in self.tokens.top(self.cfg.n_hard_tokens).items() for t, _ in toks]
        if not pairs:
            return
        arr = torch.tensor(sorted(pairs), dtype=torch.long, device=self.device)
        self.hard_map = (arr[:, 0].contiguous(), arr[:, 1].contiguous())

    def add_hard(self, ids: torch.Tensor, acts: torch.Tensor, windows: torch.Tensor) -> None:
        """Hard negatives in held-out windows ``ids`` ``(b, T)`` with dense activations ``acts``
        ``(b, T, F)``: per feature, a random position holding one of its top tokens whose cut-out
        context has the feature silent throughout."""
        if self.hard_map is None or ids.shape[0] == 0:
            return
        b, T = ids.shape
        F = acts.shape[-1]
        dev = acts.device
        before, after = min(self.cfg.window_before, T - 1), min(self.cfg.window_after, T - 1)
        fire = (acts > 0).float().transpose(1, 2)                                        # (b, F, T)
        loud = TF.max_pool1d(TF.pad(fire, (before, after)), before + after + 1, stride=1) > 0  # (b, F, T)
        toks, feats = self.hard_map
        flat = ids.reshape(-1).to(dev)                                                   # (n,)
        lo, hi = torch.searchsorted(toks, flat), torch.searchsorted(toks, flat, right=True)
        counts = hi - lo
        if int(counts.sum()) == 0:
            return
        rows = torch.repeat_interleave(torch.arange(flat.numel(), device=dev), counts)     # (m,)
        first = torch.repeat_interleave(lo - (counts.cumsum(0) - counts), counts)
        f = feats[first + torch.arange(rows.numel(), device=dev)]                        # (m,)
        w, t = rows // T, rows % T
        quiet = ~loud[w, f, t]
        w, t, f = w[quiet], t[quiet], f[quiet]
        if w.numel() == 0:
            return
        key = torch.rand(w.numel(), generator=self.gen).to(dev)
        slot = w * F + f
        best = torch.full((b * F,), float("-inf"), device=dev).scatter_reduce_(0, slot, key, "amax")
        at_best = key == best[slot]
        pos = torch.zeros(b * F, dtype=torch.long, device=dev).scatter_(0, slot[at_best], t[at_best])
        win = windows.to(dev)[:, None].expand(b, F)
        self.hard.add(best.view(b, F), win, pos.view(b, F), torch.zeros(b, F, device=dev))

    def add(self, rows: torch.Tensor, feats: torch.Tensor, vals: torch.Tensor, ids: torch.Tensor,
            first_window: int) -> None:
        """The positive activations of windows ``first_window..`` as sparse entries: token ``rows``
        (index into the flattened ``(b, T)`` batch), ``feats`` and ``vals``; ``ids`` ``(b, T)``.
        Everything is computed from the entries, so the cost follows the activations that fire,
        not ``b * T * F``."""
        b, T = ids.shape
        F = self.count.numel()
        dev = vals.device
        self.count.index_add_(0, feats, torch.ones_like(feats))
        self.total.index_add_(0, feats, vals.double())
        self.max.scatter_reduce_(0, feats, vals, "amax")
        bins = (torch.bucketize(vals, self.edges, right=True) - 1).clamp_(0, len(HIST_EDGES) - 1)
        self.hist.view(-1).index_add_(0, feats * len(HIST_EDGES) + bins, torch.ones_like(bins))
        self.tokens.add(feats, ids.reshape(-1).to(dev)[rows], vals)

        # Strongest activation per (window, feature) and where it is.
        key = (rows // T) * F + feats
        best = torch.zeros(b * F, device=dev).scatter_reduce_(0, key, vals, "amax")
        at_best = vals == best[key]
        pos = torch.zeros(b * F, dtype=torch.long, device=dev).scatter_(0, key[at_best], (rows % T)[at_best])
        best, pos = best.view(b, F), pos.view(b, F)                                  # (b, F)

        win = (torch.arange(b, device=dev) + first_window)[:, None].expand(b, F)
        held_row = torch.from_numpy(self.is_held(np.arange(first_window, first_window + b))).to(dev)
        held = held_row[:, None].expand(b, F)
        ninf = torch.tensor(float("-inf"), device=dev)
        firing = best > 0
        self.top.add(torch.where(firing & ~held, best, ninf), win, pos, best)
        rand = torch.rand(b, F, generator=self.gen).to(dev)
        self.reservoir.add(torch.where(firing & ~held, rand, ninf), win, pos, best)
        self.heldout.add(torch.where(firing & held, rand, ninf), win, pos, best)
        if self.negative.k and bool(held_row.any()):
            pos_neg, silent = self._silent_positions(rows, feats, held_row, T, F)
            self.negative.add(torch.where(silent, rand, ninf), win, pos_neg, torch.zeros_like(best))

    def _silent_positions(self, rows: torch.Tensor, feats: torch.Tensor, held_row: torch.Tensor, T: int,
                          F: int, tries: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        """For each held-out window: ``tries`` random positions; per feature, the first whose
        cut-out context (window_before .. window_after around it) has the feature silent on every
        token. Returns ``(position (b, F), found (b, F))``."""
        dev = rows.device
        b = held_row.numel()
        held_idx = held_row.nonzero()[:, 0]                                            # (n_h,)
        n_h = held_idx.numel()
        local = torch.full((b,), -1, dtype=torch.long, device=dev)
        local[held_idx] = torch.arange(n_h, device=dev)
        cand = torch.randint(0, T, (n_h, tries), generator=self.gen).to(dev)          # (n_h, tries)
        e_h = local[rows // T]
        keep = e_h >= 0
        e_h, e_t, e_f = e_h[keep], (rows % T)[keep], feats[keep]
        loud = torch.zeros(n_h * tries * F, dtype=torch.bool, device=dev)
        for j in range(tries):
            c = cand[e_h, j]
            near = (e_t >= c - self.cfg.window_before) & (e_t <= c + self.cfg.window_after)
            loud[(e_h[near] * tries + j) * F + e_f[near]] = True
        silent = ~loud.view(n_h, tries, F)                                              # (n_h, tries, F)
        first = silent.to(torch.int8).argmax(1)                                          # (n_h, F)
        pos = torch.zeros(b, F, dtype=torch.long, device=dev)
        found = torch.zeros(b, F, dtype=torch.bool, device=dev)
        pos[held_idx] = cand.gather(1, first)
        found[held_idx] = silent.any(1)
        return pos, found


def sparse_acts(tc: "Transcoder", x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows, features, values)`` of the positive activations for ``x`` ``(N, d)``."""
    N = x.shape[0]
    if tc.cfg.activation == "topk":
        vals, idx = tc.encode_sparse(x)                                                 # (N, k)
        on = vals > 0
        rows = torch.arange(N, device=x.device)[:, None].expand_as(idx)
        return rows[on], idx[on], vals[on]
    acts = tc.encode(x)                                                                 # (N, F)
    rows, feats = (acts > 0).nonzero(as_tuple=True)
    return rows, feats, acts[rows, feats]


def _quantile_picks(samples: list[tuple[int, int, float]], exclude: set[int], n: int) -> list[tuple[int, int, float, float]]:
    """``n`` samples evenly spread over the sorted sample (skipping windows shown as top), with
    their quantile in [0, 1]."""
    pool = sorted((s for s in samples if s[0] not in exclude), key=lambda s: s[2])
    if not pool or n == 0:
        return []
    idx = np.unique(np.linspace(0, len(pool) - 1, num=min(n, len(pool))).round().astype(int))
    return [(*pool[i], i / max(len(pool) - 1, 1)) for i in idx]


# -- logit effects --------------------------------------------------------------------------------

@torch.no_grad()
def logit_effects(lm: "LoadedModel", tc: "Transcoder", n: int, chunk: int = 512) -> list[tuple[list[tuple[int, float]], list[tuple[int, float]]]]:
    """Per feature, the ``n`` output tokens whose logits its decoder row raises most and lowers
    most: ``W_dec[f]`` through the final norm's per-channel gain (centred first where that norm is a
    LayerNorm; an RMSNorm only rescales) and the unembedding.

    Caveat: this is the direct path only, and the final norm's division by the residual
    stream's scale is left out (it depends on everything else in the stream), so the values
    rank tokens for a feature but are not logit changes in any particular context.
    """
    stack = lm.stack
    W_U = stack.unembed_weight().detach().float()                                  # (V, d)
    gain = stack.final_gain()
    gain = gain.detach().float().to(W_U.device) if gain is not None else torch.ones(W_U.shape[1], device=W_U.device)
    banned = lm.tokenizer.mask_id if lm.tokenizer.mask_id is not None and lm.tokenizer.mask_id < W_U.shape[0] else None
    out = []
    W_dec = tc.W_dec.detach().float().to(W_U.device)
    for s in range(0, W_dec.shape[0], chunk):
        d = W_dec[s:s + chunk]
        if stack.final_norm_centres:
            d = d - d.mean(-1, keepdim=True)
        d = d * gain                                                                # (c, d)
        logits = d @ W_U.t()                                                        # (c, V)
        if banned is not None:
            logits[:, banned] = 0.0
        k = min(n, logits.shape[1])
        up, down = logits.topk(k, dim=-1), (-logits).topk(k, dim=-1)
        for i in range(d.shape[0]):
            out.append((list(zip(up.indices[i].tolist(), up.values[i].tolist())),
                        list(zip(down.indices[i].tolist(), (-down.values[i]).tolist()))))
    return out


# -- the job --------------------------------------------------------------------------------------

def collect_features(lm: "LoadedModel", tset: "TranscoderSet", cfg: CollectConfig | None = None, *,
                     out: str | Path | None = None, corpus: CorpusTokens | None = None) -> Iterator[CollectEvent]:
    """Build a fresh feature store for ``tset`` at ``out`` (default: ``<set folder>/features.sqlite``).

    The store is written to a temp file and renamed when complete; stopping the generator leaves
    any earlier store in place. The store's writer lock is taken before the first batch (so a
    describe job writing it meanwhile is found out at once, not after the whole scan) and held
    until the rename.
    """
    cfg = cfg or CollectConfig()
    cfg.check()
    tset.check_model(lm)
    layers = tset.layers if cfg.layers is None else sorted(set(cfg.layers))
    missing = [i for i in layers if i not in tset.transcoders]
    if missing:
        raise LabError(f"The transcoder set has no layer(s) {missing}; it covers {tset.layers}.")
    if out is None:
        if tset.folder is None:
            raise LabError("Say where to write the feature store (out=...): this transcoder set was never saved.")
        out = store_path(tset.folder)
    with writer_lock(out):
        yield from _collect(lm, tset, cfg, layers, Path(out), corpus)


def _collect(lm: "LoadedModel", tset: "TranscoderSet", cfg: CollectConfig, layers: list[int], out: Path,
             corpus: CorpusTokens | None) -> Iterator[CollectEvent]:
    stack = lm.stack
    seq_len = min(cfg.seq_len, stack.context_length)
    corpus = corpus or corpus_tokens(lm, cfg.dataset)
    windows = corpus.windows("train", seq_len, max(1, cfg.n_tokens // seq_len))
    gen = torch.Generator().manual_seed(cfg.seed)
    # What the model reads: the text itself, or for a diffusion model the text with masks drawn once
    # here, so both passes (and the contexts shown) see the same masked windows.
    windows = model_inputs(lm, torch.from_numpy(windows), gen).numpy()
    n_batches = (len(windows) + cfg.batch_size - 1) // cfg.batch_size
    device = stack.device
    t0 = time.perf_counter()
    total = 2 * n_batches + 1
    yield CollectStarted(layers=layers, n_windows=len(windows), total=total)

    scans = {i: _LayerScan(tset[i].n_features, stack.vocab_size, cfg, device, gen) for i in layers}
    done = 0
    with torch.no_grad():
        for start, ids in iter_batches(windows, cfg.batch_size):
            io = mlp_io(lm, ids, layers)
            for i in layers:
                x = io[i][0].float()
                scans[i].add(*sparse_acts(tset[i], x.reshape(-1, x.shape[-1])), ids, start)
            done += 1
            yield CollectProgress(phase="scan", done=done, total=total)

    # Which window/position/feature triples to cut contexts from, per layer (silent negatives need no
    # cutting: their activations are zero by construction, and their tokens are the stored window's).
    plans: dict[int, dict[str, list]] = {}
    for i in layers:
        sc = scans[i]
        sc.plan_hard()
        plan = {k: [] for k in ("feature", "kind", "rank", "window", "pos", "quantile")}
        for f in range(tset[i].n_features):
            if int(sc.count[f]) == 0:
                continue
            top = sc.top.entries(f)
            picks = [("top", r, w, p, None) for r, (w, p, _) in enumerate(top)]
            shown = {w for w, _, _ in top}
            picks += [("quantile", r, w, p, q) for r, (w, p, _, q) in
                      enumerate(_quantile_picks(sc.reservoir.entries(f), shown, cfg.n_quantile))]
            picks += [("heldout", r, w, p, None) for r, (w, p, _) in enumerate(sc.heldout.entries(f))]
            for kind, r, w, p, q in picks:
                for key, v in zip(plan, (f, kind, r, w, p, q)):
                    plan[key].append(v)
        plans[i] = {k: np.asarray(v, dtype=object if k in ("kind", "quantile") else np.int64) for k, v in plan.items()}

    all_windows = np.arange(len(windows))
    held_windows = all_windows[scans[layers[0]].is_held(all_windows)] if cfg.n_hard else np.zeros(0, dtype=np.int64)
    needed = np.unique(np.concatenate([plans[i]["window"] for i in layers] + [held_windows, np.zeros(0, dtype=np.int64)]))
    cut: dict[int, list] = {i: [None] * len(plans[i]["feature"]) for i in layers}
    for b, (_, ids) in enumerate(iter_batches(windows[needed], cfg.batch_size)):
        batch_windows = needed[b * cfg.batch_size:b * cfg.batch_size + ids.shape[0]]
        held = scans[layers[0]].is_held(batch_windows) if cfg.n_hard else np.zeros(len(batch_windows), dtype=bool)
        with torch.no_grad():
            io = mlp_io(lm, ids, layers)
        for i in layers:
            plan = plans[i]
            sel = np.nonzero(np.isin(plan["window"], batch_windows))[0]
            if sel.size == 0 and not held.any():
                continue
            acts = tset[i].encode(io[i][0].float())                                    # (b, T, F)
            if held.any():
                rows_h = torch.from_numpy(np.nonzero(held)[0])
                scans[i].add_hard(ids[rows_h], acts[rows_h.to(acts.device)], torch.from_numpy(batch_windows[held]))
            if sel.size == 0:
                continue
            row = np.searchsorted(batch_windows, plan["window"][sel])
            feats = torch.from_numpy(plan["feature"][sel]).to(acts.device)
            per = acts[torch.from_numpy(row).to(acts.device), :, feats].float().cpu().numpy()  # (m, T)
            ids_np = ids.numpy()
            for j, s in enumerate(sel):
                p = int(plan["pos"][s])
                lo, hi = max(0, p - cfg.window_before), min(seq_len, p + cfg.window_after + 1)
                cut[i][s] = (ids_np[row[j], lo:hi].tolist(), per[j, lo:hi].tolist(), p - lo)
        done += 1
        yield CollectProgress(phase="contexts", done=done, total=total)
    done = 2 * n_batches

    vocab_ids: set[int] = set()
    rows: dict[int, list[FeatureStats]] = {}
    contexts: dict[int, dict[int, list[Context]]] = {}
    scoring: dict[int, dict[int, dict[str, list[tuple[int, int, list[float]]]]]] = {}
    kept_windows: set[int] = set()
    for i in layers:
        sc, plan = scans[i], plans[i]
        n_tok = len(windows) * seq_len
        effects = logit_effects(lm, tset[i], cfg.n_logit_tokens)
        tok_top = sc.tokens.top(cfg.n_top_tokens)
        ctx_by_f: dict[int, list[Context]] = {}
        score_by_f: dict[int, dict[str, list[tuple[int, int, list[float]]]]] = {}
        for s in range(len(plan["feature"])):
            token_ids, acts, p = cut[i][s]
            f, kind, w = int(plan["feature"][s]), str(plan["kind"][s]), int(plan["window"][s])
            if kind == "heldout":
                score_by_f.setdefault(f, {}).setdefault(kind, []).append((w, int(plan["pos"][s]), acts))
                kept_windows.add(w)
                continue
            vocab_ids.update(token_ids)
            ctx_by_f.setdefault(f, []).append(Context(
                kind=kind, rank=int(plan["rank"][s]), tokens=[], token_ids=token_ids, acts=acts,
                position=p, activation=float(acts[p]), window=w, quantile=plan["quantile"][s]))
        for f in range(tset[i].n_features):
            if int(sc.count[f]) == 0:
                continue
            for kind, picked in (("negative", sc.negative.entries(f)), ("hard", sc.hard.entries(f))):
                for w, p, _ in picked:
                    lo, hi = max(0, p - cfg.window_before), min(seq_len, p + cfg.window_after + 1)
                    score_by_f.setdefault(f, {}).setdefault(kind, []).append((w, p, [0.0] * (hi - lo)))
                    kept_windows.add(w)
        contexts[i], scoring[i] = ctx_by_f, score_by_f
        count, total_act, mx, hist = (sc.count.cpu().numpy(), sc.total.cpu().numpy(), sc.max.cpu().numpy(),
                                      sc.hist.cpu().numpy())
        layer_rows = []
        for f in range(tset[i].n_features):
            up, down = effects[f] if count[f] else ([], [])  # a silent feature's card is never shown
            tops = tok_top.get(f, [])
            vocab_ids.update(t for t, _ in up + down)
            vocab_ids.update(t for t, _ in tops)
            c = int(count[f])
            layer_rows.append(FeatureStats(
                layer=i, feature=f, density=c / n_tok, n_active=c, max_act=float(mx[f]),
                mean_act=float(total_act[f] / c) if c else 0.0, hist=hist[f].tolist(),
                top_tokens=[(t, n) for t, n in tops], promoted=[(t, v) for t, v in up],
                suppressed=[(t, v) for t, v in down]))
        rows[i] = layer_rows
    window_ids = {w: windows[w].tolist() for w in sorted(kept_windows)}
    for ids_w in window_ids.values():
        vocab_ids.update(ids_w)

    yield CollectProgress(phase="write", done=done, total=total)
    tok = lm.tokenizer
    texts = {t: tok.token_str(t) for t in sorted(vocab_ids)}
    with FeatureStore.build(out) as store:
        store.set_vocab_size(stack.vocab_size)
        store.add_set(lm.spec, str(tset.folder) if tset.folder else None,
                      {"transcoder": tset.config.to_dict(), "collect": cfg.to_dict(), "seq_len": seq_len,
                       "corpus": corpus.source, "model_info": stack.describe()})
        store.put_vocab(texts)
        store.put_windows(window_ids)
        for i in layers:
            q = (tset.metrics.get("layers") or {}).get(str(i))
            store.put_layer(i, tset[i].n_features, q, n_tokens=len(windows) * seq_len)
            store.put_features([_with_text(r, texts) for r in rows[i]])
            for f, ctxs in contexts[i].items():
                store.put_contexts(i, f, ctxs)
            for f, kinds in scoring[i].items():
                for kind, picks in kinds.items():
                    store.put_scoring(i, f, kind, cfg.window_before, cfg.window_after, picks)
    yield CollectFinished(path=out, alive={i: int((scans[i].count > 0).sum()) for i in layers},
                          seconds=time.perf_counter() - t0)


def _with_text(r: FeatureStats, texts: dict[int, str]) -> FeatureStats:
    """Token ids -> their text in the lists a feature card shows."""
    r.top_tokens = [(texts[t], n) for t, n in r.top_tokens]
    r.promoted = [(texts[t], v) for t, v in r.promoted]
    r.suppressed = [(texts[t], v) for t, v in r.suppressed]
    return r
