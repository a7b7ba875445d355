"""FSDP and multi-node pieces that need no second process: one-process FSDP equals the unsharded run,
activation checkpointing changes no number, an unsharded checkpoint continues sharded, the memory
check under DDP and FSDP, the multi-node launch, the token-cache wait, and the shard metadata reader."""
from __future__ import annotations

import json
import pickle
import threading
import time
from pathlib import Path

import pytest
import torch

from core.errors import LabError
from core.training import TrainConfig, read_metrics, train
from core.training.checkpoint import SHARDS_DIR, consolidated_weights, is_sharded
from core.training.trainer import CheckpointSaved, resume_config
from tests.conftest import CORPUS


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("par") / "tiny.txt"
    path.write_text(CORPUS * 3)
    return path


def cfg(text: Path, **over) -> TrainConfig:
    d = dict(dataset=str(text), vocab_size=320, data_cache=str(text.parent / "cache"), n_layer=2, n_head=2,
             d_model=16, block_size=32, device="cpu", log_every=1, val_every=3, val_batches=2, save_every=3,
             max_steps=6, seed=5, batch_size=4, warmup_steps=1)
    d.update(over)
    return TrainConfig(**d)


def losses(run: Path) -> list[tuple[int, float, float | None]]:
    return [(m["step"], m["train_loss"], m.get("val_loss")) for m in read_metrics(run)]


def close(a, b, tol=1e-5):
    assert [s for s, _, _ in a] == [s for s, _, _ in b]
    for (s, x, vx), (_, y, vy) in zip(a, b):
        assert abs(x - y) < tol, (s, x, y)
        assert (vx is None) == (vy is None) and (vx is None or abs(vx - vy) < tol), s


@pytest.fixture(scope="module")
def plain(text):
    run = text.parent / "plain"
    list(train(cfg(text), run))
    return run


def test_one_process_fsdp_and_activation_checkpointing_retrace_the_unsharded_run(text, plain, tmp_path):
    list(train(cfg(text, parallel="fsdp", activation_checkpointing=True), tmp_path / "fsdp"))
    close(losses(plain), losses(tmp_path / "fsdp"))
    assert is_sharded(tmp_path / "fsdp" / "checkpoints" / "6")
    log = (tmp_path / "fsdp" / "log.txt").read_text()
    assert "parallel: FSDP2, sharded over 1 process(es) (--parallel fsdp), activation checkpointing" in log
    list(train(cfg(text, activation_checkpointing=True), tmp_path / "ckpt"))
    close(losses(plain), losses(tmp_path / "ckpt"), tol=1e-6)
    assert "parallel: one process, unsharded (auto: one process)" in (plain / "log.txt").read_text()


def test_an_unsharded_checkpoint_continues_sharded_exactly(text, plain, tmp_path):
    run = tmp_path / "switch"

    def first_half():
        gen = train(cfg(text), run)
        for ev in gen:
            if isinstance(ev, CheckpointSaved) and ev.step == 3:
                gen.close()
                return

    first_half()
    assert (run / "checkpoints" / "3" / "model.safetensors").is_file()
    list(train(resume_config(run, parallel="fsdp"), run, resume=True))
    close(losses(plain), losses(run))
    assert is_sharded(run / "checkpoints" / "6")
    full = consolidated_weights(run / "checkpoints" / "6")
    from safetensors.torch import load_file

    ref = load_file(str(plain / "checkpoints" / "6" / "model.safetensors"))
    for k, v in ref.items():
        assert torch.allclose(full[k], v, atol=1e-5), k


def test_muon_is_refused_under_fsdp_with_a_sentence(text, tmp_path):
    with pytest.raises(LabError, match="--optimizer muon needs each weight matrix whole"):
        list(train(cfg(text, parallel="fsdp", optimizer="muon"), tmp_path / "m"))


def test_a_tampered_shard_metadata_is_refused_not_run(text, tmp_path):
    from core.models.loading import load_model

    run = tmp_path / "t"
    list(train(cfg(text, parallel="fsdp", max_steps=3), run))
    ck = run / "checkpoints" / "3"
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    good = (ck / SHARDS_DIR / ".metadata").read_bytes()
    (ck / SHARDS_DIR / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(LabError, match=r"Refused to read .*\.metadata: it is not the metadata of a sharded"):
        load_model(str(ck))
    assert not marker.exists()
    # a shard named outside the folder is refused before anything is read
    (ck / SHARDS_DIR / ".metadata").write_bytes(good.replace(b"__0_0.distcp", b"../x/a.distc"))
    with pytest.raises(LabError, match=r"names the shard file '../x/a.distc'"):
        load_model(str(ck))


# -- memory ---------------------------------------------------------------------------------------

def test_memory_check_names_what_fits_under_ddp_and_fsdp(monkeypatch):
    import core.devices as devices
    from core.training.memory import check_fits, fits_table, gpus_needed, parameter_count, training_bytes

    gb = 10**9
    big = TrainConfig(preset="gpt2-xl", block_size=1024, batch_size=1, amp=True, tokenizer="gpt2")
    monkeypatch.setattr(devices, "free_bytes", lambda device: 16 * gb)
    big.parallel = "ddp"
    with pytest.raises(LabError, match=r"per GPU under DDP .* FSDP over 4 such GPUs would hold it"):
        check_fits(big, "cuda", [0, 1], nnodes=1)
    big.parallel = "auto"  # a replica does not fit, so FSDP: over 2 GPUs not either, over 4 it would
    with pytest.raises(LabError, match=r"per GPU under FSDP .* FSDP over 4 such GPUs would hold it"):
        check_fits(big, "cuda", [0, 1], nnodes=1)
    params = parameter_count(big, 50257)
    n = gpus_needed(params, 16 * gb, n_layer=48, d_model=1600, vocab_size=50257, batch_size=1, context=1024,
                    amp=True)
    assert n == 4
    # auto picks FSDP when a replica does not fit: over 4 GPUs x 2 machines it does
    need = check_fits(big, "cuda", [0, 1, 2, 3], nnodes=2)
    assert need == training_bytes(params, parallel="fsdp", world=8, n_layer=48, d_model=1600, vocab_size=50257,
                                  batch_size=1, context=1024, amp=True) < 16 * gb
    rows = {r["preset"]: r for r in fits_table(80 * gb)["rows"]}
    assert rows["gpt2-small"]["ddp_fits"] and rows["gpt2-small"]["fsdp_gpus"] == 1
    assert not rows["gpt3-davinci"]["ddp_fits"] and rows["gpt3-davinci"]["fsdp_gpus"] == 64


def test_models_lists_the_memory_each_preset_needs(capsys):
    from core.commands.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "Memory to train each preset on GPUs of 80 GB (none visible here)" in out
    assert "  gpt3-davinci   2,835.1 GB (no)  64 GPUs x 64.0 GB" in out
    assert main(["models", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["preset_memory"]["rows"][0]["preset"] == "tiny"


# -- several machines -------------------------------------------------------------------------------

def test_multi_node_flags_become_a_static_torchrun_rendezvous(tmp_path, monkeypatch, capsys):
    import os

    from core.commands.cli import main

    calls = []

    def fake_exec(file, args, env):
        calls.append(args)
        raise SystemExit(0)

    monkeypatch.setattr(os, "execvpe", fake_exec)
    base = ["train", "--device", "cpu", "--nproc-per-node", "2", "--max-steps", "3", "--nnodes", "2",
            "--rdzv-endpoint", "node0.cluster:29500"]
    for rank in (0, 1):
        with pytest.raises(SystemExit):
            main(base + ["--node-rank", str(rank), "--output-dir", str(tmp_path / "run")])
    node0, node1 = calls
    for rank, args in enumerate(calls):
        assert args[1:3] == ["-m", "torch.distributed.run"]
        assert args[3:8] == ["--nnodes=2", f"--node-rank={rank}", "--master-addr=node0.cluster", "--master-port=29500",
                             "--nproc-per-node=2"]
    assert node0[node0.index("--config") + 1] == str(tmp_path / "run" / "config.json")
    own = Path(node1[node1.index("--config") + 1])                   # node 1 passes the same settings itself
    assert own.parent != tmp_path / "run" and json.loads(own.read_text())["max_steps"] == 3
    assert json.loads((tmp_path / "run" / "config.json").read_text())["max_steps"] == 3
    for extra, message in ((["--node-rank", "2", "--output-dir", str(tmp_path / "x")], "--node-rank 2 is not below"),
                           (["--node-rank", "1"], "needs the same run folder on each")):
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err
    assert main(["train", "--nnodes", "2", "--rdzv-endpoint", "node0", "--output-dir", str(tmp_path / "y")]) == 2
    assert "--rdzv-endpoint must be HOST:PORT" in capsys.readouterr().err
    assert main(["train", "--node-rank", "1", "--output-dir", str(tmp_path / "z")]) == 2
    assert "go with --nnodes 2 or more" in capsys.readouterr().err


def test_a_rank_that_does_not_build_waits_for_the_cache_then_reads_it_or_says_why_not(text, tmp_path, monkeypatch):
    from core.training.data import prepare_data

    kw = dict(val_fraction=0.05, need_mask=False, cache_dir=tmp_path / "cache", log=lambda _: None)
    t0 = time.monotonic()
    with pytest.raises(LabError, match=r"Waited \d+ s for the run's BPE tokenizer at .*rank 0 .*GPTLAB_DATA_WAIT"):
        prepare_data(str(text), "bpe", 320, build=False, wait=0.5, **kw)
    assert time.monotonic() - t0 < 5

    built = {}
    builder = threading.Thread(target=lambda: (time.sleep(1.0), built.update(
        data=prepare_data(str(text), "bpe", 320, build=True, **kw))))
    builder.start()
    data = prepare_data(str(text), "bpe", 320, build=False, wait=60, **kw)
    builder.join()
    assert data.folder == built["data"].folder and data.meta["train_tokens"] == built["data"].meta["train_tokens"]
    monkeypatch.setenv("GPTLAB_DATA_WAIT", "0.2")
    with pytest.raises(LabError, match=r"the token cache .* \(now 0.2 s\)"):
        prepare_data(str(text), "bpe", 320, build=False, max_tokens=1000, **kw)


def test_the_batch_encoder_gives_the_ids_of_encoding_piece_by_piece(text):
    from core.models.loading import DEFAULT_DIR
    from core.models.tokenizer import BPETokenizer
    from core.training.data import LocalSource, _pieces, encoded_pieces

    big = text.parent / "big.txt"
    big.write_text((CORPUS + "\n") * 400)
    tok = BPETokenizer(DEFAULT_DIR / "tokenizer.json")
    src = LocalSource(big)
    one_by_one = [(tok.encode(t), e) for t, e in _pieces(src)]
    assert list(encoded_pieces(src, DEFAULT_DIR / "tokenizer.json", batch_chars=5000)) == one_by_one
    assert len(one_by_one) > 2


def test_hub_datasets_stream_when_the_hub_is_reachable_and_are_never_listed_whole(text, tmp_path, monkeypatch):
    """Online, every hub dataset (the presets that used to download whole included) is opened with
    streaming=True, and the cache build takes its rows one at a time."""
    import datasets

    import core.training.data as data

    seen = {}

    def rows():
        for i in range(100_000):
            seen["read"] = i + 1
            yield {"text": f"row {i}: " + CORPUS[: 200]}

    def fake_load(name, config=None, split=None, streaming=False):
        seen["streaming"] = streaming
        return rows()

    monkeypatch.setattr(data, "hub_reachable", lambda *a, **k: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    source = data.resolve_source("openwebtext-10k", max_tokens=2000)        # a preset with streaming=False
    from core.models.loading import DEFAULT_DIR

    folder = tmp_path / "tokens"
    data._build_cache(source, DEFAULT_DIR / "tokenizer.json", folder, 0.05, 2000, log=lambda _: None)
    assert seen["streaming"] is True
    # read a batch of the encoder at most (about ENCODE_BATCH_CHARS of text), never the whole dataset
    assert seen["read"] <= data.ENCODE_BATCH_CHARS // 200 + 1
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["train_tokens"] + meta["val_tokens"] == 2000


def test_a_sharded_checkpoint_continues_unsharded_exactly(text, plain, tmp_path):
    run = tmp_path / "back"
    gen = train(cfg(text, parallel="fsdp"), run)
    for ev in gen:
        if isinstance(ev, CheckpointSaved) and ev.step == 3:
            gen.close()
            break
    assert is_sharded(run / "checkpoints" / "3")
    list(train(resume_config(run, parallel="ddp"), run, resume=True))
    close(losses(plain), losses(run))
    assert (run / "checkpoints" / "6" / "model.safetensors").is_file()
