"""Transcoders: training quality on a tiny model, the drop-in MLP contract, saving and loading,
stopping, attribution, and the `transcoders` CLI end to end."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.errors import LabError
from core.interp import (Transcoder, TranscoderConfig, TranscoderTrainConfig, attribute,
                         corpus_from_texts, evaluate_transcoders, load_transcoder_set, model_loss, run_to_end,
                         train_transcoders, transcoder_dir_for)
from core.interp.quality import recovered
from core.models.loading import load_model

from tests.conftest import CORPUS

TEXTS = [CORPUS, CORPUS.upper(), CORPUS[::-1]]
FAST = dict(expansion=4, k=8, steps=80, batch_tokens=256, seq_len=32, model_batch=8, buffer_batches=4,
            val_windows=8, warmup_steps=10, lr=1e-2)


@pytest.fixture(scope="module")
def lm(tiny_gptlab_dir):
    return load_model(str(tiny_gptlab_dir))


@pytest.fixture(scope="module")
def corpus(lm):
    return corpus_from_texts(lm, TEXTS)


@pytest.fixture(scope="module")
def trained(lm, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tset")
    tset = run_to_end(train_transcoders(lm, TranscoderTrainConfig(**FAST), corpus=corpus, out_dir=out))
    return tset, out


def test_training_reaches_fve_at_reported_l0(trained):
    tset, out = trained
    layers = tset.metrics["layers"]
    assert set(layers) == {"0", "1"}
    for q in layers.values():
        assert q["fve"] >= 0.7, q
        assert q["l0"] == pytest.approx(8.0, abs=1e-6)       # topk: exactly k active (all above zero)
        assert 0.0 <= q["dead_fraction"] < 1.0
        assert q["loss_recovered"] == pytest.approx(recovered(q["loss_clean"], q["loss_replaced"], q["loss_ablated"]))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["layers"]["0"]["fve"] == pytest.approx(layers["0"]["fve"])
    for t in tset.transcoders.values():
        assert torch.allclose(t.W_dec.norm(dim=-1), torch.ones(t.n_features), atol=1e-5)


def test_saved_set_round_trips_and_splices_in(lm, corpus, trained):
    tset, out = trained
    loaded = load_transcoder_set(out)
    assert loaded.layers == [0, 1] and loaded.config == tset.config and loaded.model == lm.spec
    x = torch.randn(3, 5, lm.stack.d_model)
    for i in loaded.layers:
        assert torch.allclose(loaded[i](x), tset[i](x), atol=1e-6)
        # the dense and the sparse paths agree
        assert torch.allclose(loaded[i].decode(loaded[i].encode(x)), loaded[i](x), atol=1e-5)
    ids = torch.from_numpy(corpus.windows("val" if corpus.val.size >= 32 else "train", 32, 4))
    clean = model_loss(lm, ids)
    assert model_loss(lm, ids, {0: loaded[0]}) != clean     # the transcoder really replaces the MLP
    q = evaluate_transcoders(lm, loaded, ids.numpy(), batch_size=2)
    assert q[0].loss_clean == pytest.approx(clean, rel=1e-5)


def test_saved_hook_names_are_the_builders(trained):
    from core.models.hooks import act_name

    _, out = trained
    meta = json.loads((out / "config.json").read_text())
    assert meta["format_version"] == 2 and "hook_in" not in meta and "hook_out" not in meta
    assert meta["hook_name"] == {str(i): act_name("ln2_normalized", i) for i in (0, 1)}
    assert meta["hook_name_out"] == {str(i): act_name("mlp_out", i) for i in (0, 1)}
    assert meta["hook_name"]["1"] == "blocks.1.ln2.hook_normalized"        # not hook_mlp_in: that is before ln2


def test_sets_saved_with_the_old_keys_still_load(trained, tmp_path):
    """Format 1 (the shipped default set, and users' sets) wrote hook_in / hook_out templates."""
    import shutil

    from core.models.loading import DEFAULT_DIR

    tset, out = trained
    old = tmp_path / "old"
    shutil.copytree(out, old)
    meta = json.loads((old / "config.json").read_text())
    for key in ("hook_name", "hook_name_out"):
        del meta[key]
    meta.update(format_version=1, hook_in="blocks.{layer}.ln2.hook_normalized", hook_out="blocks.{layer}.hook_mlp_out")
    (old / "config.json").write_text(json.dumps(meta))
    loaded = load_transcoder_set(old)
    x = torch.randn(4, tset.config.d_model)
    assert loaded.layers == [0, 1] and torch.allclose(loaded[1](x), tset[1](x), atol=1e-6)
    assert json.loads((DEFAULT_DIR / "transcoders" / "config.json").read_text())["format_version"] == 1
    assert load_transcoder_set(DEFAULT_DIR / "transcoders").layers == [0, 1, 2, 3]

    meta["hook_in"] = "blocks.{layer}.hook_resid_pre"                     # a set for another hook point
    (old / "config.json").write_text(json.dumps(meta))
    with pytest.raises(LabError, match=r"reads blocks\.0\.hook_resid_pre .* train a set"):
        load_transcoder_set(old)
    (old / "config.json").write_text(json.dumps({"format": "gptlab-transcoders", "layers": "x"}))
    with pytest.raises(LabError, match="incomplete or damaged"):
        load_transcoder_set(old)
    (old / "config.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(LabError, match="newer GPT Lab"):
        load_transcoder_set(old)


def test_a_diverging_run_stops_in_one_sentence_and_keeps_the_good_set(lm, corpus, trained, tmp_path):
    """lr 1e30 makes the loss infinite within a few steps: the run ends with a LabError, and the
    good set already in the folder is neither overwritten with NaNs nor touched at all."""
    import shutil

    _, out = trained
    folder = tmp_path / "set"
    shutil.copytree(out, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    cfg = TranscoderTrainConfig(**{**FAST, "lr": 1e30, "warmup_steps": 1, "save_every": 1})
    with pytest.raises(LabError, match=r"diverged at step \d+ .* lower --lr \(it was 1e\+30\)") as e:
        run_to_end(train_transcoders(lm, cfg, corpus=corpus, out_dir=folder))
    assert "\n" not in str(e.value) and str(folder) in str(e.value)
    after = {p.name: p.read_bytes() for p in folder.iterdir()}
    for name, data in after.items():                                       # periodic saves before it went bad are
        if name.endswith(".safetensors"):                                   # finite; nothing non-finite reached disk
            from safetensors.torch import load
            assert all(bool(torch.isfinite(t).all()) for t in load(data).values()), name
    assert set(after) == set(before)


def test_saving_refuses_weights_that_are_not_finite(trained, tmp_path):
    import copy

    tset, out = trained
    bad = copy.deepcopy(tset)
    with torch.no_grad():
        bad[0].W_enc[0, 0] = float("nan")
    with pytest.raises(LabError, match="not finite, so nothing was written .* lower --lr"):
        bad.save(tmp_path / "nan")
    assert not (tmp_path / "nan").exists()
    with torch.no_grad():
        bad[0].W_enc[0, 0] = 1e6                                            # finite, but not in float16
    with pytest.raises(LabError, match="--save-dtype float32"):
        bad.save(tmp_path / "half", dtype="float16")


@pytest.mark.parametrize("activation", ["topk", "relu"])
def test_folding_scales_is_exact(activation):
    torch.manual_seed(0)
    t = Transcoder(TranscoderConfig(d_model=8, n_features=32, activation=activation, k=4))
    with torch.no_grad():
        t.b_enc.normal_()
        t.b_dec.normal_()
    x = torch.randn(10, 8)
    folded = t.folded(in_scale=3.0, out_scale=0.5)
    assert torch.allclose(folded(x), 0.5 * t(x / 3.0), atol=1e-5)
    assert torch.allclose(folded.W_dec.norm(dim=-1), t.W_dec.norm(dim=-1))


def test_relu_transcoders_train_too(lm, corpus):
    cfg = TranscoderTrainConfig(**{**FAST, "activation": "relu", "steps": 60, "l1_coeff": 1e-3, "layers": [1]})
    tset = run_to_end(train_transcoders(lm, cfg, corpus=corpus))
    q = tset.metrics["layers"]["1"]
    assert tset.layers == [1] and q["fve"] > 0.3 and 0 < q["l0"] < tset.config.n_features


def test_stopping_keeps_what_was_learnt(lm, corpus, tmp_path):
    events = train_transcoders(lm, TranscoderTrainConfig(**{**FAST, "steps": 50}), corpus=corpus, out_dir=tmp_path)
    for ev in events:
        if getattr(ev, "step", 0) == 5:
            break
    events.close()
    meta = json.loads((tmp_path / "metrics.json").read_text())
    assert meta["final"] is False and meta["steps"] == 5
    assert load_transcoder_set(tmp_path).layers == [0, 1]


def _with_store(trained, folder: Path) -> Path:
    """A copy of the trained set in ``folder`` with a feature store (and a SQLite journal) beside it."""
    import shutil

    shutil.copytree(trained[1], folder)
    (folder / "features.sqlite").write_bytes(b"the previous weights' features")
    (folder / "features.sqlite-journal").write_bytes(b"")
    return folder


def test_retraining_removes_the_store_of_the_replaced_weights(lm, corpus, trained, tmp_path):
    """The store goes just before the first save writes new weights, said by that Saved event only."""
    folder = _with_store(trained, tmp_path / "set")
    events = train_transcoders(lm, TranscoderTrainConfig(**{**FAST, "steps": 6, "save_every": 2}), corpus=corpus,
                               out_dir=folder)
    saved = []
    for ev in events:
        if getattr(ev, "step", 0) == 1:  # nothing saved yet: the old weights and their store stand together
            assert (folder / "features.sqlite").read_bytes() == b"the previous weights' features"
        if type(ev).__name__ == "Saved":
            saved.append(ev)
    assert [(s.step, s.dropped_store) for s in saved] == [(2, folder / "features.sqlite"), (4, None), (6, None)]
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in trained[1].iterdir())


def test_a_training_that_saves_nothing_leaves_the_store(lm, corpus, trained, tmp_path):
    folder = _with_store(trained, tmp_path / "set")
    run_to_end(train_transcoders(lm, TranscoderTrainConfig(**{**FAST, "steps": 3}), corpus=corpus))  # no out_dir
    events = train_transcoders(lm, TranscoderTrainConfig(**{**FAST, "steps": 50}), corpus=corpus, out_dir=folder)
    next(events)
    events.close()  # stopped before its first step: nothing learnt, nothing saved
    assert (folder / "features.sqlite").read_bytes() == b"the previous weights' features"


def test_cli_retraining_with_no_collect_leaves_no_stale_store(lm, trained, tiny_gptlab_dir, tmp_path, monkeypatch,
                                                              capsys):
    from core.commands.cli import main

    monkeypatch.setenv("GPTLAB_DATA_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(TEXTS * 3))
    folder = _with_store(trained, tmp_path / "set")
    rc = main(["transcoders", "train", "--model", str(tiny_gptlab_dir), "--output-dir", str(folder), "--dataset",
               str(text), "--expansion", "4", "--k", "8", "--train_steps", "4", "--batch-tokens", "128",
               "--train_seq_len", "32", "--no-collect", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert (f"removed {folder / 'features.sqlite'}: it described the previous weights; `transcoders collect` builds "
            f"the new weights' store") in err
    assert not (folder / "features.sqlite").exists() and not (folder / "features.sqlite-journal").exists()
    rc = main(["transcoders", "describe", "--model", str(tiny_gptlab_dir), "--transcoders", str(folder)])
    err = capsys.readouterr().err
    assert rc == 2 and "collect" in err  # the new weights have no features until they are collected


def test_bad_settings_say_what_to_change(lm, corpus):
    with pytest.raises(LabError, match="--layers"):
        next(train_transcoders(lm, TranscoderTrainConfig(**{**FAST, "layers": [7]}), corpus=corpus))
    with pytest.raises(LabError, match="--k"):
        next(train_transcoders(lm, TranscoderTrainConfig(**{**FAST, "k": 10_000}), corpus=corpus))
    with pytest.raises(LabError, match="not a transcoder set"):
        load_transcoder_set(Path(__file__).parent)


def test_a_job_too_big_for_the_machine_is_refused_before_allocating(lm, corpus, monkeypatch):
    """The Features page's maxima (expansion 256, a million tokens a step) would be killed by the
    kernel; they end in a sentence instead, while the usual sizes go ahead."""
    import core.devices as devices

    huge = TranscoderTrainConfig(**{**FAST, "expansion": 256, "batch_tokens": 1_000_000})
    monkeypatch.setattr(devices, "free_bytes", lambda device: 64 << 20)  # a machine with 64 MB free
    with pytest.raises(LabError, match="lower --expansion or --batch-tokens"):
        next(train_transcoders(lm, huge, corpus=corpus))
    assert next(train_transcoders(lm, TranscoderTrainConfig(**FAST), corpus=corpus)) is not None


def test_attribution_forward_is_the_models_own(lm, trained):
    tset, _ = trained
    ids = torch.tensor([lm.tokenizer.encode("ROMEO: But soft, what light")])
    x, nxt = ids[:, :-1], ids[0, 1:].tolist()
    targets = [(p, t) for p, t in enumerate(nxt)]
    acts, attr, mean_lp = attribute(lm, tset, x, targets)
    logp = lm.stack.logits(x).float().log_softmax(-1)[0]
    assert mean_lp == pytest.approx(float(torch.stack([logp[p, t] for p, t in targets]).mean()), abs=1e-5)
    for i in tset.layers:
        assert acts[i].shape == attr[i].shape == (x.shape[1], tset[i].n_features)
        assert bool((attr[i][acts[i] == 0] == 0).all())     # silent features get no credit


def test_default_set_lives_next_to_the_model(lm, tiny_gptlab_dir):
    from core.models.loading import DEFAULT_DIR

    assert transcoder_dir_for(lm) == Path(tiny_gptlab_dir) / "transcoders"
    default = load_model("default")
    assert transcoder_dir_for(default) == DEFAULT_DIR / "transcoders"


# -- CLI -------------------------------------------------------------------------------------------

def test_cli_train_collect_describe_explain(tiny_gptlab_dir, tmp_path, monkeypatch, capsys):
    from core.commands.cli import main

    monkeypatch.setenv("GPTLAB_DATA_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(TEXTS * 3))
    out = tmp_path / "set"
    rc = main(["transcoders", "train", "--model", str(tiny_gptlab_dir), "--output-dir", str(out), "--dataset", str(text),
               "--expansion", "4", "--k", "8", "--train_steps", "40", "--batch-tokens", "128", "--grad_acc_steps", "2",
               "--train_seq_len", "32", "--collect-tokens", "2048", "--collect-seq-len", "32", "--top_k", "5",
               "--n-quantile", "3", "--n-heldout", "3", "--n-negative", "3", "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("fve", "l0", "dead_fraction", "loss_clean", "loss_replaced", "loss_ablated", "loss_recovered"):
        assert key in metrics["layers"]["0"] and key in metrics["layers"]["1"]
    assert metrics["tokens"] == 40 * 256
    assert (out / "features.sqlite").is_file() and (out / "layer_0.safetensors").is_file()
    assert "total:" in captured.out                          # the built-in describe ran as part of train

    rc = main(["transcoders", "collect", "--model", str(tiny_gptlab_dir), "--transcoders", str(out), "--dataset",
               str(text), "--train_steps", "2", "--collect-batch", "8", "--train_seq_len", "32", "--top_k", "4"])
    assert rc == 0, capsys.readouterr().err
    rc = main(["transcoders", "describe", "--model", str(tiny_gptlab_dir), "--transcoders", str(out),
               "--max-features", "5", "--layers", "1"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out.startswith("layer 1: ")

    rc = main(["transcoders", "explain", "--model", str(tiny_gptlab_dir), "--transcoders", str(out), "--prompt",
               "ROMEO:", "--max-new-tokens", "5", "--json", str(tmp_path / "e.json")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "layer 0" in captured.out and "layer 1" in captured.out and "total description:" in captured.out
    result = json.loads((tmp_path / "e.json").read_text())[0]
    assert result["prompt"] == "ROMEO:" and len(result["layers"]) == 2 and result["explainer"] == "builtin"

    rc = main(["transcoders", "explain", "--model", str(tiny_gptlab_dir), "--transcoders", str(out), "--prompt",
               "ROMEO:", "--max-new-tokens", "3", "--format", "reference", "--explainer", "builtin"])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 0 and lines[0] == "input: ROMEO:" and lines[3].strip().startswith("per layer description=['Layer 0")
    assert lines[5].strip().startswith("models output score=perplexity ")
    assert lines[6].strip().startswith("models mechanistic interpretability score=interpretability AUC ")

    # errors are one clear line, exit code 2
    rc = main(["transcoders", "explain", "--model", str(tiny_gptlab_dir), "--transcoders", str(tmp_path / "nope"),
               "--prompt", "x"])
    assert rc == 2 and "No transcoder set" in capsys.readouterr().err
    rc = main(["transcoders", "train", "--model", str(tiny_gptlab_dir), "--num_layers", "5", "--no-collect"])
    assert rc == 2 and "--num_layers 5" in capsys.readouterr().err

    # a learning rate that makes the loss blow up: exit 2, one sentence, the set on disk untouched
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    rc = main(["transcoders", "train", "--model", str(tiny_gptlab_dir), "--output-dir", str(out), "--dataset",
               str(text), "--expansion", "4", "--k", "8", "--train_steps", "40", "--batch-tokens", "128",
               "--lr", "1e30", "--train_seq_len", "32", "--no-collect"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: Transcoder training diverged at step") and "--lr" in err[-1]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before

    # a feature store that is not one: exit 2, one sentence naming it, no sqlite traceback
    (out / "features.sqlite").write_bytes(b"\x00garbage" * 100)
    rc = main(["transcoders", "describe", "--model", str(tiny_gptlab_dir), "--transcoders", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and str(out / "features.sqlite") in err and "collect" in err
    assert "Traceback" not in err


def test_reference_model_flags_map_to_checkpoints(tmp_path, tiny_gptlab_dir):
    import shutil

    from core.commands.transcoders import resolve_reference_model

    run = tmp_path / "run"
    shutil.copytree(tiny_gptlab_dir, run / "checkpoints" / "20000")
    assert resolve_reference_model(str(run), "state_step020000.pt") == (str(run / "checkpoints" / "20000"), None)
    assert resolve_reference_model(str(run), None) == (str(run / "checkpoints" / "20000"), None)
    with pytest.raises(LabError, match="No checkpoint"):
        resolve_reference_model(str(run), "state_step000500.pt")


def test_diffusion_models_work_end_to_end(tiny_diffusion_dir):
    """A bidirectional masked-diffusion model: trained on masked inputs, explained from its first
    denoising state."""
    from core.interp import CompletionExplained, explain_completion
    from core.generation.diffusion import DiffusionConfig

    dm = load_model(str(tiny_diffusion_dir))
    corpus = corpus_from_texts(dm, TEXTS)
    tset = run_to_end(train_transcoders(dm, TranscoderTrainConfig(**{**FAST, "steps": 20}), corpus=corpus))
    q = tset.metrics["layers"]["0"]
    assert q["loss_ablated"] == q["loss_ablated"] and q["fve"] > 0    # masked-position losses are defined
    events = list(explain_completion(dm, tset, "ROMEO:", settings=DiffusionConfig(gen_length=6, steps=3, seed=0)))
    res = events[-1].result
    assert isinstance(events[-1], CompletionExplained) and res.objective == "diffusion"
    assert len(res.tokens) == res.n_prompt + 6 and len(res.layers[0].per_token) == res.n_prompt + 6
    assert res.interpretability.value is None and res.total_description     # no store: nothing measured
    assert res.interpretability.n == 0 and res.quality.name == "perplexity" and res.quality.n == 6

    # step by step: every step that revealed tokens, the state it read, the tokens it revealed, and the
    # features whose attribution to those tokens is largest, over every layer
    from core.generation.diffusion import generate as denoise
    from core.interp.completion import StepExplained

    gen = denoise(dm, "ROMEO:", DiffusionConfig(gen_length=6, steps=3, seed=0))
    assert gen.completion == res.completion
    assert [e.step.step for e in events if isinstance(e, StepExplained)] == [s.step for s in res.steps] == [1, 2, 3]
    P = len(gen.prompt_ids)
    assert sorted(p for s in res.steps for p, _ in s.revealed) == list(range(P, P + 6))   # each token once
    first = res.steps[0]
    assert first.read == "[MASK]" * 6
    assert [t for _, t in first.revealed] == [dm.tokenizer.token_str(gen.completion_ids[p - P]) for p, _ in first.revealed]
    # the step's features are the top of the same attribution computed here on the state it read
    second = res.steps[1]
    targets = [(p, gen.states[2][p]) for p, _ in second.revealed]
    _, attr, lp = attribute(dm, tset, torch.tensor([gen.states[1]]), targets, tset.layers)
    ranked = sorted(((float(attr[i].sum(0)[f]), i, f) for i in tset.layers for f in range(attr[i].shape[1])),
                    reverse=True)
    want = [(i, f) for v, i, f in ranked[:len(second.features)]]
    assert [(sf.layer, sf.feature) for sf in second.features] == want
    assert [sf.attribution for sf in second.features] == pytest.approx([v for v, _, _ in ranked[:len(want)]],
                                                                       rel=1e-5, abs=1e-8)
    assert second.mean_logprob == pytest.approx(lp) and "[MASK]" in second.read
    assert second.read.count("[MASK]") == 6 - len(first.revealed)


def test_cli_defaults_are_the_configs_and_help_needs_no_torch():
    """Each default is stated once: the flags' defaults are the config dataclasses' own, and the
    command module (what --help needs) imports no torch."""
    import subprocess
    import sys

    from core.commands.cli import build_parser
    from core.interp.config import (DESCRIBE_N_TOP, EXPLAIN_MAX_NEW_TOKENS, EXPLAIN_TOP_FEATURES, CollectConfig,
                                    TranscoderTrainConfig)

    parser = build_parser()
    train = vars(parser.parse_args(["transcoders", "train"]))
    expected = TranscoderTrainConfig()
    for name in ("expansion", "activation", "k", "l1_coeff", "train_tokens", "steps", "batch_tokens", "lr", "seq_len",
                 "dataset", "eval_every", "save_every", "save_dtype", "seed"):
        assert train[name] == getattr(expected, name), name
    collect = vars(parser.parse_args(["transcoders", "collect"]))
    c = CollectConfig()
    assert (collect["n_tokens"], collect["collect_seq_len"], collect["top_k"], collect["n_quantile"],
            collect["n_heldout"], collect["n_negative"], collect["n_hard"], tuple(collect["window"]),
            collect["collect_batch"], collect["dataset"], collect["seed"]) == (
        c.n_tokens, c.seq_len, c.top_k, c.n_quantile, c.n_heldout, c.n_negative, c.n_hard,
        (c.window_before, c.window_after), c.batch_size, c.dataset, c.seed)
    assert c.n_heldout >= 50 and c.n_negative >= 50 and c.n_hard > 0   # the score's sample sizes by default
    assert vars(parser.parse_args(["transcoders", "describe"]))["n_top"] == DESCRIBE_N_TOP
    explain = vars(parser.parse_args(["transcoders", "explain"]))
    assert (explain["max_new_tokens"], explain["top_features"]) == (EXPLAIN_MAX_NEW_TOKENS, EXPLAIN_TOP_FEATURES)

    code = "import sys, core.commands.transcoders; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout
    assert out.strip() == "[]"
