"""User-facing errors, and the few helpers that turn any exception into one line for a person.

Every bad input ends in a :class:`LabError` whose message is one sentence saying what to change.
The CLI prints it and exits with code 2; the app shows it with ``st.error``. Anything else that
escapes is a bug, not a user mistake. Torch-free, so the CLI's ``--help`` can import it.
"""
from __future__ import annotations

from typing import Any


class LabError(Exception):
    """A problem the user can fix; ``str(err)`` is the message to show them.

    ``fix`` optionally carries the suggested change as data (e.g. ``{"record_every": 4}``), so a
    page can offer it as one click without reading it back out of the sentence.
    """

    def __init__(self, message: str, *, fix: dict[str, Any] | None = None):
        super().__init__(message)
        self.fix = dict(fix or {})


class ModelNotAvailableError(LabError):
    """A model spec that cannot be resolved or fetched (offline, typo, missing folder)."""


def is_out_of_memory(e: BaseException) -> bool:
    """torch's OutOfMemoryError (told by name, so this module needs no torch), or the CPU
    allocator's RuntimeError for a block the machine cannot give: both mean "make it smaller"."""
    return type(e).__name__ == "OutOfMemoryError" or (
        isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "DefaultCPUAllocator" in str(e)))


def one_line(text: object) -> str:
    """``text`` on a single line (its lines joined by spaces): the CLI promises one line per error."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def shorten(text: str, limit: int = 60, newline: str = "\\n") -> str:
    """``text`` on one line (newlines shown as ``newline``), cut to ``limit`` characters with ``...``."""
    text = str(text).replace("\r\n", "\n").replace("\n", newline)
    return text if len(text) <= limit else text[:max(limit - 3, 0)] + "..."


def fmt_bytes(n: float) -> str:
    """``1.5 GB``-style sizes for messages."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
