"""Checkpoints made by accident or by an attacker: links out of the folder, configs that are not
configs or describe impossible sizes, weights that are not numbers, a tokenizer bigger than the
model, a diffusion model with no mask token. Each is refused at load, in one sentence, before
anything large is built; nothing behind a link is read or shown."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.errors import LabError
from core.generation.sampler import sampler_for
from core.models.config import LIMITS, GPTConfig
from core.models.gpt import GPT
from core.models.loading import load_model, read_checkpoint_meta, save_checkpoint

SECRET = "root:$6$not-for-your-eyes:19000:0:99999:7:::"


@pytest.fixture
def ckpt(tmp_path, tiny_gptlab_dir) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_gptlab_dir, folder)
    return folder


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "shadow"
    path.write_text(SECRET)
    return path


def _meta(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _write_meta(folder: Path, meta: dict) -> None:
    (folder / "config.json").write_text(json.dumps(meta))


# -- links out of the folder ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["README.md", "config.json", "model.safetensors", "tokenizer.json"])
def test_a_file_linking_out_of_the_folder_is_refused_never_followed(ckpt, secret, name):
    from core.commands.models import checkpoint_summary, find_checkpoints

    target = secret
    if name != "README.md":  # a real file of the right kind, moved out and linked back
        target = ckpt.parent / f"outside-{name}"
        shutil.move(ckpt / name, target)
    (ckpt / name).unlink(missing_ok=True)
    os.symlink(target, ckpt / name)
    with pytest.raises(LabError, match=r"is a link to .*outside the model folder; GPT Lab reads a model only") as e:
        load_model(str(ckpt))
    assert SECRET not in str(e.value) and "\n" not in str(e.value)
    if name in ("README.md", "config.json"):  # what `models` reads to list a checkpoint
        with pytest.raises(LabError, match="outside the model folder"):
            checkpoint_summary(ckpt)
    runs = ckpt.parent / "runs"
    (runs / "r" / "checkpoints").mkdir(parents=True)
    (runs / "r" / "checkpoints" / "1").symlink_to(ckpt)
    assert all(SECRET not in json.dumps(c) for c in find_checkpoints(runs))  # listed without it, or not at all


def test_links_inside_the_folder_and_a_hub_cache_snapshot_load(tmp_path, tiny_gptlab_dir, tiny_gpt2_dir):
    inside = tmp_path / "inside"
    shutil.copytree(tiny_gptlab_dir, inside)
    (inside / "card.md").write_text("# a card\n")
    os.symlink("card.md", inside / "README.md")
    assert load_model(str(inside)).card_text == "# a card\n"
    # the Hugging Face cache: snapshots/<rev>/<file> are links into the repository's blobs
    repo = tmp_path / "models--tiny" / "snapshots"
    snap, blobs = repo / "abc123", tmp_path / "models--tiny" / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in Path(tiny_gpt2_dir).iterdir():
        shutil.copy(f, blobs / f.name)
        os.symlink(Path("..", "..", "blobs", f.name), snap / f.name)
    assert load_model(str(snap)).family == "gpt2"


def test_a_linked_model_folder_is_read_where_it_lives(tmp_path, tiny_gptlab_dir):
    link = tmp_path / "latest"
    os.symlink(tiny_gptlab_dir, link)  # runs/latest -> runs/x: the folder itself may be a link
    assert load_model(str(link)).stack.n_layer == 2


# -- configs that are not sensible ---------------------------------------------------------------------

@pytest.mark.parametrize("change, words", [
    ({"n_layer": 100_000}, "n_layer must be between 1 and 1,024"),
    ({"vocab_size": 10**12}, "vocab_size must be between 1 and"),
    ({"d_model": "32"}, "d_model must be a whole number"),
    ({"n_head": 2.5}, "n_head must be a whole number"),
    ({"n_layer": True}, "n_layer must be a whole number"),
    ({"dropout": float("nan")}, "dropout must be a finite number"),
    ({"causal": "yes"}, "causal must be true or false"),
    ({"mask_token_id": 10**9}, "mask_token_id must be a token id"),
    ({"layer_norm_eps": 0}, "layer_norm_eps must be in (0, 1)"),
    ({"extra": [1, 2]}, "extra must be a mapping"),
])
def test_impossible_sizes_are_refused_in_a_sentence_before_building(ckpt, change, words):
    meta = _meta(ckpt)
    meta["model"].update(change)
    _write_meta(ckpt, meta)
    t0 = time.perf_counter()
    with pytest.raises(LabError) as e:
        load_model(str(ckpt))
    assert time.perf_counter() - t0 < 5 and words in str(e.value) and "\n" not in str(e.value)


def test_sizes_within_limits_that_cannot_fit_are_refused_by_a_memory_check(ckpt):
    meta = _meta(ckpt)
    meta["model"].update(n_layer=LIMITS["n_layer"], d_model=LIMITS["d_model"], n_head=64)  # about 52 trillion bytes
    _write_meta(ckpt, meta)
    t0 = time.perf_counter()
    with pytest.raises(LabError, match=r"needs about .* to load \(.* parameters\), more than the .* free on cpu"):
        load_model(str(ckpt))
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("text, words", [
    ("not json", "is not valid JSON"),
    ("[1, 2]", "no \"model\" object"),
    (json.dumps({"format": "gptlab", "model": "big"}), "no \"model\" object"),
    (json.dumps({"format": "gptlab", "model": {}, "objective": "telepathy"}), "names the objective 'telepathy'"),
])
def test_config_json_that_is_no_config(ckpt, text, words):
    (ckpt / "config.json").write_text(text)
    with pytest.raises(LabError, match=words if "(" not in words else None) as e:
        read_checkpoint_meta(ckpt)
    assert words in str(e.value)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=8)
FIELDS = ["vocab_size", "block_size", "n_layer", "n_head", "d_model", "mlp_expansion", "dropout", "bias", "causal",
          "tie_weights", "layer_norm_eps", "mask_token_id", "extra"]
MODEL_JSON = st.one_of(JSON, st.dictionaries(st.sampled_from(FIELDS), st.one_of(
    JSON, st.integers(-3, 300), st.sampled_from([10**6, 10**12, 2**63, -1, 0, 1.5, float("inf")])), max_size=8))


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(model=MODEL_JSON, objective=st.one_of(st.sampled_from(["ar", "diffusion"]), JSON))
def test_random_json_as_a_checkpoint_config_is_a_model_or_a_sentence(tmp_path, tiny_gptlab_dir, model, objective):
    folder = tmp_path / "random"
    if not folder.exists():
        shutil.copytree(tiny_gptlab_dir, folder)
    meta = {**json.loads((tiny_gptlab_dir / "config.json").read_text()), "model": model, "objective": objective}
    (folder / "config.json").write_text(json.dumps(meta))
    try:
        cfg = GPTConfig.from_dict(model)
    except LabError as e:
        assert "\n" not in str(e)
    else:
        assert all(1 <= getattr(cfg, k) <= v for k, v in LIMITS.items())
    try:
        load_model(str(folder))
    except LabError as e:
        assert "\n" not in str(e)


# -- weights, tokenizer, mask token ----------------------------------------------------------------------

def _tiny(vocab: int, **kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab, block_size=16, n_layer=1, n_head=2, d_model=8, **kw))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_that_are_not_numbers_are_refused_at_load(tmp_path, tiny_gptlab_dir, bad):
    tok = tiny_gptlab_dir / "tokenizer.json"
    model = _tiny(320)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[3, 1] = bad
    save_checkpoint(tmp_path / "nan", model, str(tok))
    with pytest.raises(LabError, match=r"hold NaN or infinite values \(first in transformer\.h\.0\.mlp\.c_fc\.weight\)"):
        load_model(str(tmp_path / "nan"))


def test_nan_in_a_bare_state_dict_is_refused(tmp_path):
    from core.models.loading import load_state_dict_file

    sd = {"transformer.wte.weight": torch.tensor([[1.0, float("nan")]])}
    torch.save(sd, tmp_path / "w.pt")
    with pytest.raises(LabError, match="NaN or infinite"):
        load_state_dict_file(tmp_path / "w.pt")


def test_a_tokenizer_bigger_than_the_vocabulary_is_refused_at_load(tmp_path, tiny_gptlab_dir):
    save_checkpoint(tmp_path / "small", _tiny(100), str(tiny_gptlab_dir / "tokenizer.json"))  # tokenizer: 320
    with pytest.raises(LabError, match=r"has 320 tokens but the model only 100; pass the tokenizer"):
        load_model(str(tmp_path / "small"))


def test_a_diffusion_checkpoint_without_a_mask_token_is_refused_at_load(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    folder = tmp_path / "nomask"
    folder.mkdir()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["plain text with no mask token at all"] * 10,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                show_progress=False))
    tok.save(str(tmp_path / "tokenizer.json"))
    save_checkpoint(folder, _tiny(tok.get_vocab_size(), causal=False), str(tmp_path / "tokenizer.json"),
                    objective="diffusion")
    with pytest.raises(LabError, match="labelled a diffusion model but names no mask token"):
        load_model(str(folder))
    # the same model labelled autoregressive loads, and takes the autoregressive sampler
    meta = _meta(folder)
    _write_meta(folder, {**meta, "objective": "ar"})
    assert sampler_for(load_model(str(folder))).name == "autoregressive"
