"""User-facing errors.

Every bad input ends in a :class:`LabError` whose message is one sentence saying what to change.
The CLI prints it and exits with code 2; the app shows it with ``st.error``. Anything else that
escapes is a bug, not a user mistake.
"""
from __future__ import annotations


class LabError(Exception):
    """A problem the user can fix; ``str(err)`` is the message to show them."""


class ModelNotAvailableError(LabError):
    """A model spec that cannot be resolved or fetched (offline, typo, missing folder)."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`LabError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise LabError(message)


def is_out_of_memory(e: BaseException) -> bool:
    """torch's OutOfMemoryError (told by name, so this module needs no torch), or the CPU
    allocator's RuntimeError for a block the machine cannot give: both mean "make it smaller"."""
    return type(e).__name__ == "OutOfMemoryError" or (
        isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "DefaultCPUAllocator" in str(e)))
