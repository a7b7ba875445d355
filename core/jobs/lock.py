"""One writer per folder: an OS lock on ``<folder>/.writer.lock``, held for a process's life.

Two ``train --resume`` of one run, or two transcoder jobs writing one set, would interleave
their files. The writer takes ``fcntl.flock`` on the folder's lock file before writing anything
and keeps it until it ends; the kernel releases it when the process dies in any way (even
``kill -9``), so a lock never outlives its holder and nothing needs cleaning after a crash. A
second writer is refused at once with a sentence naming the holder (its pid and command line,
which the holder writes into the lock file).

A launcher (the app's server) takes the lock *before* it writes the folder and hands it to the
job it starts: the lock's file descriptor is passed to the child (``pass_fds``), with
:data:`HELD_ENV` saying which folder it locks, and the launcher closes its own copy. flock
belongs to the open file, which the child now holds, so there is no moment at which the folder
is unlocked between the launcher's check and the child's work. :func:`acquire` in the child
adopts the inherited lock instead of waiting on itself.

Within one process :func:`acquire` is re-entrant (the ``train`` command and the trainer it runs
both ask for the run's lock; a describe job holds its set folder and the feature store in it asks
again), and its table of held locks is guarded for the app server's threads. Readers never need the lock; :func:`holder` tells whether someone
holds it, and acquiring retries for :data:`RETRY_S` (or the ``wait_s`` given) so such a probe cannot
refuse a writer.
The file is removed on an orderly release; an acquirer checks that the file it locked is still
the one at the path, so a release racing with an acquire cannot give two writers the lock.
"""
from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import sys
import threading
import time
from pathlib import Path

from ..errors import LabError, shorten
from ..files import parse_json
from .folder import now
from .process import this_host

LOCK_FILE = ".writer.lock"
HELD_ENV = "GPTLAB_HELD_LOCKS"   # JSON {"/abs/folder": fd} of locks a launcher handed to this process
RETRY_S = 1.0


class FolderLock:
    """A held lock on one folder (see the module docstring); release with :meth:`release`."""

    def __init__(self, folder: Path, fd: int):
        self.folder = folder
        self.fd = fd
        self.count = 1

    @property
    def path(self) -> Path:
        return self.folder / LOCK_FILE

    def release(self) -> None:
        """Give the lock up (after as many releases as acquires in this process)."""
        with _GUARD:
            self.count -= 1
            if self.count > 0 or self.fd < 0:
                return
            _HELD.pop(str(self.folder), None)
            if _same_file(self.fd, self.path):
                try:
                    self.path.unlink()
                except OSError:
                    pass
            os.close(self.fd)  # closing the last descriptor of the open file releases the flock
            self.fd = -1

    def hand_over(self) -> None:
        """Drop this process's copy of a lock now held by a child it started with the descriptor."""
        _HELD.pop(str(self.folder), None)
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def keep_across_exec(self) -> None:
        """Let the lock survive ``os.exec*`` (the train command becoming torchrun)."""
        os.set_inheritable(self.fd, True)

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


_HELD: dict[str, FolderLock] = {}
_GUARD = threading.RLock()  # _HELD is shared by the threads of one process (the app's sessions)


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _record_holder(fd: int) -> None:
    info = {"pid": os.getpid(), "host": this_host(), "since": now(),
            "command": shorten(" ".join([os.path.basename(sys.executable), *sys.argv]), 300)}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    except OSError:
        pass  # the holder's name is a courtesy for messages; the lock itself is what counts


def _inherited(folder: Path) -> FolderLock | None:
    """The lock on ``folder`` that a launcher handed to this process, if any."""
    try:
        handed = json.loads(os.environ.get(HELD_ENV, "{}"))
        fd = int(handed[str(folder)])
    except (ValueError, KeyError, TypeError):
        return None
    if not _same_file(fd, folder / LOCK_FILE):
        return None
    return FolderLock(folder, fd)


def acquire(folder: str | os.PathLike, what: str, hint: str, wait_s: float = RETRY_S,
            named: str | os.PathLike | None = None) -> FolderLock:
    """Lock ``folder`` (created if missing) for this process, waiting up to ``wait_s`` seconds for
    another holder, or LabError: "{what} {named or folder} is being written by another process
    (pid N: command); {hint}"."""
    folder = Path(folder).expanduser().resolve()
    with _GUARD:
        held = _HELD.get(str(folder))
        if held is not None:
            held.count += 1
            return held
        lock = _inherited(folder)
        if lock is None:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:  # a file in the way, a read-only place: the folder cannot be written at all
                raise LabError(f"Cannot create {what.lower()} folder {folder} ({e.strerror or e}); pick a folder you "
                               f"can write to.") from None
            lock = FolderLock(folder, _take(folder, what, hint, wait_s, named or folder))
        _record_holder(lock.fd)
        _HELD[str(folder)] = lock
        return lock


def _take(folder: Path, what: str, hint: str, wait_s: float, named: str | os.PathLike) -> int:
    path = folder / LOCK_FILE
    deadline = time.monotonic() + max(0.0, wait_s)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise LabError(f"{path} is a symbolic link; remove it and try again.") from None
            raise LabError(f"Cannot write the lock file {path} ({e.strerror or e}); {what.lower()} {folder} "
                           f"must be a folder you can write to.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() >= deadline:
                raise LabError(f"{what} {named} is being written by another process{_describe(folder)}; "
                               f"{hint}") from None
            time.sleep(0.05)
            continue
        if _same_file(fd, path):
            return fd
        os.close(fd)  # the holder released and removed that file meanwhile: lock the new one


def holder(folder: str | os.PathLike) -> dict | None:
    """Who holds ``folder``'s lock (``{"pid", "host", "command", "since"}``, fields as recorded),
    or None when nobody does. Does not take the lock."""
    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                info = parse_json(os.pread(fd, 4096, 0).decode("utf-8", errors="replace") or "{}")
            except ValueError:
                info = {}
            return info if isinstance(info, dict) else {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _describe(folder: Path) -> str:
    info = holder(folder) or {}
    parts = [f"pid {info['pid']}" if isinstance(info.get("pid"), int) else "",
             f"`{info['command']}`" if isinstance(info.get("command"), str) else ""]
    text = ": ".join(p for p in parts if p)
    return f" ({text})" if text else ""


def handed_env(locks: list[FolderLock]) -> dict[str, str]:
    """The environment entry that tells a child which of its inherited descriptors lock what."""
    return {HELD_ENV: json.dumps({str(lock.folder): lock.fd for lock in locks})}


def adopt_inherited() -> list[FolderLock]:
    """Take over every lock a launcher handed to this process (the job's child does this first,
    so the lock files name the job's own pid)."""
    try:
        handed = json.loads(os.environ.get(HELD_ENV, "{}"))
    except ValueError:
        return []
    locks = []
    with _GUARD:
        for folder in handed if isinstance(handed, dict) else {}:
            lock = _inherited(Path(folder))
            if lock is not None and str(lock.folder) not in _HELD:
                _record_holder(lock.fd)
                _HELD[str(lock.folder)] = lock
                locks.append(lock)
    return locks


@atexit.register
def _release_all() -> None:
    for lock in list(_HELD.values()):
        lock.count = 1
        try:
            lock.release()
        except OSError:
            pass
