"""One writer at a time for a file several processes may write (the feature store).

SQLite serialises single statements, but a feature store is also *replaced* wholesale (a fresh
collection is built in a temp file and renamed over it) while a describe job may be writing it;
a rename under an open write transaction would orphan that job's rollback journal, which the next
reader could roll back into the new file. So every writer holds an exclusive advisory lock
(``flock``) on a small sidecar file, ``.<name>.lock`` next to the store, for as long as it writes:
a second writer waits a few seconds, then is refused with a sentence naming the process that
holds it. Readers take no lock. The lock is re-entrant within a process (a collection holds it
from its first batch to the rename, and the store it builds takes it again), and the sidecar is
removed on release; a process that dies releases its lock with its file descriptors.

Where ``fcntl`` does not exist (Windows) writers are not serialised beyond SQLite's own locking.
"""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import LabError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

LOCK_WAIT_S = 5.0       # how long a second writer waits before it is refused
_POLL_S = 0.05
_HELD: dict[str, list] = {}   # lock file -> [fd, depth] for the locks this process holds
_GUARD = threading.RLock()    # _HELD is shared by the threads of one process (the app's sessions)


def lock_path(target: str | os.PathLike) -> Path:
    """The sidecar lock file of ``target``."""
    target = Path(target)
    return target.with_name(f".{target.name}.lock")


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"process {pid}" if pid.isdigit() else "another process"


def acquire(target: str | os.PathLike, wait_s: float = LOCK_WAIT_S, what: str = "file") -> None:
    """Take the writer lock of ``target`` (waiting up to ``wait_s`` seconds), or raise LabError."""
    path = lock_path(target).resolve()
    key = str(path)
    with _GUARD:
        if key in _HELD:
            _HELD[key][1] += 1
            return
        if fcntl is None:
            _HELD[key] = [None, 1]
            return
        _take(path, target, wait_s, what)


def _take(path: Path, target: str | os.PathLike, wait_s: float, what: str) -> None:
    deadline = time.monotonic() + max(0.0, wait_s)
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)  # a writer is about to write there anyway
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise LabError(f"Cannot write next to the {what} {target} ({e.strerror or e}); pick a folder you can "
                           f"write to.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() >= deadline:
                raise LabError(f"The {what} {target} is being written by {_holder(path)}; wait for it to finish (or "
                               f"stop it) and try again.") from None
            time.sleep(_POLL_S)
            continue
        try:  # a releasing holder unlinks the file before unlocking: the one locked must still be there
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            _HELD[str(path)] = [fd, 1]
            return
        os.close(fd)


def release(target: str | os.PathLike) -> None:
    """Give back one hold of ``target``'s writer lock; the last one removes the sidecar."""
    key = str(lock_path(target).resolve())
    with _GUARD:
        held = _HELD.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] > 0:
            return
        del _HELD[key]
        fd = held[0]
        if fd is None:
            return
        try:
            os.unlink(key)
        except FileNotFoundError:
            pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextmanager
def writing(target: str | os.PathLike, wait_s: float = LOCK_WAIT_S, what: str = "file") -> Iterator[None]:
    """``with writing(path):`` holds ``path``'s writer lock for the block."""
    acquire(target, wait_s, what)
    try:
        yield
    finally:
        release(target)
