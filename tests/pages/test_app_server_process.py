"""The app's server process keeps its page's work from waiting on the browser and on full garbage
collections (pages/parts/server_process.py, .streamlit/config.toml)."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from core.devices import usable_cores
from pages.parts import server_process

ROOT = Path(__file__).resolve().parents[2]


def test_streamlit_does_not_collect_after_every_script_run():
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["runner"]["postScriptGC"] is False


def test_the_server_leaves_one_core_to_the_browser():
    assert server_process.server_threads(default=2, cores=2) == 1
    assert server_process.server_threads(default=8, cores=16) == 8    # never more than torch's own choice
    assert server_process.server_threads(default=16, cores=16) == 15
    assert server_process.server_threads(default=1, cores=1) == 1     # one core: one thread all the same


def _threads_after_prepare(env: dict) -> int:
    code = ("import torch; from pages.parts.server_process import prepare_server_process; "
            "torch.set_num_threads(4); prepare_server_process(); print(torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    return int(out.stdout.split()[-1])


def test_prepare_sets_the_threads_unless_the_user_chose_them():
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    cores = usable_cores()
    assert _threads_after_prepare(env) == server_process.server_threads(4, cores)
    assert _threads_after_prepare({**env, "OMP_NUM_THREADS": "3"}) == 4   # the user's setting is left alone


def test_the_startup_heap_is_set_aside_once_and_later_objects_stay_collectable(monkeypatch):
    monkeypatch.setattr(server_process, "_PREPARED", False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # leave this process's threads as the suite set them
    before = [[]]  # alive across the freeze: set aside
    try:
        server_process.prepare_server_process()
        frozen = gc.get_freeze_count()
        assert frozen > 0
        after = [[]]  # made later (a model, a result): the collector still sees it
        tracked = {id(o) for o in gc.get_objects()}
        assert id(before) not in tracked and id(after) in tracked
        server_process.prepare_server_process()  # once per process
        gc.collect()
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
