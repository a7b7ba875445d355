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
    """torch's OutOfMemoryError (told by name, so this module needs no torch), Python's
    MemoryError, or a RuntimeError from an allocator (the CPU's "can't allocate memory", a GPU
    library's "out of memory"): all mean "make it smaller"."""
    if type(e).__name__ == "OutOfMemoryError" or isinstance(e, MemoryError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(
        s in text for s in ("can't allocate memory", "defaultcpuallocator", "out of memory", "alloc_failed"))


def one_line(text: object) -> str:
    """``text`` on a single line (its lines joined by spaces): the CLI promises one line per error."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def shorten(text: str, limit: int | None = 60, newline: str = "\\n") -> str:
    """``text`` on one line (each line break, ``\\r\\n``, ``\\n`` or ``\\r``, shown as ``newline``), cut to
    ``limit`` characters with ``...`` (``None``: not cut)."""
    text = str(text).replace("\r\n", "\n").replace("\r", "\n").replace("\n", newline)
    return text if limit is None or len(text) <= limit else text[:max(limit - 3, 0)] + "..."


def failure(e: BaseException, out_of_memory: str) -> str:
    """One line for an exception nobody planned for (a bug, a device failing): ``out_of_memory``
    (what to make smaller) when :func:`is_out_of_memory` says the device ran out, else the first
    line of its message. The CLI, the pages and the jobs all word the unexpected this way."""
    return out_of_memory if is_out_of_memory(e) else first_line(e)


def fmt_count(n: int) -> str:
    """``124.4M``-style counts (parameters, tokens) for tables and cards."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def fmt_bytes(n: float) -> str:
    """``1.5 GB``-style sizes for messages."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
