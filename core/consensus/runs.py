"""Consensus run folders: every run, from the app or the CLI, kept on disk as it goes.

A run lives in ``<runs root>/consensus/<name>/`` (``$GPTLAB_RUNS``, default ``runs``; the name is
``--run-name``, by default the start time ``YYYYmmdd-HHMMSS``), beside the training runs, which it
never looks like: its marker (:data:`core.jobs.folder.MARKER_FILE`) says :data:`RUN_KIND`, so
``python -m core runs`` and the Training page skip it. The folder holds

- ``config.json``: what was run, enough to run it again (``python -m core consensus --config``):
  ``kind`` (``run``, ``decode`` or ``sim``), ``model`` (the spec), ``label``, ``prompts``
  (``{"source": "typed", "texts": [...]}`` or ``{"source": "random", "n": N, "length": L}``),
  ``consensus`` / ``decode`` / ``simulation`` (the settings' fields), ``device``, ``dtype``, ``created``.
- ``status.json``: ``state`` (running, finished, failed, stopped), the process (``pid``,
  ``pid_start``, ``host``), ``started``/``ended``, ``seconds``, ``device``, ``done``/``total``
  (layer-steps, or new tokens when decoding), ``reason`` when it failed or stopped.
- the reference scripts' files (:mod:`core.consensus.files`): ``consensus.npy`` float32 ``[B, P]``,
  ``consensus_hidden.npy`` ``[B, T, D]``, ``consensus_eplot.npy`` ``[B, P-1, 2]`` and, when the
  matrices were recorded, ``consensus_matrix.npy`` ``[B, T, T, P-1]`` (the embeddings' matrices,
  column 0, in ``consensus_matrix0.npy`` ``[B, T, T]``); consensus decoding writes
  ``consensus.npy`` (the texts) and ``consensus_diag.npy`` ``[K*B, P]`` instead.
- what the page reopens a run from: ``steps.npy`` int64 ``[P]`` (the layer-step of each column),
  ``steps_done.npy`` int64 ``[B]``, ``stat_<name>.npy`` float32 ``[B, P]`` for every series of
  :data:`~core.consensus.results.STAT_NAMES`, ``prompts.json`` (each prompt's text),
  ``token_ids.npy`` int64 ``[B, T]`` (-1 after a prompt's end), ``decodings.json`` (logit-lens
  texts by iteration); decoding: ``traces.npy`` float32 ``[B, K, P]`` and ``decoded.json``.
- ``events.jsonl``, ``console.txt`` (a background run's output) and ``.writer.lock`` while it runs
  (:mod:`core.jobs`).

Every file is written atomically, and the arrays again every few seconds while the run goes
(:class:`RunWriter`), so a run that is stopped, fails or is killed keeps what it had computed;
a ``running`` status whose process is gone reads as ``failed``. One process writes a run (its
lock). A run started in the background (:func:`launch`) is ``python -m core consensus --config
RUN/config.json --run-name RUN`` run by the one job runner (:mod:`core.jobs.runner`), so it
outlives the page that started it. Torch-free until a run is started.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import LabError, failure, first_line, shorten
from ..files import (atomic_save_npy, atomic_write_json, check_output_place, link_out_of, new_numbered_folder,
                     parse_json)
from ..jobs import runner
from ..jobs.events import EventLog
from ..jobs.folder import MARKER_FILE, StatusFile, StatusUnreadable, mark, marker_kind, now, \
    read_status_file
from ..jobs.lock import FolderLock, acquire
from ..jobs.process import process_start, this_host
from .config import ConsensusConfig, DecodeConfig, SimulationConfig
from .results import STAT_NAMES, ConsensusDecodeResult, ConsensusResult

RUN_KIND = "consensus-run"      # the marker's kind
RUNS_DIR = "consensus"          # under the runs root
KINDS = ("run", "decode", "sim")
CONFIG_FILE = "config.json"
FORMAT = 1
FLUSH_S = 2.0                   # arrays are rewritten at most this often while a run goes...
FLUSH_SHARE = 10                # ...and at most a tenth of the time (a run with big matrices writes less often)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_STATUS_FIELDS: dict[str, tuple[type, ...]] = {"seconds": (int, float), "device": (str,), "done": (int,),
                                               "total": (int,)}
_CHILDREN = runner.ChildrenView(RUN_KIND, key="folder")  # background runs this process started (tests' clean-up)


def consensus_root(root: str | os.PathLike | None = None) -> Path:
    """``<runs root>/consensus``; ``root`` is the runs root (default ``$GPTLAB_RUNS`` or ``runs``)."""
    from ..training.runs import runs_root

    return (runs_root() if root is None else Path(root)) / RUNS_DIR


def check_name(name: str) -> str:
    """A run name is one path component of letters, digits, '.', '_' or '-'."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
        raise LabError(f"Run name '{shorten(str(name), 60)}' is not allowed; use letters, digits, '.', '_' and '-' "
                       f"only (up to 100 characters, starting with a letter or digit).")
    return name


def run_folder(run: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """A run by name (under :func:`consensus_root`) or by folder path (a name with a slash)."""
    text = str(run)
    if isinstance(run, os.PathLike) or "/" in text or os.sep in text:
        return Path(text).expanduser()
    return consensus_root(root) / check_name(text)


def is_run(folder: Path) -> bool:
    """Whether ``folder`` is a consensus run folder GPT Lab made (marked; never a link)."""
    return not folder.is_symlink() and folder.is_dir() and marker_kind(folder) == RUN_KIND


def _new_folder(root: Path) -> Path:
    """A fresh ``YYYYmmdd-HHMMSS`` folder under ``root`` (``-2``, ``-3``, ... when taken), created here."""
    return new_numbered_folder(root, f"{datetime.now():%Y%m%d-%H%M%S}", "run", "pick one with --run-name")


def _prepared(folder: Path) -> bool:
    """A folder a launcher made for this run: marked, nothing computed in it yet."""
    return is_run(folder) and not (folder / "steps.npy").exists() and not (folder / "traces.npy").exists()


def check_new_run(run: str | os.PathLike | None, root: str | os.PathLike | None = None,
                  flag: str = "--run-name") -> Path | None:
    """Where a new run named ``run`` would go, checked before any work: a name already taken by
    another run (or a folder that is not a consensus run) is refused, never written over; None
    (no name) is fine, a fresh timestamp is taken when the run starts."""
    if run is None:
        try:
            check_output_place(consensus_root(root), flag)
        except LabError as e:  # the default place: say how to keep no folder at all
            raise LabError(f"{e} The runs folder is $GPTLAB_RUNS (default runs/ here); set it elsewhere, or pass "
                           f"--no-run-folder to keep no run folder.") from None
        return None
    if not str(run).strip():
        raise LabError(f"{flag} needs a name (got an empty one); name the run, or leave {flag} out for a timestamp.")
    folder = run_folder(run, root)
    if folder.is_symlink():
        raise LabError(f"{folder} is a symbolic link; GPT Lab does not write runs through links, so pick another "
                       f"{flag}.")
    if folder.exists() and not folder.is_dir():
        raise LabError(f"{folder} is a file; pick another {flag}.")
    if folder.is_dir() and not _prepared(folder) and any(folder.iterdir()):
        what = "a consensus run" if is_run(folder) else "files of something else"
        raise LabError(f"{folder} already holds {what}; pick another {flag} (or delete that run first).")
    check_output_place(folder, flag)
    return folder


# -- what a run is: config.json -------------------------------------------------------------------

def _fields(cls, data: dict | None) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: (tuple(v) if k == "decode_iterations" else v) for k, v in (data or {}).items() if k in names}


def run_config(kind: str, model: str | None, prompts: dict | None, consensus: ConsensusConfig | None = None,
               decode: DecodeConfig | None = None, simulation: SimulationConfig | None = None, label: str = "",
               device: str | None = None, dtype: str | None = None) -> dict:
    """The ``config.json`` of a run (see the module docstring); ``prompts`` is ``{"source": "typed",
    "texts": [...]}`` or ``{"source": "random", "n": N, "length": L}`` (None for a simulation)."""
    if kind not in KINDS:
        raise LabError(f"A consensus run is one of {', '.join(KINDS)} (got '{kind}').")
    return {"format": FORMAT, "kind": kind, "model": model, "label": label or kind, "prompts": prompts,
            "consensus": None if consensus is None else asdict(consensus),
            "decode": None if decode is None else asdict(decode),
            "simulation": None if simulation is None else asdict(simulation),
            "device": device, "dtype": dtype, "created": now()}


def configs(cfg: dict) -> tuple[ConsensusConfig | None, DecodeConfig | None, SimulationConfig | None]:
    """The settings objects a config.json holds (fields it does not know are ignored)."""
    c = ConsensusConfig(**_fields(ConsensusConfig, cfg.get("consensus"))) if cfg.get("consensus") else None
    d = DecodeConfig(**_fields(DecodeConfig, cfg.get("decode"))) if cfg.get("decode") else None
    s = SimulationConfig(**_fields(SimulationConfig, cfg.get("simulation"))) if cfg.get("simulation") else None
    return c, d, s


def read_config(folder: str | os.PathLike) -> dict:
    """config.json of a run folder, checked to be one GPT Lab wrote, else LabError naming it."""
    path = Path(folder) / CONFIG_FILE
    try:
        cfg = parse_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LabError(f"{path} is missing; this run folder is damaged, delete it.") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise LabError(f"{path} cannot be read ({first_line(e)}); delete the run or restore the file.") from None
    if not isinstance(cfg, dict) or cfg.get("kind") not in KINDS:
        raise LabError(f"{path} is not a consensus run's config (no kind run, decode or sim); delete the run or "
                       f"restore the file.")
    return cfg


def prompts_of(cfg: dict, lm) -> list:
    """The prompts a config asks for: its typed texts, or its random token ids drawn with the run's seed."""
    p = cfg.get("prompts") or {}
    if p.get("source") == "random":
        from .engine import random_prompt_ids

        seed = (cfg.get("consensus") or {}).get("seed", ConsensusConfig.seed)
        return random_prompt_ids(lm, int(p["n"]), int(p["length"]), int(seed))
    texts = [t for t in p.get("texts") or [] if isinstance(t, str) and t.strip()]
    if not texts:
        raise LabError("The run has no prompts; give at least one.")
    return texts


def stream(cfg: dict, lm=None, device=None) -> Iterator:
    """The event stream of the run ``cfg`` describes on ``lm`` (a simulation needs a model only
    for Q, K, V taken from a layer): how the page runs one setting over many models, and how
    ``python -m core consensus --config`` runs a saved or prepared run."""
    consensus, decode, simulation = configs(cfg)
    if cfg["kind"] == "sim":
        from .simulation import simulation_stream

        return simulation_stream(simulation or SimulationConfig(), lm=lm,
                                 device=device if device is not None else (lm.stack.device if lm else None))
    from .engine import consensus_decode_stream, consensus_stream

    prompts = prompts_of(cfg, lm)
    if cfg["kind"] == "decode":
        return consensus_decode_stream(lm, prompts, consensus, decode or DecodeConfig())
    return consensus_stream(lm, prompts, consensus)


# -- writing ----------------------------------------------------------------------------------------

def _padded_ids(token_ids: list[list[int]]) -> np.ndarray:
    T = max((len(t) for t in token_ids), default=0)
    out = np.full((len(token_ids), T), -1, dtype=np.int64)
    for b, ids in enumerate(token_ids):
        out[b, :len(ids)] = ids
    return out


class RunWriter:
    """Writes one run's folder while its events pass (:meth:`watch`): config.json and status.json
    at the start, the arrays every :data:`FLUSH_S` seconds (less often when writing them takes
    long) and at the end, however the run ends. Holds the folder's lock until :meth:`close`."""

    def __init__(self, folder: Path, config: dict, lock: FolderLock):
        self.folder, self.config, self.lock = folder, config, lock
        self.name = folder.name
        self.status = StatusFile(folder)
        self.log = EventLog(folder)
        self.result = None
        self.done = self.total = 0
        self.finished = False
        self.closed = False
        self.stop_in_thread = False  # see watch(): a page sets it
        self._t0 = time.monotonic()
        self._flushed = 0.0
        self._flush_cost = 0.0

    @classmethod
    def create(cls, config: dict, run: str | os.PathLike | None = None,
               root: str | os.PathLike | None = None) -> "RunWriter":
        """A new run folder (named ``run``, else a timestamp) or the one a launcher prepared for it."""
        folder = check_new_run(run, root)
        if folder is None:
            folder = _new_folder(consensus_root(root))
        lock = acquire(folder, "Consensus run", "pick another --run-name.")
        try:
            mark(folder, RUN_KIND)
            atomic_write_json(folder / CONFIG_FILE, config)
            writer = cls(folder.resolve(), config, lock)
            writer.status.update("running", started=now(), ended=None, reason=None, pid=os.getpid(),
                                 pid_start=process_start(os.getpid()), host=this_host(), done=0, total=None)
        except BaseException:
            lock.release()
            raise
        return writer

    def watch(self, events: Iterator) -> Iterator:
        """Pass ``events`` through, writing the folder as they go; closing this generator (a Stop)
        or an error (recorded as the run's failure) closes the run with what it computed. The
        Started event's ``info["run"]`` names the folder."""
        from .results import Finished, Progress, Started, TokenSampled

        error: BaseException | None = None
        try:
            for ev in events:
                if isinstance(ev, Started):
                    self.result = ev.result
                    ev.info["run"] = self.name
                    self.total = int(ev.info.get("total") or 0)
                    self._start_files()
                elif isinstance(ev, Progress):
                    self.done, self.total = int(ev.step), int(ev.total)
                    self.flush()
                elif isinstance(ev, TokenSampled):
                    self.flush()
                elif isinstance(ev, Finished):
                    self.result, self.finished = ev.result, True
                    self.done = self.total
                yield ev
        except BaseException as e:
            error = e
            raise
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()
            if self.finished and error is None:
                self.close("finished")
            elif isinstance(error, Exception):
                self.close("failed", error)
            elif isinstance(error, GeneratorExit) and self.stop_in_thread:
                # the consumer stopped (a page's Stop): the last writes (a fraction of a second of
                # fsyncs) go on in a thread, so the page answers at once; the result changes no more
                threading.Thread(target=self.close, args=("stopped",), name=f"close-{self.name}", daemon=False).start()
            else:  # GeneratorExit (the consumer stopped) or KeyboardInterrupt
                self.close("stopped")

    def _start_files(self) -> None:
        r = self.result
        atomic_write_json(self.folder / "prompts.json", list(r.prompts))
        if any(r.token_ids):
            atomic_save_npy(self.folder / "token_ids.npy", _padded_ids(r.token_ids))
        self.config = {**self.config, "n_layer": int(r.n_layer)}
        if getattr(r, "qkv_description", None):
            self.config["qkv"] = r.qkv_description
        atomic_write_json(self.folder / CONFIG_FILE, self.config)
        self.status.update(device=str(r.device), total=self.total)

    def flush(self, force: bool = False) -> None:
        """Write the arrays now if it is time (``force``: whatever the time)."""
        if self.result is None:
            return
        t = time.monotonic()
        if not force and t - self._flushed < max(FLUSH_S, FLUSH_SHARE * self._flush_cost):
            return
        write_arrays(self.folder, self.result)
        self._flushed = time.monotonic()
        self._flush_cost = self._flushed - t
        self.status.update(done=self.done, total=self.total, seconds=round(time.monotonic() - self._t0, 3))

    def close(self, state: str, error: BaseException | None = None) -> None:
        """Write the arrays and the final status (``finished``, ``stopped`` or ``failed``), release the lock."""
        if self.closed:
            return
        self.closed = True
        reason = fix = None
        try:
            if self.result is not None:
                write_arrays(self.folder, self.result)
            if error is not None:
                reason = str(error) if isinstance(error, LabError) else failure(
                    error, "The device ran out of memory; use fewer or shorter prompts or record every k-th step.")
                fix = error.fix if isinstance(error, LabError) and error.fix else None
                self.log.error(error)
            elif state == "stopped":
                reason = "Stopped on request; what it had computed is kept."
            seconds = getattr(self.result, "seconds", 0.0) or (time.monotonic() - self._t0)
            self.status.update(state, ended=now(), reason=reason, fix=fix, done=self.done, total=self.total,
                               seconds=round(float(seconds), 3))
            self.log.state(state)
        finally:
            self.lock.release()


def write_arrays(folder: Path, result) -> None:
    """Every array of ``result`` (as it stands: a live result is cut at what it computed) into ``folder``."""
    from .files import save_consensus, save_decode

    if isinstance(result, ConsensusDecodeResult):
        save_decode(result, str(folder / "consensus"))
        atomic_save_npy(folder / "traces.npy", np.ascontiguousarray(result.traces, dtype=np.float32))
        atomic_save_npy(folder / "steps.npy", np.asarray(result.steps, dtype=np.int64))
        atomic_write_json(folder / "decoded.json", {"new_ids": [list(map(int, n)) for n in result.new_ids],
                                                    "completions": list(result.completions),
                                                    "texts": list(result.texts)})
        return
    cut = result.trimmed()
    p = len(cut.steps)
    save_consensus(cut, str(folder / "consensus"), str(folder / "consensus_eplot.npy"),
                   str(folder / "consensus_matrix.npy") if cut.matrix is not None else None)
    if cut.matrix is not None and p:
        atomic_save_npy(folder / "consensus_matrix0.npy", np.ascontiguousarray(cut.matrix[..., 0], dtype=np.float32))
    for name in STAT_NAMES:
        atomic_save_npy(folder / f"stat_{name}.npy", np.ascontiguousarray(cut.series(name), dtype=np.float32))
    atomic_save_npy(folder / "steps_done.npy", np.asarray(cut.steps_done, dtype=np.int64))
    atomic_write_json(folder / "decodings.json", {str(k): list(v) for k, v in cut.decodings.items()})
    atomic_save_npy(folder / "steps.npy", np.asarray(cut.steps, dtype=np.int64))  # last: it marks the arrays there


# -- reading --------------------------------------------------------------------------------------

@dataclass
class RunInfo:
    """One saved run, for lists and tables."""

    name: str
    path: Path
    kind: str
    model: str | None
    label: str
    state: str                  # running | finished | failed | stopped | unreadable
    created: str | None = None
    seconds: float | None = None
    prompts: int | None = None
    done: int | None = None
    total: int | None = None
    reason: str | None = None
    pid: int | None = None
    pid_start: str | None = None

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def fraction(self) -> float:
        return min(1.0, max(0.0, (self.done or 0) / self.total)) if self.total else 0.0


def _status(folder: Path) -> dict:
    try:
        st = read_status_file(folder, _STATUS_FIELDS)
    except FileNotFoundError:
        st = {"state": "running"}  # its launcher is writing it: the liveness check decides
    except StatusUnreadable as e:
        return {"state": "unreadable", "reason": str(e)}
    live = runner.live_status(folder, st)
    if live.get("lost"):
        reason = ("Stopped before it reported." if live["state"] == "stopped" else
                  "The process running it ended without reporting (killed, or the machine went down); what it had "
                  "written is kept.")
        live = {**live, "reason": live.get("reason") or reason}
    return live


def _links(folder: Path) -> str | None:
    try:
        found = link_out_of(folder)
    except OSError as e:
        return f"{folder} cannot be read ({e.strerror or e}); check its permissions."
    if found is None:
        return None
    return (f"{found[0]} is a link to {shorten(str(found[1]), 80)}, outside the run folder; GPT Lab reads a run only "
            f"inside its folder, so delete the run or replace the link with the file.")


def run_info(run: str | os.PathLike, root: str | os.PathLike | None = None) -> RunInfo:
    folder = run_folder(run, root)
    if not is_run(folder):
        raise LabError(f"No consensus run at {folder}; pick one from the list of saved runs.")
    try:
        reason = _links(folder)
        if reason:
            raise LabError(reason)
        cfg = read_config(folder)
    except LabError as e:
        return RunInfo(folder.name, folder, "?", None, folder.name, "unreadable", reason=str(e))
    st = _status(folder)
    try:
        n_prompts = len(parse_json((folder / "prompts.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        n_prompts = None

    def num(v):
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    model = cfg.get("model") if isinstance(cfg.get("model"), str) else None
    return RunInfo(folder.name, folder, cfg["kind"], model, str(cfg.get("label") or folder.name),
                   str(st.get("state")), created=cfg.get("created") if isinstance(cfg.get("created"), str) else None,
                   seconds=num(st.get("seconds")), prompts=n_prompts, done=num(st.get("done")),
                   total=num(st.get("total")), reason=st.get("reason") if isinstance(st.get("reason"), str) else None,
                   pid=num(st.get("pid")), pid_start=st.get("pid_start"))


def list_runs(root: str | os.PathLike | None = None) -> list[RunInfo]:
    """Every consensus run under ``<runs root>/consensus``, newest first; a damaged one is listed
    as ``unreadable`` with the reason."""
    base = consensus_root(root)
    if not base.is_dir():
        return []
    def made(r: RunInfo) -> tuple:
        try:
            return r.created or "", (r.path / MARKER_FILE).stat().st_mtime_ns
        except OSError:
            return r.created or "", 0

    return sorted((run_info(d) for d in base.iterdir() if not d.name.startswith(".") and is_run(d)),
                  key=made, reverse=True)


def _load(folder: Path, name: str, *, required: bool = True):
    path = folder / name
    if path.is_symlink():
        raise LabError(f"{path} is a symbolic link; GPT Lab reads a run only inside its folder.")
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        if required:
            raise LabError(f"{path} is missing; the run had computed nothing yet, or the folder is damaged.") \
                from None
        return None
    except (OSError, ValueError) as e:
        raise LabError(f"{path} cannot be read ({first_line(e)}); the run folder is damaged.") from None


def _json(folder: Path, name: str, default: Any) -> Any:
    try:
        return parse_json((folder / name).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise LabError(f"{folder / name} cannot be read ({first_line(e)}); the run folder is damaged.") from None


def _expect(cond: bool, folder: Path, what: str) -> None:
    if not cond:
        raise LabError(f"{folder} is damaged ({what}); delete the run.")


def load_run(run: str | os.PathLike, root: str | os.PathLike | None = None):
    """``(RunInfo, result)``: the run's arrays as the result object its engine made
    (:class:`ConsensusResult`, :class:`ConsensusDecodeResult` or a simulation's result),
    with what a stopped or unfinished run had not computed left NaN. Nothing is unpickled."""
    info = run_info(run, root)
    folder = info.path
    if info.state == "unreadable":
        raise LabError(info.reason or f"{folder} cannot be read.")
    cfg = read_config(folder)
    consensus, decode, simulation = configs(cfg)
    consensus = consensus or ConsensusConfig()
    st = _status(folder)
    seconds, device = float(st.get("seconds") or 0.0), str(st.get("device") or "?")
    prompts = [str(p) for p in _json(folder, "prompts.json", [])]
    ids = _load(folder, "token_ids.npy", required=False)
    token_ids = [[int(t) for t in row if t >= 0] for row in ids] if ids is not None else [[] for _ in prompts]
    steps = _load(folder, "steps.npy").astype(np.int64)
    n_layer = int(cfg.get("n_layer") or 0)
    model = info.model or "simulation"
    if cfg["kind"] == "decode":
        traces = _load(folder, "traces.npy").astype(np.float32)
        dec = _json(folder, "decoded.json", {})
        _expect(traces.ndim == 3 and traces.shape[0] == len(prompts) and traces.shape[2] == len(steps), folder,
                "traces.npy does not match prompts.json and steps.npy")
        n_layer = n_layer or max(1, int(steps[-1]) // max(1, consensus.iterations))
        result = ConsensusDecodeResult(
            model=model, prompts=prompts, token_ids=token_ids,
            new_ids=[[int(t) for t in n] for n in dec.get("new_ids") or [[] for _ in prompts]],
            completions=[str(c) for c in dec.get("completions") or ["" for _ in prompts]],
            texts=[str(t) for t in dec.get("texts") or prompts], traces=traces, steps=steps, config=consensus,
            decode=decode or DecodeConfig(), n_layer=n_layer, seconds=seconds, device=device)
        return info, result
    series = {name: _load(folder, f"stat_{name}.npy").astype(np.float32) for name in STAT_NAMES}
    B = len(prompts)
    for name, arr in series.items():
        _expect(arr.shape == (B, len(steps)), folder, f"stat_{name}.npy is not [prompts, steps]")
    hidden = _load(folder, "consensus_hidden.npy").astype(np.float32)
    steps_done = _load(folder, "steps_done.npy").astype(np.int64)
    matrix = None
    rest = _load(folder, "consensus_matrix.npy", required=False)
    if rest is not None:
        first = _load(folder, "consensus_matrix0.npy")
        matrix = np.concatenate([first[..., None], rest], axis=-1).astype(np.float32)
        _expect(matrix.shape[-1] == len(steps), folder, "the matrices do not match steps.npy")
    decodings = {int(k): [None if t is None else str(t) for t in v]
                 for k, v in (_json(folder, "decodings.json", {}) or {}).items()}
    total = int(steps[-1]) if len(steps) else 0
    if cfg["kind"] == "sim":
        from .simulation import SimulationResult

        sim = simulation or SimulationConfig()
        result = SimulationResult(model=model, prompts=prompts, token_ids=[[] for _ in prompts],
                                  config=replace_iterations(consensus, int(sim.steps)), n_layer=1, steps=steps,
                                  hidden=hidden, matrix=matrix, decodings={}, steps_done=steps_done, seconds=seconds,
                                  device=device, simulation=sim, qkv_description=str(cfg.get("qkv") or sim.qkv),
                                  **series)
        return info, result
    n_layer = n_layer or max(1, total // max(1, consensus.iterations))
    result = ConsensusResult(model=model, prompts=prompts, token_ids=token_ids, config=consensus, n_layer=n_layer,
                             steps=steps, hidden=hidden, matrix=matrix, decodings=decodings, steps_done=steps_done,
                             seconds=seconds, device=device, **series)
    return info, result


def replace_iterations(cfg: ConsensusConfig, iterations: int) -> ConsensusConfig:
    from dataclasses import replace

    return replace(cfg, iterations=iterations)


# -- background runs, stopping, deleting ----------------------------------------------------------

def launch(config: dict, run: str | None = None, root: str | os.PathLike | None = None,
           device: str | None = None, dtype: str | None = None, trust_remote_code: bool = False) -> RunInfo:
    """Start the run ``config`` describes as a background job (``python -m core consensus --config``)
    in a new run folder and return at once; it keeps going when the page that started it goes."""
    folder = check_new_run(run, root)
    if folder is None:
        folder = _new_folder(consensus_root(root))
    folder = folder.resolve()
    config = {**config, "created": now()}
    lock = acquire(folder, "Consensus run", "pick another run name.")
    try:
        mark(folder, RUN_KIND)
        atomic_write_json(folder / CONFIG_FILE, config)
        StatusFile(folder).update("running", pid=None, started=now(), done=0, total=None)
        argv = ["consensus", "--config", str(folder / CONFIG_FILE), "--run-name", str(folder)]
        if config.get("model"):
            argv += ["--model", str(config["model"])]
        argv += ["--device", device or config.get("device") or "cpu"]
        if dtype or config.get("dtype"):
            argv += ["--dtype", dtype or config["dtype"]]
        if trust_remote_code:
            argv.append("--trust-remote-code")
        runner.start(folder, argv, kind=RUN_KIND, locks=[lock])
    finally:
        lock.release()  # a no-op once handed to the job's process
    return run_info(folder)


def stop(run: str | os.PathLike, root: str | os.PathLike | None = None) -> RunInfo:
    """Ask a background run to stop (Ctrl-C: it writes what it computed and says ``stopped``)."""
    info = run_info(run, root)
    if not info.running:
        raise LabError(f"Run {info.name} is not running (it is {info.state}); nothing to stop.")
    runner.stop(info.path, info.pid, info.pid_start, sig=signal.SIGINT)
    return run_info(info.path)


def delete(run: str | os.PathLike, root: str | os.PathLike | None = None) -> None:
    """Remove a run folder: only a consensus run directly in the consensus runs folder, never while it runs."""
    folder = run_folder(run, root)
    if not is_run(folder):
        raise LabError(f"{folder} is not a consensus run GPT Lab made; nothing was deleted.")
    base = consensus_root(root)
    if folder.resolve().parent != base.resolve():
        raise LabError(f"{folder} is outside the consensus runs folder {base}; GPT Lab deletes only runs inside it.")
    if run_info(folder).running:
        raise LabError(f"Run {folder.name} is running; stop it before deleting it.")
    with acquire(folder, "Consensus run", "stop it before deleting it."):
        shutil.rmtree(folder)
