"""Activations a transcoder learns from: the model's corpus as token windows, the MLP input/output
pairs of every layer in one forward pass, and the model's loss with MLPs swapped out.

The corpus is tokenised once by :func:`core.training.data.prepare_data` with the model's own
tokenizer (the same memmap shards the trainer uses, so a model and its transcoders see the same
text), and read back as fixed windows of ``seq_len`` tokens. A model whose tokenizer starts every
text with a BOS (Llama, Gemma, OPT) reads each window as BOS and ``seq_len - 1`` corpus tokens,
as SAELens's ``prepend_bos`` batches do, so its transcoders learn from the states it has in use
(the BOS position included); other models read ``seq_len`` corpus tokens. Windows are split by index into an
*explain* part and a *held-out* part (every ``holdout_every``-th window), so explanation scores
are always measured on text the explainer never saw.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import LabError
from ..models.stack import MLPFn
from ..training.data import prepare_data
from .config import transcoder_hooks

if TYPE_CHECKING:
    from ..models.loading import LoadedModel

DIFFUSION_EVAL_RATE = 0.5  # the masking rate at which a diffusion model's loss is compared


@dataclass
class CorpusTokens:
    """A model's corpus as token arrays: ``train`` for learning and collecting, ``val`` for quality."""

    train: np.ndarray            # 1-D token ids (a concatenation of the shards; may be a memmap view)
    val: np.ndarray
    source: str                  # label of the text source
    folder: Path | None = None   # the token cache it came from
    prefix: tuple[int, ...] = () # ids every window starts with: the model's BOS (the module docstring says why)

    def windows(self, split: str, seq_len: int, n: int | None = None, *, offset: int = 0) -> np.ndarray:
        """Non-overlapping windows ``(n, seq_len)`` from ``split``, starting at ``offset``: each is
        :attr:`prefix` then the next ``seq_len - len(prefix)`` corpus tokens."""
        arr = self.train if split == "train" else self.val
        body = seq_len - len(self.prefix)
        if body < 1:
            raise LabError(f"A window of {seq_len} tokens leaves no room for text after the model's "
                           f"{len(self.prefix)} start token(s); use a longer --seq-len.")
        total = (arr.size - offset) // body
        if total < 1:
            raise LabError(f"The corpus' {split} split has {arr.size} tokens, fewer than one window of {seq_len}; "
                           f"use a shorter --seq-len or more text.")
        n = total if n is None else min(n, total)
        text = np.asarray(arr[offset:offset + n * body], dtype=np.int64).reshape(n, body)           # (n, body)
        if not self.prefix:
            return text
        return np.concatenate([np.tile(np.asarray(self.prefix, dtype=np.int64), (n, 1)), text], axis=1)  # (n, T)


def _tokenizer_spec(lm: "LoadedModel") -> str:
    """What :func:`prepare_data` should tokenise with so ids match the model's tokenizer."""
    tok = lm.tokenizer
    path = getattr(tok, "path", None)
    if path:
        return str(path)
    if type(tok).__name__ == "TiktokenTokenizer":
        return "gpt2"
    src = Path(lm.source)
    if src.is_dir() and (src / "tokenizer.json").is_file():
        return str(src)
    return lm.spec


def corpus_tokens(lm: "LoadedModel", dataset: str = "shakespeare", *, max_tokens: int | None = None,
                  cache_dir: str | None = None, log: Callable[[str], None] = lambda s: None) -> CorpusTokens:
    """The model's corpus tokenised with the model's own tokenizer (cached on disk)."""
    spec = _tokenizer_spec(lm)
    data = prepare_data(dataset, spec, lm.stack.vocab_size, val_fraction=0.05, need_mask=False,
                        max_tokens=max_tokens, cache_dir=cache_dir, log=log)
    probe = "ROMEO: But soft, what light through yonder window breaks?"
    if data.tokenizer.encode(probe, add_special_tokens=False) != lm.tokenizer.encode(probe, add_special_tokens=False):
        raise LabError(f"The corpus tokenizer ({spec}) does not match {lm.name}'s own tokenizer; pass the model's "
                       f"tokenizer with --tokenizer.")
    join = lambda split: (np.concatenate([np.asarray(a) for a in split.arrays]) if len(split.arrays) > 1  # noqa: E731
                          else (split.arrays[0] if split.arrays else np.zeros(0, dtype=np.uint16)))
    train, val = join(data.train), join(data.val)
    if int(train.max(initial=0)) >= lm.stack.vocab_size:
        raise LabError(f"The corpus holds token ids beyond {lm.name}'s vocabulary of {lm.stack.vocab_size}; "
                       f"the tokenizer does not belong to this model.")
    return CorpusTokens(train=train, val=val, source=data.source_label, folder=data.folder,
                        prefix=tuple(lm.tokenizer.prefix_ids))


def corpus_from_texts(lm: "LoadedModel", texts: list[str], val_fraction: float = 0.1) -> CorpusTokens:
    """A small in-memory corpus (tests, a user's own snippet) tokenised with the model's tokenizer
    (raw ids, documents separated by EOS, as :func:`corpus_tokens`'s shards; windows add the BOS)."""
    ids: list[int] = []
    for t in texts:
        ids.extend(lm.tokenizer.encode(t, add_special_tokens=False))
        if lm.tokenizer.eos_id is not None:
            ids.append(lm.tokenizer.eos_id)
    arr = np.asarray(ids, dtype=np.int64)
    n_val = int(round(arr.size * val_fraction))
    return CorpusTokens(train=arr[:arr.size - n_val], val=arr[arr.size - n_val:], source="texts",
                        prefix=tuple(lm.tokenizer.prefix_ids))


def model_inputs(lm: "LoadedModel", ids: torch.Tensor, generator: torch.Generator | None = None,
                 rate: float | None = None) -> torch.Tensor:
    """What the model reads for clean ``ids`` ``(B, T)``: the ids themselves for a causal model; for a
    diffusion model, the ids with a share of positions masked (drawn per sequence in (0, 1], or
    ``rate`` for all), the inputs it is trained and sampled on."""
    if lm.objective != "diffusion":
        return ids
    mask_id = _mask_id(lm)
    B, T = ids.shape
    if rate is None:
        t = torch.rand(B, 1, generator=generator)
    else:
        t = torch.full((B, 1), float(rate))
    mask = torch.rand(B, T, generator=generator) < t                                     # (B, T)
    return ids.masked_fill(mask.to(ids.device), mask_id)


def _mask_id(lm: "LoadedModel") -> int:
    mask_id = getattr(getattr(lm.model, "config", None), "mask_token_id", None)
    if mask_id is None:
        mask_id = lm.tokenizer.mask_id
    if mask_id is None:
        raise LabError(f"{lm.name} is a diffusion model without a mask token; it cannot be run on masked text.")
    return int(mask_id)


@torch.no_grad()
def mlp_io(lm: "LoadedModel", ids: torch.Tensor, layers: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (what its transcoder reads, what it writes)}``, each ``(B, T, d)``, from one
    forward pass over ``ids``: the MLP's input after ln2 (``blocks.{i}.ln2.hook_normalized``) and
    the MLP's output (``blocks.{i}.hook_mlp_out``), as :func:`.config.transcoder_hooks` names them.

    The walk stops after the last layer asked for: nothing past it is needed.
    """
    stack = lm.stack
    record: dict = {}
    h = stack.embed(ids.to(stack.device))
    last = max(layers)
    for i in range(last + 1):
        h = stack.block(i, h, record=record if i in layers else None)
    return {i: tuple(record[name] for name in transcoder_hooks(i)) for i in layers}


def zero_mlp(x: torch.Tensor) -> torch.Tensor:
    """The ablated MLP: writes nothing."""
    return torch.zeros_like(x)


@torch.no_grad()
def model_loss(lm: "LoadedModel", ids: torch.Tensor, mlps: dict[int, MLPFn] | None = None,
               generator: torch.Generator | None = None) -> float:
    """Mean loss per predicted token on clean ``ids`` ``(B, T)`` with some MLPs replaced.

    Causal models: next-token cross-entropy. Diffusion models: cross-entropy on the masked
    positions at masking rate :data:`DIFFUSION_EVAL_RATE` (the same masks for every call with the
    same ``generator`` seed, so the original, spliced and ablated losses are comparable).
    """
    stack = lm.stack
    ids = ids.to(stack.device)
    if lm.objective == "diffusion":
        x = model_inputs(lm, ids.cpu(), generator, rate=DIFFUSION_EVAL_RATE).to(stack.device)
        logits = stack.logits(x, mlps=mlps).float()                                       # (B, T, V)
        masked = x == _mask_id(lm)
        if not masked.any():
            return float("nan")
        picked = logits[masked]
        picked[:, _mask_id(lm)] = float("-inf")
        return float(F.cross_entropy(picked, ids[masked]))
    logits = stack.logits(ids[:, :-1], mlps=mlps).float()                                 # (B, T-1, V)
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


def iter_batches(windows: np.ndarray, batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first row index, ids (b, T))`` over ``windows`` in order."""
    for start in range(0, len(windows), batch_size):
        yield start, torch.from_numpy(np.ascontiguousarray(windows[start:start + batch_size]))
