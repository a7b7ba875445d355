"""Transcoders: a sparse, wider stand-in for one MLP (Dunefsky et al. 2024).

A transcoder reads what the MLP reads (the block's second norm output,
``blocks.{i}.ln2.hook_normalized``) and is trained to write what the MLP writes
(``blocks.{i}.hook_mlp_out``) through a layer of sparse features::

    a = act(x @ W_enc + b_enc)          # (N, F)  F = expansion * d_model features
    y_hat = a @ W_dec + b_dec           # (N, d)  rows of W_dec have unit norm

Because the output is a sum of a few decoder rows, each feature's effect on the model is one
fixed vector, which is what makes features and their circuits readable. Two activations:
``relu`` (sparsity from an L1 penalty on ``a``) and ``topk`` (exactly ``k`` features per token,
Gao et al. 2024). Decoder rows are renormalised after every optimiser step, so the activation
alone says how much a feature writes. A third, ``jumprelu`` (a feature is on only above its own
learnt ``threshold``; Gemma Scope's transcoders), comes in through ``transcoders import`` from
SAELens folders (:mod:`core.interp.saelens`), as do ReLU transcoders whose decoder rows are not
unit-norm: imported weights are kept exactly as they were written.

A *transcoder set* is one transcoder per MLP layer, kept in a folder::

    config.json            format, model, layers, per-layer hook_name / hook_name_out (what each
                           transcoder reads and writes, as core.models.hooks names), sizes, training;
                           for an imported set its ``origin`` (where from, and what was changed)
    layer_{i}.safetensors  W_enc (d, F), b_enc (F,), W_dec (F, d), b_dec (d,) [, threshold (F,): jumprelu]
    metrics.json           per-layer quality (see core.interp.quality)
    features.sqlite        the feature store (see core.interp.store), once collected

A model's own set lives in ``<model folder>/transcoders/`` (so ``default`` reads
``assets/default/transcoders/``); hub models keep theirs under
``~/.cache/gptlab/transcoders/<hub id>/``.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from ..errors import LabError, first_line
from ..files import (atomic_write_bytes, atomic_write_json, check_folder_links, check_output_place, parse_json,
                     read_text_inside)
from .config import ACTIVATIONS, SAVE_DTYPES, TranscoderConfig, transcoder_hooks  # noqa: F401 (old import path)

if TYPE_CHECKING:
    from ..models.loading import LoadedModel

SET_FORMAT = "gptlab-transcoders"
SET_FORMAT_VERSION = 2             # 2: per-layer hook_name / hook_name_out; 1 wrote hook_in / hook_out templates
CONFIG_FILENAME = "config.json"
METRICS_FILENAME = "metrics.json"
SET_WHAT = "transcoder set"          # how messages name the folder (core.files.check_folder_links)


def weights_filename(layer: int) -> str:
    """The safetensors file of one layer's transcoder inside a set folder."""
    return f"layer_{int(layer)}.safetensors"


class Transcoder(nn.Module):
    """One layer's transcoder; ``forward(x) -> y_hat`` makes it a drop-in MLP for
    :meth:`core.models.stack.LayerStack.logits` (``mlps={layer: transcoder}``)."""

    def __init__(self, cfg: TranscoderConfig, layer: int = 0):
        super().__init__()
        cfg.check()
        self.cfg, self.layer = cfg, layer
        d, n = cfg.d_model, cfg.n_features
        self.W_enc = nn.Parameter(torch.empty(d, n))
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.W_dec = nn.Parameter(torch.empty(n, d))
        self.b_dec = nn.Parameter(torch.zeros(d))
        if cfg.activation == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(n))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random unit decoder rows, encoder = their transpose (Gao et al.'s init: every feature
        starts out reading the direction it writes, which keeps few features dead early on)."""
        w = torch.randn(self.cfg.n_features, self.cfg.d_model, generator=generator)
        w = w / w.norm(dim=-1, keepdim=True)
        self.W_dec.copy_(w.to(self.W_dec))
        self.W_enc.copy_(w.t().to(self.W_enc) * (self.cfg.d_model / self.cfg.n_features) ** 0.5)
        self.b_enc.zero_()
        self.b_dec.zero_()

    @property
    def n_features(self) -> int:
        return self.cfg.n_features

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.W_enc.dtype) @ self.W_enc + self.b_enc          # (..., F)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense feature activations ``(..., F)`` (zeros where a feature is off)."""
        pre = self.pre_acts(x)
        if self.cfg.activation == "relu":
            return F.relu(pre)
        if self.cfg.activation == "jumprelu":
            return F.relu(pre) * (pre > self.threshold)
        vals, idx = pre.topk(self.cfg.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, idx, F.relu(vals))

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TopK only: ``(values, indices)`` each ``(..., k)``, the cheap form training uses."""
        vals, idx = self.pre_acts(x).topk(self.cfg.k, dim=-1)
        return F.relu(vals), idx

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        return acts @ self.W_dec + self.b_dec                               # (..., d)

    def decode_sparse(self, vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``sum_j vals[j] * W_dec[idx[j]]`` without materialising the dense activations."""
        shape = vals.shape[:-1]
        flat_i, flat_v = idx.reshape(-1, idx.shape[-1]), vals.reshape(-1, vals.shape[-1])  # (N, k)
        out = F.embedding_bag(flat_i, self.W_dec, per_sample_weights=flat_v, mode="sum")  # (N, d)
        return out.reshape(*shape, -1) + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self.cfg.activation == "topk":
            return self.decode_sparse(*self.encode_sparse(x)).to(dtype)
        return self.decode(self.encode(x)).to(dtype)

    @torch.no_grad()
    def folded(self, in_scale: float, out_scale: float) -> "Transcoder":
        """A copy that reads ``x`` and writes ``y`` for one trained on ``x / in_scale`` and
        ``y / out_scale``: ReLU and TopK commute with positive scaling, so the output scale moves
        into the activations and the decoder rows stay unit-norm."""
        t = Transcoder(self.cfg, self.layer).to(self.W_enc.device)
        t.W_enc.copy_(self.W_enc * (out_scale / in_scale))
        t.b_enc.copy_(self.b_enc * out_scale)
        t.W_dec.copy_(self.W_dec)
        t.b_dec.copy_(self.b_dec * out_scale)
        if self.cfg.activation == "jumprelu":
            t.threshold.copy_(self.threshold * out_scale)
        return t

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Unit-norm decoder rows, so an activation's size is the size of what the feature writes."""
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the part of W_dec's gradient that would only change row norms (undone by the
        renormalisation anyway), so Adam's steps go into directions that matter."""
        if self.W_dec.grad is not None:
            w, g = self.W_dec, self.W_dec.grad
            g.sub_((g * w).sum(-1, keepdim=True) * w)


@dataclass
class TranscoderSet:
    """One transcoder per MLP layer of one model, with how they were made and how good they are."""

    transcoders: dict[int, Transcoder]
    config: TranscoderConfig
    model: str = ""                        # the model spec the set was trained on
    model_info: dict = field(default_factory=dict)   # stack.describe() of that model
    training: dict = field(default_factory=dict)     # TranscoderTrainConfig as a dict
    metrics: dict = field(default_factory=dict)      # {"layers": {str(layer): LayerQuality dict}, ...}
    folder: Path | None = None
    # An imported set: {"format": "saelens", "source": where from, "notes": [what was changed, one
    # sentence each: the set's card on the Features page shows them]}; empty for a trained set.
    origin: dict = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(self.transcoders)

    def __getitem__(self, layer: int) -> Transcoder:
        if layer not in self.transcoders:
            raise LabError(f"This transcoder set has no layer {layer}; it covers layers {self.layers}.")
        return self.transcoders[layer]

    def to(self, device: str | torch.device) -> "TranscoderSet":
        for t in self.transcoders.values():
            t.to(device)
        return self

    def mlps(self, layers: list[int] | None = None) -> dict[int, Transcoder]:
        """``{layer: transcoder}`` ready for ``stack.logits(ids, mlps=...)``."""
        return {i: self[i] for i in (self.layers if layers is None else layers)}

    def check_model(self, lm: "LoadedModel") -> None:
        """Fail early when the set was made for a model of another shape."""
        d = lm.stack.describe()
        if self.config.d_model != d["d_model"] or max(self.layers) >= d["n_layer"]:
            raise LabError(f"The transcoder set in {self.folder or '(memory)'} was trained on {self.model or 'another model'} "
                           f"(d_model {self.config.d_model}, layers {self.layers}); {lm.name} has d_model "
                           f"{d['d_model']} and {d['n_layer']} layers: train a set for it with "
                           f"`python -m core transcoders train --model {lm.spec}`.")

    def save(self, folder: str | os.PathLike, dtype: str = "float32") -> Path:
        """Write config.json, layer_{i}.safetensors and metrics.json, each atomically.

        Weights that are not finite (a diverged run, or float16 too narrow for them) are refused
        before anything is written, so a good set already in ``folder`` is never replaced by NaNs."""
        if dtype not in SAVE_DTYPES:
            raise LabError(f"Transcoder save dtype must be one of {', '.join(SAVE_DTYPES)} (got '{dtype}').")
        folder = Path(folder)
        tdtype = getattr(torch, dtype)
        blobs = {}
        for i, t in self.transcoders.items():
            tensors = {k: v.detach().to("cpu", tdtype).contiguous() for k, v in t.state_dict().items()}
            if not all(bool(torch.isfinite(v).all()) for v in tensors.values()):
                finite32 = all(bool(torch.isfinite(v).all()) for v in t.state_dict().values())
                fix = (f"save as float32 (--save-dtype float32): they overflow {dtype}" if finite32 else
                       "the training diverged; lower --lr and train again")
                raise LabError(f"The transcoder of layer {i} has weights that are not finite, so nothing was written "
                               f"to {folder}; {fix}.")
            blobs[i] = save(tensors)
        folder.mkdir(parents=True, exist_ok=True)
        for i, blob in blobs.items():
            atomic_write_bytes(folder / weights_filename(i), blob)
        atomic_write_json(folder / METRICS_FILENAME, self.metrics)
        hooks = {str(i): transcoder_hooks(i) for i in self.layers}
        atomic_write_json(folder / CONFIG_FILENAME, {
            "format": SET_FORMAT, "format_version": SET_FORMAT_VERSION, "model": self.model,
            "model_info": self.model_info, "layers": self.layers,
            "hook_name": {i: h[0] for i, h in hooks.items()}, "hook_name_out": {i: h[1] for i, h in hooks.items()},
            "transcoder": self.config.to_dict(), "training": self.training, "dtype": dtype,
            **({"origin": self.origin} if self.origin else {})})
        self.folder = folder
        return folder


def set_hooks(meta: dict, layers: list[int]) -> dict[int, tuple[str, str]]:
    """``{layer: (hook_name, hook_name_out)}`` a set's config.json records: per layer
    (``hook_name`` / ``hook_name_out``, format 2), or as the templates format 1 wrote
    (``hook_in`` / ``hook_out``, e.g. ``"blocks.{layer}.ln2.hook_normalized"``); a config
    that records neither reads what every GPT Lab set reads."""
    out = {}
    for i in layers:
        if "hook_name" in meta or "hook_name_out" in meta:
            names = (meta.get("hook_name", {}).get(str(i)), meta.get("hook_name_out", {}).get(str(i)))
        else:
            names = tuple(t.format(layer=i) if isinstance(t, str) else None
                          for t in (meta.get("hook_in"), meta.get("hook_out")))
        default = transcoder_hooks(i)
        out[i] = (names[0] or default[0], names[1] or default[1])
    return out


def is_transcoder_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a transcoder set (its config.json says so; a config.json that is
    unreadable, not an object, or a link out of the folder says no)."""
    try:
        if not (Path(path) / CONFIG_FILENAME).is_file():
            return False
        meta = parse_json(read_text_inside(path, CONFIG_FILENAME, SET_WHAT) or "null")
    except (json.JSONDecodeError, LabError, OSError):
        return False
    return isinstance(meta, dict) and meta.get("format") == SET_FORMAT


_SET_FILE = re.compile(r"(config\.json|metrics\.json|layer_\d+\.safetensors|features\.sqlite(-journal|-wal|-shm)?|tracking)")


def check_set_output(folder: str | os.PathLike, flag: str = "--output-dir") -> Path:
    """The folder a transcoder set will be written to, checked before any work: a folder that can
    be written (:func:`core.files.check_output_place`), and missing, empty or already a transcoder
    set (retrained in place). A model, checkpoint or run folder is refused: the set's config.json
    would replace the model's own."""
    out = check_output_place(folder, flag)
    if not out.is_dir() or is_transcoder_folder(out):
        return out
    entries = sorted(e.name for e in out.iterdir() if not e.name.startswith("."))
    if not entries:
        return out
    foreign = [n for n in entries if not _SET_FILE.fullmatch(n)]
    model = (out / CONFIG_FILENAME).exists() or any(n.endswith((".safetensors", ".bin", ".pt")) for n in foreign)
    what = "a model or a checkpoint" if model else "files of something else"
    raise LabError(f"{flag} {out} holds {what} ({', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}); a "
                   f"transcoder set writes config.json and layer files there, so pick an empty folder (a model's "
                   f"own set goes in its transcoders/ subfolder) or an existing transcoder set.")


def _metrics(raw: object) -> dict:
    """metrics.json as read, keeping only what has the shape :func:`core.interp.quality.metrics_json`
    writes: per-layer entries that are objects of numbers (a hand-edited or hostile file loses
    the rest instead of failing later, far from the file)."""
    if not isinstance(raw, dict):
        return {}
    layers = raw.get("layers")
    clean = {str(k): {n: v for n, v in q.items() if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))}
             for k, q in layers.items() if isinstance(q, dict)} if isinstance(layers, dict) else {}
    return {**raw, "layers": clean}


def load_transcoder_set(folder: str | os.PathLike, device: str | torch.device = "cpu") -> TranscoderSet:
    """Read a set written by :meth:`TranscoderSet.save` (safetensors only, nothing unpickled), by
    this version or an earlier one."""
    folder = Path(folder).expanduser()
    if folder.is_dir():
        check_folder_links(folder, SET_WHAT)  # weights, config and store are read only from inside the set
    if not is_transcoder_folder(folder):
        raise LabError(f"{folder} is not a transcoder set (no {CONFIG_FILENAME} with format '{SET_FORMAT}'); train "
                       f"one with `python -m core transcoders train --model SPEC --output-dir {folder}`.")
    meta = parse_json(read_text_inside(folder, CONFIG_FILENAME, SET_WHAT))
    try:
        version = int(meta.get("format_version", 1))
        layers = [int(i) for i in meta["layers"]]
        hooks = set_hooks(meta, layers)
        cfg = TranscoderConfig.from_dict(meta["transcoder"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise LabError(f"{folder / CONFIG_FILENAME} is incomplete or damaged ({type(e).__name__}: {first_line(e)}); "
                       f"retrain the set.") from None
    if version > SET_FORMAT_VERSION:
        raise LabError(f"The transcoder set in {folder} was written by a newer GPT Lab (format {version}); update "
                       f"GPT Lab to read it.")
    for i, (got_in, got_out) in hooks.items():
        if (got_in, got_out) != transcoder_hooks(i):
            want_in, want_out = transcoder_hooks(i)
            raise LabError(f"The transcoder set in {folder} reads {got_in} and writes {got_out}, but GPT Lab splices "
                           f"transcoders in for the MLP ({want_in} -> {want_out}); train a set here instead.")
    cfg.check()
    transcoders: dict[int, Transcoder] = {}
    for i in layers:
        path = folder / weights_filename(i)
        try:
            t = Transcoder(cfg, layer=i)
            t.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise LabError(f"Transcoder weights {path} are missing or corrupt ({first_line(e)}); retrain the "
                           f"set.") from None
        transcoders[i] = t.to(device).eval().requires_grad_(False)
    try:
        metrics = _metrics(parse_json(read_text_inside(folder, METRICS_FILENAME, SET_WHAT) or "{}"))
    except json.JSONDecodeError:
        metrics = {}  # the quality numbers are a report, not part of the set: a damaged file reads as none
    return TranscoderSet(transcoders=transcoders, config=cfg, model=meta.get("model", ""),
                         model_info=meta.get("model_info", {}), training=meta.get("training", {}),
                         metrics=metrics, folder=folder,
                         origin=meta["origin"] if isinstance(meta.get("origin"), dict) else {})


def transcoder_dir_for(lm: "LoadedModel") -> Path:
    """Where a model's own transcoder set lives (see the module docstring)."""
    src = Path(lm.source) if not str(lm.source).startswith("hub:") else None
    if src is not None and src.is_dir():
        return src / "transcoders"
    safe = re.sub(r"[^A-Za-z0-9._-]+", "--", lm.spec)
    root = Path(os.environ.get("GPTLAB_TRANSCODERS", "~/.cache/gptlab/transcoders")).expanduser()
    return root / safe


def find_transcoder_set(lm: "LoadedModel", folder: str | os.PathLike | None = None,
                        device: str | torch.device | None = None) -> TranscoderSet:
    """``folder`` when given, else the model's own set; a clear message when there is none."""
    path = Path(folder).expanduser() if folder else transcoder_dir_for(lm)
    if not is_transcoder_folder(path):
        where = f"{path}" if folder else f"{path} (the default place for {lm.spec}'s set)"
        raise LabError(f"No transcoder set in {where}; train one with `python -m core transcoders train --model "
                       f"{lm.spec}` or pass --transcoders DIR.")
    tset = load_transcoder_set(path, device or lm.stack.device)
    tset.check_model(lm)
    return tset
