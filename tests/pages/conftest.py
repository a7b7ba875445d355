"""Fixtures the page tests share (tests/conftest.py holds those of the whole suite)."""
from __future__ import annotations

import pytest

from core.models.loading import load_model


@pytest.fixture(scope="module")
def default_lm():
    """The shipped default model (untrained, 4 layers, width 256), as the pages load it."""
    return load_model("default")
