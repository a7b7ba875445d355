"""Which process is which: a pid plus its start time names one process for its whole life.

A pid alone is not enough: the system reuses pids, so a job folder's ``pid`` may name an
unrelated process after a reboot or a long time. Its start time (Linux ``/proc/<pid>/stat``
field 22), recorded beside the pid, tells the job's own process from a newcomer with the same
number. Torch-free, so the CLI's ``--help`` and the pages can import it cheaply.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path


def this_host() -> str:
    """The machine's name, recorded with a pid: a pid only means something on its own host."""
    return socket.gethostname()


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (None when it is gone or unreadable)."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # counted after "pid (comm)", which may hold spaces
    return fields[19] if len(fields) > 19 else None


def process_state(pid: int) -> str | None:
    """The one-letter state of process ``pid`` (R, S, Z for a zombie, ...), or None when it is gone."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[0] if fields else None


def process_alive(pid: int, started: str | None = None) -> bool:
    """Whether process ``pid`` lives and is still the one that started at ``started`` (a pid the
    system gave to a new process since reads as dead). A zombie (finished, not yet reaped) is dead.

    Never reaps anything itself: waiting on a pid belongs to whoever started it
    (:mod:`core.jobs.runner` does that for the jobs it starts).
    """
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process, alive
    except (OverflowError, ValueError):
        return False
    if process_state(pid) == "Z":
        return False
    if started is not None:
        now_start = process_start(pid)
        return now_start is None or now_start == started
    return True
