"""Fixtures the page tests share (tests/conftest.py holds those of the whole suite)."""
from __future__ import annotations

from pathlib import Path

import pytest
from tests.conftest import kill_process_groups, leftover_pids

from core.interp import jobs as features_jobs
from core.models.loading import load_model


@pytest.fixture(scope="module")
def default_lm():
    """The shipped default model (untrained, 4 layers, width 256), as the pages load it."""
    return load_model("default")


@pytest.fixture
def env(tmp_path: Path, monkeypatch) -> Path:
    """Runs and token caches under tmp_path for the Features page's jobs; every job process started
    meanwhile is killed after."""
    root = tmp_path / "runs"
    monkeypatch.setenv("GPTLAB_RUNS", str(root))
    monkeypatch.setenv("GPTLAB_DATA_CACHE", str(tmp_path / "token-cache"))
    before = set(features_jobs._CHILDREN)
    yield root
    pids: dict[int, object] = {}
    for folder, proc in list(features_jobs._CHILDREN.items()):
        if folder not in before:
            pids[proc.pid] = proc
            features_jobs._CHILDREN.pop(folder)
    kill_process_groups({**pids, **leftover_pids(features_jobs.jobs_root(root).glob("*/status.json"), pids)})
