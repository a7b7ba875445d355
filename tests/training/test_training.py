"""The trainer: loss falls, exact resume, loadable checkpoints, metrics and status files, the
optimiser recipes and schedule, stop paths and failure reporting. Tiny models on a tiny text."""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from core.errors import LabError
from core.training import RunEnded, StepLogged, TrainConfig, read_metrics, read_status, resume_config, train
from core.training.optim import RECIPES, build_optimizers, decay_groups, resolve_hyper
from core.training.schedules import lr_at


def tiny(text_file, cache, **kw) -> TrainConfig:
    base = dict(dataset=str(text_file), vocab_size=320, data_cache=str(cache), n_layer=2, n_head=2, d_model=32,
                block_size=32, batch_size=4, device="cpu", log_every=1, val_every=5, val_batches=2, save_every=0,
                max_steps=10, seed=7)
    return TrainConfig(**{**base, **kw})


def run_all(cfg, folder, **kw) -> list:
    return list(train(cfg, folder, **kw))


def test_loss_falls_on_a_tiny_run(text_file, cache, tmp_path):
    events = run_all(tiny(text_file, cache, max_steps=40, lr=1e-2, log_every=5, val_every=20), tmp_path / "run")
    logged = [e.metrics for e in events if isinstance(e, StepLogged)]
    assert [m["step"] for m in logged] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert logged[0]["train_loss"] > 5.0                     # about log(320) = 5.77 at the start
    assert logged[-1]["train_loss"] < logged[0]["train_loss"] - 1.5
    vals = [m["val_loss"] for m in logged if "val_loss" in m]
    assert len(vals) == 2 and vals[1] < vals[0]
    assert isinstance(events[-1], RunEnded) and events[-1].state == "finished"


def _losses(folder) -> dict[int, float]:
    return {m["step"]: m["train_loss"] for m in read_metrics(folder)}


def test_interrupted_and_resumed_matches_uninterrupted(text_file, cache, tmp_path):
    cfg = dict(max_steps=12, dropout=0.1, grad_acc_steps=2, val_every=4)
    run_all(tiny(text_file, cache, **cfg), tmp_path / "a")

    events = train(tiny(text_file, cache, **cfg), tmp_path / "b")
    for ev in events:
        if isinstance(ev, StepLogged) and ev.step == 6:
            break
    events.close()  # the consumer stops: checkpoint at step 6, status stopped
    assert read_status(tmp_path / "b")["state"] == "stopped"
    assert (tmp_path / "b" / "checkpoints" / "6" / "trainer_state.pt").is_file()
    resumed = run_all(resume_config(tmp_path / "b"), tmp_path / "b", resume=True)
    assert resumed[0].resumed and resumed[0].step == 6

    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert max(abs(a[s] - b[s]) for s in a) <= 1e-5
    va = [m["val_loss"] for m in read_metrics(tmp_path / "a") if "val_loss" in m]
    vb = [m["val_loss"] for m in read_metrics(tmp_path / "b") if "val_loss" in m]
    assert len(va) == 3 and max(abs(x - y) for x, y in zip(va, vb)) <= 1e-5
    assert read_status(tmp_path / "b")["state"] == "finished"


def test_checkpoints_are_model_specs_and_generate(text_file, cache, tmp_path):
    from safetensors.torch import load_file

    from core.generation.autoregressive import SamplingConfig, generate
    from core.models.loading import load_model

    run_all(tiny(text_file, cache, max_steps=10, save_every=2, keep_last=2), tmp_path / "run")
    ckpts = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == [8, 10]                                    # keep the last 2
    folder = tmp_path / "run" / "checkpoints" / "10"
    lm = load_model(str(folder))
    assert lm.objective == "ar" and not lm.untrained and lm.tokenizer.vocab_size == 320
    assert lm.extra["training"]["step"] == 10
    res = generate(lm, "ROMEO:", SamplingConfig(max_new_tokens=8, greedy=True))
    assert len(res.tokens) == 8
    # the saved weights are what load_model serves
    sd = load_file(str(folder / "model.safetensors"))
    assert torch.equal(lm.model.transformer.h[0].attn.c_attn.weight, sd["transformer.h.0.attn.c_attn.weight"])
    state = torch.load(folder / "trainer_state.pt", weights_only=True)
    assert state["step"] == 10 and state["tokens"] == 10 * 4 * 32
    assert isinstance(state["epoch"], int) and isinstance(state["cursor"], int)
    assert len(state["optimizers"]) == 1 and state["optimizers"][0]["state"]
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))


def test_metrics_and_status_files(text_file, cache, tmp_path):
    folder = tmp_path / "run"
    seen_running = []
    for ev in train(tiny(text_file, cache, max_steps=6, val_every=3, preview_every=3, preview_tokens=5), folder):
        if isinstance(ev, StepLogged):
            seen_running.append(read_status(folder)["state"])
    assert set(seen_running) == {"running"}
    rows = read_metrics(folder)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        assert r["tokens"] == r["step"] * 128
        assert r["mfu"] is None and r["gpu_mem_gb"] is None    # CPU
        assert r["tokens_per_s"] > 0 and r["grad_norm"] > 0 and r["lr"] > 0 and math.isfinite(r["train_loss"])
    assert ["val_loss" in r for r in rows] == [False, False, True, False, False, True]
    st = read_status(folder)
    assert st["state"] == "finished" and st["step"] == 6 and st["max_steps"] == 6
    assert st["val_loss"] == rows[-1]["val_loss"]
    cfg = json.loads((folder / "config.json").read_text())
    assert TrainConfig.from_dict(cfg) == tiny(text_file, cache, max_steps=6, val_every=3, preview_every=3,
                                              preview_tokens=5)
    previews = [json.loads(x) for x in (folder / "previews.jsonl").read_text().splitlines()]
    assert [p["step"] for p in previews] == [3, 6] and previews[0]["prompt"] == "The"
    assert "step 6/6" in (folder / "log.txt").read_text()


def test_stop_file_stops_at_a_step_boundary_with_a_checkpoint(text_file, cache, tmp_path):
    folder = tmp_path / "run"
    events = []
    for ev in train(tiny(text_file, cache, max_steps=50), folder):
        events.append(ev)
        if isinstance(ev, StepLogged) and ev.step == 3:
            (folder / "STOP").touch()
    end = events[-1]
    assert isinstance(end, RunEnded) and end.state == "stopped" and end.step == 3
    assert end.checkpoint.endswith("checkpoints/3")
    assert read_status(folder)["state"] == "stopped"


def test_a_crash_marks_the_run_failed_with_reason_and_log(text_file, cache, tmp_path):
    folder = tmp_path / "run"
    with pytest.raises(LabError, match="fewer than one batch"):
        run_all(tiny(text_file, cache, batch_size=4000), folder)
    st = read_status(folder)
    assert st["state"] == "failed" and "fewer than one batch" in st["reason"]
    assert any("failed" in line for line in st["last_log"])


def test_disk_full_while_saving_fails_clearly_and_keeps_earlier_checkpoints(text_file, cache, tmp_path, monkeypatch):
    import core.training.trainer as trainer_mod

    folder = tmp_path / "run"
    real = trainer_mod.save_checkpoint
    calls = []

    def flaky(path, *a, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(trainer_mod, "save_checkpoint", flaky)
    with pytest.raises(LabError, match=r"The disk is full while writing .*checkpoints \(.* free\)"):
        run_all(tiny(text_file, cache, max_steps=6, save_every=2), folder)
    st = read_status(folder)
    assert st["state"] == "failed" and "disk is full" in st["reason"] and "resume" in st["reason"]
    assert [p.name for p in (folder / "checkpoints").iterdir() if not p.name.startswith(".")] == ["2"]


def test_schedule_warmup_then_cosine_to_the_floor():
    kw = dict(base_lr=1.0, total_steps=101, warmup_steps=10, min_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(55, **kw) == pytest.approx(0.55)               # halfway down the cosine
    assert lr_at(100, **kw) == pytest.approx(0.1)


def test_model_version_recipes():
    g2 = resolve_hyper(TrainConfig(model_version="gpt2"), total_steps=100_000, tokens_per_step=1024)
    g3 = resolve_hyper(TrainConfig(model_version="gpt3"), total_steps=1000, tokens_per_step=4096)
    assert (g2.betas, g2.weight_decay, g2.warmup_steps, g2.min_lr_ratio, g2.grad_clip) == ((0.9, 0.999), 0.01, 2000,
                                                                                           0.0, 1.0)
    assert (g3.betas, g3.weight_decay, g3.min_lr_ratio, g3.grad_clip, g3.lr) == ((0.9, 0.95), 0.1, 0.1, 1.0, 6e-4)
    assert g3.warmup_steps == 50                                # 375M tokens, capped at 5% of 1000 steps
    long = resolve_hyper(TrainConfig(model_version="gpt3"), total_steps=10**7, tokens_per_step=524_288)
    assert long.warmup_steps == math.ceil(375e6 / 524_288)      # the paper's 375M tokens
    own = resolve_hyper(TrainConfig(lr=1e-3, beta2=0.99, warmup_steps=7), total_steps=100, tokens_per_step=1)
    assert (own.lr, own.betas[1], own.warmup_steps) == (1e-3, 0.99, 7)
    assert set(RECIPES) == {"gpt2", "gpt3"}


def test_decay_groups_and_muon_split():
    from core.models.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=2, n_head=2, d_model=16))
    named = list(model.named_parameters())
    decay, no_decay = decay_groups(named, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(named)
    hp = resolve_hyper(TrainConfig(), 10, 10)
    muon, adamw = build_optimizers(model, "muon", hp)
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    hidden = {id(p) for p in muon.param_groups[0]["params"]}
    assert hidden == {id(p) for n, p in named if n.startswith("transformer.h.") and p.dim() == 2}
    rest = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert not hidden & rest and len(hidden | rest) == len(named)


def test_muon_and_bfloat16_autocast_train(text_file, cache, tmp_path):
    events = run_all(tiny(text_file, cache, max_steps=4, optimizer="muon", amp=True, lr=2e-3), tmp_path / "m")
    losses = [e.metrics["train_loss"] for e in events if isinstance(e, StepLogged)]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_float16_uses_a_grad_scaler(text_file, cache, tmp_path):
    from core.training.trainer import Trainer

    tr = Trainer(tiny(text_file, cache, max_steps=2, amp=True, amp_dtype="float16"), tmp_path / "f")
    events = list(tr.events())
    assert tr.scaler is not None and isinstance(events[-1], RunEnded)
    state = torch.load(tmp_path / "f" / "checkpoints" / "2" / "trainer_state.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0


def test_config_errors_are_one_sentence():
    with pytest.raises(LabError, match="not divisible by n_head"):
        TrainConfig(d_model=30, n_head=4).check()
    with pytest.raises(LabError, match="objective"):
        TrainConfig(objective="mlm").check()
    with pytest.raises(LabError, match="Unknown training setting"):
        TrainConfig.from_dict({"lr": 1e-3, "learning_rate": 2})


def test_cli_train_resume_and_errors(text_file, cache, tmp_path, capsys):
    from core.commands.cli import main

    out = tmp_path / "cli"
    common = ["--dataset", str(text_file), "--vocab-size", "320", "--data-cache", str(cache), "--device", "cpu",
              "--num_layers", "1", "--num_heads", "2", "--model_dim", "16", "--train_seq_len", "32",
              "--batch-size", "4", "--no-progress"]
    assert main(["train", *common, "--train_steps", "3", "--output-dir", str(out), "--save_model", "False",
                 "--ckpt-name", "mini.pt"]) == 0
    from core.models.loading import load_model

    assert load_model(str(out / "mini")).extra["training"]["step"] == 3   # the exported final model
    assert not (out / "mini" / "trainer_state.pt").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["n_layer"], cfg["d_model"], cfg["block_size"], cfg["max_steps"], cfg["save_every"]) == (1, 16, 32, 3, 0)
    assert read_status(out)["state"] == "finished"
    assert main(["train", "--resume", str(out), "--max-steps", "5", "--no-progress"]) == 0
    assert [m["step"] for m in read_metrics(out)][-1] == 5
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--n-layer", "3"]) == 2
    assert "--resume continues a run" in capsys.readouterr().err
    assert main(["train", *common, "--d-model", "30", "--n-head", "4", "--output-dir", str(tmp_path / "x")]) == 2
    assert "not divisible" in capsys.readouterr().err
    assert main(["train", *common, "--val_seq_len", "64", "--output-dir", str(tmp_path / "y")]) == 2
    assert "--val_seq_len" in capsys.readouterr().err
    assert main(["train", *common, "--ckpt-name", "checkpoints.pt", "--output-dir", str(tmp_path / "z")]) == 2
    assert "overwrite" in capsys.readouterr().err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_cpu_training_process_reuses_freed_activations_instead_of_faulting_them_in():
    import resource

    from core.training.allocator import keep_freed_memory

    assert keep_freed_memory() and keep_freed_memory()  # idempotent

    def faults_for_a_64mb_activation() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = torch.ones(16 << 20)  # 64 MB, written through
        del t
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    for _ in range(4):  # the heap grows to fit the block once or twice, then serves it again
        faults_for_a_64mb_activation()
    # without the setting every such block is a fresh mmap: ~16,000 page faults each time
    assert max(faults_for_a_64mb_activation() for _ in range(3)) < 1000


def test_the_config_lists_the_recipes_the_optimiser_knows():
    """TrainConfig stays torch-free, so it names the recipes itself; they must be the optimiser's."""
    from core.training.config import MODEL_VERSIONS

    assert MODEL_VERSIONS == tuple(RECIPES)
