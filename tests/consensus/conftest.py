"""Every consensus run the CLI makes in these tests is kept in a runs folder of the test's own,
outside its tmp_path (tests list what lands there)."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def runs_dir(tmp_path_factory, monkeypatch) -> Path:
    root = tmp_path_factory.mktemp("runs")
    monkeypatch.setenv("GPTLAB_RUNS", str(root))
    return root
