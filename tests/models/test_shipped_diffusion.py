"""The second shipped model, ``diffusion``: a masked-diffusion LM trained here on Shakespeare with
the default's tokenizer. It loads offline by name, is what its card says, has learnt the corpus,
reproduces its card's samples, and comes with its transcoders and feature store."""
from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch

from core.generation.diffusion import generate as denoise
from core.models.default import DIFFUSION_SAMPLE, SAMPLE_PROMPTS
from core.models.loading import load_model
from core.models.shipped import shipped_dir, shipped_names
from core.training.objective import sequence_bound

LINE = "ROMEO:\nBut soft, what light through yonder window breaks? It is the east, and Juliet is the sun."


@pytest.fixture(scope="module")
def lm():
    return load_model("diffusion")


def test_both_defaults_are_shipped_and_pickable():
    assert shipped_names() == ["default", "diffusion"]


def test_it_is_the_bidirectional_rotary_model_its_card_describes(lm):
    cfg = lm.model.config
    assert lm.objective == "diffusion" and not lm.untrained
    assert (cfg.causal, cfg.positions, cfg.mask_token_id) == (False, "rotary", lm.tokenizer.mask_id)
    assert next(lm.model.parameters()).dtype == torch.float32      # stored 16-bit, upcast on the CPU
    assert lm.tokenizer.encode(LINE) == load_model("default").tokenizer.encode(LINE)   # one token space
    card = lm.card_text
    assert "masked-diffusion" in card and "python -m core train" in card and "--objective diffusion" in card
    assert re.search(r"this model's samples .*\| \*\*[\d.]+\*\* \|", card), "generative perplexity missing"


def test_it_has_learnt_the_corpus(lm):
    """Masked tokens of a Shakespeare line are far better predicted than those of its words shuffled."""
    def bound(text: str) -> float:
        x0 = torch.tensor([lm.tokenizer.encode(text)])
        mask = torch.rand(x0.shape, generator=torch.Generator().manual_seed(0)) < 0.3
        t = torch.tensor([0.3])
        with torch.no_grad():
            logits = lm.model(x0.masked_fill(mask, lm.tokenizer.mask_id))
        return float(sequence_bound(logits, x0, mask, t, lm.tokenizer.mask_id))

    words = LINE.split()
    shuffled = " ".join(words[1::2] + words[::2])
    assert bound(LINE) < 0.75 * bound(shuffled)


def test_the_cards_first_sample_is_what_its_command_writes(lm):
    result = denoise(lm, SAMPLE_PROMPTS[0], replace(DIFFUSION_SAMPLE, seed=1))
    block = "```\n" + SAMPLE_PROMPTS[0] + result.completion + "\n```"
    assert block in lm.card_text


def test_its_transcoders_and_feature_store_are_shipped_beside_it():
    from core.interp import FeatureStore, store_path
    from core.interp.transcoder import load_transcoder_set

    folder = shipped_dir("diffusion") / "transcoders"
    tset = load_transcoder_set(folder)
    assert sorted(tset.layers) == [0, 1, 2, 3]
    with FeatureStore(store_path(folder), readonly=True) as store:
        for info in store.layers():
            assert info.n_alive > 0
            assert len(store.explanations(info.layer, "builtin")) == info.n_alive
        assert store.description("total", -1, "builtin")
