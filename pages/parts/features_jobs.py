"""Background transcoder jobs for the Features page: ``python -m core transcoders train|collect|describe``
run as detached processes, each in a job folder, so a long job outlives the page that started it.

A job folder (``<runs root>/transcoders/<job id>/``, beside the training runs, which it never
looks like: the Training page and ``python -m core runs`` skip it) holds ``config.json`` (the
action, the command line, the model and the set folder it writes), ``status.json`` (``running``,
``finished``, ``failed`` with a ``reason``, or ``stopped``) and ``console.txt`` (the command's own
output, progress bars included). Status is written by a small runner around the CLI (this file
run as a script), so the exit status is recorded even when no page is watching; a ``running``
job whose process is gone (killed with -9) reads as ``failed``.

No streamlit here: the page (pages/parts/features_jobs_view.py) draws what these functions return.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from core.errors import LabError
from core.files import atomic_write_json
from core.training.runs import STOP_FILE, RunFiles, now, process_alive, process_start, runs_root

ROOT = Path(__file__).resolve().parents[2]
JOBS_DIR = "transcoders"            # under the runs root
ACTIONS = ("train", "collect", "describe")
CONSOLE = "console.txt"
START_GRACE_S = 60.0                # a job whose runner has not reported its pid after this long is failed
_CHILDREN: dict[str, subprocess.Popen] = {}   # job folder -> the process this server started
# A tqdm bar ("train:  45%|####    | 9/20 [...]") or core.commands.cli's plain bar ("train |###---| 9/20").
_BAR = re.compile(r"(?P<desc>[^\r\n|]*?)(?::\s*\d+%)?\s*\|[^|\r\n]*\|\s*(?P<n>\d+)/(?P<total>\d+)")


def jobs_root(root: str | os.PathLike | None = None) -> Path:
    """Where job folders go: ``<runs root>/transcoders`` (``$GPTLAB_RUNS``, default ``runs``)."""
    return (runs_root() if root is None else Path(root)) / JOBS_DIR


@dataclass
class Progress:
    stage: str          # the bar's label: train, collect, describe (builtin), ...
    done: int
    total: int

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0


@dataclass
class Job:
    id: str
    path: Path
    action: str
    argv: list[str]            # the arguments after ``python -m core``
    model: str
    output: str | None         # the transcoder set folder the job writes into
    state: str                 # running | finished | failed | stopped
    pid: int | None = None
    started: str | None = None
    ended: str | None = None
    reason: str | None = None
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
    """Text typed by a user, cut for a message (a 20,000-character path is not worth echoing)."""
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
    return str(path.resolve())


def _collect_args(v: dict) -> list[str]:
    return ["--collect-tokens", str(int(v["collect_tokens"])), "--collect-seq-len", str(int(v["collect_seq_len"])),
            "--top-k", str(int(v["top_k"])), "--n-quantile", str(int(v["n_quantile"])),
            "--n-heldout", str(int(v["n_heldout"])), "--n-negative", str(int(v["n_negative"]))]


def _describe_args(v: dict) -> list[str]:
    out = ["--n-top", str(int(v["n_top"]))]
    if v.get("max_features"):
        out += ["--max-features", str(int(v["max_features"]))]
    if not v.get("score", True):
        out.append("--no-score")
    return out


def job_argv(action: str, values: dict, model: str, set_folder: str | os.PathLike | None) -> tuple[list[str], str]:
    """``(arguments after python -m core, the set folder written)`` for a job the form describes.

    ``values`` holds the form's fields (see pages/parts/features_jobs_view.py); ``set_folder`` is where
    ``train`` writes, or the set ``collect`` and ``describe`` read. Only what can be told without
    loading anything is checked here; the command itself checks the rest and its error becomes the
    job's failure reason.
    """
    if action not in ACTIONS:
        raise LabError(f"A transcoder job is one of {', '.join(ACTIONS)} (got '{action}').")
    if not set_folder or not str(set_folder).strip():
        raise LabError("Enter the transcoder set folder.")
    folder = usable_path(str(set_folder).strip(), "The transcoder set folder").resolve()
    if folder.is_file():
        raise LabError(f"{folder} is a file; enter a folder for the transcoder set.")
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

def new_job_id(action: str, root: Path) -> str:
    base = f"{datetime.now():%Y%m%d-%H%M%S}-{action}"
    job_id, n = base, 1
    while (root / job_id).exists():
        n += 1
        job_id = f"{base}-{n}"
    return job_id


def launch(action: str, argv: list[str], model: str, output: str | os.PathLike | None,
           root: str | os.PathLike | None = None) -> Job:
    """Start ``python -m core *argv`` in a new job folder and return at once.

    Refused while another job is writing to the same set folder (two writers would interleave
    their files).
    """
    if action not in ACTIONS:
        raise LabError(f"A transcoder job is one of {', '.join(ACTIONS)} (got '{action}').")
    out = str(Path(output).expanduser().resolve()) if output else None
    jobs = jobs_root(root)
    if out is not None:
        busy = [j for j in list_jobs(root) if j.running and j.output == out]
        if busy:
            raise LabError(f"Job {busy[0].id} is still writing to {out}; wait for it to finish or stop it first.")
    jobs.mkdir(parents=True, exist_ok=True)
    folder = (jobs / new_job_id(action, jobs)).resolve()
    folder.mkdir()
    atomic_write_json(folder / "config.json", {"kind": "transcoders", "action": action, "argv": list(argv),
                                               "model": model, "output": out, "created": now()})
    files = RunFiles(folder)
    files.status("running", pid=None, started=now())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), str(folder), *argv]
    try:
        with open(folder / CONSOLE, "ab") as console:
            proc = subprocess.Popen(cmd, cwd=str(ROOT), stdout=console, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, env=env)
    except OSError as e:
        files.status("failed", reason=f"Could not start the job process ({e}).", ended=now())
        raise LabError(f"Could not start the job process ({e}); check that Python can run here.") from None
    _CHILDREN[str(folder)] = proc
    return read_job(folder)


# -- reading --------------------------------------------------------------------------------------

def _alive(folder: Path, pid: int | None, pid_start: str | None) -> bool | None:
    """Whether the job's process lives; None when that cannot be told yet (no pid reported)."""
    child = _CHILDREN.get(str(folder))
    if child is not None and child.poll() is None:
        return True
    if pid is None:
        return False if child is not None else None
    return process_alive(int(pid), pid_start)


def read_job(folder: str | os.PathLike) -> Job:
    folder = Path(folder)
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise LabError(f"{folder} is not a transcoder job folder (no readable config.json).") from None
    try:
        st = json.loads((folder / "status.json").read_text())
    except (OSError, json.JSONDecodeError):
        st = {"state": "running"}  # being written: the next read sees it
    state, reason = st.get("state", "running"), st.get("reason")
    if state == "running" and st.get("host", socket.gethostname()) == socket.gethostname():
        alive = _alive(folder, st.get("pid"), st.get("pid_start"))
        if alive is None:
            started = (folder / "status.json").stat().st_mtime if (folder / "status.json").exists() else 0.0
            alive = time.time() - started < START_GRACE_S
        if not alive:
            state = "stopped" if (folder / STOP_FILE).exists() else "failed"
            reason = reason or ("on request" if state == "stopped" else
                                f"The job process{' (pid ' + str(st['pid']) + ')' if st.get('pid') else ''} "
                                f"ended without reporting; see its log.")
    return Job(id=folder.name, path=folder, action=cfg.get("action", "?"), argv=list(cfg.get("argv", [])),
               model=cfg.get("model", ""), output=cfg.get("output"), state=state, pid=st.get("pid"),
               started=st.get("started"), ended=st.get("ended"), reason=reason,
               stop_requested=(folder / STOP_FILE).exists())


def list_jobs(root: str | os.PathLike | None = None) -> list[Job]:
    """Every job under the jobs folder, newest first."""
    jobs = jobs_root(root)
    if not jobs.is_dir():
        return []
    out = []
    for d in jobs.iterdir():
        if d.is_dir() and (d / "config.json").is_file():
            try:
                out.append(read_job(d))
            except LabError:
                continue
    return sorted(out, key=lambda j: j.id, reverse=True)


def console_lines(job: Job | Path, n: int = 30) -> list[str]:
    """The last ``n`` lines of the job's output, each progress bar shown at its latest state."""
    path = (job.path if isinstance(job, Job) else Path(job)) / CONSOLE
    if not path.is_file():
        return []
    with open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - 64 * 1024))
        text = fh.read().decode("utf-8", errors="replace")
    lines = [line.rsplit("\r", 1)[-1] if line.rsplit("\r", 1)[-1].strip() else line.replace("\r", " ").strip()
             for line in text.split("\n")]
    return [ln.rstrip() for ln in lines if ln.strip()][-n:]


def progress(job: Job | Path) -> Progress | None:
    """The latest state of the job's progress bar, read from its output."""
    path = (job.path if isinstance(job, Job) else Path(job)) / CONSOLE
    if not path.is_file():
        return None
    with open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - 16 * 1024))
        text = fh.read().decode("utf-8", errors="replace")
    last = None
    for m in _BAR.finditer(text):
        last = m
    if last is None:
        return None
    return Progress(stage=last["desc"].strip() or "progress", done=int(last["n"]), total=int(last["total"]))


# -- stopping -------------------------------------------------------------------------------------

def stop(job: Job, force: bool = False) -> Job:
    """Ask a running job to stop (Ctrl-C: a training run saves what it has learnt, a describe run
    keeps the explanations written so far); ``force`` kills it at once."""
    job = read_job(job.path)
    if not job.running:
        raise LabError(f"Job {job.id} is not running (it is {job.state}); nothing to stop.")
    (job.path / STOP_FILE).touch()
    child = _CHILDREN.get(str(job.path))
    pid = job.pid or (child.pid if child is not None else None)
    if pid:
        try:
            os.killpg(int(pid), signal.SIGKILL if force else signal.SIGINT)  # its own session: the group is the job
        except (ProcessLookupError, PermissionError):
            pass
    if force:
        if child is not None:
            child.wait(timeout=10)
        RunFiles(job.path).status("stopped", reason="killed on request.", ended=now())
    return read_job(job.path)


# -- the runner (this file as a script, in the job's own process) ---------------------------------

def _last_error(folder: Path) -> str | None:
    lines = console_lines(folder, 200)
    errors = [ln[len("error:"):].strip() for ln in lines if ln.startswith("error:")]
    if errors:
        return errors[-1]
    tb = [ln for ln in lines if re.match(r"^\w+(Error|Exception)\b", ln)]
    return tb[-1] if tb else None


def run_job(folder: Path, argv: list[str]) -> int:
    """Run the CLI in this process and record how it ended in status.json."""
    files = RunFiles(folder)
    files.status("running", pid=os.getpid(), pid_start=process_start(os.getpid()), host=socket.gethostname())
    try:
        from core.commands.cli import main

        rc = main(argv)
    except KeyboardInterrupt:
        rc = 130
    except BaseException:  # a bug: the traceback goes to the console, the status says failed
        import traceback

        traceback.print_exc()
        rc = 1
    sys.stdout.flush()
    sys.stderr.flush()
    if rc == 0:
        files.status("finished", returncode=rc, ended=now(), reason=None)
    elif rc == 130 or (folder / STOP_FILE).exists():
        files.status("stopped", returncode=rc, ended=now(),
                     reason="on request (Ctrl-C); what it had done is kept (a training job saves its set).")
    else:
        files.status("failed", returncode=rc, ended=now(),
                     reason=_last_error(folder) or f"The command ended with exit status {rc}; see its log.")
    return rc


if __name__ == "__main__":
    here = Path(__file__).resolve().parent  # run as a script: pages/ must not shadow modules of the same name
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.exit(run_job(Path(sys.argv[1]), sys.argv[2:]))
