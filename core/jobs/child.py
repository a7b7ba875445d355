"""The job's own process: ``python -m core.jobs.child FOLDER -- <command ...>``.

Runs ``python -m core <command ...>`` in this process (one interpreter, so a training run's pid
is the trainer's) and around it:

- takes over the folder locks its launcher handed down (:func:`core.jobs.lock.adopt_inherited`);
- records this process (pid, start time, host) in status.json;
- turns the command's progress bars into ``progress`` events: every command draws its bar with
  :func:`core.commands.cli.progress`, whose listener here writes the bar's position, total and
  status text to events.jsonl (the bar on the console stays as it was);
- records a LabError (its message and its ``fix``) or an unexpected exception as an ``error``
  event, handed over by the CLI's ``on_error`` before it turns the exception into a line;
- when the command did not report its own end (a transcoder command; a training run that
  failed before its trainer started), records it: ``finished`` (exit 0), ``stopped`` (Ctrl-C,
  or a STOP was requested) or ``failed`` with the error's message and fix as the reason.
"""
from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

from ..commands import cli
from ..errors import LabError, first_line
from .events import EventLog
from .folder import STOP_FILE, StatusFile, now
from .lock import adopt_inherited
from .process import process_start, this_host

STOPPED_REASON = "on request (Ctrl-C); what it had done so far is kept."


def _reason(e: BaseException | None, rc: int) -> str:
    if isinstance(e, LabError):
        return str(e)
    if e is not None:
        return f"{type(e).__name__}: {first_line(e)}"
    return f"The command ended with exit status {rc}; see its log."


def record_end(folder: Path, rc: int, error: BaseException | None, log: EventLog) -> None:
    """Write how the command ended, unless it wrote that itself (status no longer running)."""
    status = StatusFile(folder)
    if status.fields.get("state") == "running":
        if rc == 0:
            status.update("finished", returncode=rc, ended=now(), reason=None)
        elif rc == 130 or (folder / STOP_FILE).exists():
            status.update("stopped", returncode=rc, ended=now(), reason=STOPPED_REASON)
        else:
            fix = error.fix if isinstance(error, LabError) and error.fix else None
            status.update("failed", returncode=rc, ended=now(), reason=_reason(error, rc), fix=fix)
    log.state(str(status.fields.get("state")), returncode=rc)


def run(folder: Path, argv: list[str]) -> int:
    """Run the CLI on ``argv`` for the job in ``folder``; returns its exit status."""
    adopt_inherited()
    log = EventLog(folder)
    StatusFile(folder).update(pid=os.getpid(), pid_start=process_start(os.getpid()), host=this_host())
    log.state("running", pid=os.getpid())
    seen: dict[str, BaseException] = {}
    def failed(e: BaseException) -> None:
        seen["error"] = e
        log.error(e)

    try:
        with cli.progress_listener(log.progress):
            rc = cli.main(argv, on_error=failed)
    except KeyboardInterrupt:
        rc = 130
    except BaseException as e:  # a bug outside the command: the traceback goes to the console
        traceback.print_exc()
        seen.setdefault("error", e)
        rc = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    record_end(folder, rc, seen.get("error"), log)
    return rc


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[1] != "--":
        print("usage: python -m core.jobs.child FOLDER -- <command ...>", file=sys.stderr)
        return 2
    return run(Path(args[0]), args[2:])


if __name__ == "__main__":
    sys.exit(main())
