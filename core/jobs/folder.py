"""A job folder's files and how they are read: the marker, status.json, the STOP request.

Every detached job (a training run, a transcoder job) owns one folder:

- ``.gptlab-job`` (:data:`MARKER_FILE`): ``{"kind": ..., "format": 1, "created": ...}``, written
  when the job machinery creates the folder. Only a folder carrying it (or, for training runs
  made before it existed, one the runs module adopts) is treated as a job: deleting or resuming
  is never done to a folder GPT Lab did not make.
- ``status.json`` (:data:`STATUS_FILE`): ``state`` (running, finished, failed or stopped), the
  process (``pid``, ``pid_start``, ``host``), ``started``/``ended``/``updated`` times, ``reason``
  (and ``fix``, a LabError's suggested change as data) when it failed or stopped. Written
  atomically, so a reader never sees half a file; one a person broke reads as unreadable.
- ``STOP`` (:data:`STOP_FILE`): asks the job to stop (every rank of a distributed run sees it).
- ``console.txt`` (:data:`CONSOLE_FILE`): the process's own stdout and stderr.
- ``events.jsonl``: progress and errors as data (:mod:`core.jobs.events`).
- ``.writer.lock``: held by the one process writing the folder (:mod:`core.jobs.lock`).
"""
from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import LabError, first_line, shorten
from ..files import atomic_write_json, parse_json

MARKER_FILE = ".gptlab-job"
STATUS_FILE = "status.json"
STOP_FILE = "STOP"
CONSOLE_FILE = "console.txt"
STATES = ("running", "finished", "failed", "stopped")
MARKER_FORMAT = 1


def now() -> str:
    """UTC time to the second, as status.json and the marker record it."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- the marker -----------------------------------------------------------------------------------

def mark(folder: str | os.PathLike, kind: str) -> None:
    """Record that the job machinery made ``folder`` for a job of ``kind`` (kept if already there)."""
    path = Path(folder) / MARKER_FILE
    if marker_kind(folder) != kind:
        atomic_write_json(path, {"kind": kind, "format": MARKER_FORMAT, "created": now()})


def marker_kind(folder: str | os.PathLike) -> str | None:
    """The kind written in ``folder``'s marker, or None (no marker, a link, or not ours)."""
    path = Path(folder) / MARKER_FILE
    try:
        if path.is_symlink() or not path.is_file():
            return None
        data = parse_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    kind = data.get("kind") if isinstance(data, dict) else None
    return kind if isinstance(kind, str) else None


# -- status.json ----------------------------------------------------------------------------------

class StatusUnreadable(LabError):
    """status.json exists but is not a status GPT Lab wrote (broken JSON, wrong types)."""


# field -> the types it may have (besides null); ``COUNT`` marks a whole number that is never negative
COUNT = (int,)
_FIELDS: dict[str, tuple[type, ...]] = {
    "pid": COUNT, "pid_start": (str,), "host": (str,), "reason": (str,), "started": (str,), "ended": (str,),
    "updated": (str,), "fix": (dict,), "returncode": (int,),
}


def _field_ok(name: str, value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in types
    if not isinstance(value, types):
        return False
    return not (types is COUNT and value < 0)


def check_status(st: Any, where: str | os.PathLike, extra: dict[str, tuple[type, ...]] | None = None) -> dict:
    """``st`` if it is a status GPT Lab could have written, else StatusUnreadable naming the field.

    ``extra`` adds fields of a particular kind of job (a training run's ``step``, say); every
    listed field may also be null. Booleans never pass for numbers.
    """
    if not isinstance(st, dict):
        raise StatusUnreadable(f"{where} holds {type(st).__name__} instead of a status object; delete the "
                               f"folder or restore the file.")
    state = st.get("state")
    if state not in STATES:
        raise StatusUnreadable(f"{where} has state {shorten(repr(state), 40)}, not one of {', '.join(STATES)}; "
                               f"delete the folder or restore the file.")
    for name, types in {**_FIELDS, **(extra or {})}.items():
        value = st.get(name)
        if value is not None and not _field_ok(name, value, types):
            kinds = "a whole number of 0 or more" if types is COUNT else " or ".join(t.__name__ for t in types)
            raise StatusUnreadable(f"{where} has {name} = {shorten(repr(value), 40)}, which should be {kinds}; "
                                   f"delete the folder or restore the file.")
    return st


def read_status_file(folder: str | os.PathLike, extra: dict[str, tuple[type, ...]] | None = None) -> dict:
    """status.json of ``folder``, checked (:func:`check_status`); FileNotFoundError when there is none."""
    path = Path(folder) / STATUS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as e:
        raise StatusUnreadable(f"{path} cannot be read ({first_line(e)}); check its permissions.") from None
    try:
        st = parse_json(text)
    except ValueError as e:
        raise StatusUnreadable(f"{path} is not valid JSON ({first_line(e)}); delete the folder or restore the "
                               f"file.") from None
    return check_status(st, path, extra)


class StatusFile:
    """Merges fields into one folder's status.json; ``enabled=False`` (DDP ranks other than 0)
    writes nothing. The current content is read once, so fields written by someone before (the
    launcher's pid, a start time) are kept."""

    def __init__(self, folder: str | os.PathLike, enabled: bool = True):
        self.folder = Path(folder)
        self.enabled = enabled
        self.fields: dict = {}
        self._last = 0.0
        if enabled:
            try:
                data = parse_json((self.folder / STATUS_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                data = {}
            self.fields = data if isinstance(data, dict) else {}

    def update(self, state: str | None = None, *, force: bool = True, **fields: Any) -> None:
        """Merge ``fields`` (and ``state``) in; ``force=False`` writes at most once a second."""
        if not self.enabled:
            return
        if state is not None:
            self.fields["state"] = state
        self.fields.update(fields)
        t = time.monotonic()
        if force or t - self._last >= 1.0:
            self.fields["updated"] = now()
            atomic_write_json(self.folder / STATUS_FILE, self.fields)
            self._last = t


def stop_requested(folder: str | os.PathLike) -> bool:
    return (Path(folder) / STOP_FILE).exists()
