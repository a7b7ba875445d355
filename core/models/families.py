"""Layer-stack adapters for the Hugging Face decoder families researchers study today.

Each family is one small subclass over three shared parts, so adding a family means naming its
modules, not rewriting attention:

- **rotary positions** (:func:`apply_rotary`): cos/sin come from the model's own rotary module
  (so every RoPE variant transformers knows -- llama3, longrope, dynamic, partial -- is the
  model's own), applied to all or the first ``r`` dimensions of each head, in the half-split
  layout (GPT-NeoX, Llama and descendants) or the interleaved one (GPT-J);
- **grouped-query attention**: :meth:`DecoderStack._qkv` returns keys and values with the
  model's own (fewer) kv heads; :func:`core.models.attention.attend` shares them across the query
  heads and the KV cache stores them unrepeated;
- **MLPs** as ``(input -> hidden activation, hidden -> output)`` (:meth:`LayerStack._mlp_parts`):
  gated (``down(act(gate x) * up x)``, fused or not) or plain (``out(act(in x))``).

Parallel blocks (GPT-J, GPT-NeoX/Pythia) compute attention and MLP from the same input and add
both to the stream: ``h + attn(ln1 h) + mlp(ln2 h)``. Their walk (:class:`ParallelBlock`) names
the points TransformerLens names for such blocks: ``hook_mlp_in`` is the block's input (the MLP
reads the stream *before* attention wrote to it) and there is no ``hook_resid_mid``. Skipping the
MLP there drops the MLP term only: ``h + attn(ln1 h)``; attention is unchanged.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import apply_rotary, rotate_half, rotate_every_two  # noqa: F401  (re-exported)
from .stack import LayerStack, MLPFn
from ..errors import LabError

_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


# -- shared parts ---------------------------------------------------------------------------------

def gated_mlp(gate: MLPFn, up: MLPFn, down: MLPFn, act: MLPFn) -> tuple[MLPFn, MLPFn]:
    """``down(act(gate x) * up x)`` as (hidden, out): Llama's SwiGLU, Gemma's GeGLU."""
    return (lambda x: act(gate(x)) * up(x)), down


def fused_gated_mlp(gate_up: MLPFn, down: MLPFn, act: MLPFn) -> tuple[MLPFn, MLPFn]:
    """The same with gate and up in one matrix, gate first (Phi-3)."""
    def hidden(x):
        gate, up = gate_up(x).chunk(2, dim=-1)
        return up * act(gate)
    return hidden, down


def plain_mlp(fc_in: MLPFn, fc_out: MLPFn, act: MLPFn) -> tuple[MLPFn, MLPFn]:
    """``out(act(in x))`` as (hidden, out): GPT-NeoX, GPT-J, OPT."""
    return (lambda x: act(fc_in(x))), fc_out


def fast_act(name: str | None, module: MLPFn) -> MLPFn:
    """transformers' tanh GELU written as one fused call (see ``stack._HFStack``), else the module's own."""
    return (lambda y: F.gelu(y, approximate="tanh")) if name in _TANH_GELU else module


# -- the shared family base -----------------------------------------------------------------------

class DecoderStack(LayerStack):
    """A Hugging Face decoder: sizes read from the config's standard names (``num_hidden_layers``,
    ``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``,
    ``max_position_embeddings``), per-layer sliding windows, and rotary positions from the model's
    own rotary module (OPT, with learned positions, gives its own ``embed`` and ``_qkv``). A
    subclass names its modules (``wte``, ``ln_f``, ``lm_head``, the layer list) and gives ``_heads``
    (q, k, v per head before rotation), ``_attn_out``, ``_mlp_parts`` and ``attention_weights``."""

    rotary = True                 # queries and keys are rotated by position (OPT: learned positions instead)

    @property
    def qk_points_in_qkv(self) -> bool:
        return self.rotary
    interleaved_rotary = False

    def __init__(self, model: nn.Module, layers: nn.ModuleList, rotary: nn.Module | None):
        super().__init__(model)
        cfg = model.config
        self.family = cfg.model_type
        self.config = cfg
        self._layers = layers
        self._rotary = rotary
        self.n_layer = int(cfg.num_hidden_layers)
        self.n_head = int(cfg.num_attention_heads)
        self._n_kv_head = int(getattr(cfg, "num_key_value_heads", None) or self.n_head)
        self.d_model = int(cfg.hidden_size)
        self._head_dim = int(getattr(cfg, "head_dim", None) or self.d_model // self.n_head)
        self.vocab_size = int(cfg.vocab_size)
        self.context_length = int(cfg.max_position_embeddings)
        self.init_std = float(getattr(cfg, "initializer_range", 0.02))
        self.windows = self._windows(cfg)
        self._rope_memo: tuple | None = None

    @staticmethod
    def _windows(cfg) -> list[int | None]:
        """Per layer, how far back a query may look: config.layer_types where the family has them
        (Qwen2/3, Gemma-2: ``sliding_attention`` layers), else the one sliding_window on every
        layer (Mistral, Phi-3), else none."""
        n, window = int(cfg.num_hidden_layers), getattr(cfg, "sliding_window", None)
        types = getattr(cfg, "layer_types", None)
        if window is None:
            return [None] * n
        if types:
            return [int(window) if t == "sliding_attention" else None for t in types]
        return [int(window)] * n

    @property
    def blocks(self):
        return self._layers

    def embed(self, ids: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        T = ids.shape[1]
        if start_pos + T > self.context_length:
            raise LabError(f"Sequence of {start_pos + T} tokens exceeds the model's context of "
                           f"{self.context_length}; shorten the prompt or ask for fewer new tokens.")
        tok = self.wte(ids.to(self.wte.weight.device))  # Gemma's embedding module scales by sqrt(d) itself
        return self._at(None, "embed", None, tok)

    # -- attention ---------------------------------------------------------------------------
    def _rope(self, offset: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ``(T, r)`` for positions ``offset..offset+T`` of ``x`` ``(B, T, C)``, from the
        model's own rotary module; kept while the positions, device and dtype stay the same (every
        layer of one step shares them)."""
        key = (offset, x.shape[1], x.device, x.dtype)
        memo = self._rope_memo   # one tuple, read and replaced whole: sessions sharing a model may interleave
        if memo is not None and memo[0] == key:
            return memo[1]
        cos, sin = self._cos_sin(x, torch.arange(offset, offset + x.shape[1], device=x.device)[None])
        self._rope_memo = (key, (cos[0], sin[0]))
        return cos[0], sin[0]

    def _cos_sin(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._rotary(x, pos)

    def _heads(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block ``i``'s queries ``(B, n_head, T, d_head)``, keys and values ``(B, n_kv_head, T, d_head)``
        before rotation."""
        raise NotImplementedError

    def _qkv(self, i, x, offset):
        q, k, v = self._heads(i, x)
        if self.rotary:  # TransformerLens's hook_q / hook_k hold queries and keys before the rotation
            q, k = self._at_heads("q", i, q), self._at_heads("k", i, k)
        cos, sin = self._rope(offset, x)
        return (apply_rotary(q, cos, sin, self.interleaved_rotary), apply_rotary(k, cos, sin, self.interleaved_rotary),
                v)

    def _split(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        B, T, _ = t.shape
        return t.view(B, T, heads, self.head_dim).transpose(1, 2)  # (B, heads, T, d_head)

    def _window(self, i):
        return self.windows[i]

    def attention_weights(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block ``i``'s ``(W_Q, W_K, W_V, W_O)`` in the ``y = W x`` convention: ``W_Q`` ``(n_head*d_head, d)``,
        ``W_K``/``W_V`` ``(n_kv_head*d_head, d)`` (kv heads, not repeated), ``W_O`` ``(d, n_head*d_head)``;
        biases, norms, rotary positions and score scaling are not part of them."""
        raise NotImplementedError

    # -- MLP ---------------------------------------------------------------------------------
    def _mlp_parts(self, i: int) -> tuple[MLPFn, MLPFn]:
        raise NotImplementedError

    def mlp(self, i: int) -> MLPFn:
        hidden, out = self._mlp_parts(i)
        return lambda x: out(hidden(x))

    def _mlp_run(self, i: int, x: torch.Tensor, mlp: MLPFn | None) -> torch.Tensor:
        """The MLP (or its replacement) through the adapter's own MLP call where it has one (the
        hook point ``mlp.hook_post``), else directly."""
        call = getattr(self, "_mlp_call", None)
        return call(i, x, mlp) if call is not None else (mlp or self.mlp(i))(x)

    def describe(self) -> dict:
        return {**super().describe(), "n_kv_head": self.n_kv_head, "head_dim": self.head_dim}


class ParallelBlock:
    """Mixin for blocks that add attention and MLP of the same input (see the module docstring)."""

    def block(self, i, h, *, skip_mlp=False, cache=None, mlp=None, record=None):
        h, attn_out = self._attention_half(i, h, cache, record)
        if skip_mlp:
            return self._at(record, "resid_post", i, h + attn_out)
        m = self._at(record, "mlp_in", i, h)   # the MLP reads the block's input
        y = self._at(record, "ln2_normalized", i, self.ln_2(i)(m))
        out = self._at(record, "mlp_out", i, self._mlp_run(i, y, mlp))
        return self._at(record, "resid_post", i, out + attn_out + h)


# -- Llama and its descendants --------------------------------------------------------------------

class LlamaStack(DecoderStack):
    """Llama, Mistral (one sliding window on every layer), Qwen2 (q/k/v biases, windows per layer
    type): RMSNorm, separate q/k/v/o projections, grouped-query attention, SwiGLU MLP."""

    def __init__(self, model):
        inner = model.model
        super().__init__(model, inner.layers, inner.rotary_emb)
        self.wte, self.ln_f, self.lm_head = inner.embed_tokens, inner.norm, model.lm_head

    def ln_1(self, i):
        return self._layers[i].input_layernorm

    def ln_2(self, i):
        return self._layers[i].post_attention_layernorm

    def _heads(self, i, x):
        a = self._layers[i].self_attn
        return self._split(a.q_proj(x), self.n_head), self._split(a.k_proj(x), self.n_kv_head), \
            self._split(a.v_proj(x), self.n_kv_head)

    def _attn_out(self, i, y):
        return self._layers[i].self_attn.o_proj(y)

    def attention_weights(self, i):
        a = self._layers[i].self_attn
        return a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight

    def _mlp_parts(self, i):
        m = self._layers[i].mlp
        act = fast_act(getattr(self.config, "hidden_activation", None) or getattr(self.config, "hidden_act", None),
                       m.act_fn)
        return gated_mlp(m.gate_proj, m.up_proj, m.down_proj, act)


class Qwen3Stack(LlamaStack):
    """Qwen3: Llama's block with an RMSNorm over each head's queries and keys before rotation."""

    def _heads(self, i, x):
        a = self._layers[i].self_attn
        B, T, _ = x.shape
        q = a.q_norm(a.q_proj(x).view(B, T, self.n_head, self.head_dim)).transpose(1, 2)
        k = a.k_norm(a.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)).transpose(1, 2)
        return q, k, self._split(a.v_proj(x), self.n_kv_head)


class GemmaStack(LlamaStack):
    """Gemma: embeddings scaled by sqrt(d_model), RMSNorm computing ``x * (1 + w)`` (so its weights
    start at zero), GeGLU MLP, head size 256."""

    norm_weight_init = 0.0

    def final_gain(self):
        return 1.0 + self.ln_f.weight


class Gemma2Stack(GemmaStack):
    """Gemma-2: a norm before *and after* attention and MLP (the post-norms are part of what each
    sublayer writes to the stream: ``hook_attn_out``/``hook_mlp_out`` are after them), scores scaled
    by ``query_pre_attn_scalar``, attention logits and final logits soft-capped by ``tanh``, local
    (sliding-window) and global layers alternating."""

    def ln_2(self, i):
        return self._layers[i].pre_feedforward_layernorm

    def _attn_out(self, i, y):
        layer = self._layers[i]
        return layer.post_attention_layernorm(layer.self_attn.o_proj(y))

    def _mlp_parts(self, i):
        hidden, out = super()._mlp_parts(i)
        post = self._layers[i].post_feedforward_layernorm
        return hidden, (lambda y: post(out(y)))

    def _scale(self, i):
        return float(self.config.query_pre_attn_scalar) ** -0.5

    def _softcap(self, i):
        return self.config.attn_logit_softcapping

    def unembed(self, h):
        logits = super().unembed(h)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap


class Phi3Stack(LlamaStack):
    """Phi-3: Llama's block with q/k/v in one matrix and gate/up in another."""

    def _heads(self, i, x):
        a = self._layers[i].self_attn
        nq, nkv = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = a.qkv_proj(x).split([nq, nkv, nkv], dim=-1)
        return self._split(q, self.n_head), self._split(k, self.n_kv_head), self._split(v, self.n_kv_head)

    def _attn_out(self, i, y):
        layer = self._layers[i]
        return layer.resid_attn_dropout(layer.self_attn.o_proj(y))

    def attention_weights(self, i):
        a = self._layers[i].self_attn
        nq, nkv = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        return (*a.qkv_proj.weight.split([nq, nkv, nkv], dim=0), a.o_proj.weight)

    def _mlp_parts(self, i):
        layer = self._layers[i]
        hidden, out = fused_gated_mlp(layer.mlp.gate_up_proj, layer.mlp.down_proj, layer.mlp.activation_fn)
        return hidden, (lambda y: layer.resid_mlp_dropout(out(y)))


# -- GPT-NeoX / Pythia and GPT-J ------------------------------------------------------------------

class GPTNeoXStack(ParallelBlock, DecoderStack):
    """GPT-NeoX (Pythia): LayerNorm, q/k/v fused per head, rotary on a fraction of each head, and
    by default a parallel block (``use_parallel_residual``) with a norm for each branch."""

    def __init__(self, model):
        inner = model.gpt_neox
        super().__init__(model, inner.layers, inner.rotary_emb)
        self.wte, self.ln_f, self.lm_head = inner.embed_in, inner.final_layer_norm, model.lm_head
        self.parallel = bool(model.config.use_parallel_residual)
        self._drop = inner.emb_dropout

    def embed(self, ids, start_pos=0):
        return self._drop(super().embed(ids, start_pos))

    def block(self, i, h, **kw):
        return ParallelBlock.block(self, i, h, **kw) if self.parallel else LayerStack.block(self, i, h, **kw)

    def ln_1(self, i):
        return self._layers[i].input_layernorm

    def ln_2(self, i):
        return self._layers[i].post_attention_layernorm

    def _heads(self, i, x):
        B, T, _ = x.shape
        qkv = self._layers[i].attention.query_key_value(x).view(B, T, self.n_head, 3 * self.head_dim)
        return qkv.transpose(1, 2).chunk(3, dim=-1)   # each (B, nh, T, hs)

    def _attn_out(self, i, y):
        layer = self._layers[i]
        return layer.post_attention_dropout(layer.attention.dense(y))

    def attention_weights(self, i):
        a = self._layers[i].attention
        w = a.query_key_value.weight.view(self.n_head, 3 * self.head_dim, self.d_model)  # per head: q | k | v rows
        return (*(t.reshape(-1, self.d_model) for t in w.chunk(3, dim=1)), a.dense.weight)

    def _mlp_parts(self, i):
        layer = self._layers[i]
        hidden, out = plain_mlp(layer.mlp.dense_h_to_4h, layer.mlp.dense_4h_to_h,
                                fast_act(self.config.hidden_act, layer.mlp.act))
        return hidden, (lambda y: layer.post_mlp_dropout(out(y)))


class GPTJStack(ParallelBlock, DecoderStack):
    """GPT-J: one LayerNorm feeds a parallel attention and MLP; rotary on the first ``rotary_dim``
    dimensions of each head in the interleaved layout; attention scores in float32; an
    unembedding with a bias."""

    interleaved_rotary = True
    attn_in_float32 = True

    def __init__(self, model):
        inner = model.transformer
        super().__init__(model, inner.h, None)
        self.wte, self.ln_f, self.lm_head = inner.wte, inner.ln_f, model.lm_head
        self._drop = inner.drop

    def embed(self, ids, start_pos=0):
        return self._drop(super().embed(ids, start_pos))

    def _cos_sin(self, x, pos):
        table = self._layers[0].attn.embed_positions          # (context, r): sin | cos halves
        sincos = table.to(x.device)[pos[0]].to(x.dtype)
        sin, cos = sincos.chunk(2, dim=-1)
        return cos.repeat_interleave(2, -1)[None], sin.repeat_interleave(2, -1)[None]

    def ln_1(self, i):
        return self._layers[i].ln_1

    ln_2 = ln_1   # the MLP reads the same normalised input as attention

    def _heads(self, i, x):
        a = self._layers[i].attn
        return tuple(self._split(p(x), self.n_head) for p in (a.q_proj, a.k_proj, a.v_proj))

    def _attn_out(self, i, y):
        a = self._layers[i].attn
        return a.resid_dropout(a.out_proj(y))

    def attention_weights(self, i):
        a = self._layers[i].attn
        return a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.out_proj.weight

    def _mlp_parts(self, i):
        m = self._layers[i].mlp
        hidden, out = plain_mlp(m.fc_in, m.fc_out, fast_act(self.config.activation_function, m.act))
        return hidden, (lambda y: m.dropout(out(y)))


# -- OPT ------------------------------------------------------------------------------------------

class OPTStack(DecoderStack):
    """OPT: learned positions (offset by 2), LayerNorm, ReLU MLP. OPT-350m differs twice: its
    embedding is narrower (projected in and out) and it normalises *after* each sublayer
    (``do_layer_norm_before=False``): ``h = ln1(h + attn(h))``, then ``h = ln2(h + mlp(h))``. Its
    walk (:meth:`block`) names ``hook_resid_mid`` the stream after ln1 (what the MLP reads, so also
    ``hook_mlp_in`` and ``ln2.hook_normalized``: there is no norm before the MLP) and
    ``hook_resid_post`` the block's output after ln2; skipping the MLP gives ``ln2(resid_mid)``.
    Not rotary: ``_rope`` is never asked for."""

    rotary = False

    def __init__(self, model):
        dec = model.model.decoder
        super().__init__(model, dec.layers, None)
        cfg = model.config
        self.post_norm = not cfg.do_layer_norm_before
        self.init_std = float(getattr(cfg, "init_std", 0.02))
        self.wte, self.wpe, self.lm_head = dec.embed_tokens, dec.embed_positions, model.lm_head
        self.ln_f, self._proj_in, self._proj_out = dec.final_layer_norm, dec.project_in, dec.project_out
        self._dropout = float(cfg.dropout)

    def embed(self, ids, start_pos=0):
        tok = super().embed(ids, start_pos)
        if self._proj_in is not None:
            tok = self._proj_in(tok)
        pos = torch.arange(start_pos, start_pos + ids.shape[1], device=tok.device) + self.wpe.offset
        pos_emb = self._at(None, "pos_embed", None, F.embedding(pos, self.wpe.weight.to(tok.device)))
        return F.dropout(tok + pos_emb[None], p=self._dropout, training=self.model.training)

    def final_norm(self, h):
        return self.ln_f(h.to(self.ln_f.weight.device)) if self.ln_f is not None else h

    def unembed_weight(self):
        w = self.lm_head.weight
        return w if self._proj_out is None else w @ self._proj_out.weight.to(w.device)

    def unembed(self, h):
        # a narrower embedding's projection back belongs to the unembedding: the final norm's output
        # keeps the stream's width, so consensus can feed it to the next iteration
        if self._proj_out is not None:
            h = self._proj_out(h.to(self._proj_out.weight.device))
        return super().unembed(h)

    def ln_1(self, i):
        return nn.Identity() if self.post_norm else self._layers[i].self_attn_layer_norm

    def ln_2(self, i):
        return nn.Identity() if self.post_norm else self._layers[i].final_layer_norm

    def block(self, i, h, *, skip_mlp=False, cache=None, mlp=None, record=None):
        if not self.post_norm:
            return super().block(i, h, skip_mlp=skip_mlp, cache=cache, mlp=mlp, record=record)
        layer = self._layers[i]
        h = self._block_input(i, h, record)
        attn_out = self._at(record, "attn_out", i, self._attention(i, h, cache))
        h = self._at(record, "resid_mid", i, layer.self_attn_layer_norm(h + attn_out))
        if skip_mlp:
            return self._at(record, "resid_post", i, layer.final_layer_norm(h))
        m = self._at(record, "mlp_in", i, h)
        x = self._at(record, "ln2_normalized", i, m)
        out = self._at(record, "mlp_out", i, self._mlp_run(i, x, mlp))
        return self._at(record, "resid_post", i, layer.final_layer_norm(h + out))

    def _qkv(self, i, x, offset):
        a = self._layers[i].self_attn
        return self._split(a.q_proj(x) * a.scaling, self.n_head), self._split(a.k_proj(x), self.n_head), \
            self._split(a.v_proj(x), self.n_head)

    def _scale(self, i):
        return 1.0   # the queries were scaled, as OPT does

    def _attn_out(self, i, y):
        return F.dropout(self._layers[i].self_attn.out_proj(y), p=self._dropout, training=self.model.training)

    def attention_weights(self, i):
        a = self._layers[i].self_attn
        return a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.out_proj.weight

    def _mlp_parts(self, i):
        layer = self._layers[i]
        hidden, out = plain_mlp(layer.fc1, layer.fc2, layer.activation_fn)
        return hidden, (lambda y: F.dropout(out(y), p=self._dropout, training=self.model.training))


# -- the registry ---------------------------------------------------------------------------------

FAMILIES: dict[str, type[LayerStack]] = {
    "llama": LlamaStack, "mistral": LlamaStack, "qwen2": LlamaStack, "qwen3": Qwen3Stack,
    "gemma": GemmaStack, "gemma2": Gemma2Stack, "phi3": Phi3Stack,
    "gpt_neox": GPTNeoXStack, "gptj": GPTJStack, "opt": OPTStack,
}

# Families whose architecture GPT Lab cannot walk as one stack of attention + MLP blocks, by the
# kind of model they are (for a sentence naming what is supported instead).
NOT_DECODER_STACKS = {
    "encoder-decoder": ("t5", "mt5", "bart", "mbart", "pegasus", "marian", "whisper", "led", "bigbird_pegasus",
                        "blenderbot", "prophetnet", "umt5", "longt5", "switch_transformers"),
    "mixture-of-experts": ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "dbrx", "jamba",
                           "olmoe", "granitemoe", "phimoe", "gpt_oss", "llama4"),
    "state-space": ("mamba", "mamba2", "rwkv", "falcon_mamba", "zamba", "zamba2", "bamba"),
}


def unsupported_message(model_type: str | None, source: str) -> str:
    """One sentence for a model GPT Lab has no adapter for, naming the families it walks."""
    kind = next((k for k, types in NOT_DECODER_STACKS.items() if model_type in types), None)
    if kind:
        what = f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} model ({model_type})"
    else:
        what = f"a '{model_type}' model" if model_type else "a model without a Hugging Face model_type"
    return (f"Model '{source}' is {what}, which GPT Lab cannot walk layer by layer; it supports decoder-only "
            f"stacks: GPT Lab's own GPT, {', '.join(SUPPORTED_NAMES)}.")


SUPPORTED_NAMES = ("gpt2", "gpt_neo", "gpt_neox (Pythia)", "gptj", "opt", "llama", "mistral", "qwen2", "qwen3",
                   "gemma", "gemma2", "phi3")
