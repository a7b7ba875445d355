"""Shipping a trained run as one of the models in assets/ (core.models.default ship, core.models.shipped):
the card's numbers are recomputed from the shipped files, 16-bit weights are kept only when they leave
the validation loss where it was, and a name is offered only once its folder is there."""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors import safe_open

import core.models.default as shipping
import core.models.shipped as shipped
from core.models.loading import DEFAULT_DIR, load_model
from core.training import TrainConfig, train


@pytest.fixture
def assets(tmp_path: Path, monkeypatch) -> Path:
    """An assets/ folder holding a copy of the shipped default (the scorer of generative perplexity)."""
    root = tmp_path / "assets"
    (root / "default").mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md"):
        shutil.copy2(DEFAULT_DIR / name, root / "default" / name)
    monkeypatch.setattr(shipped, "ASSETS", root)
    return root


def _run(tmp_path: Path, text_file: Path, objective: str) -> Path:
    folder = tmp_path / f"run-{objective}"
    cfg = TrainConfig(dataset=str(text_file), tokenizer=str(DEFAULT_DIR / "tokenizer.json"), objective=objective,
                      data_cache=str(tmp_path / "cache"), n_layer=1, n_head=2, d_model=32, block_size=160,
                      batch_size=2, device="cpu", log_every=1, val_every=3, val_batches=2, save_every=3,
                      keep_last=1, max_steps=3, seed=7)
    list(train(cfg, folder))
    return folder


def test_a_diffusion_run_ships_with_its_card_16bit_weights_and_generative_perplexity(tmp_path, text_file, assets,
                                                                                      monkeypatch):
    run = _run(tmp_path, text_file, "diffusion")
    monkeypatch.setattr(shipping, "GEN_PPL_SAMPLES", 2)
    monkeypatch.setattr(shipping, "DIFFUSION_SAMPLE", replace(shipping.DIFFUSION_SAMPLE, gen_length=8, steps=8))
    assert not shipped.is_shipped("diffusion") and shipped.shipped_names() == ["default"]

    out = shipping.ship(run, 3, ["python -m core train --objective diffusion ..."], name="diffusion")

    assert out == assets / "diffusion" and shipped.shipped_names() == ["default", "diffusion"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {__import__("torch").float16}
    recorded = json.loads((out / "config.json").read_text())["training"]["val_loss"]
    card = (out / "README.md").read_text()
    assert card.startswith("# diffusion: a small masked-diffusion LM trained on Shakespeare")
    # the card's float16 loss is the one the shipped files give, and it is within the tolerance of the run's
    loss16 = shipping.held_out_loss(out)
    assert abs(loss16 - recorded) <= shipping.LOSS_TOLERANCE_16BIT
    assert f"{loss16:.4f} with the float16 ones" in card
    default_val = json.loads((assets / "default" / "config.json").read_text())["training"]["val_loss"]
    assert "## Generative perplexity" in card and f"| {math.exp(default_val):.1f} |" in card
    lm = load_model("diffusion")
    assert lm.objective == "diffusion" and lm.spec == "diffusion"
    assert {p.dtype for p in lm.model.parameters()} == {__import__("torch").float32}  # upcast on load


def test_held_out_loss_recomputes_the_trainers_last_validation(tmp_path, text_file):
    run = _run(tmp_path, text_file, "ar")
    ckpt = run / "checkpoints" / "3"
    recorded = json.loads((ckpt / "config.json").read_text())["training"]["val_loss"]
    assert shipping.held_out_loss(ckpt) == pytest.approx(recorded, abs=1e-6)


def test_a_run_of_the_wrong_objective_is_refused(tmp_path, text_file, assets):
    run = _run(tmp_path, text_file, "ar")
    with pytest.raises(SystemExit, match="the shipped 'diffusion' is diffusion"):
        shipping.ship(run, 3, ["..."], name="diffusion")
    assert not (assets / "diffusion").exists()
