"""Experiment trackers: TensorBoard, Weights & Biases and MLflow mirror what a run writes.

``--log-to tensorboard,wandb,mlflow`` (``python -m core train``, ``transcoders train``, the
Training form's "Log to") sends each metrics.jsonl record, the run's config and its preview
samples (as text) to the trackers named. metrics.jsonl stays the source of truth the app reads;
the trackers are copies for the tools researchers already use. Only rank 0 of a distributed run
logs, once per record.

Where the files go: ``<folder>/tracking/`` (:data:`TRACKING_DIR`) holds ``tensorboard/`` (event
files: ``tensorboard --logdir runs`` shows every run), ``wandb/`` (W&B's run folder) and
``mlflow/`` (an SQLite store and its artifacts), plus ``trackers.json``, the tracker-side run ids
a resumed run continues. W&B runs offline unless you have logged in (``wandb login`` or
``WANDB_API_KEY``); ``WANDB_MODE`` and ``WANDB_PROJECT`` are honoured. MLflow logs to
``MLFLOW_TRACKING_URI`` when set (a tracking server), else to the run's own store;
``MLFLOW_EXPERIMENT_NAME`` picks the experiment (default ``gptlab``).

Each tracker is a small class behind one interface (:class:`Tracker`); :class:`Trackers` fans a
record out to the open ones. A tracker that fails while logging is dropped with one log line,
never the run: the metrics are safe in metrics.jsonl. Every package is imported only when its
tracker opens, so this module itself is torch-free.
"""
from __future__ import annotations

import json
import logging
import math
import netrc
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlparse

from ..errors import LabError, first_line
from ..files import atomic_write_json, parse_json
from .config import TRACKERS, check_trackers

TRACKING_DIR = "tracking"          # under a run (or a transcoder set's training): every tracker's files
IDS_FILE = "trackers.json"         # tracker -> its own id of this run, so a resume continues the same run
PROJECT = "gptlab"                 # W&B project and MLflow experiment when the environment names none
PREVIEW_TAG = "preview"
CONFIG_TAG = "config"
FLUSH_S = 5                        # TensorBoard event files reach the disk at least this often
PARAM_CHARS = 6000                 # MLflow's longest parameter value


def numbers(record: Mapping[str, Any]) -> dict[str, float]:
    """The values of a metrics record a tracker charts: every finite number except ``step``
    (nulls, text and booleans are left out)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def preview_text(prompt: str, text: str) -> str:
    """A sample as the trackers store it: prompt and continuation in one fenced block (TensorBoard
    renders text as Markdown, which would fold the lines of a play into one paragraph)."""
    return f"```\n{prompt}{text}\n```"


def config_text(config: Mapping[str, Any]) -> str:
    return "```json\n" + json.dumps(config, indent=2, sort_keys=True) + "\n```"


def wandb_mode(env: Mapping[str, str] | None = None, netrc_path: str | os.PathLike | None = None) -> str:
    """``WANDB_MODE`` when set; else ``online`` when the user has logged in (``WANDB_API_KEY``, or
    the .netrc entry ``wandb login`` writes for the W&B host), else ``offline``: nothing leaves the
    machine unless you asked W&B to send it."""
    env = os.environ if env is None else env
    if env.get("WANDB_MODE"):
        return env["WANDB_MODE"]
    if env.get("WANDB_API_KEY"):
        return "online"
    host = urlparse(env.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    path = netrc_path or env.get("NETRC") or Path.home() / ".netrc"
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        entry = None
    return "online" if entry and entry[2] else "offline"


# -- one class per tracker ----------------------------------------------------------------------------

class Tracker:
    """One tracker's copy of a run. ``step`` is the run's optimiser step throughout."""

    name = ""

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def log_text(self, step: int, tag: str, text: str) -> None:
        raise NotImplementedError

    def close(self, state: str) -> None:
        """``state``: finished, stopped or failed."""
        raise NotImplementedError

    def run_id(self) -> str | None:
        """The id to continue this tracker's run with (kept in trackers.json), if it has one."""
        return None


class TensorBoardTracker(Tracker):
    """Event files in ``tracking/tensorboard`` (torch's SummaryWriter). A resumed run purges the
    events past its checkpoint's step, as metrics.jsonl drops those lines."""

    name = "tensorboard"

    def __init__(self, folder: Path, config: Mapping[str, Any], resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(log_dir=str(folder / "tensorboard"), purge_step=purge, flush_secs=FLUSH_S)
        if resume_step is None:
            self.writer.add_text(CONFIG_TAG, config_text(config), 0)

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def log_text(self, step: int, tag: str, text: str) -> None:
        self.writer.add_text(tag, text, step)

    def close(self, state: str) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """A W&B run whose files live in ``tracking/wandb`` (offline unless logged in, see
    :func:`wandb_mode`); previews are one table of (step, prompt, text) rows, logged anew as it grows."""

    name = "wandb"

    def __init__(self, folder: Path, run_name: str, config: Mapping[str, Any], run_id: str | None):
        import wandb

        self.wandb = wandb
        self.id = run_id or f"{_slug(run_name)[:40]}-{uuid.uuid4().hex[:8]}"
        folder.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(console="off", silent=True, x_disable_stats=True, save_code=False)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or PROJECT, name=run_name, id=self.id,
                              dir=str(folder), mode=wandb_mode(), config=dict(config), resume="allow",
                              reinit="create_new", allow_val_change=True, settings=settings)
        self.rows: list[list] = []

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def log_text(self, step: int, tag: str, text: str) -> None:
        self.rows.append([step, text])
        self.run.log({tag: self.wandb.Table(columns=["step", "text"], data=[list(r) for r in self.rows])}, step=step)

    def close(self, state: str) -> None:
        self.run.finish(exit_code=1 if state == "failed" else 0)

    def run_id(self) -> str | None:
        return self.id


class MlflowTracker(Tracker):
    """An MLflow run in ``MLFLOW_TRACKING_URI`` or, by default, in ``tracking/mlflow`` (an SQLite
    store; MLflow's plain-file store is in maintenance mode). The config goes in as parameters
    once, and as ``config.json``; previews as text artifacts ``previews/step_<step>.txt``."""

    name = "mlflow"

    def __init__(self, folder: Path, run_name: str, config: Mapping[str, Any], run_id: str | None):
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self.Metric = Metric
        for name in ("mlflow", "alembic"):  # creating the store logs each migration at INFO
            logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).level))
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        artifacts = None
        if not uri:
            store = folder / "mlflow"
            store.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{store.resolve() / 'mlflow.db'}"
            artifacts = (store.resolve() / "artifacts").as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT
        found = self.client.get_experiment_by_name(name)
        experiment = found.experiment_id if found else self.client.create_experiment(name, artifact_location=artifacts)
        if run_id is not None:
            self.id = run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            self.id = self.client.create_run(experiment, run_name=run_name).info.run_id
            params = [Param(k, (v if isinstance(v, str) else json.dumps(v))[:PARAM_CHARS])
                      for k, v in sorted(config.items())]
            self.client.log_batch(self.id, params=params)  # once: MLflow refuses to change a parameter
        self.client.log_dict(self.id, dict(config), "config.json")

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        at = int(time.time() * 1000)
        self.client.log_batch(self.id, metrics=[self.Metric(k, v, at, step) for k, v in values.items()])

    def log_text(self, step: int, tag: str, text: str) -> None:
        self.client.log_text(self.id, text, f"{tag}s/step_{step:08d}.txt")

    def close(self, state: str) -> None:
        status = {"finished": "FINISHED", "stopped": "KILLED"}.get(state, "FAILED")
        self.client.set_terminated(self.id, status)

    def run_id(self) -> str | None:
        return self.id


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text).strip("-") or "run"


# -- the group a run logs to ----------------------------------------------------------------------

class Trackers:
    """The open trackers of one run: each record goes to all of them. One that fails is dropped
    with a line through ``log``; the run and the other trackers go on."""

    def __init__(self, trackers: list[Tracker] | None = None, log: Callable[[str], None] | None = None):
        self.trackers = list(trackers or [])
        self.log = log or (lambda line: None)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.trackers]

    def _each(self, what: str, call: Callable[[Tracker], None]) -> None:
        for t in list(self.trackers):
            try:
                call(t)
            except Exception as e:  # a tracker's failure never ends a run whose metrics are on disk
                self.trackers.remove(t)
                self.log(f"{t.name}: {what} failed ({type(e).__name__}: {first_line(e)}); no more logging to "
                         f"{t.name} in this run (metrics.jsonl has everything)")

    def metrics(self, record: Mapping[str, Any]) -> None:
        """One metrics.jsonl record (or any record with a ``step``)."""
        step, values = int(record["step"]), numbers(record)
        if values:
            self._each("logging metrics", lambda t: t.log_metrics(step, values))

    def preview(self, step: int, prompt: str, text: str) -> None:
        self._each("logging a preview", lambda t: t.log_text(step, PREVIEW_TAG, preview_text(prompt, text)))

    def close(self, state: str) -> None:
        self._each("closing", lambda t: t.close(state))
        self.trackers = []


def open_trackers(names: list[str], tracking: str | os.PathLike, *, run_name: str, config: Mapping[str, Any],
                  resume_step: int | None = None, log: Callable[[str], None] | None = None) -> Trackers:
    """Open ``names`` (see :data:`core.training.config.TRACKERS`) with their files in the folder
    ``tracking`` (a run's is ``<run>/tracking``). ``resume_step``: the run continues from that step
    (the same tracker runs, events after it replaced); None starts new tracker runs. A tracker that
    cannot start is one LabError naming it (the ones opened before are closed)."""
    check_trackers(names)
    tracking = Path(tracking)
    ids_path = tracking / IDS_FILE
    ids = _read_ids(ids_path) if resume_step is not None else {}
    opened: list[Tracker] = []
    for name in names:
        try:
            if name == "tensorboard":
                opened.append(TensorBoardTracker(tracking, config, resume_step))
            elif name == "wandb":
                opened.append(WandbTracker(tracking, run_name, config, ids.get(name)))
            elif name == "mlflow":
                opened.append(MlflowTracker(tracking, run_name, config, ids.get(name)))
            else:  # a name in TRACKERS without a class here is a programming error
                raise AssertionError(f"no tracker class for {name}")
        except Exception as e:
            Trackers(opened).close("failed")
            raise LabError(f"Could not start logging to {name} ({type(e).__name__}: {first_line(e)}); fix that, or "
                           f"leave {name} out of --log-to (metrics.jsonl is written either way).") from None
    group = Trackers(opened, log)
    kept = {t.name: t.run_id() for t in opened if t.run_id()}
    if kept:
        atomic_write_json(ids_path, {**ids, **kept})
    return group


def _read_ids(path: Path) -> dict[str, str]:
    try:
        data = parse_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if k in TRACKERS and isinstance(v, str)} if isinstance(data, dict) else {}
