"""Hugging Face export round trip: our checkpoints written by core.models.export and read back by
transformers' own loaders (AutoModelForCausalLM, AutoTokenizer) give our logits within 1e-4 in
float32, our greedy generations token for token, and our tokenizer's ids and text."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from core.errors import LabError
from core.generation.autoregressive import SamplingConfig, generate
from core.models import export as export_mod
from core.models.config import LOGITS_TOLERANCE
from core.models.export import export_model
from core.models.gpt import GPT, GPTConfig
from core.models.loading import load_model, save_checkpoint

TEXTS = ["Once upon a time", "ROMEO: But soft, what light through yonder window breaks?",
         "  two  spaces,\ttabs\nand lines\n\n", "naïve café — ünïcödé ✓ 0123", "end<|endoftext|>start", ""]
FILES = ["README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
         "tokenizer_config.json"]


def hf_pair(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_gptlab_dir) -> Path:
    out = tmp_path_factory.mktemp("export") / "hf"
    result = export_model(str(tiny_gptlab_dir), out)
    assert result.folder == out and result.files == FILES and result.logits_max_abs_diff < LOGITS_TOLERANCE
    return out


def max_logit_diff(lm, hf, texts=TEXTS) -> float:
    worst = 0.0
    with torch.no_grad():
        for text in texts:
            ids = lm.tokenizer.encode(text)
            if not ids:
                continue
            x = torch.tensor([ids])
            worst = max(worst, float((lm.model(x).float() - hf(input_ids=x).logits.float()).abs().max()))
    return worst


def greedy_pair(lm, hf, prompt: str, k: int) -> tuple[list[int], list[int]]:
    """Both models' greedy continuations, ours ending in eos when it stopped there (as validate does)."""
    result = generate(lm, prompt, SamplingConfig(max_new_tokens=k, greedy=True, n_alternatives=0))
    eos = lm.tokenizer.eos_id
    ours = [t.token_id for t in result.tokens] + ([eos] if result.stop_reason == "eos" else [])
    x = torch.tensor([lm.tokenizer.encode(prompt)])
    out = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=k, do_sample=False,
                      num_beams=1, eos_token_id=eos, pad_token_id=eos)
    return ours, out[0, x.shape[1]:].tolist()


def test_transformers_loads_a_gpt2lmheadmodel_and_a_fast_tokenizer(exported):
    from transformers import AutoConfig, GPT2LMHeadModel, PreTrainedTokenizerFast

    hf, tok = hf_pair(exported)
    assert isinstance(hf, GPT2LMHeadModel) and AutoConfig.from_pretrained(exported).model_type == "gpt2"
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert json.loads((exported / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok.eos_token == tok.bos_token == tok.unk_token == "<|endoftext|>"
    assert hf.config.eos_token_id == hf.config.bos_token_id == tok.eos_token_id
    assert sorted(p.name for p in exported.iterdir()) == FILES  # safetensors and JSON, no pickle
    with safe_open(str(exported / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


def test_logits_equal_ours_within_1e_4_in_float32(exported, tiny_gptlab_dir):
    lm = load_model(str(tiny_gptlab_dir))
    hf, _ = hf_pair(exported)
    assert max_logit_diff(lm, hf) < LOGITS_TOLERANCE


def test_greedy_generations_equal_token_for_token(exported, tiny_gptlab_dir):
    lm = load_model(str(tiny_gptlab_dir))
    hf, _ = hf_pair(exported)
    for prompt in ("Once upon a time", "ROMEO:"):
        ours, theirs = greedy_pair(lm, hf, prompt, 20)
        assert ours == theirs and ours


def test_tokenizer_round_trip_equal(exported, tiny_gptlab_dir):
    lm = load_model(str(tiny_gptlab_dir))
    _, tok = hf_pair(exported)
    for text in TEXTS:
        ids = lm.tokenizer.encode(text)
        assert tok.encode(text) == ids, text
        assert tok(text)["input_ids"] == ids, text
        assert tok.decode(ids) == lm.tokenizer.decode(ids) == text
    assert len(tok) == lm.tokenizer.vocab_size


def test_configs_gpt2_spells_differently_convert_exactly(tmp_path, tiny_gptlab_dir):
    """No biases (exported as zeros), untied embeddings, another MLP width and norm epsilon."""
    cfg = GPTConfig(vocab_size=load_model(str(tiny_gptlab_dir)).tokenizer.vocab_size, block_size=64, n_layer=2,
                    n_head=2, d_model=16, mlp_expansion=2, bias=False, tie_weights=False, layer_norm_eps=1e-6)
    torch.manual_seed(1)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # LayerNorm weights off 1, untied head off wte
    save_checkpoint(tmp_path / "ckpt", model, str(tiny_gptlab_dir / "tokenizer.json"))
    export_model(str(tmp_path / "ckpt"), tmp_path / "hf")
    lm = load_model(str(tmp_path / "ckpt"))
    hf, _ = hf_pair(tmp_path / "hf")
    assert hf.config.tie_word_embeddings is False and hf.config.n_inner == 32
    assert float(hf.transformer.h[0].attn.c_attn.bias.detach().abs().max()) == 0.0
    assert max_logit_diff(lm, hf) < LOGITS_TOLERANCE
    ours, theirs = greedy_pair(lm, hf, "Once upon", 10)
    assert ours == theirs


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16_bit_weights(tmp_path, tiny_gptlab_dir, dtype):
    from transformers import AutoModelForCausalLM

    result = export_model(str(tiny_gptlab_dir), tmp_path / "hf", dtype=dtype)
    assert result.dtype == dtype and json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == dtype
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {getattr(torch, dtype)}
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    lm = load_model(str(tiny_gptlab_dir))
    assert max_logit_diff(lm, hf) < 0.05  # rounded weights: close, not equal


def test_the_shipped_default_exports(tmp_path):
    export_model("default", tmp_path / "hf")
    lm = load_model("default")
    hf, tok = hf_pair(tmp_path / "hf")
    assert max_logit_diff(lm, hf, ["ROMEO: But soft, what light through yonder window breaks?"]) < LOGITS_TOLERANCE
    ours, theirs = greedy_pair(lm, hf, "ROMEO:", 12)
    assert ours == theirs
    text = "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?"
    assert tok.encode(text) == lm.tokenizer.encode(text)
    card = (tmp_path / "hf" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and "--model default" in card


def test_a_failure_mid_way_leaves_no_folder(tmp_path, tiny_gptlab_dir, monkeypatch):
    def broken(path):
        raise OSError("disk went away")

    monkeypatch.setattr(export_mod, "_retag_tokenizer", broken)
    with pytest.raises(OSError):
        export_model(str(tiny_gptlab_dir), tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its hidden temp


def test_a_conversion_that_disagrees_writes_nothing(tmp_path, tiny_gptlab_dir, monkeypatch):
    monkeypatch.setattr(export_mod, "_logits_diff", lambda model, hf: 0.5)
    with pytest.raises(LabError, match="nothing was written"):
        export_model(str(tiny_gptlab_dir), tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_refusals_name_the_reason(tmp_path, tiny_gptlab_dir, tiny_diffusion_dir, tiny_gpt2_dir):
    cases = {str(tiny_diffusion_dir): "masked-diffusion", str(tiny_gpt2_dir): "use it directly",
             "gpt2": "use it directly", "EleutherAI/gpt-neo-125M": "use it directly",
             str(tmp_path / "missing"): "does not exist", str(tiny_gptlab_dir / "config.json"): "is a file",
             str(tmp_path): "holds no GPT Lab checkpoint"}
    for spec, words in cases.items():
        with pytest.raises(LabError, match=words):
            export_model(spec, tmp_path / "out")
    with pytest.raises(LabError, match="Unknown export format"):
        export_model(str(tiny_gptlab_dir), tmp_path / "out", format="onnx")
    assert not (tmp_path / "out").exists()
