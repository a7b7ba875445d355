"""Run folders and the processes that fill them.

A run is a folder (DESIGN.md): ``config.json``, ``status.json``, ``metrics.jsonl``,
``log.txt``, ``checkpoints/<step>/``, plus ``previews.jsonl`` (sample texts), ``console.txt``
(the process's own stdout/stderr), ``events.jsonl`` (progress and errors as data), the marker
``.gptlab-job`` and the writer's lock ``.writer.lock`` (see :mod:`core.jobs`). Runs started here
are detached jobs (:mod:`core.jobs.runner`), so they outlive the page or shell that launched them;
anything that can read the folder (the app, ``python -m core runs``) sees the same state.

``status.json`` says ``running``, ``finished``, ``failed`` (with ``reason`` and ``last_log``)
or ``stopped``. A ``running`` status whose process is gone (killed with -9, machine reboot) is
reported as ``failed`` when read, so a dead run never looks alive. A status.json that is not
what GPT Lab writes (a hand edit, a broken disk) makes that run ``unreadable``, never the list.

What counts as a run. Only a folder the runs machinery made: it writes the marker
(:data:`core.jobs.folder.MARKER_FILE`, kind :data:`RUN_KIND`) when it creates a run, and every
command that resumes, stops or deletes checks it, so ``runs delete assets/default`` (a model
folder with a config.json) is refused instead of deleting the shipped model. Runs made before
the marker existed are *adopted* when they sit directly in the runs root and have the run
layout (config.json, status.json, and metrics.jsonl or log.txt); a folder elsewhere needs the
marker. Deleting is further limited to folders directly inside the runs root (``--root``), so
nothing outside it is ever removed. A symbolic link is never taken for a run folder: following
it would resume or delete whatever it points at.

One writer per run: the process training a run holds its lock (:mod:`core.jobs.lock`) for its
whole life, so a second ``train --resume`` of the same run is refused (exit 2) instead of
interleaving metrics.jsonl; a launcher takes the lock before it writes and hands it to the run.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from ..errors import LabError, first_line, shorten
from ..files import atomic_write_json, atomic_write_text, check_output_place, link_out_of, parse_json
from ..jobs import runner
from ..jobs.events import EventLog, Progress, json_objects, last_progress
from ..jobs.folder import (COUNT, MARKER_FILE, STATES, STATUS_FILE, STOP_FILE, StatusFile,  # noqa: F401
                           StatusUnreadable, mark, marker_kind, now, read_status_file)
from ..jobs.lock import FolderLock, acquire
from ..jobs.process import process_alive, process_start  # noqa: F401  (long imported from here)
from .config import TrainConfig

ROOT = runner.ROOT
RUN_KIND = "training-run"
UPLOADS_DIR = "data"          # under the runs root: uploaded training text sits beside the runs using it
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # used with fullmatch
LEGACY_LOGS = ("metrics.jsonl", "log.txt")   # with config.json and status.json: a run from before the marker
MODEL_FILES = ("model.safetensors", "pytorch_model.bin", "trainer_state.pt")
_CHILDREN = runner.ChildrenView(RUN_KIND, key="pid")  # pid -> Popen of runs this process started (tests' clean-up)
_STATUS_FIELDS: dict[str, tuple[type, ...]] = {
    "step": COUNT, "max_steps": COUNT, "tokens": COUNT, "world_size": COUNT, "train_loss": (int, float),
    "val_loss": (int, float), "last_log": (list,), "checkpoint": (str,), "distributed": (bool,),
    "objective": (str,),
}


def runs_root() -> Path:
    return Path(os.environ.get("GPTLAB_RUNS", "runs"))


def check_run_id(run_id: str) -> str:
    """A run name is one path component of letters, digits, '.', '_' or '-' (no '..', no slash)."""
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id) or ".." in run_id:
        raise LabError(f"Run name '{run_id}' is not allowed; use letters, digits, '.', '_' and '-' only "
                       f"(up to 100 characters, starting with a letter or digit).")
    if run_id == UPLOADS_DIR:
        raise LabError(f"Run name '{run_id}' is taken by the folder of uploaded datasets; pick another name.")
    return run_id


def new_run_id(cfg: TrainConfig, root: Path | None = None) -> str:
    """A fresh name ``<time>-<objective>-<model>`` under ``root``, whose (empty) folder this creates,
    so two runs started in the same second never share one."""
    root = runs_root() if root is None else Path(root)
    model = cfg.preset or (f"L{cfg.n_layer}-d{cfg.d_model}" if cfg.n_layer and cfg.d_model else "tiny")
    base = f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.objective}-{model}"
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        run_id = check_run_id(base if n == 1 else f"{base}-{n}")
        try:
            (root / run_id).mkdir()
        except FileExistsError:
            continue
        return run_id
    raise LabError(f"Could not find a free run name under {root}; pick one with --run-name.")


# -- which folders are runs -----------------------------------------------------------------------

def _inside(p: Path, root: Path) -> bool:
    """``p`` sits directly in ``root`` (both resolved, so ``root/../x`` is not inside)."""
    try:
        return p.resolve().parent == root.resolve()
    except OSError:
        return False


def is_marked_run(p: Path) -> bool:
    return marker_kind(p) == RUN_KIND


def adoptable(p: Path, root: Path) -> bool:
    """A run from before the marker: directly in ``root`` with the run layout."""
    return (_inside(p, root) and (p / "config.json").is_file() and (p / STATUS_FILE).is_file()
            and any((p / name).is_file() for name in LEGACY_LOGS))


def is_run(p: Path, root: Path | None = None) -> bool:
    """Whether ``p`` is a run folder (marked, or adopted in ``root``); links never are."""
    root = runs_root() if root is None else Path(root)
    return not p.is_symlink() and p.is_dir() and (is_marked_run(p) or adoptable(p, root))


def link_refusal(p: Path) -> str | None:
    """Why the run folder ``p`` must not be read or written (one of its files is a link leading out of
    it: a log.txt pointing at /etc/shadow would be shown by ``runs status``, a metrics.jsonl
    pointing elsewhere appended to by a resumed run), or None."""
    try:
        found = link_out_of(p)
    except OSError as e:
        return f"{p} cannot be read ({e.strerror or e}); check its permissions."
    if found is None:
        return None
    entry, target = found
    return (f"{entry} is a link to {shorten(str(target), 80)}, outside the run folder; GPT Lab reads and writes a "
            f"run only inside its folder, so replace the link with the file itself (or delete the run).")


def check_links(p: Path) -> Path:
    """``p`` when no file of the run folder links out of it, else LabError (see :func:`link_refusal`)."""
    reason = link_refusal(p)
    if reason:
        raise LabError(reason)
    return p


def _symlink_refusal(p: Path) -> LabError:
    return LabError(f"{p} is a symbolic link; GPT Lab does not follow links to run folders, so use the run folder "
                    f"itself (or move it into the runs folder) instead of the link.")


def run_path(run: str | os.PathLike, root: Path | None = None) -> Path:
    """A run by name (under ``root``) or by folder path; the folder must be a run (see the module
    docstring: marked, or adopted in the runs root; never a symbolic link)."""
    root = runs_root() if root is None else Path(root)
    if isinstance(run, os.PathLike) or "/" in str(run) or os.sep in str(run):
        p = Path(run).expanduser()  # an explicit folder (e.g. an --output-dir anywhere)
    else:
        p = root / check_run_id(str(run))  # a name never leaves root
    if p.is_symlink():
        raise _symlink_refusal(p)
    if not p.is_dir():
        raise LabError(f"No training run at {p}; see `python -m core runs list` for the runs there are.")
    if not is_run(p, root):
        raise LabError(f"{p} is not a training run GPT Lab made (it has no {MARKER_FILE} marker); pass a run "
                       f"from `python -m core runs list`, or move an older run folder into the runs folder {root}.")
    return p


def check_output_folder(folder: str | os.PathLike) -> None:
    """Refuse to start a fresh run in ``folder`` unless it is missing, holds nothing of a model or
    a run, or is the folder a launcher prepared for this run (marked, nothing trained yet):
    training writes config.json and checkpoints there, which would break what is already in it."""
    p = Path(folder).expanduser()
    if p.is_symlink():
        raise _symlink_refusal(p)
    if p.exists() and not p.is_dir():
        raise LabError(f"--output-dir {p} is a file; pick an empty folder for the run.")
    check_output_place(p, "--output-dir")  # a name the file system takes, in a place that can be written
    if not p.exists():
        return
    if any((p / name).exists() for name in MODEL_FILES):
        raise LabError(f"{p} holds a model or a checkpoint; training would overwrite its config.json, so pick an "
                       f"empty folder for --output-dir (or continue a run with --resume RUN_DIR).")
    steps = checkpoint_steps(p)
    metrics = p / "metrics.jsonl"
    if steps or (metrics.is_file() and metrics.stat().st_size > 0):
        what = f"checkpoints up to step {steps[-1]}" if steps else "logged training steps"
        raise LabError(f"{p} already holds a training run ({what}); continue it with --resume {p}, or pick another "
                       f"--output-dir (or delete that folder) to start over.")
    kind = marker_kind(p)
    if kind is not None and kind != RUN_KIND:
        raise LabError(f"{p} is the folder of a {kind}, not of a training run; pick an empty folder for --output-dir.")
    if kind is None and any((p / name).exists() for name in ("config.json", STATUS_FILE, "checkpoints")):
        raise LabError(f"{p} holds a model or another run's files (config.json); pick an empty folder for "
                       f"--output-dir (or continue a run with --resume RUN_DIR).")
    others = sorted(e.name for e in p.iterdir() if not e.name.startswith("."))  # hidden: locks, markers being written
    if kind is None and others:  # files of something else: a run folder is deleted whole, so it starts empty
        raise LabError(f"--output-dir {p} is not empty ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); "
                       f"a run's folder holds only the run, so pick an empty or new folder.")


def is_new_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is missing or empty (hidden entries aside): a run started there is this
    command's own from the first file, so :func:`discard_unstarted` may remove it again."""
    p = Path(folder)
    if p.is_symlink():
        return False
    try:
        return not p.exists() or not any(not e.name.startswith(".") for e in p.iterdir())
    except OSError:
        return False


def discard_unstarted(folder: str | os.PathLike) -> bool:
    """Remove the folder of a run that ended before its first step (its dataset missing, offline or
    too small, a model that cannot be built): it holds nothing but the settings and the failure,
    which the command has just printed, and left behind it would be listed as a run that never ran.
    Only a marked run at step 0 with no metrics and no checkpoint is removed; returns whether it was."""
    p = Path(folder)
    if p.is_symlink() or not p.is_dir() or not is_marked_run(p) or checkpoint_steps(p):
        return False
    try:
        step = read_status_file(p, _STATUS_FIELDS).get("step") or 0
    except (OSError, StatusUnreadable):
        return False
    metrics = p / "metrics.jsonl"
    if step != 0 or (metrics.is_file() and metrics.stat().st_size > 0):
        return False
    shutil.rmtree(p, ignore_errors=True)
    return not p.exists()


def lock_run(folder: str | os.PathLike) -> FolderLock:
    """This process becomes the run's one writer, or LabError (exit 2) saying who is."""
    return acquire(folder, "Run", "wait for it to end or stop it (`python -m core runs stop RUN`), then try again.")


# -- writing (the trainer's side) ---------------------------------------------------------------

class RunFiles:
    """Writes one run folder; ``enabled=False`` (DDP ranks other than 0) writes nothing.
    Creating one marks the folder as a run."""

    def __init__(self, folder: Path, enabled: bool = True):
        self.folder = Path(folder)
        self.enabled = enabled
        if enabled:
            self.folder.mkdir(parents=True, exist_ok=True)
            mark(self.folder, RUN_KIND)
        self._status = StatusFile(self.folder, enabled)
        self.events = EventLog(self.folder, enabled)

    def write_config(self, cfg: TrainConfig) -> None:
        if self.enabled:
            atomic_write_json(self.folder / "config.json", cfg.to_dict())

    def status(self, state: str | None = None, *, force: bool = True, **fields) -> None:
        """Merge ``fields`` into status.json; ``force=False`` writes at most once a second."""
        self._status.update(state, force=force, **fields)

    @property
    def fields(self) -> dict:
        return self._status.fields

    def metric(self, record: dict) -> None:
        self._append("metrics.jsonl", json.dumps(record))

    def preview(self, record: dict) -> None:
        self._append("previews.jsonl", json.dumps(record))

    def log(self, line: str) -> None:
        for part in str(line).splitlines() or [""]:
            self._append("log.txt", f"{datetime.now():%Y-%m-%d %H:%M:%S} {part}")

    def _append(self, name: str, line: str) -> None:
        if self.enabled:
            try:  # O_NOFOLLOW: a line meant for the run never lands in a file a link points at
                fd = os.open(self.folder / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise LabError(f"{self.folder / name} is a symbolic link; GPT Lab writes a run only inside its "
                                   f"folder, so replace the link with a file.") from None
                raise
            with open(fd, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop metric and preview lines past ``step`` (a resumed run rewrites them)."""
        if not self.enabled:
            return
        for name in ("metrics.jsonl", "previews.jsonl"):
            path = self.folder / name
            if path.is_file():
                keep = [ln for ln in path.read_text(encoding="utf-8").splitlines()
                        if ln.strip() and _line_step(ln) <= step]
                atomic_write_text(path, "".join(ln + "\n" for ln in keep))

    def stop_requested(self) -> bool:
        return (self.folder / STOP_FILE).exists()

    def clear_stop(self) -> None:
        if self.enabled:
            (self.folder / STOP_FILE).unlink(missing_ok=True)


def _line_step(line: str) -> int:
    try:
        return int(parse_json(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 1 << 62


def prepare_run(folder: Path, cfg: TrainConfig) -> RunFiles:
    """Make ``folder`` a run that has not started: marker, config.json, status ``running``
    without a pid (the launcher's process records it)."""
    files = RunFiles(folder)
    files.write_config(cfg)
    files.status("running", pid=None, step=0, started=now())
    return files


# -- reading ------------------------------------------------------------------------------------

@dataclass
class RunInfo:
    id: str
    path: Path
    state: str                 # running | finished | failed | stopped | unreadable
    step: int = 0
    max_steps: int | None = None
    pid: int | None = None
    updated: str | None = None
    reason: str | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    objective: str | None = None
    model: str | None = None
    dataset: str | None = None
    checkpoints: list[int] = field(default_factory=list)
    last_log: list[str] = field(default_factory=list)
    progress: Progress | None = None   # the newest progress event (events.jsonl)

    def to_json(self) -> dict:
        d = {**self.__dict__, "path": str(self.path)}
        d["progress"] = None if self.progress is None else self.progress.__dict__
        return d


def _lost_reason(p: Path, st: dict) -> dict:
    tail = log_tail(p, 15)
    if st["state"] == "stopped":  # stopped before the trainer could answer (e.g. while starting)
        return {**st, "reason": "Stopped before the first checkpoint.", "last_log": tail}
    pid = f" (pid {st['pid']})" if st.get("pid") else ""
    return {**st, "reason": f"The training process{pid} ended without reporting (killed, or the machine went "
                            f"down); see the last log lines, and continue from its last checkpoint with "
                            f"`python -m core train --resume {p}`.", "last_log": tail}


def _status_of(p: Path) -> dict:
    """status.json as it really is (a dead ``running`` process is ``failed``), or ``unknown``
    when there is none yet; raises StatusUnreadable for one GPT Lab did not write."""
    reason = link_refusal(p)
    if reason:
        raise StatusUnreadable(reason)
    try:
        st = read_status_file(p, _STATUS_FIELDS)
    except FileNotFoundError:
        return {"state": "unknown"}
    live = runner.live_status(p, st)
    return _lost_reason(p, live) if live.get("lost") else live


def _status_or_unreadable(p: Path) -> dict:
    try:
        return _status_of(p)
    except StatusUnreadable as e:
        return {"state": "unreadable", "reason": str(e)}


def read_status(run: str | os.PathLike, root: Path | None = None) -> dict:
    """status.json, with a dead ``running`` process reported as ``failed`` and a broken file as
    ``unreadable`` (with the ``reason``)."""
    return _status_or_unreadable(run_path(run, root))


def read_metrics(run: str | os.PathLike, root: Path | None = None, name: str = "metrics.jsonl") -> list[dict]:
    """Every complete line of metrics.jsonl that is a JSON object (a line being written right now
    is skipped)."""
    path = run_path(run, root) / name
    if not path.is_file() or path.is_symlink():  # a link is never followed out of a run folder
        return []
    return list(json_objects(path.read_text(encoding="utf-8", errors="replace").splitlines()))


class MetricsFollower:
    """Reads only the lines appended since the last poll, for live charts that refresh often."""

    def __init__(self, run: str | os.PathLike, root: Path | None = None, name: str = "metrics.jsonl"):
        self.path = run_path(run, root) / name
        self.offset = 0
        self.inode: int | None = None
        self.rows: list[dict] = []

    def poll(self) -> list[dict]:
        """The new complete rows (all rows again if the file was replaced, e.g. by a resume)."""
        if not self.path.is_file() or self.path.is_symlink():
            return []
        st = self.path.stat()
        size = st.st_size
        if size < self.offset or st.st_ino != self.inode:
            self.offset, self.rows, self.inode = 0, [], st.st_ino
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read(size - self.offset)
        end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next poll
        self.offset += end
        new = list(json_objects(chunk[:end].decode("utf-8", errors="replace").splitlines()))
        self.rows += new
        return new


def read_previews(run: str | os.PathLike, root: Path | None = None) -> list[dict]:
    return read_metrics(run, root, "previews.jsonl")


def log_tail(run: str | os.PathLike, n: int = 20) -> list[str]:
    """The last ``n`` lines of log.txt, then of console.txt (tracebacks land there)."""
    p = Path(run)
    lines: list[str] = []
    for name in ("log.txt", "console.txt"):
        f = p / name
        if f.is_file() and not f.is_symlink():  # a link is never followed out of a run folder
            with open(f, "rb") as fh:
                fh.seek(max(0, f.stat().st_size - 64 * 1024))
                text = fh.read().decode("utf-8", errors="replace").replace("\r", "\n")
            lines += [ln for ln in text.splitlines() if ln.strip()][-n:]
    return lines[-n:]


def checkpoint_steps(run: str | os.PathLike) -> list[int]:
    """Steps of the complete checkpoints of a run, oldest first."""
    ck = Path(run) / "checkpoints"
    if not ck.is_dir() or ck.is_symlink():
        return []
    return sorted(int(d.name) for d in ck.iterdir()
                  if d.name.isdigit() and d.is_dir() and (d / "config.json").is_file())


def checkpoint_sets(folder: str | os.PathLike) -> list[Path]:
    """The transcoder sets inside a checkpoint folder: finished ones, and ones a job is still
    writing (it holds the set folder's writer lock). A checkpoint's own set goes to
    ``<checkpoint>/transcoders`` (core.interp.transcoder.transcoder_dir_for); the trainer itself
    writes only files there, so any such folder is someone's later work."""
    from ..interp.transcoder import is_transcoder_folder
    from ..jobs.lock import LOCK_FILE

    try:
        subs = sorted(d for d in Path(folder).iterdir() if d.is_dir() and not d.is_symlink())
    except OSError:
        return []
    return [d for d in subs if is_transcoder_folder(d) or (d / LOCK_FILE).exists()]


def rotation(run: str | os.PathLike, keep_last: int) -> tuple[list[int], list[int]]:
    """Checkpoint rotation (``--keep-last K``): ``(steps to delete, older steps kept because they
    hold a transcoder set)``. The newest K are always kept; an older checkpoint that holds a set is
    kept too, since deleting it would delete the set (delete the set, or the run, to free it)."""
    older = checkpoint_steps(run)[:-int(keep_last)] if int(keep_last) > 0 else checkpoint_steps(run)
    ck = Path(run) / "checkpoints"
    held = [s for s in older if checkpoint_sets(ck / str(s))]
    return [s for s in older if s not in held], held


def sweep_partial_checkpoints(run: str | os.PathLike) -> list[str]:
    """Tidy what a killed save left in ``checkpoints/`` (only the trainer writes there, so it runs
    before training starts); returns the names removed or restored.

    A save writes ``.tmp-<step>-<pid>/`` and renames it to ``<step>/``; re-saving a step first moves
    the old folder to ``.old-<step>-<pid>/``; pruning renames a folder to ``.del-<step>-<pid>/``
    before deleting it. A kill between the renames of a re-save leaves the only copy of that step
    in ``.old-*``, which is put back; every other hidden leftover is deleted, so partial folders
    neither pile up nor pass for checkpoints (``checkpoint_steps`` never lists them).
    """
    ck = Path(run) / "checkpoints"
    if not ck.is_dir() or ck.is_symlink():  # never delete inside a folder a link points at
        return []
    done = []
    for d in sorted(ck.iterdir()):
        if not d.is_dir() or not d.name.startswith((".tmp-", ".old-", ".del-")):
            continue
        step = d.name.split("-")[1]
        if d.name.startswith(".old-") and step.isdigit() and not (ck / step).exists() \
                and (d / "config.json").is_file():
            os.rename(d, ck / step)
            done.append(f"{d.name} -> {step}")
        else:
            shutil.rmtree(d, ignore_errors=True)
            done.append(d.name)
    return done


def _read_config(p: Path) -> dict:
    try:
        cfg = parse_json((p / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise StatusUnreadable(f"{p / 'config.json'} is not valid JSON ({first_line(e)}); delete the run or "
                               f"restore the file.") from None
    if not isinstance(cfg, dict):
        raise StatusUnreadable(f"{p / 'config.json'} holds {type(cfg).__name__} instead of a training config; "
                               f"delete the run or restore the file.")
    return cfg


def _model_label(cfg: dict) -> str | None:
    try:
        sizes = TrainConfig.from_dict(cfg).model_sizes()
        return f"{cfg.get('preset') or 'custom'} ({sizes['n_layer']}L, d{sizes['d_model']})"
    except (LabError, TypeError, ValueError, KeyError):
        preset = cfg.get("preset")
        return preset if isinstance(preset, str) else None


def _text(v) -> str | None:
    return v if isinstance(v, str) else None


def run_info(run: str | os.PathLike, root: Path | None = None) -> RunInfo:
    """One run's state for tables and panels; a run whose files are broken is ``unreadable``
    (with the reason) rather than an exception."""
    p = run_path(run, root)
    try:
        st = _status_of(p)
        cfg = _read_config(p)
    except StatusUnreadable as e:
        return RunInfo(id=p.name, path=p, state="unreadable", reason=str(e), checkpoints=checkpoint_steps(p))
    return RunInfo(id=p.name, path=p, state=st.get("state", "unknown"), step=int(st.get("step") or 0),
                   max_steps=st.get("max_steps"), pid=st.get("pid"), updated=st.get("updated"),
                   reason=st.get("reason"), train_loss=st.get("train_loss"), val_loss=st.get("val_loss"),
                   objective=_text(cfg.get("objective")), model=_model_label(cfg), dataset=_text(cfg.get("dataset")),
                   checkpoints=checkpoint_steps(p), last_log=[str(x) for x in st.get("last_log") or []],
                   progress=last_progress(p) if st.get("state") == "running" else None)


def _mtime(p: Path) -> float:
    try:
        return (p / "config.json").stat().st_mtime
    except OSError:
        return 0.0


def list_runs(root: str | os.PathLike | None = None) -> list[RunInfo]:
    """Every run under ``root`` (default ``runs/`` or $GPTLAB_RUNS), newest first. A run whose
    files are broken is listed as ``unreadable``; a symbolic link that looks like a run is listed
    as unreadable too (saying it is not followed); the rest is listed as usual."""
    root = runs_root() if root is None else Path(root)
    if not root.is_dir():
        return []
    runs = []
    for d in root.iterdir():
        if d.name.startswith("."):
            continue
        if d.is_symlink():
            if d.is_dir() and ((d / STATUS_FILE).exists() or is_marked_run(d)):
                runs.append(RunInfo(id=d.name, path=d, state="unreadable", reason=str(_symlink_refusal(d))))
            continue
        if is_run(d, root):
            runs.append(run_info(d, root))
    return sorted(runs, key=lambda r: 0.0 if r.path.is_symlink() else _mtime(r.path), reverse=True)


# -- processes ----------------------------------------------------------------------------------

def launch(config: TrainConfig, run_id: str | None = None, root: str | os.PathLike | None = None) -> RunInfo:
    """Start ``python -m core train`` for ``config`` in a new run folder and return at once.

    More than one GPU in ``config.devices`` makes the command re-run itself under torchrun.
    """
    config.check()
    root = runs_root() if root is None else Path(root)
    if run_id:
        folder = root / check_run_id(run_id)
        root.mkdir(parents=True, exist_ok=True)
        try:
            folder.mkdir()
        except FileExistsError:
            raise LabError(f"Run '{run_id}' already exists under {root}; pick another name or delete it first.") \
                from None
    else:
        folder = root / new_run_id(config, root)
    folder = folder.resolve()
    lock = lock_run(folder)
    try:
        prepare_run(folder, config)
        runner.start(folder, ["train", "--config", str(folder / "config.json"), "--output-dir", str(folder),
                              "--no-progress"], kind=RUN_KIND, locks=[lock])
    finally:
        lock.release()  # a no-op once handed over to the run's process
    return run_info(folder)


def stop(run: str | os.PathLike, root: Path | None = None, wait: float = 0.0) -> RunInfo:
    """Ask a running run to checkpoint and stop: a STOP file (every rank sees it) plus SIGTERM for a
    single process. ``wait`` seconds: block until it has stopped (or the time is up)."""
    p = run_path(run, root)
    st = _status_or_unreadable(p)
    if st.get("state") != "running":
        raise LabError(f"Run {p.name} is not running (it is {st.get('state')}); nothing to stop.")
    runner.stop(p, st.get("pid"), st.get("pid_start"), sig=signal.SIGTERM, group=False,
                signal_process=not st.get("distributed"))
    deadline = time.monotonic() + wait
    while wait and time.monotonic() < deadline and _status_or_unreadable(p).get("state") == "running":
        time.sleep(0.1)
    runner.reap()
    return run_info(p, root)


def resume(run: str | os.PathLike, root: Path | None = None, max_steps: int | None = None) -> RunInfo:
    """Continue a stopped or failed run from its last checkpoint, in a new process."""
    p = run_path(run, root).resolve()
    st = _status_or_unreadable(p)
    if st.get("state") == "running":
        raise LabError(f"Run {p.name} is still running; stop it before resuming.")
    if st.get("state") == "unreadable":
        raise LabError(f"Run {p.name} cannot be resumed: {st.get('reason')}")
    if st.get("state") == "finished" and max_steps is None:
        raise LabError(f"Run {p.name} has finished; pass a larger max steps to train it further.")
    lock = acquire(p, "Run", "it is still running; stop it before resuming.")
    try:
        files = RunFiles(p)
        files.clear_stop()
        files.status("running", pid=None, reason=None, last_log=[])
        args = ["train", "--resume", str(p), "--no-progress"] + (["--max-steps", str(max_steps)] if max_steps else [])
        runner.start(p, args, kind=RUN_KIND, locks=[lock])
    finally:
        lock.release()
    return run_info(p, root)


def delete(run: str | os.PathLike, root: Path | None = None) -> None:
    """Remove a run folder: only a run (see the module docstring) directly inside the runs root,
    never while a process writes it."""
    root = runs_root() if root is None else Path(root)
    p = run_path(run, root)
    if not _inside(p, root):
        raise LabError(f"{p} is outside the runs folder {root}; GPT Lab deletes only runs inside it, so pass "
                       f"--root {p.parent} or remove the folder yourself.")
    if _status_or_unreadable(p).get("state") == "running":
        raise LabError(f"Run {p.name} is running; stop it before deleting it.")
    with acquire(p, "Run", "stop it before deleting it."):
        shutil.rmtree(p)
