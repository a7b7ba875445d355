"""Run folders and the processes that fill them.

A run is a folder (DESIGN.md): ``config.json``, ``status.json``, ``metrics.jsonl``,
``log.txt``, ``checkpoints/<step>/``, plus ``previews.jsonl`` (sample texts) and
``console.txt`` (the process's own stdout/stderr). Runs are separate processes started with
``start_new_session=True``, so they outlive the page or shell that launched them; anything that
can read the folder (the app, ``python -m core runs``) sees the same state.

``status.json`` says ``running``, ``finished``, ``failed`` (with ``reason`` and ``last_log``)
or ``stopped``. A ``running`` status whose process is gone (killed with -9, machine reboot) is
reported as ``failed`` when read, so a dead run never looks alive.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..errors import LabError
from ..files import atomic_write_json
from .config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
STATES = ("running", "finished", "failed", "stopped")
STOP_FILE = "STOP"
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # used with fullmatch
_CHILDREN: dict[int, subprocess.Popen] = {}


def runs_root() -> Path:
    return Path(os.environ.get("GPTLAB_RUNS", "runs"))


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_run_id(run_id: str) -> str:
    """A run name is one path component of letters, digits, '.', '_' or '-' (no '..', no slash)."""
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id) or ".." in run_id:
        raise LabError(f"Run name '{run_id}' is not allowed; use letters, digits, '.', '_' and '-' only "
                       f"(up to 100 characters, starting with a letter or digit).")
    from .data import UPLOADS_DIR

    if run_id == UPLOADS_DIR:
        raise LabError(f"Run name '{run_id}' is taken by the folder of uploaded datasets; pick another name.")
    return run_id


def new_run_id(cfg: TrainConfig, root: Path | None = None) -> str:
    root = runs_root() if root is None else Path(root)
    model = cfg.preset or (f"L{cfg.n_layer}-d{cfg.d_model}" if cfg.n_layer and cfg.d_model else "tiny")
    base = f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.objective}-{model}"
    run_id, n = base, 1
    while (root / run_id).exists():
        n += 1
        run_id = f"{base}-{n}"
    return check_run_id(run_id)


def run_path(run: str | os.PathLike, root: Path | None = None) -> Path:
    """A run by name (under ``root``) or by folder path; the folder must hold a run."""
    root = runs_root() if root is None else Path(root)
    if isinstance(run, os.PathLike) or "/" in str(run) or os.sep in str(run):
        p = Path(run)  # an explicit folder (e.g. an --output-dir anywhere)
    else:
        p = root / check_run_id(str(run))  # a name never leaves root
    if not _is_run(p):
        raise LabError(f"No training run at {p}; see `python -m core runs list` for the runs there are.")
    return p


def _is_run(p: Path) -> bool:
    return p.is_dir() and ((p / "status.json").is_file() or (p / "config.json").is_file())


# -- writing (the trainer's side) ---------------------------------------------------------------

class RunFiles:
    """Writes one run folder; ``enabled=False`` (DDP ranks other than 0) writes nothing."""

    def __init__(self, folder: Path, enabled: bool = True):
        self.folder = Path(folder)
        self.enabled = enabled
        self._status: dict = {}
        self._last_status = 0.0
        if enabled:
            self.folder.mkdir(parents=True, exist_ok=True)
            prev = self.folder / "status.json"
            if prev.is_file():
                try:
                    self._status = json.loads(prev.read_text())
                except (json.JSONDecodeError, OSError):
                    self._status = {}

    def write_config(self, cfg: TrainConfig) -> None:
        if self.enabled:
            atomic_write_json(self.folder / "config.json", cfg.to_dict())

    def status(self, state: str | None = None, *, force: bool = True, **fields) -> None:
        """Merge ``fields`` into status.json; ``force=False`` writes at most once a second."""
        if not self.enabled:
            return
        if state is not None:
            self._status["state"] = state
        self._status.update(fields)
        t = time.monotonic()
        if force or t - self._last_status >= 1.0:
            self._status["updated"] = now()
            atomic_write_json(self.folder / "status.json", self._status)
            self._last_status = t

    def metric(self, record: dict) -> None:
        self._append("metrics.jsonl", json.dumps(record))

    def preview(self, record: dict) -> None:
        self._append("previews.jsonl", json.dumps(record))

    def log(self, line: str) -> None:
        for part in str(line).splitlines() or [""]:
            self._append("log.txt", f"{datetime.now():%Y-%m-%d %H:%M:%S} {part}")

    def _append(self, name: str, line: str) -> None:
        if self.enabled:
            with open(self.folder / name, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop metric and preview lines past ``step`` (a resumed run rewrites them)."""
        if not self.enabled:
            return
        from ..files import atomic_write_text

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
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 1 << 62


# -- reading ------------------------------------------------------------------------------------

@dataclass
class RunInfo:
    id: str
    path: Path
    state: str
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

    def to_json(self) -> dict:
        return {**self.__dict__, "path": str(self.path)}


def process_start(pid: int) -> str | None:
    """The process's start time (Linux /proc), which tells a live run from a recycled pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22, counted after "pid (comm)"


def process_alive(pid: int, started: str | None = None) -> bool:
    """Whether process ``pid`` lives and is still the one that started at ``started`` (a pid the
    system gave to a new process since reads as dead)."""
    child = _CHILDREN.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        os.waitpid(pid, os.WNOHANG)  # reaps our own finished child, which would otherwise look alive
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if started is not None:
        now_start = process_start(pid)
        return now_start is None or now_start == started
    return True


def read_status(run: str | os.PathLike, root: Path | None = None) -> dict:
    """status.json, with a dead ``running`` process reported as ``failed``."""
    p = run_path(run, root)
    try:
        st = json.loads((p / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        st = {"state": "unknown"}
    if st.get("state") == "running" and st.get("pid") and st.get("host", socket.gethostname()) == socket.gethostname():
        if not process_alive(int(st["pid"]), st.get("pid_start")):
            tail = log_tail(p, 15)
            if (p / STOP_FILE).exists():  # stopped before the trainer could answer (e.g. while starting)
                return {**st, "state": "stopped", "reason": "Stopped before the first checkpoint.", "last_log": tail}
            st = {**st, "state": "failed", "reason": f"The training process (pid {st['pid']}) ended without "
                                                     f"reporting (killed, or the machine went down); see the last "
                                                     f"log lines, and continue from its last checkpoint with "
                                                     f"`python -m core train --resume {p}`.", "last_log": tail}
    return st


def read_metrics(run: str | os.PathLike, root: Path | None = None, name: str = "metrics.jsonl") -> list[dict]:
    """Every complete line of metrics.jsonl (a line being written right now is skipped)."""
    path = run_path(run, root) / name
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class MetricsFollower:
    """Reads only the lines appended since the last poll, for live charts that refresh often."""

    def __init__(self, run: str | os.PathLike, root: Path | None = None, name: str = "metrics.jsonl"):
        self.path = run_path(run, root) / name
        self.offset = 0
        self.inode: int | None = None
        self.rows: list[dict] = []

    def poll(self) -> list[dict]:
        """The new complete rows (all rows again if the file was replaced, e.g. by a resume)."""
        if not self.path.is_file():
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
        new = []
        for line in chunk[:end].decode("utf-8", errors="replace").splitlines():
            try:
                new.append(json.loads(line))
            except json.JSONDecodeError:
                continue
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
        if f.is_file():
            with open(f, "rb") as fh:
                fh.seek(max(0, f.stat().st_size - 64 * 1024))
                text = fh.read().decode("utf-8", errors="replace").replace("\r", "\n")
            lines += [ln for ln in text.splitlines() if ln.strip()][-n:]
    return lines[-n:]


def checkpoint_steps(run: str | os.PathLike) -> list[int]:
    """Steps of the complete checkpoints of a run, oldest first."""
    ck = Path(run) / "checkpoints"
    if not ck.is_dir():
        return []
    return sorted(int(d.name) for d in ck.iterdir()
                  if d.is_dir() and d.name.isdigit() and (d / "config.json").is_file())


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
    if not ck.is_dir():
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


def run_info(run: str | os.PathLike, root: Path | None = None) -> RunInfo:
    p = run_path(run, root)
    st = read_status(p)
    try:
        cfg = json.loads((p / "config.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        cfg = {}
    try:
        sizes = TrainConfig.from_dict(cfg).model_sizes()
        model = f"{cfg.get('preset') or 'custom'} ({sizes['n_layer']}L, d{sizes['d_model']})"
    except (LabError, TypeError):
        model = cfg.get("preset")
    return RunInfo(id=p.name, path=p, state=st.get("state", "unknown"), step=int(st.get("step") or 0),
                   max_steps=st.get("max_steps"), pid=st.get("pid"), updated=st.get("updated"),
                   reason=st.get("reason"), train_loss=st.get("train_loss"), val_loss=st.get("val_loss"),
                   objective=cfg.get("objective"), model=model, dataset=cfg.get("dataset"),
                   checkpoints=checkpoint_steps(p), last_log=st.get("last_log") or [])


def list_runs(root: str | os.PathLike | None = None) -> list[RunInfo]:
    """Every run under ``root`` (default ``runs/`` or $GPTLAB_RUNS), newest first."""
    root = runs_root() if root is None else Path(root)
    if not root.is_dir():
        return []
    runs = [run_info(d, root) for d in root.iterdir() if not d.name.startswith(".") and _is_run(d)]
    return sorted(runs, key=lambda r: (r.path / "config.json").stat().st_mtime
                  if (r.path / "config.json").exists() else 0.0, reverse=True)


# -- processes ----------------------------------------------------------------------------------

def _spawn(folder: Path, train_args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "core", "train", *train_args, "--no-progress"]
    with open(folder / "console.txt", "ab") as out:
        proc = subprocess.Popen(cmd, cwd=str(ROOT), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env)
    _CHILDREN[proc.pid] = proc
    return proc


def launch(config: TrainConfig, run_id: str | None = None, root: str | os.PathLike | None = None) -> RunInfo:
    """Start ``python -m core train`` for ``config`` in a new run folder and return at once.

    More than one GPU in ``config.devices`` makes the command re-run itself under torchrun.
    """
    config.check()
    root = runs_root() if root is None else Path(root)
    run_id = check_run_id(run_id) if run_id else new_run_id(config, root)
    folder = (root / run_id).resolve()
    if folder.exists():
        raise LabError(f"Run '{run_id}' already exists under {root}; pick another name or delete it first.")
    files = RunFiles(folder)
    files.write_config(config)
    files.status("running", pid=None, step=0, started=now())
    proc = _spawn_or_fail(files, ["--config", str(folder / "config.json"), "--output-dir", str(folder)])
    _claim(folder, proc)
    return run_info(folder)


def _spawn_or_fail(files: RunFiles, args: list[str]) -> subprocess.Popen:
    try:
        return _spawn(files.folder, args)
    except OSError as e:
        files.status("failed", reason=f"Could not start the training process ({e}).")
        raise LabError(f"Could not start the training process ({e}); check that Python can run here.") from None


def _claim(folder: Path, proc: subprocess.Popen) -> None:
    """Record the child's pid unless the child already wrote its own status (it re-reads the file,
    so a fast child's fields are never overwritten with stale ones)."""
    files = RunFiles(folder)
    if files._status.get("pid") != proc.pid:
        files.status(pid=proc.pid, pid_start=process_start(proc.pid), host=socket.gethostname())


def stop(run: str | os.PathLike, root: Path | None = None, wait: float = 0.0) -> RunInfo:
    """Ask a running run to checkpoint and stop: a STOP file (every rank sees it) plus SIGTERM for a
    single process. ``wait`` seconds: block until it has stopped (or the time is up)."""
    p = run_path(run, root)
    st = read_status(p)
    if st.get("state") != "running":
        raise LabError(f"Run {p.name} is not running (it is {st.get('state')}); nothing to stop.")
    (p / STOP_FILE).touch()
    pid = st.get("pid")
    if pid and not st.get("distributed"):
        try:
            os.kill(int(pid), signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait
    while wait and time.monotonic() < deadline and read_status(p).get("state") == "running":
        time.sleep(0.1)
    if pid and int(pid) in _CHILDREN and _CHILDREN[int(pid)].poll() is not None:
        _CHILDREN.pop(int(pid))
    return run_info(p)


def resume(run: str | os.PathLike, root: Path | None = None, max_steps: int | None = None) -> RunInfo:
    """Continue a stopped or failed run from its last checkpoint, in a new process."""
    p = run_path(run, root).resolve()
    st = read_status(p)
    if st.get("state") == "running":
        raise LabError(f"Run {p.name} is still running; stop it before resuming.")
    if st.get("state") == "finished" and max_steps is None:
        raise LabError(f"Run {p.name} has finished; pass a larger max steps to train it further.")
    args = ["--resume", str(p)] + (["--max-steps", str(max_steps)] if max_steps else [])
    files = RunFiles(p)
    files.clear_stop()
    files.status("running", pid=None, reason=None, last_log=[])
    proc = _spawn_or_fail(files, args)
    _claim(p, proc)
    return run_info(p)


def delete(run: str | os.PathLike, root: Path | None = None) -> None:
    """Remove a run folder; refused while the run is running."""
    p = run_path(run, root)
    if read_status(p).get("state") == "running":
        raise LabError(f"Run {p.name} is running; stop it before deleting it.")
    shutil.rmtree(p)
