"""The layer-stack adapter: one view of embed / blocks / final norm / unembed per model family.

Consensus, the logit lens, transcoders and generation all walk models through this class, so
a new family is supported everywhere by adding one subclass here. Attention is computed by
:func:`core.models.attention.attend` from the family's own projection weights; norms and MLPs are the
family's own modules, called directly.

``record`` collects activations under TransformerLens names built by
:func:`core.models.hooks.act_name` (``blocks.{i}.hook_resid_pre``, ``blocks.{i}.hook_attn_out``,
``blocks.{i}.hook_resid_mid``, ``blocks.{i}.hook_mlp_in`` (the stream before ln2),
``blocks.{i}.ln2.hook_normalized`` (after it: the MLP's input), ``blocks.{i}.hook_mlp_out``,
``blocks.{i}.hook_resid_post``, ``ln_final.hook_normalized``), the same tensors in every family.

Every point (those, plus ``hook_embed``, ``hook_pos_embed``, ``blocks.{i}.ln1.hook_normalized``, the
per-head ``attn.hook_q/k/v/z`` in TransformerLens's ``(B, T, heads, d_head)``, ``attn.hook_pattern``
``(B, heads, T, T)`` and ``mlp.hook_post``) also runs the hooks of the calling context
(:mod:`core.models.hookpoints`; the API is :mod:`core.interventions`). Hooks are never stored on the
adapter or the model, so sessions sharing a model never see each other's; points that cost work to
expose are computed only when a hook names them (the pattern needs the explicit softmax, not SDPA).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import KVCache, attend, attend_with_pattern, merge_heads, split_heads
from .gpt import GPT, rotate
from .hookpoints import active_hooks, point_name
from ..errors import LabError

MLPFn = Callable[[torch.Tensor], torch.Tensor]


class LayerStack:
    """Walks one loaded model block by block.

    Subclasses provide the family's modules (``wte``, ``wpe``, ``drop``, ``blocks``, ``ln_f``,
    ``lm_head``), ``_qkv`` and ``_attn_out`` (and ``_window``/``_scale`` where they differ);
    everything else is shared.
    """

    family = "base"

    def __init__(self, model: nn.Module):
        self.model = model
        self._block_devices: list[torch.device] | None = None

    # -- facts --------------------------------------------------------------------------------
    n_layer: int
    n_head: int
    d_model: int
    vocab_size: int
    context_length: int
    causal: bool = True
    init_std: float = 0.02
    norm_weight_init: float = 1.0   # what re-initialisation puts in norm weights (Gemma's x * (1 + w): 0)

    @property
    def n_kv_head(self) -> int:
        """Key/value heads: fewer than ``n_head`` where queries share them (grouped-query attention)."""
        return getattr(self, "_n_kv_head", None) or self.n_head

    @property
    def head_dim(self) -> int:
        return getattr(self, "_head_dim", None) or self.d_model // self.n_head

    @property
    def blocks(self) -> list[nn.Module]:
        raise NotImplementedError

    def ln_1(self, i: int) -> nn.Module:
        return self.blocks[i].ln_1

    def ln_2(self, i: int) -> nn.Module:
        return self.blocks[i].ln_2

    def mlp(self, i: int) -> nn.Module:
        return self.blocks[i].mlp

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def block_devices(self) -> list[torch.device]:
        if self._block_devices is None:
            self._block_devices = [next(b.parameters()).device for b in self.blocks]
        return self._block_devices

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.wte.weight.dtype

    # -- the walk -----------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """Token + position embeddings ``(B, T, C)`` for ids at absolute positions ``start_pos..``."""
        T = ids.shape[1]
        if start_pos + T > self.context_length:
            raise LabError(f"Sequence of {start_pos + T} tokens exceeds the model's context of "
                           f"{self.context_length}; shorten the prompt or ask for fewer new tokens.")
        ids = ids.to(self.wte.weight.device)
        pos = torch.arange(start_pos, start_pos + T, device=ids.device)
        tok = self._at(None, "embed", None, self.wte(ids))
        if self.wpe is None:                                           # rotary: positions turn q and k instead
            return self.drop(tok)
        p = self.wpe(pos).to(self.wte.weight.device)                  # (T, C), broadcast over the batch
        if self._wants("pos_embed", None):                             # hooks see TransformerLens's (B, T, C)
            p = self._at(None, "pos_embed", None, p.expand(ids.shape[0], -1, -1))
        return self.drop(tok + p)

    def _attention_half(self, i: int, h: torch.Tensor, cache: KVCache | None,
                        record: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
        """What every family's block begins with: ``h`` moved to block ``i``'s device (named
        resid_pre) and the attention of its first norm (attn_out); sequential and parallel blocks
        differ only in what they do with the two."""
        h = self._block_input(i, h, record)
        x = self._at(record, "ln1_normalized", i, self.ln_1(i)(h))
        return h, self._at(record, "attn_out", i, self._attention(i, x, cache))

    def _block_input(self, i: int, h: torch.Tensor, record: dict | None) -> torch.Tensor:
        """``h`` on block ``i``'s device (a model spread over GPUs hands it on), named resid_pre."""
        dev = self.block_devices()[i]
        if h.device != dev:
            h = h.to(dev)
        return self._at(record, "resid_pre", i, h)

    def block(self, i: int, h: torch.Tensor, *, skip_mlp: bool = False, cache: KVCache | None = None,
              mlp: MLPFn | None = None, record: dict | None = None) -> torch.Tensor:
        """One transformer block. ``skip_mlp`` drops the feed-forward sublayer; ``mlp`` replaces it
        (a transcoder); ``record`` collects the block's named activations."""
        h, attn_out = self._attention_half(i, h, cache, record)
        h = self._at(record, "resid_mid", i, h + attn_out)
        if not skip_mlp:
            m = self._at(record, "mlp_in", i, h)      # TransformerLens: the stream before ln2 (the MLP's
            x = self._at(record, "ln2_normalized", i, self.ln_2(i)(m))   # copy: rewriting it leaves h alone)
            out = self._at(record, "mlp_out", i, self._mlp_call(i, x, mlp))
            h = h + out
        return self._at(record, "resid_post", i, h)

    def _at(self, record: dict | None, point: str, i: int | None, t: torch.Tensor) -> torch.Tensor:
        """The one place an activation passes a named point (``act_name(point, i)``): recorded into
        ``record`` when given, and read or rewritten by the hooks of the current context
        (:mod:`core.models.hookpoints`), which may return a replacement. Every family's walk, shared
        or overridden, calls it at each point it has; with no record and no hooks it costs one
        context-variable lookup."""
        active = active_hooks()
        if active is None and record is None:
            return t
        name = point_name(point, i)
        if active is not None and active.wants(name):
            t = active.run(name, i, t)
        if record is not None:
            record[name] = t
        return t

    def _wants(self, point: str, i: int | None) -> bool:
        """Whether a hook of the current context asked for ``point`` of block ``i``: points that cost
        work to expose (per-head tensors, the attention pattern, the MLP's hidden layer) check first."""
        active = active_hooks()
        return active is not None and active.wants(point_name(point, i))

    def _at_heads(self, point: str, i: int, t: torch.Tensor) -> torch.Tensor:
        """A per-head point: ours are ``(B, heads, T, d_head)``, TransformerLens's ``(B, T, heads, d_head)``;
        hooks see (and return) its layout."""
        if not self._wants(point, i):
            return t
        return self._at(None, point, i, t.transpose(1, 2)).transpose(1, 2)

    def _mlp_call(self, i: int, x: torch.Tensor, mlp: MLPFn | None) -> torch.Tensor:
        """Block ``i``'s MLP (or its replacement ``mlp``) on ``x``; split in two around
        ``blocks.{i}.mlp.hook_post`` (the hidden activation) only when a hook asks for it."""
        if mlp is None and self._wants("mlp_post", i):
            parts = self._mlp_parts(i)
            if parts is not None:
                hidden, out = parts
                return out(self._at(None, "mlp_post", i, hidden(x)))
        return (mlp or self.mlp(i))(x)

    def _mlp_parts(self, i: int) -> tuple[MLPFn, MLPFn] | None:
        """Block ``i``'s MLP as ``(input -> hidden activation, hidden -> output)``, read off the module
        names the families use: GPT-2 / GPT-Neo / our GPT (``c_fc``, act, ``c_proj``), gated MLPs
        (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``), GPT-NeoX (``dense_h_to_4h``, ``act``,
        ``dense_4h_to_h``). None for an MLP of another shape (``mlp.hook_post`` is then not offered)."""
        m = self.blocks[i].mlp
        drop = getattr(m, "dropout", None) or (lambda y: y)
        if hasattr(m, "c_fc") and hasattr(m, "c_proj"):
            act = m.act
            if getattr(getattr(self.model, "config", None), "activation_function", None) in _TANH_GELU:
                act = lambda y: F.gelu(y, approximate="tanh")  # noqa: E731  (what _HFStack.mlp runs)
            return (lambda x: act(m.c_fc(x))), (lambda y: drop(m.c_proj(y)))
        if all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return (lambda x: m.act_fn(m.gate_proj(x)) * m.up_proj(x)), m.down_proj
        if hasattr(m, "dense_h_to_4h") and hasattr(m, "dense_4h_to_h"):
            return (lambda x: m.act(m.dense_h_to_4h(x))), m.dense_4h_to_h
        return None

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.ln_f(h.to(self.ln_f.weight.device))

    def unembed_weight(self) -> torch.Tensor:
        """The unembedding as one ``(V, d_model)`` matrix (OPT-350m: its projection out folded in)."""
        return self.lm_head.weight

    def final_gain(self) -> torch.Tensor | None:
        """The per-channel factor the final norm multiplies by (None: none); Gemma's is ``1 + w``."""
        return getattr(self.ln_f, "weight", None)

    @property
    def final_norm_centres(self) -> bool:
        """Whether the final norm subtracts the mean (LayerNorm) or only rescales (RMSNorm)."""
        return isinstance(self.ln_f, nn.LayerNorm)

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        w = self.lm_head.weight
        h = h.to(w.device)
        if w.device.type == "cpu" and h.shape[-2] == 1 and getattr(self.lm_head, "bias", None) is None:
            return h @ self._head_in_out()  # decoding on the CPU: see _head_in_out
        return self.lm_head(h)

    def _head_in_out(self) -> torch.Tensor:
        """The unembedding stored ``(C, V)``, rebuilt whenever the weight changes.

        A one-row product with the vocabulary matrix is memory-bound; on CPUs reading it in
        ``(C, V)`` order is ~1.7x faster than ``nn.Linear``'s ``(V, C)``, and the unembedding is a
        third of GPT-2 small's bytes per decoded token. The copy costs one extra matrix of memory.
        """
        w = self.lm_head.weight
        key = (w.data_ptr(), w._version, w.dtype)
        if getattr(self, "_head_key", None) != key:
            self._head_t = w.detach().t().contiguous()
            self._head_key = key
        return self._head_t

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, *, cache: KVCache | None = None, skip_mlp: bool = False,
               last_only: bool = False, mlps: dict[int, MLPFn] | None = None,
               record: dict | None = None) -> torch.Tensor:
        """The model's forward, walked block by block: ``(B, T, V)`` (``(B, 1, V)`` with ``last_only``)."""
        h = self.embed(ids, cache.length if cache is not None else 0)
        for i in range(self.n_layer):
            h = self.block(i, h, skip_mlp=skip_mlp, cache=cache, mlp=(mlps or {}).get(i), record=record)
        if cache is not None:
            cache.advance(ids.shape[1])
        h = self._at(record, "ln_final_normalized", None, self.final_norm(h))
        if last_only:
            h = h[:, -1:]
        return self.unembed(h)

    def new_cache(self) -> KVCache:
        return KVCache(self.n_layer, self.context_length)

    # -- re-initialisation --------------------------------------------------------------------
    @torch.no_grad()
    def reinit(self, seed: int) -> None:
        """Re-draw every weight from the family's init distribution, reproducibly for ``seed``.

        Draws happen on the CPU with a private generator and are copied over, so the same seed
        gives the same weights on any device and leaves the global RNG alone.
        """
        gen = torch.Generator().manual_seed(int(seed))
        seen: set[int] = set()
        for name, p in self.model.named_parameters():
            if id(p) in seen:  # tied weights: draw once
                continue
            seen.add(id(p))
            if p.dim() >= 2:
                std = self.init_std
                if name.endswith(("c_proj.weight", "out_proj.weight")) and self.family in ("gptlab", "gpt2"):
                    std = self.init_std / math.sqrt(2 * self.n_layer)
                new = torch.randn(p.shape, generator=gen) * std
            elif name.endswith("bias"):
                new = torch.zeros(p.shape)
            else:
                new = torch.full(p.shape, self.norm_weight_init)
            p.copy_(new.to(p.dtype))

    # -- attention: the family gives q, k, v and the output projection; the rest is shared ------
    attn_in_float32: bool = False   # GPT-Neo computes attention scores in float32
    qk_points_in_qkv: bool = False  # rotary families pass hook_q / hook_k in _qkv, before the rotation (as TransformerLens)

    def _attention(self, i: int, x: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        offset = cache.length if cache is not None else 0
        q, k, v = self._qkv(i, x, offset)  # (B, heads, T, d_head)
        if not self.qk_points_in_qkv:
            q, k = self._at_heads("q", i, q), self._at_heads("k", i, k)
        v = self._at_heads("v", i, v)
        if cache is not None:
            k, v = cache.update(i, k, v)
        dtype = v.dtype
        if self.attn_in_float32:
            q, k, v = q.float(), k.float(), v.float()
        how = dict(causal=self.causal, q_offset=offset, window=self._window(i), scale=self._scale(i),
                   softcap=self._softcap(i))
        if self._wants("pattern", i):   # the explicit softmax, only when someone reads or edits it
            z = attend_with_pattern(q, k, v, lambda p: self._at(None, "pattern", i, p), **how)
        else:
            z = attend(q, k, v, **how)
        z = self._at_heads("z", i, z.to(dtype))  # (B, heads, T, d_head): head h's slice before the projection
        return self._attn_out(i, merge_heads(z))

    def _qkv(self, i: int, x: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values ``(B, heads, T, d_head)`` of block ``i`` for input ``x`` whose
        first token sits at absolute position ``offset`` (rotary families rotate here)."""
        raise NotImplementedError

    def _attn_out(self, i: int, y: torch.Tensor) -> torch.Tensor:
        """The output projection of block ``i`` applied to the merged heads ``(B, T, C)``."""
        raise NotImplementedError

    def _window(self, i: int) -> int | None:
        return None

    def _scale(self, i: int) -> float | None:
        return None  # 1/sqrt(d_head)

    def _softcap(self, i: int) -> float | None:
        return None  # Gemma-2: scores pass through cap * tanh(scores / cap)

    def describe(self) -> dict:
        return dict(family=self.family, n_layer=self.n_layer, n_head=self.n_head, d_model=self.d_model,
                    vocab_size=self.vocab_size, context_length=self.context_length, causal=self.causal,
                    n_params=self.num_params())


class GPTLabStack(LayerStack):
    """Our own GPT (core.models.gpt.GPT), causal or bidirectional."""

    family = "gptlab"

    def __init__(self, model):
        super().__init__(model)
        cfg = model.config
        self.n_layer, self.n_head, self.d_model = cfg.n_layer, cfg.n_head, cfg.d_model
        self.vocab_size, self.context_length, self.causal = cfg.vocab_size, cfg.block_size, cfg.causal
        self.rotary = cfg.positions == "rotary"
        t = model.transformer
        self.wte, self.drop, self.ln_f, self.lm_head = t.wte, t.drop, t.ln_f, model.lm_head
        self.wpe = t.wpe if "wpe" in t else None

    @property
    def blocks(self):
        return self.model.transformer.h

    @property
    def qk_points_in_qkv(self) -> bool:
        return self.rotary

    def _qkv(self, i, x, offset):
        q, k, v = (split_heads(t, self.n_head) for t in self.blocks[i].attn.c_attn(x).split(self.d_model, dim=2))
        if not self.rotary:
            return q, k, v
        q, k = self._at_heads("q", i, q), self._at_heads("k", i, k)   # before the rotation, as TransformerLens
        return (*rotate(q, k, offset), v)

    def _attn_out(self, i, y):
        attn = self.blocks[i].attn
        return attn.resid_dropout(attn.c_proj(y))


_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


class _HFStack(LayerStack):
    """What GPT-2 and GPT-Neo share: Hugging Face module names, an init std in the config, and an
    MLP (c_fc -> act -> c_proj -> dropout) whose tanh GELU runs as one fused call: transformers'
    ``gelu_new`` is the same formula written as a chain of Python-level ops, about a tenth of a
    CPU block's time."""

    def __init__(self, model, n_layer: int, n_head: int, d_model: int, context_length: int):
        super().__init__(model)
        self.n_layer, self.n_head, self.d_model = n_layer, n_head, d_model
        self.vocab_size, self.context_length = model.config.vocab_size, context_length
        self.init_std = model.config.initializer_range
        t = model.transformer
        self.wte, self.wpe, self.drop, self.ln_f, self.lm_head = t.wte, t.wpe, t.drop, t.ln_f, model.lm_head

    @property
    def blocks(self):
        return self.model.transformer.h

    def mlp(self, i: int):
        m = self.blocks[i].mlp
        if getattr(self.model.config, "activation_function", None) not in _TANH_GELU:
            return m
        return lambda x: m.dropout(m.c_proj(F.gelu(m.c_fc(x), approximate="tanh")))


class GPT2Stack(_HFStack):
    """Hugging Face GPT2LMHeadModel (Conv1D projections)."""

    family = "gpt2"

    def __init__(self, model):
        cfg = model.config
        super().__init__(model, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.n_positions)
        self.scale_by_layer = bool(getattr(cfg, "scale_attn_by_inverse_layer_idx", False))
        self.scale_weights = bool(getattr(cfg, "scale_attn_weights", True))

    def _qkv(self, i, x, offset):
        q, k, v = self.blocks[i].attn.c_attn(x).split(self.d_model, dim=2)
        return tuple(split_heads(t, self.n_head) for t in (q, k, v))

    def _scale(self, i):
        scale = 1.0 / math.sqrt(self.d_model // self.n_head) if self.scale_weights else 1.0
        return scale / float(i + 1) if self.scale_by_layer else scale

    def _attn_out(self, i, y):
        attn = self.blocks[i].attn
        return attn.resid_dropout(attn.c_proj(y))


class GPTNeoStack(_HFStack):
    """Hugging Face GPTNeoForCausalLM: unscaled attention in float32, local layers with a window."""

    family = "gpt_neo"

    def __init__(self, model):
        cfg = model.config
        super().__init__(model, cfg.num_layers, cfg.num_heads, cfg.hidden_size, cfg.max_position_embeddings)
        self.windows = [cfg.window_size if kind == "local" else None for kind in cfg.attention_layers]

    attn_in_float32 = True

    def _qkv(self, i, x, offset):
        attn = self.blocks[i].attn.attention
        return tuple(split_heads(p(x), self.n_head) for p in (attn.q_proj, attn.k_proj, attn.v_proj))

    def _window(self, i):
        return self.windows[i]

    def _scale(self, i):
        return 1.0

    def _attn_out(self, i, y):
        attn = self.blocks[i].attn.attention
        return attn.resid_dropout(attn.out_proj(y))


def stack_for(model: nn.Module, source: str | None = None) -> LayerStack:
    """The adapter for a loaded model, chosen by its class (our GPT) or its config's model_type."""
    from .families import FAMILIES, unsupported_message  # the families build on this module

    if isinstance(model, GPT):
        return GPTLabStack(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type == "gpt2":
        return GPT2Stack(model)
    if model_type == "gpt_neo":
        return GPTNeoStack(model)
    if model_type in FAMILIES:
        return FAMILIES[model_type](model)
    raise LabError(unsupported_message(model_type, source or type(model).__name__))
