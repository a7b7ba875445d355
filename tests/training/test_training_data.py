"""Training data: sources, the token cache (dtype, split, reuse), tokenizer choice, clear errors,
and the batch sampler's determinism, position and per-rank split."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from core.errors import LabError
from core.training import data as D
from tests.conftest import CORPUS


@pytest.fixture()
def text_file(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text(CORPUS * 3)
    return path


def prep(dataset, cache, **kw):
    base = dict(val_fraction=0.1, need_mask=False, cache_dir=cache, log=lambda _: None)
    return D.prepare_data(str(dataset), "bpe", 320, **{**base, **kw})


def test_token_cache_is_built_once_with_a_split(text_file, tmp_path):
    data = prep(text_file, tmp_path / "c")
    meta = data.meta
    assert meta["dtype"] == "uint16" and data.train.arrays[0].dtype == np.uint16
    tok = data.tokenizer
    ids = tok.encode(CORPUS * 3) + [tok.eos_id]
    assert meta["train_tokens"] + meta["val_tokens"] == len(ids)
    assert meta["val_tokens"] == round(len(ids) * 0.1)           # tiny corpus: the tail is validation
    assert np.array_equal(np.concatenate([data.train.arrays[0], data.val.arrays[0]]), np.array(ids))
    stamp = (data.folder / "meta.json").stat().st_mtime_ns
    again = prep(text_file, tmp_path / "c")
    assert again.folder == data.folder and (again.folder / "meta.json").stat().st_mtime_ns == stamp
    text_file.write_text(CORPUS * 4)                             # new text: new cache key
    assert prep(text_file, tmp_path / "c").folder != data.folder


def test_block_routing_spreads_validation_over_the_corpus(tmp_path):
    folder = tmp_path / "r"
    folder.mkdir()
    router = D._SplitRouter(folder, np.dtype(np.uint16), 0.25)  # every 4th block
    stream = np.arange(10 * D.SPLIT_BLOCK + 7) % 60000
    for chunk in np.array_split(stream, 13):
        router.add(chunk)
    n_train, n_val = router.close()
    val = np.fromfile(folder / "val_0000.bin", dtype=np.uint16)
    train = np.fromfile(folder / "train_0000.bin", dtype=np.uint16)
    blocks = stream[:10 * D.SPLIT_BLOCK].reshape(10, -1)
    assert np.array_equal(val, np.concatenate([blocks[3], blocks[7]]))
    assert np.array_equal(train, np.concatenate([blocks[i] for i in (0, 1, 2, 4, 5, 6, 8, 9)] + [stream[-7:]]))
    assert (n_train, n_val) == (train.size, val.size)


def test_jsonl_folder_and_errors(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps({"text": "first doc"}) + "\n\n" + json.dumps({"text": "second"}) + "\n")
    (folder / "b.txt").write_text("plain text file")
    (folder / "skip.bin").write_bytes(b"\0")
    docs = list(D.resolve_source(str(folder)).documents())
    assert docs == [("first doc", True), ("second", True), ("plain text file", True)]
    (folder / "a.jsonl").write_text('{"title": "no text"}\n')
    with pytest.raises(LabError, match="line 1 has no string 'text' field"):
        list(D.resolve_source(str(folder)).documents())
    with pytest.raises(LabError, match="does not exist"):
        D.resolve_source(str(tmp_path / "missing.txt"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(LabError, match="not a .txt, .md or .jsonl"):
        D.resolve_source(str(tmp_path / "x.csv"))


def test_hub_dataset_offline_is_one_clear_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))           # nothing cached
    for name, hub in [("fineweb-edu", "HuggingFaceFW/fineweb-edu"), ("small", "stas/openwebtext-10k")]:
        t0 = time.monotonic()
        with pytest.raises(LabError) as err:
            D.prepare_data(name, "bpe", 320, val_fraction=0.05, need_mask=False, cache_dir=tmp_path / "c",
                           log=lambda _: None)
        msg = str(err.value)
        assert msg.startswith(f"Dataset '{name if name != 'small' else 'openwebtext-10k'}' is not in the local")
        assert hub in msg and "shakespeare" in msg and msg.count(". ") == 0
        assert time.monotonic() - t0 < 20
    assert D.resolve_source("large").ds.name == "Salesforce/wikitext"


def test_shakespeare_bpe_reuses_the_shipped_tokenizer(tmp_path):
    from core.models.loading import DEFAULT_DIR

    src = D.resolve_source("shakespeare")
    path = D.prepare_tokenizer("bpe", 8192, src, tmp_path, need_mask=False, log=lambda _: None)
    assert path.read_text() == (DEFAULT_DIR / "tokenizer.json").read_text()
    assert src.default_prompt == "ROMEO:"


def test_diffusion_adds_a_mask_token_when_missing(text_file, tmp_path, tiny_gpt2_dir):
    src = D.resolve_source(str(text_file))
    path = D.prepare_tokenizer(str(tiny_gpt2_dir), 0, src, tmp_path, need_mask=True, log=lambda _: None)
    tok = D.BPETokenizer(path)
    assert tok.mask_id == tok.vocab_size - 1 and tok.token_str(tok.mask_id) == "<|mask|>"
    plain = D.BPETokenizer(D.prepare_tokenizer(str(tiny_gpt2_dir), 0, src, tmp_path, need_mask=False,
                                                log=lambda _: None))
    assert plain.mask_id is None and plain.vocab_size == tok.vocab_size - 1
    assert tok.encode("ROMEO: hello") == plain.encode("ROMEO: hello")


def _split(tokens: np.ndarray, tmp_path, name="train") -> D.TokenSplit:
    f = tmp_path / f"{name}_0000.bin"
    tokens.astype(np.uint16).tofile(f)
    return D.TokenSplit([f], np.dtype(np.uint16))


def test_sampler_is_seeded_resumable_and_splits_ranks(tmp_path):
    split = _split(np.arange(1000), tmp_path)            # token value = position
    s = D.BatchSampler(split, 10, 4, seed=1)
    assert s.windows_per_epoch == 99
    batches = [s.next() for _ in range(30)]                      # crosses into epoch 1
    assert s.epoch == 1 and s.position == (1, (30 - 24) * 4)
    for b in batches:                                           # windows are contiguous text
        assert b.shape == (4, 11) and bool((b[:, 1:] - b[:, :-1] == 1).all())
    epoch0 = torch.cat(batches[:24])[:, 0]
    assert len(set(epoch0.tolist())) == 96                       # no window twice within an epoch
    again = D.BatchSampler(split, 10, 4, seed=1, epoch=0, cursor=5 * 4)
    assert torch.equal(again.next(), batches[5])                 # the position is the whole state
    assert not torch.equal(D.BatchSampler(split, 10, 4, seed=2).next(), batches[0])
    r0 = D.BatchSampler(split, 10, 2, seed=1, world=2, rank=0)
    r1 = D.BatchSampler(split, 10, 2, seed=1, world=2, rank=1)
    for k in range(3):                                          # 2 ranks x 2 = one process with batch 4
        assert torch.equal(torch.cat([r0.next(), r1.next()]), batches[k])
    with pytest.raises(LabError, match="fewer than one batch"):
        D.BatchSampler(split, 10, 200, seed=1)


def test_validation_windows_are_fixed_and_shared_out(tmp_path):
    split = _split(np.arange(2001) % 700, tmp_path, "val")
    full = D.validation_windows(split, 20, 10)
    assert full.shape == (10, 21) and torch.equal(full, D.validation_windows(split, 20, 10))
    parts = [D.validation_windows(split, 20, 10, world=3, rank=r) for r in range(3)]
    assert sorted(map(tuple, torch.cat(parts).tolist())) == sorted(map(tuple, full.tolist()))


def test_gpt2_tokenizer_unavailable_offline_is_one_sentence(text_file, tmp_path, monkeypatch):
    import tiktoken

    import core.models.loading

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(core.models.loading, "hub_reachable", lambda timeout=3.0: False)

    def no_files(name):
        raise ValueError("no cached encoding files")

    monkeypatch.setattr(tiktoken, "get_encoding", no_files)
    with pytest.raises(LabError, match="GPT-2's tokenizer is neither in the Hugging Face cache nor in tiktoken's"):
        D.prepare_tokenizer("gpt2", 0, D.resolve_source(str(text_file)), tmp_path, need_mask=False, log=lambda _: None)
