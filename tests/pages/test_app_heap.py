"""The app keeps full garbage collections off the page's path (pages/parts/common.py,
freeze_startup_heap, and .streamlit/config.toml)."""
from __future__ import annotations

import gc
import tomllib
from pathlib import Path

from pages.parts import common

ROOT = Path(__file__).resolve().parents[2]


def test_streamlit_does_not_collect_after_every_script_run():
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["runner"]["postScriptGC"] is False


def test_the_startup_heap_is_set_aside_once_and_later_objects_stay_collectable(monkeypatch):
    monkeypatch.setattr(common, "_HEAP_FROZEN", False)
    before = [[]]  # alive across the freeze: set aside
    try:
        common.freeze_startup_heap()
        frozen = gc.get_freeze_count()
        assert frozen > 0
        after = [[]]  # made later (a model, a result): the collector still sees it
        tracked = {id(o) for o in gc.get_objects()}
        assert id(before) not in tracked and id(after) in tracked
        common.freeze_startup_heap()  # once per process
        gc.collect()
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
