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


# -- each family's own tokenizer ------------------------------------------------------------------
# The families' tokenizer classes, built from a small vocabulary trained here and set as their hub
# repositories set them: which special tokens frame a text (a BOS or not) is the point, so the
# vocabulary is tiny and the settings are the hub's (Llama 2 / Mistral add <s>, Llama 3 adds
# <|begin_of_text|> through its post-processor, Gemma adds <bos>, OPT adds </s>, Qwen2, GPT-NeoX
# and GPT-2 add nothing).

TOKENIZER_FAMILIES = ("llama", "llama3", "mistral", "gemma", "qwen2", "gpt_neox", "opt", "gpt2")
_SENTENCEPIECE_SPECIALS = {"llama": ["<unk>", "<s>", "</s>"], "mistral": ["<unk>", "<s>", "</s>"],
                           "gemma": ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]}
_BYTE_LEVEL_SPECIALS = {"llama3": ["<|begin_of_text|>", "<|end_of_text|>"], "qwen2": ["<|endoftext|>"],
                        "gpt_neox": ["<|endoftext|>", "<|padding|>"], "opt": ["<s>", "<pad>", "</s>", "<unk>"],
                        "gpt2": ["<|endoftext|>"]}


def _trained_vocab(specials: list[str], sentencepiece: bool, vocab_size: int = 400) -> tuple[dict, list]:
    """``(vocab, merges)`` of a BPE trained on the test corpus: byte-level (GPT-2's alphabet) or
    SentencePiece-style (``▁`` for spaces, with the 256 ``<0xNN>`` byte-fallback pieces)."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from tests.conftest import CORPUS

    tok = Tokenizer(models.BPE())
    if sentencepiece:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        specials = specials + [f"<0x{b:02X}>" for b in range(256)]
        alphabet: list[str] = []
        vocab_size += 256
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator([CORPUS], trainer=trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                                  initial_alphabet=alphabet, show_progress=False))
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]


def family_tokenizer(family: str, folder: Path):
    """``family``'s own tokenizer class (a key of :data:`TOKENIZER_FAMILIES`), saved in ``folder`` and
    read back with ``AutoTokenizer`` as a user's download would be."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders

    if family in _SENTENCEPIECE_SPECIALS:
        vocab, merges = _trained_vocab(_SENTENCEPIECE_SPECIALS[family], sentencepiece=True)
        cls = tf.GemmaTokenizer if family == "gemma" else tf.LlamaTokenizer
        tok = cls(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False)
    else:
        vocab, merges = _trained_vocab(_BYTE_LEVEL_SPECIALS[family], sentencepiece=False)
        if family == "llama3":
            backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            backend.decoder = decoders.ByteLevel()
            backend.post_processor = processors.TemplateProcessing(
                single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                special_tokens=[("<|begin_of_text|>", vocab["<|begin_of_text|>"])])
            tok = tf.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                             eos_token="<|end_of_text|>")
        elif family == "qwen2":
            tok = tf.Qwen2Tokenizer(vocab=vocab, merges=merges)
        elif family == "gpt_neox":
            tok = tf.GPTNeoXTokenizer(vocab=vocab, merges=merges)
        elif family == "opt":
            tok = tf.GPT2Tokenizer(vocab=vocab, merges=merges, bos_token="</s>", eos_token="</s>", unk_token="</s>",
                                   pad_token="<pad>", add_bos_token=True)
        else:
            tok = tf.GPT2Tokenizer(vocab=vocab, merges=merges)
    tok.save_pretrained(folder)
    return tf.AutoTokenizer.from_pretrained(folder, local_files_only=True)


def family_dir_with_own_tokenizer(tmp_path_factory, family: str, model_family: str | None = None) -> Path:
    """A tiny ``model_family`` model (a key of :func:`build`; default ``family``) saved beside ``family``'s own
    tokenizer."""
    folder = tmp_path_factory.mktemp(f"tiny-{family}-own-tokenizer")
    tok = family_tokenizer(family, folder)
    torch.manual_seed(0)
    build(model_family or family, tok).eval().save_pretrained(folder)
    return folder
