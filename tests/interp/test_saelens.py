"""SAELens' format both ways, checked against SAELens itself (sae-lens from PyPI): our export
loads with its own loader and computes what ours computes; folders SAELens writes come back bit
for bit; TransformerLens-folded transcoders get ln2's affine folded in and their FVE measured
against the centred target; the Hugging Face cache; the CLI; refusals in one sentence."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from core.errors import LabError
from core.interp import FeatureStats, FeatureStore, TranscoderConfig, evaluate_transcoders, load_transcoder_set
from core.interp.activations import mlp_io
from core.interp.saelens import (NO_PROCESSING, SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME,
                                 densities_from, export_saelens, import_saelens, layer_folder, resolve_source)
from core.interp.store import HIST_EDGES
from core.interp.transcoder import Transcoder, TranscoderSet
from core.models.loading import load_model

D, F = 32, 64  # the tiny models' width; features per layer


@pytest.fixture(scope="module")
def sae_lens():
    """The oracle, SAELens itself (sae-lens==6.54.12 from PyPI, in requirements.txt); imported only by
    the tests that use it, which skip where it is not installed."""
    return pytest.importorskip("sae_lens")


@pytest.fixture(scope="module")
def lm(tiny_gptlab_dir):
    return load_model(str(tiny_gptlab_dir))


def random_set(activation: str, layers=(0, 1), seed: int = 0, model: str = "tiny") -> TranscoderSet:
    g = torch.Generator().manual_seed(seed)
    cfg = TranscoderConfig(d_model=D, n_features=F, activation=activation, k=8)
    tcs = {}
    for i in layers:
        t = Transcoder(cfg, layer=i)
        t.reset_parameters(g)
        with torch.no_grad():
            t.b_enc.copy_(torch.randn(F, generator=g) * 0.1)
            t.b_dec.copy_(torch.randn(D, generator=g))
            if activation == "jumprelu":
                t.threshold.copy_(torch.rand(F, generator=g) * 0.3)
        tcs[i] = t.eval().requires_grad_(False)
    quality = {str(i): {"layer": i, "fve": 0.5 + i / 10, "l0": 8.0, "dead_fraction": 0.1, "loss_clean": 3.0,
                        "loss_replaced": 3.2, "loss_ablated": 4.0, "loss_recovered": 0.8, "n_tokens": 100}
               for i in layers}
    return TranscoderSet(transcoders=tcs, config=cfg, model=model, model_info={"d_model": D, "n_layer": 2},
                         training={"seq_len": 32, "dataset": "shakespeare", "steps": 5}, metrics={"layers": quality})


def store_with_densities(path: Path, layers=(0, 1)) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(0)
    dens = {i: np.where(rng.random(F) < 0.2, 0.0, rng.random(F) * 0.3) for i in layers}
    with FeatureStore.build(path) as store:
        store.add_set("tiny", None, {"transcoder": {"n_features": F}})
        for i in layers:
            store.put_layer(i, F)
            store.put_features([FeatureStats(layer=i, feature=f, density=float(dens[i][f]), n_active=0, max_act=1.0,
                                             mean_act=1.0, hist=[0] * len(HIST_EDGES), top_tokens=[], promoted=[],
                                             suppressed=[]) for f in range(F)])
    return dens


def load_saelens(sae_lens, folder: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "load the model with from_pretrained_no_processing": what the export asks
        return sae_lens.SAE.load_from_disk(folder)


# -- export: SAELens' own loader computes what we compute ------------------------------------------

@pytest.mark.parametrize("activation,cls", [("topk", "TopKSAE"), ("relu", "Transcoder"),
                                            ("jumprelu", "JumpReLUTranscoder")])
def test_export_loads_in_saelens_and_computes_the_same(sae_lens, tmp_path, activation, cls):
    tset = random_set(activation)
    dens = store_with_densities(tmp_path / "features.sqlite")
    with FeatureStore(tmp_path / "features.sqlite", readonly=True) as store:
        folders = export_saelens(tset, tmp_path / "out", store=store)
    assert [f.name for f in folders] == ["blocks.0.ln2.hook_normalized", "blocks.1.ln2.hook_normalized"]
    x = torch.randn(4, 9, D, generator=torch.Generator().manual_seed(1)) * 3
    for i, folder in zip((0, 1), folders):
        assert sorted(p.name for p in folder.iterdir()) == [SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME]
        sae = load_saelens(sae_lens, folder)
        assert type(sae).__name__ == cls
        meta = sae.cfg.metadata
        assert (meta.hook_name, meta.hook_name_out, meta.model_name) == (f"blocks.{i}.ln2.hook_normalized",
                                                                         f"blocks.{i}.hook_mlp_out", "tiny")
        assert meta.model_from_pretrained_kwargs == NO_PROCESSING and meta.context_size == 32
        assert (sae.cfg.d_in, sae.cfg.d_sae) == (D, F)
        raw = json.loads((folder / SAE_CFG_FILENAME).read_text())
        arch = {"topk": "topk", "relu": "transcoder", "jumprelu": "jumprelu_transcoder"}[activation]
        assert raw["architecture"] == arch
        assert raw["d_out"] == D and raw.get("k") == (8 if activation == "topk" else None)
        ours = tset[i]
        acts = sae.encode(x)
        assert torch.allclose(acts, ours.encode(x), atol=1e-6, rtol=0)
        assert torch.allclose(sae.decode(acts), ours.decode(ours.encode(x)), atol=1e-6, rtol=0)
        assert torch.allclose(sae(x), ours(x), atol=1e-6, rtol=0)
        assert (acts > 0).sum(-1).max() <= (8 if activation == "topk" else F)
        # log10 feature density, as SAELens' trainer stores it
        sparsity = load_file(str(folder / SPARSITY_FILENAME))["sparsity"]
        assert sparsity.dtype == torch.float32
        assert torch.equal(sparsity, torch.from_numpy(np.log10(dens[i] + 1e-10).astype(np.float32)))
    back = densities_from(tmp_path / "out")
    assert np.allclose(back[0], dens[0], atol=1e-6, rtol=1e-5)


def test_export_then_import_is_the_same_set(lm, tmp_path):
    tset = random_set("topk", model=lm.spec)
    tset.config.target_centered = False
    export_saelens(tset, tmp_path / "out", dtype="float32")
    back = import_saelens(tmp_path / "out", lm)
    assert back.config == tset.config and back.layers == [0, 1] and back.training == tset.training
    assert back.metrics == tset.metrics
    for i in back.layers:
        for name, v in tset[i].state_dict().items():
            assert torch.equal(back[i].state_dict()[name], v), name
    assert back.origin["format"] == "saelens" and len(back.origin["notes"]) == 1   # nothing was changed
    # half precision on disk comes back exactly too, and is kept in that dtype
    export_saelens(tset, tmp_path / "half", dtype="bfloat16")
    half = import_saelens(tmp_path / "half", lm)
    assert half.origin["dtype"] == "bfloat16"
    folder = half.save(tmp_path / "set", half.origin["dtype"])
    stored = load_file(str(tmp_path / "half" / layer_folder(1) / SAE_WEIGHTS_FILENAME))
    assert all(torch.equal(load_transcoder_set(folder)[1].state_dict()[k], v.float()) for k, v in stored.items())


# -- import: folders SAELens wrote -----------------------------------------------------------------

def saelens_transcoder(sae_lens, arch: str, layer: int, meta: dict, seed: int = 0):
    """A transcoder made and saved by SAELens itself (its own random init, not ours)."""
    from sae_lens.saes.sae import SAEMetadata

    cls, cfg_cls = sae_lens.registry.get_sae_class(arch)
    kwargs = dict(d_in=D, d_sae=F, apply_b_dec_to_input=False,
                  metadata=SAEMetadata(model_name="tiny", hook_name=f"blocks.{layer}.ln2.hook_normalized",
                                       hook_name_out=f"blocks.{layer}.hook_mlp_out", **meta))
    if arch == "topk":
        kwargs["k"] = 5
    else:
        kwargs["d_out"] = D
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae = cls(cfg_cls(**kwargs))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # biases and thresholds away from zero
        if hasattr(sae, "threshold"):
            sae.threshold.abs_()
    return sae


@pytest.mark.parametrize("arch", ["transcoder", "jumprelu_transcoder", "topk"])
def test_folders_saelens_wrote_import_bit_for_bit(sae_lens, lm, tmp_path, arch):
    meta = {"model_from_pretrained_kwargs": NO_PROCESSING}
    saes = {i: saelens_transcoder(sae_lens, arch, i, meta, seed=i) for i in (0, 1)}
    for i, sae in saes.items():
        sae.save_model(tmp_path / "release" / f"layer_{i}")
    tset = import_saelens(tmp_path / "release", lm)
    assert tset.layers == [0, 1] and not tset.config.target_centered
    assert tset.config.activation == {"transcoder": "relu", "jumprelu_transcoder": "jumprelu", "topk": "topk"}[arch]
    x = torch.randn(6, D)
    for i, sae in saes.items():
        theirs = sae.state_dict()
        ours = tset[i].state_dict()
        assert set(ours) == set(theirs)
        for name in theirs:
            assert torch.equal(ours[name], theirs[name]), name
        assert torch.allclose(tset[i].encode(x), sae.encode(x), atol=1e-6, rtol=0)
        assert torch.allclose(tset[i](x), sae(x), atol=1e-6, rtol=0)
    # and round trip through SAELens again: our export of the imported set loads as the same SAE
    export_saelens(tset, tmp_path / "again")
    for i, sae in saes.items():
        again = load_saelens(sae_lens, tmp_path / "again" / layer_folder(i))
        for name, v in sae.state_dict().items():
            assert torch.equal(again.state_dict()[name], v), name


@pytest.mark.parametrize("arch,extra", [("topk", {"rescale_acts_by_decoder_norm": True}),
                                        ("topk", {"apply_b_dec_to_input": True}),
                                        ("jumprelu", {"apply_b_dec_to_input": True}),
                                        ("standard", {"apply_b_dec_to_input": True})])
def test_saelens_kinds_that_need_a_fold_compute_the_same(sae_lens, lm, tmp_path, arch, extra):
    """SAEs that rank TopK by decoder norm, or subtract b_dec from their input, are folded into a plain
    transcoder that computes what SAELens computes (weights changed, so within float error)."""
    from sae_lens.saes.sae import SAEMetadata

    cls, cfg_cls = sae_lens.registry.get_sae_class(arch)
    meta = SAEMetadata(model_name="tiny", hook_name="blocks.1.ln2.hook_normalized",
                       hook_name_out="blocks.1.hook_mlp_out", model_from_pretrained_kwargs=NO_PROCESSING)
    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae = cls(cfg_cls(d_in=D, d_sae=F, metadata=meta, **({"k": 6} if arch == "topk" else {}), **extra))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        sae.W_dec.mul_(torch.rand(F, 1) * 2 + 0.5)               # decoder rows of uneven norm
        if hasattr(sae, "threshold"):
            sae.threshold.abs_()
    sae.save_model(tmp_path / "sae")
    tset = import_saelens(tmp_path / "sae", lm)
    for flag in extra:                                            # what was folded is said
        assert any(flag in note for note in tset.origin["notes"]), tset.origin["notes"]
    x = torch.randn(50, D) * 2
    assert torch.allclose(tset[1](x), sae(x), atol=1e-5, rtol=1e-5)
    on = sae.encode(x) > 0
    assert torch.equal(tset[1].encode(x) > 0, on)


def test_transformerlens_folded_transcoders_get_ln2_folded_in(sae_lens, tmp_path, tiny_gpt2_dir):
    """A transcoder trained on a fold_ln model read the stream normalised but before ln2's weight
    and bias, and wrote hook_mlp_out less its mean: on import the affine goes into the encoder and
    FVE is measured against the centred target."""
    lm = load_model(str(tiny_gpt2_dir))
    g = torch.Generator().manual_seed(3)
    for i in range(lm.stack.n_layer):  # a random init has w = 1, b = 0: make the fold matter
        ln = lm.stack.ln_2(i)
        with torch.no_grad():
            ln.weight.copy_(0.5 + torch.rand(D, generator=g))
            ln.bias.copy_(torch.randn(D, generator=g) * 0.3)
    sae = saelens_transcoder(sae_lens, "transcoder", 1, {})       # no model_from_pretrained_kwargs: TL's defaults
    with torch.no_grad():
        sae.W_dec.mul_(0.02)                                      # writes about as much as the tiny MLP does
    sae.save_model(tmp_path / "tl")
    tset = import_saelens(tmp_path / "tl", lm)
    assert tset.layers == [1] and tset.config.target_centered
    notes = " ".join(tset.origin["notes"])
    assert "fold_ln" in notes and "center_writing_weights" in notes
    ids = torch.randint(0, lm.stack.vocab_size, (2, 12), generator=g)
    record: dict = {}
    h = lm.stack.embed(ids)
    for i in range(2):
        h = lm.stack.block(i, h, record=record)
    resid = record["blocks.1.hook_mlp_in"]
    ln = lm.stack.ln_2(1)
    var = resid.var(-1, unbiased=False, keepdim=True)
    normalized = (resid - resid.mean(-1, keepdim=True)) / torch.sqrt(var + ln.eps)  # LNPre: no weight, no bias
    x = record["blocks.1.ln2.hook_normalized"]                    # GPT Lab's hook: after the affine
    assert torch.allclose(tset[1].encode(x), sae.encode(normalized), atol=1e-5, rtol=1e-5)
    assert torch.allclose(tset[1](x), sae(normalized), atol=1e-5, rtol=1e-5)
    # FVE against the target it was trained on: hook_mlp_out less its mean over d_model
    windows = ids.numpy()
    q = evaluate_transcoders(lm, tset, windows, batch_size=2)[1]
    (xx, y), = mlp_io(lm, ids, [1]).values()
    y = (y - y.mean(-1, keepdim=True)).reshape(-1, D).double()
    y_hat = tset[1](xx).reshape(-1, D).double()
    fve = 1 - ((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    assert q.fve == pytest.approx(float(fve), rel=1e-6, abs=1e-6)
    (_, y_raw), = mlp_io(lm, ids, [1]).values()
    y_raw = y_raw.reshape(-1, D).double()
    fve_raw = 1 - ((y_raw - y_hat) ** 2).sum() / ((y_raw - y_raw.mean(0)) ** 2).sum()
    assert abs(float(fve_raw) - q.fve) > 1e-3, (float(fve_raw), q.fve)
    # told it read the MLP's real input, nothing is folded
    kept = import_saelens(tmp_path / "tl", lm, fold_ln="no")
    assert torch.equal(kept[1].W_enc, sae.W_enc.detach())


# -- the Hugging Face cache ------------------------------------------------------------------------

def test_import_from_the_hugging_face_cache(lm, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    tset = random_set("relu", model=lm.spec)
    export_saelens(tset, tmp_path / "export")
    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-transcoders"
    sha = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / sha
    for src in sorted(p for p in (tmp_path / "export").rglob("*") if p.is_file()):  # blobs/, linked from the snapshot
        blob = repo / "blobs" / f"{abs(hash(str(src))):x}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, blob)
        dest = snap / "saes" / src.relative_to(tmp_path / "export")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_source("someone/tiny-transcoders/saes") == snap / "saes"
    back = import_saelens("someone/tiny-transcoders/saes", lm)
    assert back.layers == [0, 1]
    assert all(torch.equal(back[i].W_enc, tset[i].W_enc) for i in (0, 1))
    with pytest.raises(LabError, match="no folder here, and as a Hugging Face repo .* not in the local Hugging Face"):
        resolve_source("someone/not-there")
    # a file that links out of the repository is refused, never read
    outside = tmp_path / "elsewhere.json"
    outside.write_text((snap / "saes" / layer_folder(0) / SAE_CFG_FILENAME).read_text())
    (snap / "saes" / layer_folder(0) / SAE_CFG_FILENAME).unlink()
    (snap / "saes" / layer_folder(0) / SAE_CFG_FILENAME).symlink_to(outside)
    with pytest.raises(LabError, match="outside the folder being imported"):
        import_saelens("someone/tiny-transcoders/saes", lm)


# -- refusals --------------------------------------------------------------------------------------

def test_what_cannot_be_spliced_in_is_refused_in_one_sentence(sae_lens, lm, tmp_path):
    def write(name: str, meta: dict):
        sae = saelens_transcoder(sae_lens, "transcoder", 0, meta)
        sae.save_model(tmp_path / name)
        return tmp_path / name

    sae_only = write("sae", {})
    raw = json.loads((sae_only / SAE_CFG_FILENAME).read_text())
    del raw["metadata"]["hook_name_out"]
    (sae_only / SAE_CFG_FILENAME).write_text(json.dumps(raw))
    with pytest.raises(LabError, match="an SAE, not a transcoder"):
        import_saelens(sae_only, lm)
    resid = write("resid", {})
    raw = json.loads((resid / SAE_CFG_FILENAME).read_text())
    raw["metadata"]["hook_name"] = "blocks.0.hook_resid_pre"
    (resid / SAE_CFG_FILENAME).write_text(json.dumps(raw))
    with pytest.raises(LabError, match="reads blocks.0.hook_resid_pre"):
        import_saelens(resid, lm)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / SAE_CFG_FILENAME).write_text((resid / SAE_CFG_FILENAME).read_text())
    (pickled / "final_sparse_autoencoder.pt").write_bytes(b"not unpickled")
    with pytest.raises(LabError, match="does not unpickle"):
        import_saelens(pickled, lm)
    with pytest.raises(LabError, match="no such folder, and not a Hugging Face repo id"):
        import_saelens(str(tmp_path / "missing"), lm)
    export_saelens(random_set("relu"), tmp_path / "ok")
    with pytest.raises(LabError, match="--layers"):
        import_saelens(tmp_path / "ok", lm, layers=[5])


# -- the command line ------------------------------------------------------------------------------

def test_cli_export_and_import(tiny_gptlab_dir, tmp_path, monkeypatch, capsys):
    from core.commands.cli import main

    monkeypatch.setenv("GPTLAB_DATA_CACHE", str(tmp_path / "cache"))
    from tests.conftest import CORPUS

    text = tmp_path / "corpus.txt"
    text.write_text(CORPUS * 3)
    lm = load_model(str(tiny_gptlab_dir))
    tset = random_set("topk", model=lm.spec)
    tset.save(tmp_path / "set")
    store_with_densities(tmp_path / "set" / "features.sqlite")
    out = tmp_path / "saelens"
    rc = main(["transcoders", "export", "--model", str(tiny_gptlab_dir), "--transcoders", str(tmp_path / "set"),
               "--to", str(out), "--format", "saelens"])
    err = capsys.readouterr().err
    assert rc == 0 and "SAE.load_from_disk" in err, err
    assert (out / layer_folder(1) / SPARSITY_FILENAME).is_file()
    # nothing is ever written over an existing folder: a second export, a model folder
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    rc = main(["transcoders", "export", "--transcoders", str(tmp_path / "set"), "--to", str(out), "--layers", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "is not empty" in err and err.count("\n") == 1
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")
    rc = main(["transcoders", "export", "--transcoders", str(tmp_path / "set"), "--to", str(tmp_path / "other")])
    assert rc == 2 and "a model folder" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["config.json"]

    # import: --model comes from the folders' model_name; evaluated, collected and described like train
    rc = main(["transcoders", "import", "--from", str(out), "--to", str(tmp_path / "imported"), "--dataset", str(text),
               "--seq-len", "32", "--val-windows", "4", "--collect-tokens", "2048", "--collect-seq-len", "32",
               "--top-k", "3", "--n-quantile", "2", "--n-heldout", "2", "--n-negative", "2", "--max-features", "4"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    back = load_transcoder_set(tmp_path / "imported")
    assert back.model == str(tiny_gptlab_dir) and back.origin["format"] == "saelens"
    assert set(back.metrics["layers"]) == {"0", "1"} and back.metrics["imported"] is True
    assert (tmp_path / "imported" / "features.sqlite").is_file() and "total:" in captured.out
    for i in (0, 1):
        assert torch.equal(back[i].W_dec, tset[i].W_dec)
    for taken in ("imported", "other"):  # a set, a model folder: refused before the model loads
        rc = main(["transcoders", "import", "--from", str(out), "--to", str(tmp_path / taken), "--no-eval",
                   "--no-collect"])
        assert rc == 2 and "name a new or empty folder" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["config.json"]
    # without --to, the model's own set folder (a copy of the model: the fixture is shared)
    own = tmp_path / "model"
    shutil.copytree(tiny_gptlab_dir, own)
    rc = main(["transcoders", "import", "--from", str(out), "--model", str(own), "--no-eval", "--no-collect"])
    assert rc == 0, capsys.readouterr().err
    assert load_transcoder_set(own / "transcoders").origin["format"] == "saelens"
    assert not (Path(tiny_gptlab_dir) / "transcoders").exists()


def test_older_flat_configs_read_too(tmp_path):
    """SAELens before 6.0 kept the metadata at the top level and named hooks hook_point(_out)."""
    from core.interp.saelens import SAELensConfig, source_model_name

    flat = {"d_in": D, "d_sae": F, "d_out": D, "hook_point": "blocks.2.ln2.hook_normalized",
            "hook_point_out": "blocks.2.hook_mlp_out", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 4},
            "model_name": "gpt2-small", "dtype": "torch.float32", "normalize_activations": False}
    cfg = SAELensConfig.from_dict(flat)
    assert (cfg.architecture, cfg.k, cfg.dtype, cfg.normalize_activations) == ("topk", 4, "float32", "none")
    assert cfg.metadata["hook_name"] == "blocks.2.ln2.hook_normalized"
    assert cfg.metadata["hook_name_out"] == "blocks.2.hook_mlp_out" and cfg.apply_b_dec_to_input
    (tmp_path / SAE_CFG_FILENAME).write_text(json.dumps(flat))
    assert source_model_name(tmp_path) == "gpt2"                     # TransformerLens' name -> the hub id
