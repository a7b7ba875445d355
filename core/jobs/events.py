"""Progress and errors of a job as data: ``events.jsonl`` in the job's folder, one JSON object a line.

Pages and commands read what a job is doing from here instead of parsing its console (progress
bars are for people; their text changes with tqdm's version and the terminal's width) or reading
a suggestion back out of an error sentence. Each line has ``t`` (Unix time, seconds) and ``kind``:

- ``progress``: ``stage`` (``train``, ``collect``, ``describe (builtin)``, ...), ``done`` and
  ``total`` (``total`` may be null when unknown), ``text`` (a short status such as ``loss 2.3104``,
  or null). Written at most every :data:`MIN_INTERVAL_S` per stage, and always when a stage
  starts or reaches its total, so the file grows slowly however fast the job steps.
- ``error``: ``message`` (the one-line sentence shown to the user), ``error`` (the exception's
  type name) and ``fix`` (a :class:`~core.errors.LabError`'s suggested change as data, or null).
- ``state``: ``state`` (running, finished, failed, stopped) and optional ``returncode``: the job
  started or ended.

Appends are single ``write`` calls of one line, so a reader sees whole lines or none (a line
still being written is skipped until it is complete).
"""
from __future__ import annotations

import errno
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..errors import LabError, one_line
from ..files import parse_json

EVENTS_FILE = "events.jsonl"
MIN_INTERVAL_S = 0.5
TAIL_BYTES = 64 * 1024


@dataclass
class Progress:
    stage: str
    done: int
    total: int | None
    text: str | None = None

    @property
    def fraction(self) -> float:
        return min(1.0, max(0.0, self.done / self.total)) if self.total else 0.0


class EventLog:
    """Appends events to one folder's events.jsonl; ``enabled=False`` writes nothing (DDP ranks
    other than 0)."""

    def __init__(self, folder: str | os.PathLike, enabled: bool = True):
        self.path = Path(folder) / EVENTS_FILE
        self.enabled = enabled
        self._last: dict[str, tuple[float, int]] = {}   # stage -> (when written, done)

    def write(self, kind: str, **fields: Any) -> None:
        if not self.enabled:
            return
        line = json.dumps({"t": round(time.time(), 3), "kind": kind, **fields}, default=str) + "\n"
        try:  # O_NOFOLLOW: an event never lands in a file a link points at
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise LabError(f"{self.path} is a symbolic link; GPT Lab writes a job's events only inside its "
                               f"folder, so replace the link with a file.") from None
            raise
        try:
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)

    def progress(self, stage: str, done: int, total: int | None, text: str | None = None,
                 force: bool = False) -> None:
        """``done`` of ``total`` in ``stage``; skipped when the stage wrote less than
        :data:`MIN_INTERVAL_S` ago, unless ``force``, the stage is new or it is complete."""
        t = time.monotonic()
        last = self._last.get(stage)
        complete = total is not None and done >= total
        if not (force or last is None or complete or t - last[0] >= MIN_INTERVAL_S):
            return
        if last is not None and last[1] == done and not force and not complete:
            return
        self._last[stage] = (t, done)
        self.write("progress", stage=stage, done=int(done), total=None if total is None else int(total),
                   text=text)

    def error(self, e: BaseException) -> None:
        """Record ``e`` once (the trainer and the job's runner may both see the same exception)."""
        if getattr(e, "_gptlab_recorded", False):
            return
        try:
            e._gptlab_recorded = True  # type: ignore[attr-defined]
        except AttributeError:
            pass
        fix = e.fix if isinstance(e, LabError) and e.fix else None
        message = one_line(e) if isinstance(e, LabError) else f"{type(e).__name__}: {one_line(e)}".rstrip(": ")
        self.write("error", message=message, error=type(e).__name__, fix=fix)

    def state(self, state: str, **fields: Any) -> None:
        self.write("state", state=state, **fields)


def _tail_lines(folder: str | os.PathLike, tail_bytes: int) -> list[str]:
    path = Path(folder) / EVENTS_FILE
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - tail_bytes))
            chunk = fh.read()
    except OSError:
        return []
    end = chunk.rfind(b"\n") + 1
    lines = chunk[:end].decode("utf-8", errors="replace").splitlines()
    return lines[1:] if size > tail_bytes else lines  # the first line of a tail may be cut


def read_events(folder: str | os.PathLike, kind: str | None = None,
                tail_bytes: int = TAIL_BYTES) -> list[dict]:
    """The events in the last ``tail_bytes`` of the file (all of a small one), oldest first."""
    return list(json_objects(_tail_lines(folder, tail_bytes), kind))


def json_objects(lines: Iterable[str], kind: str | None = None) -> Iterator[dict]:
    """The lines that are JSON objects (of that ``kind``, when one is given), in order; any other
    line (half written, or not JSON) is skipped. Events files and metrics files are read with it."""
    for line in lines:
        try:
            ev = parse_json(line)
        except ValueError:
            continue
        if isinstance(ev, dict) and (kind is None or ev.get("kind") == kind):
            yield ev


def last_progress(folder: str | os.PathLike) -> Progress | None:
    """The newest progress event, or None when the job has reported none (yet)."""
    for ev in reversed(read_events(folder, "progress")):
        done, total = ev.get("done"), ev.get("total")
        if isinstance(done, int) and (total is None or isinstance(total, int)):
            stage, text = ev.get("stage"), ev.get("text")
            return Progress(stage=str(stage or "progress"), done=done, total=total,
                            text=text if isinstance(text, str) else None)
    return None


def last_error(folder: str | os.PathLike) -> dict | None:
    """The newest error event (``message``, ``error``, ``fix``), or None."""
    errors = read_events(folder, "error")
    return errors[-1] if errors else None
