"""Tiny random models of every decoder family GPT Lab walks, built with transformers' own config
classes and saved with save_pretrained beside the small tokenizer of tests/conftest.py (no hub).

Each config exercises what makes its family different: grouped-query attention (fewer kv heads),
a head size other than width / heads, sliding windows shorter than the test prompts, partial and
interleaved rotary, q/k norms, soft-capping, a projected embedding (OPT), parallel blocks.
Weights are drawn with a larger spread than the families' own 0.02 so that the next-token
distributions are peaked and greedy decoding has no near-ties.
"""
from __future__ import annotations

from pathlib import Path

import torch

SPREAD = 0.15


def _common(tok) -> dict:
    return dict(vocab_size=len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.eos_token_id, initializer_range=SPREAD)


def _rotary_common(tok) -> dict:
    return dict(**_common(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                max_position_embeddings=64)


def build(family: str, tok):
    """A tiny model of ``family`` (a key of :data:`BUILDERS`)."""
    import transformers as tf

    if family == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**_rotary_common(tok), num_key_value_heads=2,
                                                  rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0,
                                                                   "factor": 8.0, "low_freq_factor": 1.0,
                                                                   "high_freq_factor": 4.0,
                                                                   "original_max_position_embeddings": 16}))
    if family == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**_rotary_common(tok), num_key_value_heads=2, sliding_window=8))
    if family == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**_rotary_common(tok), num_key_value_heads=2, use_sliding_window=True,
                                                  sliding_window=8, max_window_layers=1))
    if family == "qwen3":
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(**_rotary_common(tok), num_key_value_heads=2, head_dim=16,
                                                  use_sliding_window=True, sliding_window=8, max_window_layers=2))
    if family == "gemma":
        return tf.GemmaForCausalLM(tf.GemmaConfig(**_rotary_common(tok), num_key_value_heads=1, head_dim=16,
                                                  hidden_act="gelu_pytorch_tanh"))
    if family == "gemma2":
        return tf.Gemma2ForCausalLM(tf.Gemma2Config(**_rotary_common(tok), num_key_value_heads=2, head_dim=16,
                                                    sliding_window=8, query_pre_attn_scalar=12,
                                                    attn_logit_softcapping=5.0, final_logit_softcapping=3.0))
    if family == "phi3":
        return tf.Phi3ForCausalLM(tf.Phi3Config(**_rotary_common(tok), num_key_value_heads=2, sliding_window=8,
                                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                 "partial_rotary_factor": 0.5}))
    if family in ("gpt_neox", "gpt_neox_sequential"):
        return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**_rotary_common(tok), hidden_act="gelu",
                                                      use_parallel_residual=family == "gpt_neox",
                                                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                       "partial_rotary_factor": 0.25}))
    if family == "gptj":
        return tf.GPTJForCausalLM(tf.GPTJConfig(**_common(tok), n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                                rotary_dim=4, n_inner=64))
    if family in ("opt", "opt_350m"):   # opt-350m's shape: a narrower embedding, norms after each sublayer
        return tf.OPTForCausalLM(tf.OPTConfig(**_common(tok), hidden_size=32, ffn_dim=64, num_hidden_layers=3,
                                              num_attention_heads=4, max_position_embeddings=64,
                                              word_embed_proj_dim=16 if family == "opt_350m" else 32,
                                              do_layer_norm_before=family == "opt", init_std=SPREAD))
    raise KeyError(family)


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt_neox", "gpt_neox_sequential",
            "gptj", "opt", "opt_350m")


def family_dir(tmp_path_factory, family: str) -> Path:
    """A Hugging Face folder of a tiny ``family`` model and its tokenizer (seeded, so reproducible)."""
    from tests.conftest import _hf_tokenizer

    folder = tmp_path_factory.mktemp(f"tiny-{family}")
    tok = _hf_tokenizer(folder)
    torch.manual_seed(0)
    model = build(family, tok).eval()
    model.save_pretrained(folder)
    return folder
