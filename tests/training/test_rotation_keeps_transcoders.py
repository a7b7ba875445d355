"""Checkpoint rotation (``--keep-last``) never deletes a transcoder set: a checkpoint's own set lives
inside the checkpoint folder (``<checkpoint>/transcoders``, core.interp.transcoder.transcoder_dir_for),
so rotation keeps an old checkpoint that holds one, finished or still being written."""
from __future__ import annotations

import json
from pathlib import Path

from core.interp.transcoder import SET_FORMAT, is_transcoder_folder, transcoder_dir_for
from core.jobs.lock import acquire
from core.models.loading import load_model
from core.training import CheckpointSaved, TrainConfig, resume_config, train
from core.training.runs import checkpoint_sets, checkpoint_steps, rotation


def tiny(text_file, cache, **kw) -> TrainConfig:
    base = dict(dataset=str(text_file), vocab_size=320, data_cache=str(cache), n_layer=2, n_head=2, d_model=32,
                block_size=32, batch_size=4, device="cpu", log_every=1, val_every=0, save_every=2, keep_last=1,
                max_steps=10, seed=7)
    return TrainConfig(**{**base, **kw})


def make_set(folder: Path) -> Path:
    """A set's marker and one weights file, as ``transcoders train`` leaves them."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"format": SET_FORMAT, "layers": [0]}))
    (folder / "layer_0.safetensors").write_bytes(b"weights")
    assert is_transcoder_folder(folder)
    return folder


def test_rotation_keeps_checkpoints_that_hold_a_set(text_file, cache, tmp_path):
    run = tmp_path / "run"
    sets, lock = {}, None
    for ev in train(tiny(text_file, cache), run):
        if isinstance(ev, CheckpointSaved) and ev.step == 2:  # a finished set, in the checkpoint's default place
            own = transcoder_dir_for(load_model(ev.path))
            assert own == Path(ev.path) / "transcoders"
            sets[2] = make_set(own)
        if isinstance(ev, CheckpointSaved) and ev.step == 4:  # a job still writing its set (holds the lock)
            folder = Path(ev.path) / "my-set"
            folder.mkdir()
            lock = acquire(folder, "Transcoder set", "wait.")
    try:
        assert checkpoint_steps(run) == [2, 4, 10]  # keep-last 1, plus the two that hold sets
        assert (sets[2] / "layer_0.safetensors").read_bytes() == b"weights"
        assert (run / "checkpoints" / "4" / "my-set").is_dir()
        assert [d.name for d in checkpoint_sets(run / "checkpoints" / "4")] == ["my-set"]
        assert rotation(run, 1) == ([], [2, 4])
        log = (run / "log.txt").read_text()
        assert log.count("checkpoint 2 kept beyond --keep-last 1: it holds a transcoder set (transcoders)") == 1
        assert "checkpoint 4 kept beyond --keep-last 1" in log
        load_model(str(run / "checkpoints" / "2"))  # still a loadable model spec
    finally:
        if lock is not None:
            lock.release()
    # the job ended without writing a set (its lock is gone, the folder empty): the next rotation frees it
    (run / "checkpoints" / "4" / "my-set").rmdir()
    assert rotation(run, 1) == ([4], [2])


def test_resaving_a_step_carries_its_set_along(text_file, cache, tmp_path):
    """A step saved again replaces its folder (here: resumed from step 2 because step 4 had no
    trainer state); a set made in the old folder moves into the new one."""
    run = tmp_path / "run"
    list(train(tiny(text_file, cache, max_steps=4, keep_last=5), run))
    ck = run / "checkpoints"
    make_set(ck / "4" / "transcoders")
    (ck / "4" / "trainer_state.pt").unlink()  # weights only: resume starts from step 2
    events = list(train(resume_config(run), run, resume=True))
    assert events[0].step == 2
    assert checkpoint_steps(run) == [2, 4]
    assert (ck / "4" / "trainer_state.pt").is_file()  # written again
    assert (ck / "4" / "transcoders" / "layer_0.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in ck.iterdir()) == ["2", "4"]  # no hidden leftovers


def test_without_sets_rotation_is_unchanged(text_file, cache, tmp_path):
    run = tmp_path / "run"
    list(train(tiny(text_file, cache, keep_last=2), run))
    assert checkpoint_steps(run) == [8, 10]
    assert "kept beyond" not in (run / "log.txt").read_text()
