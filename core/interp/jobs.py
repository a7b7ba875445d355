"""Background transcoder jobs: ``python -m core transcoders train|collect|describe`` as detached
jobs (:mod:`core.jobs`), each in a job folder, so a long job outlives the page that started it.

A job folder (``<runs root>/transcoders/<job id>/``, beside the training runs, which it never
looks like: its marker says ``transcoder-job``, so the Training page and ``python -m core runs``
skip it) holds ``config.json`` (the action, the command line, the model and the set folder it
writes), ``status.json`` (``running``, ``finished``, ``failed`` with a ``reason``, or
``stopped``), ``events.jsonl`` (progress and errors as data) and ``console.txt`` (the command's
own output). The job's own process (:mod:`core.jobs.child`) writes status and events, so how a
job ended is recorded even when no page is watching; a ``running`` job whose process is gone
(killed with -9) reads as ``failed``.

Where a job writes: never into the shipped ``assets/`` (git tracks it; the CLI may, the app does
not). ``train`` writes into the model's own set folder (``transcoder_dir_for``) unless that is in
``assets/``, in which case a new folder under ``<runs root>/transcoder-sets/`` takes its place
(:func:`train_folder`). Writing over a set that is there (``train``) or over a feature store
(``collect`` starts a fresh one, explanations and all) needs ``replace=True``: the page asks first
(:func:`write_check`, :func:`job_argv`).

One writer per set: a job holds the lock of the set folder it writes (:mod:`core.jobs.lock`)
for its whole life, so a second job writing the same set, from this page or any other, is
refused before it starts.

No streamlit here: the page (pages/parts/features_jobs_view.py) draws what these functions return.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ..errors import LabError
from ..files import atomic_write_json, new_numbered_folder, parse_json
from ..jobs import runner
from ..jobs.events import Progress, last_progress
from ..jobs.folder import CONSOLE_FILE, STOP_FILE, StatusFile, StatusUnreadable, mark, marker_kind, now, \
    read_status_file
from ..jobs.lock import FolderLock, acquire
from ..training.data import check_regular
from ..training.runs import runs_root

JOB_KIND = "transcoder-job"
JOBS_DIR = "transcoders"            # under the runs root
SETS_DIR = "transcoder-sets"        # under the runs root: new sets whose model's own folder is in assets/
ACTIONS = ("train", "collect", "describe")
_CHILDREN = runner.ChildrenView(JOB_KIND, key="folder")  # job folder -> Popen of jobs this process started


def jobs_root(root: str | os.PathLike | None = None) -> Path:
    """Where job folders go: ``<runs root>/transcoders`` (``$GPTLAB_RUNS``, default ``runs``)."""
    return (runs_root() if root is None else Path(root)) / JOBS_DIR


def sets_root(root: str | os.PathLike | None = None) -> Path:
    """Where the app puts a new set that may not go to its model's own folder: ``<runs root>/transcoder-sets``."""
    return (runs_root() if root is None else Path(root)) / SETS_DIR


def new_set_folder(model: str, root: str | os.PathLike | None = None) -> Path:
    """A fresh ``<model>-<time>`` folder name under :func:`sets_root` (not created: the job does)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", model).strip("-.")[-60:].lstrip("-.") or "model"
    base = sets_root(root) / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
    folder, n = base, 2
    while folder.exists():
        folder, n = base.with_name(f"{base.name}-{n}"), n + 1
    return folder


def shipped(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` lies in the shipped ``assets/`` folder (git tracks it; the app never writes there)."""
    from ..models.loading import ASSETS

    try:
        return Path(folder).expanduser().resolve().is_relative_to(ASSETS.resolve())
    except (OSError, ValueError):
        return False


def train_folder(typed: str, own: str | os.PathLike, model: str, root: str | os.PathLike | None = None) -> Path:
    """Where a ``train`` job writes: the folder typed, else the model's own set folder ``own``,
    else (``own`` is in the shipped assets/) a new folder under :func:`sets_root`."""
    if typed.strip():
        return Path(typed.strip()).expanduser()
    return Path(own) if not shipped(own) else new_set_folder(model, root)


def _shipped_refusal(action: str, folder: Path, model: str) -> LabError:
    proposal = new_set_folder(model)
    if action == "train":
        return LabError(f"{folder} is in the shipped assets/ folder, which the app never writes (git tracks it); "
                        f"leave the folder empty for a new set under {sets_root()}, or enter a folder there such as "
                        f"{proposal}.", fix={"output": str(proposal)})
    return LabError(f"The set in {folder} is shipped in assets/, which the app never writes (git tracks it); "
                    f"{action} a copy instead: copy the folder to {proposal} and pick it as another folder.",
                    fix={"copy_to": str(proposal)})


def write_check(action: str, folder: str | os.PathLike | None, model: str) -> tuple[str | None, str | None]:
    """What starting ``action`` on ``folder`` would do that the page must not do unasked:
    ``(refusal, replaces)``. ``refusal`` is a sentence when the job would write into the shipped
    assets/; ``replaces`` names what it would write over (``"the transcoder set"`` for ``train``
    on a set, ``"the feature store"`` for ``collect`` on a set with one), to be confirmed first."""
    from .store import store_path
    from .transcoder import is_transcoder_folder

    if folder is None or not str(folder).strip():
        return None, None
    path = Path(str(folder).strip()).expanduser()
    if shipped(path):
        return str(_shipped_refusal(action, path.resolve(), model)), None
    try:
        if action == "train" and is_transcoder_folder(path):
            return None, "the transcoder set"
        if action == "collect" and store_path(path).is_file():
            return None, "the feature store"
    except OSError:  # an unusable path: job_argv says so
        pass
    return None, None


@dataclass
class Job:
    id: str
    path: Path
    action: str
    argv: list[str]            # the arguments after ``python -m core``
    model: str
    output: str | None         # the transcoder set folder the job writes into
    state: str                 # running | finished | failed | stopped | unreadable
    pid: int | None = None
    pid_start: str | None = None   # the process's start time: a pid only counts while it matches
    started: str | None = None
    ended: str | None = None
    reason: str | None = None
    fix: dict | None = None    # a failure's suggested change as data (LabError.fix)
    stop_requested: bool = False

    @property
    def command(self) -> str:
        """The same job as a shell command."""
        return shlex.join(["python", "-m", "core", *self.argv])

    @property
    def running(self) -> bool:
        return self.state == "running"


# -- the command line -----------------------------------------------------------------------------

def short(text: str, limit: int = 300) -> str:
    """Text typed by a user, cut for a message, keeping its end (where a path's file name is)."""
    return text if len(text) <= limit else text[:limit - 21] + "…" + text[-20:]


def usable_path(text: str, what: str) -> Path:
    """``text`` as a path the file system can look up, or LabError saying why not (a name longer than
    the file system allows, a NUL character), instead of an OSError from the first stat."""
    if "\x00" in text:
        raise LabError(f"{what} contains a NUL character; enter a plain path.")
    path = Path(text).expanduser()
    try:
        path.stat()
    except FileNotFoundError:
        pass
    except OSError as e:
        raise LabError(f"{what} '{short(text)}' is not a usable path ({e.strerror or e}); enter another.") from None
    return path


def _dataset(value: str | None) -> str:
    """``shakespeare`` or an existing local file or folder (made absolute: the job runs elsewhere)."""
    value = (value or "").strip()
    if value == "shakespeare":
        return value
    if not value:
        raise LabError("Enter a local .txt/.jsonl file or folder for the corpus, or pick shakespeare.")
    path = usable_path(value, "The corpus path")
    if not path.exists():
        raise LabError(f"Corpus {short(value)} does not exist; enter a local .txt/.jsonl file or folder.")
    check_regular(path, f"Corpus {short(value)}")
    return str(path.resolve())


def _collect_args(v: dict) -> list[str]:
    return ["--collect-tokens", str(int(v["collect_tokens"])), "--collect-seq-len", str(int(v["collect_seq_len"])),
            "--top-k", str(int(v["top_k"])), "--n-quantile", str(int(v["n_quantile"])),
            "--n-heldout", str(int(v["n_heldout"])), "--n-negative", str(int(v["n_negative"]))] + \
        (["--n-hard", str(int(v["n_hard"]))] if v.get("n_hard") is not None else [])  # else the command's default


def _describe_args(v: dict) -> list[str]:
    out = ["--n-top", str(int(v["n_top"]))]
    if v.get("max_features"):
        out += ["--max-features", str(int(v["max_features"]))]
    if not v.get("score", True):
        out.append("--no-score")
    return out


def _check_action(action: str) -> None:
    if action not in ACTIONS:
        raise LabError(f"A transcoder job is one of {', '.join(ACTIONS)} (got '{action}').")


def job_argv(action: str, values: dict, model: str, set_folder: str | os.PathLike | None,
             replace: bool = False) -> tuple[list[str], str]:
    """``(arguments after python -m core, the set folder written)`` for a job the form describes.

    ``values`` holds the form's fields (see pages/parts/features_jobs_view.py); ``set_folder`` is where
    ``train`` writes, or the set ``collect`` and ``describe`` read. Only what can be told without
    loading anything is checked here; the command itself checks the rest and its error becomes the
    job's failure reason. No job writes into the shipped assets/, and one that would write over a
    set (or a feature store) is refused unless ``replace`` (see :func:`write_check`).
    """
    _check_action(action)
    if not set_folder or not str(set_folder).strip():
        raise LabError("Enter the transcoder set folder.")
    folder = usable_path(str(set_folder).strip(), "The transcoder set folder").resolve()
    if folder.is_file():
        raise LabError(f"{folder} is a file; enter a folder for the transcoder set.")
    if shipped(folder):
        raise _shipped_refusal(action, folder, model)
    _, replaces = write_check(action, folder, model)
    if replaces and not replace:
        raise LabError(f"{folder} already holds {replaces}, which this {action} job would replace; confirm that "
                       f"you want it replaced, or pick another folder.", fix={"replace": True})
    argv = ["transcoders", action, "--model", model, "--device", values.get("device") or "cpu",
            "--dtype", values.get("dtype") or "float32"]
    layers = values.get("layers")
    if action == "train":
        argv += ["--output-dir", str(folder), "--expansion", str(int(values["expansion"])),
                 "--activation", values["activation"], "--batch-tokens", str(int(values["batch_tokens"])),
                 "--seq-len", str(int(values["seq_len"])), "--lr", repr(float(values["lr"])),
                 "--dataset", _dataset(values.get("dataset")), "--seed", str(int(values.get("seed") or 0))]
        argv += (["--k", str(int(values["k"]))] if values["activation"] == "topk"
                 else ["--l1-coeff", repr(float(values["l1_coeff"]))])
        argv += (["--steps", str(int(values["steps"]))] if values.get("steps")
                 else ["--train-tokens", str(int(values["train_tokens"]))])
        if layers:
            argv += ["--layers", ",".join(str(int(i)) for i in layers)]
        if values.get("collect", True):
            argv += _collect_args(values)
            argv += _describe_args(values) if values.get("describe", True) else ["--no-describe"]
        else:
            argv.append("--no-collect")
        return argv, str(folder)
    argv += ["--transcoders", str(folder)]
    if layers:
        argv += ["--layers", ",".join(str(int(i)) for i in layers)]
    if action == "collect":
        argv += _collect_args(values) + ["--dataset", _dataset(values.get("dataset")),
                                         "--seed", str(int(values.get("seed") or 0))]
    else:
        explainer = values.get("explainer")
        explainer = "builtin" if explainer is None else str(explainer).strip()  # "" is an LM left unnamed
        if not explainer:
            raise LabError("Enter the explainer: builtin, or a language model's hub id or folder.")
        argv += ["--explainer", explainer, "--explainer-device", values.get("explainer_device") or "cpu"]
        argv += _describe_args(values)
    return argv, str(folder)


# -- launching ------------------------------------------------------------------------------------

def new_job_folder(action: str, root: Path) -> Path:
    """A fresh ``<time>-<action>`` folder under ``root``, created here so two jobs never share one."""
    return new_numbered_folder(root, f"{datetime.now():%Y%m%d-%H%M%S}-{action}", "job",
                               "delete old jobs there").resolve()


def lock_set(out: Path, action: str) -> FolderLock | None:
    """Take the set folder's writer lock (``train`` creates the folder; ``collect`` and
    ``describe`` need an existing set, so a missing one is left to the command to report)."""
    if action != "train" and not out.is_dir():
        return None
    return acquire(out, "Transcoder set", "wait for the job writing it to finish or stop it first.")


def launch(action: str, argv: list[str], model: str, output: str | os.PathLike | None,
           root: str | os.PathLike | None = None) -> Job:
    """Start ``python -m core *argv`` in a new job folder and return at once.

    Refused while another job is writing to the same set folder (two writers would interleave
    their files): a job this page knows of is named; any other writer is found by the set's lock.
    """
    _check_action(action)
    out = Path(output).expanduser().resolve() if output else None
    if out is not None:
        busy = [j for j in list_jobs(root) if j.running and j.output == str(out)]
        if busy:
            raise LabError(f"Job {busy[0].id} is still writing to {out}; wait for it to finish or stop it first.")
    lock = lock_set(out, action) if out is not None else None
    try:
        folder = new_job_folder(action, jobs_root(root))
        mark(folder, JOB_KIND)
        atomic_write_json(folder / "config.json", {"kind": "transcoders", "action": action, "argv": list(argv),
                                                   "model": model, "output": None if out is None else str(out),
                                                   "created": now()})
        StatusFile(folder).update("running", pid=None, started=now())
        runner.start(folder, argv, kind=JOB_KIND, locks=[lock] if lock is not None else [])
    finally:
        if lock is not None:
            lock.release()  # a no-op once handed to the job's process
    return read_job(folder)


# -- reading --------------------------------------------------------------------------------------

def is_job_folder(folder: Path, root: str | os.PathLike | None = None) -> bool:
    """A job folder: marked as one, or (made before the marker) a folder of the jobs root whose
    config.json says ``"kind": "transcoders"``. Links never are."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    if marker_kind(folder) == JOB_KIND:
        return True
    if folder.resolve().parent != jobs_root(root).resolve():
        return False
    try:
        cfg = parse_json((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and cfg.get("kind") == "transcoders"


def _config(folder: Path) -> dict:
    try:
        cfg = parse_json((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise LabError(f"{folder} is not a transcoder job folder (no readable config.json).") from None
    if not isinstance(cfg, dict):
        raise LabError(f"{folder} is not a transcoder job folder (its config.json is not an object).")
    return cfg


def _status(folder: Path) -> dict:
    """status.json as it really is; a broken one reads as ``unreadable`` with the reason."""
    try:
        st = read_status_file(folder)
    except FileNotFoundError:
        st = {"state": "running"}  # its launcher is writing it: the liveness check below decides
    except StatusUnreadable as e:
        return {"state": "unreadable", "reason": str(e)}
    live = runner.live_status(folder, st)
    if live.get("lost"):
        pid = f" (pid {live['pid']})" if live.get("pid") else ""
        reason = "on request" if live["state"] == "stopped" else \
            f"The job process{pid} ended without reporting; see its log."
        live = {**live, "reason": live.get("reason") or reason}
    return live


def read_job(folder: str | os.PathLike) -> Job:
    folder = Path(folder)
    cfg = _config(folder)
    st = _status(folder)

    def text(v) -> str | None:
        return v if isinstance(v, str) else None

    argv = cfg.get("argv")
    return Job(id=folder.name, path=folder, action=text(cfg.get("action")) or "?",
               argv=[str(a) for a in argv] if isinstance(argv, list) else [], model=text(cfg.get("model")) or "",
               output=text(cfg.get("output")), state=st.get("state", "running"), pid=st.get("pid"),
               pid_start=text(st.get("pid_start")), started=text(st.get("started")), ended=text(st.get("ended")), reason=text(st.get("reason")),
               fix=st.get("fix") if isinstance(st.get("fix"), dict) else None,
               stop_requested=(folder / STOP_FILE).exists())


def list_jobs(root: str | os.PathLike | None = None) -> list[Job]:
    """Every job under the jobs folder, newest first."""
    jobs = jobs_root(root)
    if not jobs.is_dir():
        return []
    out = []
    for d in jobs.iterdir():
        if is_job_folder(d, root):
            try:
                out.append(read_job(d))
            except LabError:
                continue
    return sorted(out, key=lambda j: j.id, reverse=True)


def console_lines(job: Job | Path, n: int = 30) -> list[str]:
    """The last ``n`` lines of the job's output for a person to read (a progress bar redrawn with
    carriage returns shows at its latest state)."""
    path = (job.path if isinstance(job, Job) else Path(job)) / CONSOLE_FILE
    if not path.is_file():
        return []
    with open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - 64 * 1024))
        text = fh.read().decode("utf-8", errors="replace")
    lines = [line.rsplit("\r", 1)[-1] if line.rsplit("\r", 1)[-1].strip() else line.replace("\r", " ").strip()
             for line in text.split("\n")]
    return [ln.rstrip() for ln in lines if ln.strip()][-n:]


def progress(job: Job | Path) -> Progress | None:
    """The job's latest progress, from its events file (None before its first report)."""
    return last_progress(job.path if isinstance(job, Job) else Path(job))


# -- stopping -------------------------------------------------------------------------------------

def stop(job: Job, force: bool = False) -> Job:
    """Ask a running job to stop (Ctrl-C: a training run saves what it has learnt, a describe run
    keeps the explanations written so far); ``force`` kills it at once."""
    job = read_job(job.path)
    if not job.running:
        raise LabError(f"Job {job.id} is not running (it is {job.state}); nothing to stop.")
    runner.stop(job.path, job.pid, job.pid_start, sig=signal.SIGINT, group=True, force=force)
    if force:
        StatusFile(job.path).update("stopped", reason="killed on request.", ended=now())
    return read_job(job.path)
