"""Detached jobs: one runner for training runs and transcoder jobs alike.

A job is a folder plus a process: :func:`start` runs ``python -m core <command>`` in its own
session through :mod:`core.jobs.child`, which records the process and how it ended in
``status.json`` and its progress and errors in ``events.jsonl``. :func:`live_status` tells a
running job from one whose process died, :func:`stop` asks it to stop, and every child started
here is reaped as soon as it ends (no ``<defunct>`` processes under a long-lived app server).
One process writes a folder at a time (:mod:`core.jobs.lock`).

Modules: :mod:`.folder` (the folder's files), :mod:`.events` (the events file), :mod:`.lock`
(one writer), :mod:`.process` (pid identity), :mod:`.runner` (start/status/stop/reap),
:mod:`.child` (the job's own process). Torch-free.
"""
from ..lazy import lazy_exports, names

__getattr__, __dir__ = lazy_exports(__name__, {
    **names(".events", "EVENTS_FILE", "EventLog", "Progress", "last_error", "last_progress", "read_events"),
    **names(".folder", "MARKER_FILE", "STATES", "STATUS_FILE", "STOP_FILE", "CONSOLE_FILE", "StatusFile",
            "StatusUnreadable", "mark", "marker_kind", "read_status_file"),
    **names(".lock", "LOCK_FILE", "FolderLock", "acquire", "holder"),
    **names(".process", "process_alive", "process_start"),
    **names(".runner", "children", "live_status", "reap", "start", "stop"),
})
