"""`validate`: our GPT against transformers' GPT-2 on tiny models. The weights are redrawn with a
large spread so greedy decoding wanders over many tokens instead of repeating one, which makes
"identical token for token" a real check."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import core.models.validate as validate_mod
from core.commands.cli import main
from core.models.loading import offline_message
from core.models.validate import format_report, validate_gpt2

GEN_PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def sharp_gpt2_dir(tiny_gpt2_dir, tmp_path_factory):
    from transformers import GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("sharp-gpt2")
    shutil.copytree(tiny_gpt2_dir, folder, dirs_exist_ok=True)
    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.save_pretrained(folder)
    return folder


def test_tiny_gpt2_passes_every_check(sharp_gpt2_dir):
    r = validate_gpt2(str(sharp_gpt2_dir), gen_prompt=GEN_PROMPT, max_new_tokens=20)
    assert r.passed, format_report(r)
    assert r.hf_params == r.our_params == 49_824
    assert len(r.weights) == 41 and r.weights_max_abs_diff == 0.0
    assert r.logits_max_abs_diff < 1e-4
    assert r.our_ids == r.hf_ids and len(r.our_ids) == 20
    assert len(set(r.our_ids)) >= 5  # a varied continuation, not one token repeated
    assert r.our_text == r.hf_text
    json.dumps(r.to_dict())  # the app and --json get plain data


def test_validate_command_prints_the_report_and_exits_0(capsys, sharp_gpt2_dir, tmp_path):
    out_json = tmp_path / "report.json"
    rc = main(["validate", "--model", str(sharp_gpt2_dir), "--prompt", "The quick brown fox",
               "--gen_prompt", GEN_PROMPT, "--max_new_tokens", "16", "--json", str(out_json)])
    out, _ = capsys.readouterr()
    assert rc == 0, out
    for heading in ("Parameters", "Weights (41 tensors", "Logits on 'The quick brown fox'",
                    "Greedy generation", "identical token for token (16 tokens)", "Result: all checks pass"):
        assert heading in out
    saved = json.loads(out_json.read_text())
    assert saved["passed"] is True and saved["checks"] == {"parameters": True, "weights": True, "logits": True,
                                                          "generation": True}
    assert len(saved["weights"]) == 41


def test_validate_a_bare_state_dict(capsys, sharp_gpt2_dir, tmp_path):
    from transformers import GPT2LMHeadModel

    sd_path = tmp_path / "gpt2_weights.pt"
    torch.save(GPT2LMHeadModel.from_pretrained(sharp_gpt2_dir).state_dict(), sd_path)
    rc = main(["validate", "--model", str(sharp_gpt2_dir), "--weights", str(sd_path), "--gen-prompt", GEN_PROMPT,
               "--max-new-tokens", "12"])
    out, _ = capsys.readouterr()
    assert rc == 0, out
    assert "weights from gpt2_weights.pt" in out and "Result: all checks pass" in out


def test_a_conversion_error_is_caught_and_exits_1(capsys, monkeypatch, sharp_gpt2_dir):
    convert = validate_mod.gpt_from_hf_gpt2

    def broken(hf):
        model = convert(hf)
        with torch.no_grad():
            model.transformer.h[1].mlp.c_fc.bias[3] += 0.5
        return model

    monkeypatch.setattr(validate_mod, "gpt_from_hf_gpt2", broken)
    r = validate_gpt2(str(sharp_gpt2_dir), gen_prompt=GEN_PROMPT, max_new_tokens=8)
    bad = [w for w in r.weights if w.max_abs_diff != 0]
    assert [w.name for w in bad] == ["transformer.h.1.mlp.c_fc.bias"]
    assert bad[0].max_abs_diff == pytest.approx(0.5)
    assert not r.weights_identical and not r.logits_pass and r.params_match
    rc = main(["validate", "--model", str(sharp_gpt2_dir), "--gen-prompt", GEN_PROMPT, "--max-new-tokens", "8"])
    out, _ = capsys.readouterr()
    assert rc == 1 and "Result: FAILED (weights, logits" in out


@pytest.mark.parametrize("fixture, family", [("tiny_neo_dir", "gpt_neo"), ("tiny_gptlab_dir", "GPT Lab")])
def test_only_gpt2_models_can_be_validated(capsys, request, fixture, family):
    rc = main(["validate", "--model", str(request.getfixturevalue(fixture))])
    _, err = capsys.readouterr()
    last = err.splitlines()[-1]
    assert rc == 2 and last.startswith("error: ") and family in last
    assert "only the GPT-2 family can be validated" in last


def test_uncached_hub_model_exits_2_offline(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = "gptlab-tests/not-downloaded-gpt2"
    assert main(["validate", "--model", spec]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"error: {offline_message(spec)}"


def test_too_many_new_tokens_exits_2(capsys, sharp_gpt2_dir):
    assert main(["validate", "--model", str(sharp_gpt2_dir), "--gen-prompt", GEN_PROMPT,
                 "--max-new-tokens", "500"]) == 2
    assert "ask for at most" in capsys.readouterr().err
