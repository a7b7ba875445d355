"""Training a transcoder set: one transcoder per MLP layer, all layers at once, on activations
streamed from the model running over its corpus.

Each refill runs the model over ``buffer_batches`` batches of corpus windows (one forward pass
records every layer's MLP input and output), shuffles the tokens, and hands them out in
minibatches of ``batch_tokens``; every layer's transcoder takes one Adam step per minibatch.
The loss is the MSE normalised by the MLP output's variance (so layers of different scale learn
at the same pace) plus, for ``relu``, ``l1_coeff * sum(a)`` (decoder rows are unit-norm, so this
is the usual ``sum(a * ||W_dec||)``), or, for ``topk``, Gao et al.'s auxiliary loss that lets
features silent for ``dead_tokens`` tokens learn to explain what the live ones miss.

:func:`train_transcoders` is a generator of events; stop it by closing it (the consumer just
stops iterating). With ``out_dir`` the set is saved every ``save_every`` steps, at the end, and
when stopped, so work done is never lost. A loss that stops being a finite number (a learning
rate far too high) ends the run with a LabError and writes nothing more, so the last good set in
``out_dir`` is kept rather than overwritten with NaNs.

A feature store in ``out_dir`` (``features.sqlite``) describes the weights it was collected from.
Just before the first save replaces them, it is removed (:func:`drop_stale_store`; the first
:class:`Saved` event names it), so old features never describe new weights; ``transcoders
collect`` (which ``transcoders train`` runs unless told ``--no-collect``) builds the new one.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Union

import numpy as np
import torch

from .. import devices
from ..errors import LabError
from .activations import CorpusTokens, corpus_tokens, mlp_io, model_inputs
from .config import TranscoderConfig, TranscoderTrainConfig
from .quality import LayerQuality, evaluate_transcoders, metrics_json
from .transcoder import Transcoder, TranscoderSet

if TYPE_CHECKING:
    from ..models.loading import LoadedModel


# -- events ---------------------------------------------------------------------------------------

@dataclass
class TrainStarted:
    layers: list[int]
    n_features: int
    total_steps: int
    batch_tokens: int
    corpus: str


@dataclass
class TrainProgress:
    step: int                        # 1-based, after this many optimiser steps
    total_steps: int
    tokens: int                      # tokens seen per layer so far
    lr: float
    mse: dict[int, float]            # variance-normalised MSE per layer (about 1 - FVE) on this minibatch
    l0: dict[int, float]
    dead_fraction: dict[int, float]  # silent for dead_tokens tokens
    tokens_per_s: float


@dataclass
class Validated:
    step: int
    fve: dict[int, float]
    l0: dict[int, float]


@dataclass
class Saved:
    step: int
    folder: Path
    dropped_store: Path | None = None  # the previous weights' feature store, removed before this save


@dataclass
class Evaluated:
    quality: dict[int, LayerQuality]


@dataclass
class TrainFinished:
    transcoders: TranscoderSet
    seconds: float
    stopped: bool = False


TrainEvent = Union[TrainStarted, TrainProgress, Validated, Saved, Evaluated, TrainFinished]


# -- the loop -------------------------------------------------------------------------------------

class _Buffer:
    """Shuffled (ln2.hook_normalized, hook_mlp_out) tokens of every layer, refilled from the model as it drains."""

    def __init__(self, lm: "LoadedModel", windows: np.ndarray, layers: list[int], cfg: TranscoderTrainConfig,
                 gen: torch.Generator):
        self.lm, self.windows, self.layers, self.cfg, self.gen = lm, windows, layers, cfg, gen
        self.order = torch.randperm(len(windows), generator=gen).numpy()
        self.cursor = 0
        self.x: torch.Tensor | None = None
        self.pos = 0

    def _next_ids(self) -> torch.Tensor:
        if self.cursor + self.cfg.model_batch > len(self.order):
            self.order = torch.randperm(len(self.windows), generator=self.gen).numpy()
            self.cursor = 0
        rows = self.order[self.cursor:self.cursor + self.cfg.model_batch]
        self.cursor += self.cfg.model_batch
        return torch.from_numpy(self.windows[np.sort(rows)])

    @torch.no_grad()
    def _refill(self) -> None:
        xs, ys = [], []
        for _ in range(self.cfg.buffer_batches):
            ids = model_inputs(self.lm, self._next_ids(), self.gen)
            io = mlp_io(self.lm, ids, self.layers)
            d = io[self.layers[0]][0].shape[-1]
            xs.append(torch.stack([io[i][0].reshape(-1, d) for i in self.layers]))   # (L, b*T, d)
            ys.append(torch.stack([io[i][1].reshape(-1, d) for i in self.layers]))
        x, y = torch.cat(xs, 1).float(), torch.cat(ys, 1).float()                    # (L, N, d)
        perm = torch.randperm(x.shape[1], generator=self.gen).to(x.device)
        self.x, self.y, self.pos = x[:, perm], y[:, perm], 0

    def next(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` each ``(L, n, d)``."""
        if self.x is None or self.pos + n > self.x.shape[1]:
            self._refill()
            if self.x.shape[1] < n:
                raise LabError(f"One buffer holds {self.x.shape[1]} tokens, fewer than --batch-tokens {n}; raise "
                               f"--buffer-batches or --model-batch, or lower --batch-tokens.")
        x, y = self.x[:, self.pos:self.pos + n], self.y[:, self.pos:self.pos + n]
        self.pos += n
        return x, y


def _lr_at(step: int, cfg: TranscoderTrainConfig) -> float:
    total = cfg.total_steps
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_start = int(total * (1 - cfg.decay_fraction))
    if step >= decay_start and total > decay_start:
        return cfg.lr * max(0.0, (total - step) / (total - decay_start))
    return cfg.lr


def _layer_loss(tc: Transcoder, x: torch.Tensor, y: torch.Tensor, var: float, dead: torch.Tensor,
                cfg: TranscoderTrainConfig) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(loss, fired (F,) bool, normalised mse)`` for one layer's minibatch ``x, y`` ``(n, d)``."""
    if tc.cfg.activation == "topk":
        pre = tc.pre_acts(x)                                                        # (n, F)
        vals, idx = pre.topk(tc.cfg.k, dim=-1)
        vals = torch.relu(vals)
        y_hat = tc.decode_sparse(vals, idx)
        mse = ((y_hat - y) ** 2).sum(-1).mean() / var
        loss = mse
        n_dead = int(dead.sum())
        if n_dead and cfg.aux_coeff > 0:
            k_aux = min(cfg.aux_k, n_dead)
            a_vals, a_idx = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1)
            e_hat = tc.decode_sparse(a_vals, a_idx) - tc.b_dec  # no ReLU: silent latents still get a gradient
            err = (y - y_hat).detach()
            loss = loss + cfg.aux_coeff * ((e_hat - err) ** 2).sum(-1).mean() / var
        fired = torch.zeros(tc.n_features, dtype=torch.bool, device=x.device)
        fired[idx[vals > 0]] = True
        return loss, fired, float(mse.detach())
    acts = tc.encode(x)
    y_hat = tc.decode(acts)
    mse = ((y_hat - y) ** 2).sum(-1).mean() / var
    loss = mse + cfg.l1_coeff * acts.sum(-1).mean()
    return loss, (acts > 0).any(0), float(mse.detach())


def training_bytes(d_model: int, n_layers: int, n_features: int, seq_len: int, cfg: TranscoderTrainConfig) -> int:
    """A generous estimate of the working memory: per layer the encoder and decoder with their
    gradients and Adam's two moments, a minibatch's pre-activations, activations and their
    gradients, and the shuffle buffer of MLP inputs and outputs (float32 throughout)."""
    weights = 2 * n_features * d_model + n_features + d_model
    minibatch = cfg.batch_tokens * (3 * n_features + 6 * d_model)
    buffer = 2 * cfg.buffer_batches * cfg.model_batch * seq_len * d_model
    return 4 * n_layers * (4 * weights + minibatch + buffer)


def _check_fits(stack, n_layers: int, n_features: int, seq_len: int, cfg: TranscoderTrainConfig) -> None:
    """Refuse up front what the machine cannot hold, so a job ends with a sentence instead of the
    kernel's out-of-memory killer (a device whose free memory cannot be told passes)."""
    devices.require_free(training_bytes(stack.d_model, n_layers, n_features, seq_len, cfg), stack.device,
                         f"Training {n_layers} transcoder(s) of {n_features:,} features needs",
                         "lower --expansion or --batch-tokens, train fewer --layers at a time, or use a shorter "
                         "--seq-len.")


STORE_SIDECARS = ("-journal", "-wal", "-shm")  # SQLite's own files beside a store, gone with it


def drop_stale_store(folder: str | Path) -> Path | None:
    """Remove the feature store of the set in ``folder`` (and SQLite's files beside it), returned
    when there was one: called before new weights replace the ones it was collected from. Each
    removal is one unlink, so a reader sees the old store whole or no store, never a part."""
    from .store import store_path

    path = store_path(folder)
    found = path.exists()
    for p in [path] + [path.with_name(path.name + s) for s in STORE_SIDECARS]:
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise LabError(f"The feature store {p} describes the weights this training replaces and cannot be "
                           f"removed ({e.strerror or e}); remove it, or train into another --output-dir.") from None
    return path if found else None


def train_transcoders(lm: "LoadedModel", cfg: TranscoderTrainConfig | None = None, *,
                      corpus: CorpusTokens | None = None, out_dir: str | Path | None = None) -> Iterator[TrainEvent]:
    """Train one transcoder per MLP layer of ``lm``; see the module docstring for the events."""
    cfg = cfg or TranscoderTrainConfig()
    cfg.check()
    stack = lm.stack
    layers = list(range(stack.n_layer)) if cfg.layers is None else sorted(set(cfg.layers))
    bad = [i for i in layers if not 0 <= i < stack.n_layer]
    if bad or not layers:
        raise LabError(f"--layers must name layers between 0 and {stack.n_layer - 1} (got {cfg.layers}).")
    tcfg = TranscoderConfig(d_model=stack.d_model, n_features=cfg.expansion * stack.d_model,
                            activation=cfg.activation, k=cfg.k, l1_coeff=cfg.l1_coeff)
    tcfg.check()
    seq_len = min(cfg.seq_len, stack.context_length)
    corpus = corpus or corpus_tokens(lm, cfg.dataset, max_tokens=cfg.max_corpus_tokens)
    train_windows = corpus.windows("train", seq_len)
    val_split = "val" if corpus.val.size >= seq_len else "train"
    val_windows = corpus.windows(val_split, seq_len, cfg.val_windows)

    _check_fits(stack, len(layers), tcfg.n_features, seq_len, cfg)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = stack.device
    tcs = {i: Transcoder(tcfg, layer=i) for i in layers}
    for t in tcs.values():
        t.reset_parameters(gen)
        t.to(device).train()
    params = [p for t in tcs.values() for p in t.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.999))
    buf = _Buffer(lm, train_windows, layers, cfg, gen)

    # Training runs on scaled activations, x / s_in and y / s_out with s the per-coordinate RMS
    # (of y about its mean), so one learning rate suits every model and layer; the scales are
    # folded back into the weights on export (Transcoder.folded). b_dec starts at mean(y).
    x0, y0 = buf.next(min(cfg.batch_tokens * 4, cfg.buffer_batches * cfg.model_batch * seq_len))
    buf.pos = 0
    d = stack.d_model
    s_in: dict[int, float] = {}
    s_out: dict[int, float] = {}
    with torch.no_grad():
        for j, i in enumerate(layers):
            mean = y0[j].mean(0)
            s_in[i] = max(float((x0[j] ** 2).sum(-1).mean() / d) ** 0.5, 1e-12)
            s_out[i] = max(float(((y0[j] - mean) ** 2).sum(-1).mean() / d) ** 0.5, 1e-12)
            tcs[i].b_dec.copy_(mean / s_out[i])
    var = {i: float(d) for i in layers}  # E||y/s_out - mean||^2 = d by construction

    def export() -> dict[int, Transcoder]:
        return {i: tcs[i].folded(s_in[i], s_out[i]).eval().requires_grad_(False) for i in layers}
    since_fired = {i: torch.zeros(tcfg.n_features, dtype=torch.long, device=device) for i in layers}
    # Dead = silent for dead_tokens tokens, or a tenth of the run when that is shorter.
    dead_steps = max(1, min(cfg.dead_tokens, cfg.total_steps * cfg.batch_tokens // 10) // cfg.batch_tokens)

    tset = TranscoderSet(transcoders=tcs, config=tcfg, model=lm.spec, model_info=stack.describe(),
                         training={**cfg.to_dict(), "seq_len": seq_len, "corpus": corpus.source,
                                   "prepend_bos": bool(corpus.prefix),   # windows began with the model's BOS
                                   "scales": {str(i): [s_in[i], s_out[i]] for i in layers}})
    total = cfg.total_steps
    yield TrainStarted(layers=layers, n_features=tcfg.n_features, total_steps=total,
                       batch_tokens=cfg.batch_tokens, corpus=corpus.source)
    t0 = time.perf_counter()
    step = 0
    stale: dict[str, Path | None] = {}  # "dropped": the old store, once the first save has removed it

    def save(final: bool, quality: dict[int, LayerQuality] | None = None) -> Path | None:
        if out_dir is None:
            return None
        tset.transcoders = export()
        if "dropped" not in stale:  # before the weights change, so no moment pairs new weights with it
            stale["dropped"] = drop_stale_store(out_dir)
        tset.metrics = metrics_json(quality or {}, steps=step, tokens=step * cfg.batch_tokens, final=final,
                                    seconds=round(time.perf_counter() - t0, 2))
        return tset.save(out_dir, cfg.save_dtype)

    finished = diverged = False
    try:
        while step < total:
            lr = _lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            x, y = buf.next(cfg.batch_tokens)
            opt.zero_grad(set_to_none=True)
            losses, mse, l0 = [], {}, {}
            for j, i in enumerate(layers):
                dead = since_fired[i] >= dead_steps
                loss, fired, mse[i] = _layer_loss(tcs[i], x[j] / s_in[i], y[j] / s_out[i], var[i], dead, cfg)
                losses.append(loss)
                since_fired[i] += 1
                since_fired[i][fired] = 0
            total_loss = torch.stack(losses).sum()
            if not math.isfinite(float(total_loss.detach())):
                diverged = True
                raise LabError(_diverged(step + 1, mse, cfg, out_dir))
            total_loss.backward()
            for t in tcs.values():
                t.remove_parallel_grad()
            opt.step()
            for t in tcs.values():
                t.normalize_decoder()
            step += 1
            for i in layers:
                l0[i] = float(cfg.k) if cfg.activation == "topk" else float("nan")
            if cfg.activation == "relu":
                with torch.no_grad():
                    for j, i in enumerate(layers):
                        l0[i] = float((tcs[i].encode(x[j] / s_in[i]) > 0).float().sum(-1).mean())
            dt = time.perf_counter() - t0
            yield TrainProgress(step=step, total_steps=total, tokens=step * cfg.batch_tokens, lr=lr, mse=mse, l0=l0,
                                dead_fraction={i: float((since_fired[i] >= dead_steps).float().mean()) for i in layers},
                                tokens_per_s=step * cfg.batch_tokens / max(dt, 1e-9))
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                yield _quick_validation(lm, export(), val_windows, step, cfg)
            if cfg.save_every and out_dir is not None and step % cfg.save_every == 0 and step < total:
                first = "dropped" not in stale
                folder = save(False)
                yield Saved(step=step, folder=folder, dropped_store=stale["dropped"] if first else None)
        tset.transcoders = export()
        quality = evaluate_transcoders(lm, tset.transcoders, val_windows, batch_size=cfg.model_batch, seed=cfg.seed)
        tset.metrics = metrics_json(quality, steps=step, tokens=step * cfg.batch_tokens, final=True,
                                    seconds=round(time.perf_counter() - t0, 2))
        yield Evaluated(quality=quality)
        if out_dir is not None:
            first = "dropped" not in stale
            folder = save(True, quality)
            yield Saved(step=step, folder=folder, dropped_store=stale["dropped"] if first else None)
        finished = True
        yield TrainFinished(transcoders=tset, seconds=time.perf_counter() - t0)
    finally:
        if not finished and not diverged and step > 0 and out_dir is not None:
            try:
                save(False)  # stopped or failed: keep what was learnt so far
            except LabError:
                pass  # weights gone bad: what is on disk stays (save refuses non-finite weights)


def _diverged(step: int, mse: dict[int, float], cfg: TranscoderTrainConfig, out_dir: str | Path | None) -> str:
    """The one sentence a diverged run ends with: where, and what to change."""
    bad = [i for i, v in mse.items() if not math.isfinite(v)] or sorted(mse)
    where = f"layer {bad[0]}" if len(bad) == 1 else f"layers {', '.join(map(str, bad))}"
    kept = f"; {out_dir} keeps what was saved before" if out_dir is not None else ""
    return (f"Transcoder training diverged at step {step} (the loss of {where} is no longer a finite number); "
            f"lower --lr (it was {cfg.lr:g}) and train again{kept}.")


@torch.no_grad()
def _quick_validation(lm: "LoadedModel", tcs: dict[int, Transcoder], windows: np.ndarray, step: int,
                      cfg: TranscoderTrainConfig) -> Validated:
    layers = sorted(tcs)
    ids = torch.from_numpy(windows[:cfg.model_batch])
    io = mlp_io(lm, model_inputs(lm, ids, torch.Generator().manual_seed(cfg.seed)), layers)
    fve, l0 = {}, {}
    for i in layers:
        x, y = io[i]
        acts = tcs[i].encode(x.float())
        y_hat, y = tcs[i].decode(acts), y.float()
        var = ((y - y.reshape(-1, y.shape[-1]).mean(0)) ** 2).sum()
        fve[i] = float(1 - ((y - y_hat) ** 2).sum() / var) if var > 0 else math.nan
        l0[i] = float((acts > 0).float().sum(-1).mean())
    return Validated(step=step, fve=fve, l0=l0)


def tracker_record(ev: TrainEvent) -> dict | None:
    """What an event gives the experiment trackers (``transcoders train --log-to``): a record with
    the optimiser ``step`` and named numbers, per layer under ``layer_{i}/`` (validation FVE under
    ``val/``, the final quality under ``final/``); None for events that carry no numbers."""
    if isinstance(ev, TrainProgress):
        per_layer = {f"layer_{i}/{name}": v for name, values in (("nmse", ev.mse), ("l0", ev.l0),
                                                                  ("dead_fraction", ev.dead_fraction))
                     for i, v in values.items()}
        return {"step": ev.step, "tokens": ev.tokens, "lr": ev.lr, "tokens_per_s": ev.tokens_per_s, **per_layer}
    if isinstance(ev, Validated):
        return {"step": ev.step, **{f"val/layer_{i}/fve": v for i, v in ev.fve.items()},
                **{f"val/layer_{i}/l0": v for i, v in ev.l0.items()}}
    return None


def quality_record(step: int, quality: dict[int, LayerQuality]) -> dict:
    """The final per-layer quality (:class:`Evaluated`) as a tracker record at ``step``."""
    return {"step": step, **{f"final/layer_{i}/{k}": v for i, q in quality.items()
                             for k, v in q.to_dict().items() if k != "layer"}}


def run_to_end(events: Iterator[TrainEvent]) -> TranscoderSet:
    """Drain a training generator and return its set (tests, scripts)."""
    for ev in events:
        if isinstance(ev, TrainFinished):
            return ev.transcoders
    raise AssertionError("training ended without a result")


__all__ = ["TranscoderTrainConfig", "TrainStarted", "TrainProgress", "Validated", "Saved", "Evaluated",
           "TrainFinished", "TrainEvent", "train_transcoders", "run_to_end", "tracker_record", "quality_record"]
