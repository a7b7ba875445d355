"""Start, watch, stop and reap detached jobs: training runs and transcoder jobs alike.

A job is ``python -m core <command ...>`` run by :mod:`core.jobs.child` in its own session
(``start_new_session``), so it outlives the page or shell that started it, with its output in the
folder's ``console.txt``. The child records the process in ``status.json``, turns the command's
progress and errors into ``events.jsonl`` (:mod:`core.jobs.events`) and records how the command
ended, even when nobody is watching. See :mod:`core.jobs.folder` for the folder's files.

Reaping. A finished child stays a ``<defunct>`` zombie in the process table until its parent
waits for it, and the app's server lives for days. Every child started here is therefore waited
for by a small daemon thread (:func:`_reap_when_done`) that blocks in ``Popen.wait()`` and reaps
it the moment it exits. The alternative, a double fork that hands the job to init, would also
lose the Popen handle, which is the one exact "is it still running" for a job whose pid was not
yet recorded; the waiting thread keeps it and costs one sleeping thread per running job.
:func:`reap` polls the same children synchronously, for callers that want it done now.

Liveness. A ``running`` status whose process is gone (``kill -9``, a reboot) must not read as
running: :func:`live_status` checks the recorded pid and its start time (a reused pid is not the
job) or, before the pid is recorded, the Popen this process holds, and reports such a job as
``stopped`` when a stop was requested, else ``failed`` with ``lost: true`` so the caller can say
why in its own words.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

from ..errors import LabError, first_line
from .folder import CONSOLE_FILE, STATUS_FILE, STOP_FILE, StatusFile, now
from .lock import FolderLock, handed_env
from .process import process_alive, process_start, this_host

ROOT = Path(__file__).resolve().parents[2]  # the folder holding core/: the checkout, or site-packages installed
FOLDER_VARIABLES = ("GPTLAB_RUNS", "GPTLAB_DATA_CACHE", "GPTLAB_TRANSCODERS")  # folders a job reads or writes
START_GRACE_S = 60.0   # a running status with no pid yet (its launcher died mid-start) reads as failed after this


@dataclass
class Child:
    proc: subprocess.Popen
    folder: str
    kind: str


_CHILDREN: dict[int, Child] = {}
_LOCK = threading.Lock()


def child_env() -> dict[str, str]:
    """The job's environment: this one, with GPT Lab importable and output unbuffered (the
    console file is read while the job writes it). The job runs in ROOT, so a relative folder in
    ``$GPTLAB_RUNS`` and the like is made absolute here: it means the same folder to the job as
    to whoever started it, from whatever folder that was."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    folders = {k: os.path.abspath(os.path.expanduser(os.environ[k])) for k in FOLDER_VARIABLES
               if os.environ.get(k, "").strip()}
    return {**os.environ, **folders, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def job_command(folder: str | os.PathLike, argv: list[str]) -> list[str]:
    """The child's command line: ``python -m core.jobs.child FOLDER -- ARGV`` (the folder on the
    command line also tells a job's process from an unrelated one with a recycled pid)."""
    return [sys.executable, "-m", "core.jobs.child", str(folder), "--", *argv]


def start(folder: str | os.PathLike, argv: list[str], kind: str, locks: list[FolderLock] | None = None) -> int:
    """Start ``python -m core *argv`` for the job in ``folder`` and return its pid at once.

    ``locks`` (taken by the caller before it wrote the folder) pass to the child, which holds
    them for its life; this process's copies are closed. The pid and its start time go into
    status.json before this returns (unless the child, quicker, wrote them itself).
    """
    folder = Path(folder)
    locks = list(locks or [])
    env = {**child_env(), **handed_env(locks)}
    try:
        console = os.open(folder / CONSOLE_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        with open(console, "ab") as out:  # O_NOFOLLOW: the job's output never lands where a link points
            proc = subprocess.Popen(job_command(folder, argv), cwd=str(ROOT), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, env=env,
                                    pass_fds=[lock.fd for lock in locks])
    except OSError as e:
        StatusFile(folder).update("failed", reason=f"Could not start the job process ({first_line(e)}).", ended=now())
        raise LabError(f"Could not start the job process ({first_line(e)}); check that Python can run here.") \
            from None
    finally:
        for lock in locks:
            lock.hand_over()
    with _LOCK:
        _CHILDREN[proc.pid] = Child(proc, str(folder), kind)
    threading.Thread(target=_reap_when_done, args=(proc,), name=f"reap-{proc.pid}", daemon=True).start()
    status = StatusFile(folder)
    if status.fields.get("pid") != proc.pid:  # the child re-reads the file, so its own fields are never lost
        status.update(pid=proc.pid, pid_start=process_start(proc.pid), host=this_host())
    return proc.pid


def _reap_when_done(proc: subprocess.Popen) -> None:
    """Wait for ``proc`` (which reaps it) and forget it."""
    try:
        proc.wait()
    finally:
        with _LOCK:
            _CHILDREN.pop(proc.pid, None)


def reap() -> list[int]:
    """Reap every finished child started here now; returns their pids."""
    with _LOCK:
        items = list(_CHILDREN.items())
    done = [pid for pid, child in items if child.proc.poll() is not None]
    with _LOCK:
        for pid in done:
            _CHILDREN.pop(pid, None)
    return done


def children(kind: str | None = None) -> dict[int, subprocess.Popen]:
    """The running children this process started (pid -> Popen), of one ``kind`` or all."""
    with _LOCK:
        return {pid: c.proc for pid, c in _CHILDREN.items() if kind is None or c.kind == kind}


def _child_in(folder: Path) -> Child | None:
    key = str(folder)
    with _LOCK:
        found = [c for c in _CHILDREN.values() if c.folder == key]
    return found[-1] if found else None


def live_status(folder: str | os.PathLike, st: dict) -> dict:
    """``st`` (a folder's status.json) as it really is: a ``running`` job whose process is gone
    becomes ``stopped`` (a stop was requested) or ``failed``, with ``lost: true``. A job on
    another host is taken at its word."""
    if st.get("state") != "running" or st.get("host", this_host()) != this_host():
        return st
    folder = Path(folder)
    child = _child_in(folder)
    if child is not None and child.proc.poll() is None:
        return st
    pid = st.get("pid")
    if isinstance(pid, int) and not isinstance(pid, bool):
        alive = (child is None or child.proc.pid != pid) and process_alive(pid, st.get("pid_start"))
    elif child is not None:
        alive = False
    else:
        try:
            alive = time.time() - (folder / STATUS_FILE).stat().st_mtime < START_GRACE_S
        except OSError:
            alive = False
    if alive:
        return st
    return {**st, "state": "stopped" if (folder / STOP_FILE).exists() else "failed", "lost": True}


def signalable(pid: object, pid_start: object) -> bool:
    """Whether ``pid`` may be sent a signal as the job's process: a real pid (not 0, which is
    our own process group, nor 1, init), not this process, and still the process that started
    at ``pid_start``. A status.json written by hand, or naming a pid the system gave to another
    process since, never makes a Stop signal someone else."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1 or pid == os.getpid():
        return False
    return isinstance(pid_start, str) and process_start(pid) == pid_start


def stop(folder: str | os.PathLike, pid: int | None, pid_start: str | None = None, *, sig: int = signal.SIGINT,
         group: bool = True, force: bool = False, signal_process: bool = True) -> None:
    """Ask the job in ``folder`` to stop: a STOP file (which every rank of a distributed run
    sees, and which the job acts on even when no signal can be sent) and ``sig`` to its process,
    or to its whole process group when ``group`` and it leads one (a job started here leads its
    own session, so its group is all of it). ``force`` sends SIGKILL instead and waits for a
    child started here. Signals go only to a pid :func:`signalable` vouches for."""
    folder = Path(folder)
    (folder / STOP_FILE).touch()
    child = _child_in(folder)
    if not pid and child is not None:
        pid, pid_start = child.proc.pid, process_start(child.proc.pid)
    if not (signal_process or force) or not signalable(pid, pid_start):
        return
    try:
        leads_group = os.getpgid(pid) == pid
        if force:
            os.killpg(pid, signal.SIGKILL) if leads_group else os.kill(pid, signal.SIGKILL)
        elif group and leads_group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    if force and child is not None:
        try:
            child.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


class ChildrenView(Mapping):
    """The running children of one ``kind`` keyed the way older callers (test fixtures) keyed
    them: by pid, or by job folder. ``pop`` forgets a child; the waiting thread still reaps it."""

    def __init__(self, kind: str, key: str = "pid"):
        self.kind, self.key = kind, key

    def _items(self) -> dict:
        with _LOCK:
            items = [(pid, c) for pid, c in _CHILDREN.items() if c.kind == self.kind]
        return {(pid if self.key == "pid" else c.folder): c.proc for pid, c in items}

    def __getitem__(self, k):
        return self._items()[k]

    def __iter__(self) -> Iterator:
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())

    def pop(self, k, *default):
        proc = self._items().get(k)
        if proc is None:
            if default:
                return default[0]
            raise KeyError(k)
        with _LOCK:
            _CHILDREN.pop(proc.pid, None)
        return proc
