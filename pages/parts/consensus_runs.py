"""The Consensus page's saved runs: every run kept on disk, reopened, overlaid, deleted; runs in
the background; one setting over many models ("consensus over training").

Every run the page starts is written to a run folder as it goes (core.consensus.runs, the same
folder ``python -m core consensus`` writes), so a reload, a visit to another page or a closed tab
loses nothing computed. The runs shown on the page are the saved runs picked in "Open runs"
(:data:`OPEN_KEY`), a widget bound to the URL (``?cons_open=NAME``), so a reload, or the same
address tomorrow, opens them again; a run that just ended joins it by itself. A run started "in
the background" is a job of the one runner (core.jobs), like a training run: it keeps going when
the tab closes, and the page follows it from its folder. No model math here.

Records put into ``st.session_state[RUNS_KEY]`` have the page's record layout (see
pages/consensus.py) plus ``run``, the run folder's name.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import streamlit as st

from core.consensus import runs as saved
from core.errors import LabError, shorten
from pages.parts.common import STATE_BADGE, attempt, load_spec, model_request, spec_label

RUNS_KEY = "cons_runs"          # the page's list of runs on screen (pages/consensus.py)
OVERLAY_KEY = "cons_overlay"
SHOW_KEY = "cons_show"          # the run shown in full (pages/consensus.py)
OPEN_KEY = "cons_open"          # the saved runs open on the page, bound to ?cons_open=
BACKGROUND_KEY = "cons_background"
MODELS_KEY = "cons_models"      # one model spec a line: consensus over training
_LOADED_KEY = "_cons_loaded"    # run name -> (files' stamp, record): a run is read from disk once per change
_SEEN_KEY = "_cons_seen"        # run names this session has put on screen (a new one joins the open list)
POLL_S = 2.0                    # a running background run is looked at this often
MAX_OPEN = 12                   # as pages/consensus.py's MAX_RUNS


# -- the runs of this page, kept as they go -----------------------------------------------------------

def keep(request, events):
    """``events`` passed through a writer that keeps the run in a run folder as it goes (see
    core.consensus.runs.RunWriter); the Started event names the folder (``info["run"]``). When
    the folder cannot be made the run goes on unsaved, and the page says so."""
    config = getattr(request, "config", None)
    if not config:
        return events
    try:
        writer = saved.RunWriter.create(config)
    except LabError as e:
        st.warning(f"This run is not kept on disk: {e}")
        return events
    except OSError as e:
        st.warning(f"This run is not kept on disk ({e.strerror or e}); check that the runs folder can be written.")
        return events
    writer.stop_in_thread = True  # a Stop answers at once; the folder's last writes follow in a thread
    return writer.watch(events)


def background_toggle(where) -> bool:
    return where.toggle("In the background", key=BACKGROUND_KEY, persist_state="session",
                        help="Run as a separate process that keeps going when you leave the page or close the "
                             "tab, like a training run; the page follows it from its run folder.")


def launch(request, spec: str | None = None) -> saved.RunInfo | None:
    """Start ``request`` as a background run (on ``spec`` instead of the sidebar's model when
    given); its settings are checked first, so a bad one is an error here, not a failed job."""
    if spec is None:
        try:
            request.start().close()  # checks everything; nothing runs until the first event
        except LabError as e:
            st.error(str(e))
            return None
    _, device, dtype, trust = model_request()
    config = dict(request.config)
    if spec is not None:
        config = {**config, "model": spec, "label": relabel(config.get("label") or "", config.get("model"), spec)}
    info, error = attempt(saved.launch, config, device=device, dtype=dtype, trust_remote_code=trust)
    if error:
        st.error(error)
        return None
    opened = st.session_state.setdefault(_SEEN_KEY, set())
    opened.add(info.name)
    _open(info.name)
    return info


def start(request, lm, execute: Callable, background: bool) -> None:
    """Run pressed: the run in this page (live), or as a background run."""
    if background:
        info = launch(request)
        if info is not None:
            st.toast(f"Started {info.name} in the background.")
    else:
        execute(request, lm)


def open_saved(name: str) -> None:
    """Open saved run ``name`` on the page (it is shown once its folder holds something)."""
    st.session_state.setdefault(_SEEN_KEY, set()).add(name)
    _open(name)


def _open(name: str) -> None:
    ss = st.session_state
    names = list(ss.get(OPEN_KEY) or [])
    if name not in names:
        ss[OPEN_KEY] = (names + [name])[-MAX_OPEN:]


# -- consensus over training: one setting, many models --------------------------------------------------

def short_spec(spec: str) -> str:
    """A model's name for a legend: ``<run> step <N>`` for a checkpoint of a training run."""
    p = Path(spec)
    if p.parent.name == "checkpoints" and p.name.isdigit():
        return f"{p.parent.parent.name} step {int(p.name)}"
    return spec_label(spec)


def relabel(label: str, old: str | None, new: str) -> str:
    """``label`` naming ``new`` where it named the model ``old``."""
    head = spec_label(old) if old else ""
    rest = label[len(head):] if head and label.startswith(head) else f" {label}" if label else ""
    return short_spec(new) + rest


def model_list() -> list[str]:
    return [line.strip() for line in str(st.session_state.get(MODELS_KEY) or "").splitlines() if line.strip()]


def _add_checkpoints(run_path: str) -> None:
    from core.training.runs import checkpoint_steps

    ck = [str(Path(run_path) / "checkpoints" / str(s)) for s in checkpoint_steps(run_path)]
    have = model_list()
    st.session_state[MODELS_KEY] = "\n".join(have + [c for c in ck if c not in have])


def over_training(request, execute: Callable, background: bool) -> None:
    """The same prompts and settings on every model of a list (hub revisions ``id@rev``, the
    checkpoints of a training run, any spec), each kept as a run and overlaid."""
    from core.training.runs import list_runs as training_runs

    with st.expander("Consensus over training: the same prompts on several models"):
        st.caption("One model spec a line: hub revisions such as `EleutherAI/pythia-160m@step1000`, checkpoint "
                   "folders, any spec the sidebar takes. Each model gets the settings above and is kept as a run; "
                   "the runs are overlaid below.")
        train = [r for r in training_runs() if r.checkpoints]
        if train:
            c1, c2 = st.columns([3, 1])
            pick = c1.selectbox("Training run", [str(r.path) for r in train], key="cons_models_run",
                                format_func=lambda p: f"{Path(p).name} ({len(next(r for r in train if str(r.path) == p).checkpoints)} checkpoints)")
            c2.button("Add its checkpoints", key="cons_models_add", on_click=_add_checkpoints, args=(pick,),
                      help="Every checkpoint of that run, oldest first.")
        st.text_area("Models, one spec a line", key=MODELS_KEY, height=120, persist_state="session",
                     placeholder="EleutherAI/pythia-160m@step1000\nEleutherAI/pythia-160m@step143000")
        specs = model_list()
        go = st.button(f"Run on {len(specs)} model(s)" if specs else "Run on each model", key="cons_models_go",
                       disabled=request is None or not specs or getattr(request, "config", None) is None)
    if not (go and request is not None and specs):
        return
    if background:
        for spec in specs:
            launch(request, spec)
        return
    for spec in specs:
        try:
            lm = load_spec(spec)
        except LabError as e:
            st.error(f"{spec}: {e}")
            continue
        except Exception as e:  # one line for the user, as the sidebar does
            st.error(f"{spec}: could not load it ({type(e).__name__}: {shorten(str(e), 200)}).")
            continue
        config = {**request.config, "model": lm.spec,
                  "label": relabel(request.config.get("label") or request.label, request.config.get("model"), spec)}
        execute(replace(request, label=config["label"], config=config,
                        start=lambda lm=lm, config=config: saved.stream(config, lm)), lm)


# -- saved runs: list, open, delete, follow ----------------------------------------------------------------

def _stamp(folder: Path) -> tuple:
    def mtime(name: str) -> float:
        try:
            return os.stat(folder / name).st_mtime_ns
        except OSError:
            return 0

    return mtime("status.json"), mtime("steps.npy")


def record_of(name: str, lm=None) -> dict | None:
    """The page's record of saved run ``name`` (read again only when its files changed), or None
    when it has computed nothing yet. Token strings come from ``lm`` when it is the run's model."""
    ss = st.session_state
    cache = ss.setdefault(_LOADED_KEY, {})
    folder = saved.run_folder(name)
    if not (folder / "steps.npy").is_file():
        return None  # starting, or ended before it computed anything (open_runs says why)
    stamp = _stamp(folder)
    hit = cache.get(name)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    info, result = saved.load_run(name)
    same = lm is not None and info.model == lm.spec
    tokens = new_texts = None
    if same and info.kind != "sim":
        tokens = [[lm.tokenizer.token_str(t) for t in ids] for ids in result.token_ids]
    if info.kind == "decode":
        new_texts = [[lm.tokenizer.token_str(t) if same else f"#{t}" for t in ids] for ids in result.new_ids]
    status = {"running": "running", "finished": "finished", "stopped": "stopped"}.get(info.state, "failed")
    record = dict(label=info.label, kind=info.kind, status=status, result=result,
                  error=info.reason if status == "failed" else None, tokens=tokens,
                  settings=saved.read_config(folder), new_texts=new_texts or [[] for _ in result.prompts], run=name)
    cache[name] = (stamp, record)
    return record


def _unique(label: str, name: str, taken: set[str]) -> str:
    return label if label not in taken else f"{label} ({name})"


def numbered_labels(infos: list[saved.RunInfo]) -> dict[str, str]:
    """Each saved run's name on the page (run folder -> label): its settings' label, the later runs
    of the same label numbered ``#2``, ``#3``, ... in the order the runs were made (the first keeps
    the bare label). Why from the folders: a number given as runs reach the page depended on which
    script run archived which run first (Stop, Run again, a return to the page), and so differed
    between machines; this one is the same for a run folder on every page and every visit."""
    counts: dict[str, int] = {}
    out: dict[str, str] = {}
    for info in reversed(infos):  # list_runs lists the newest first
        n = counts[info.label] = counts.get(info.label, 0) + 1
        label = info.label if n == 1 else f"{info.label} #{n}"
        out[info.name] = _unique(label, info.name, set(out.values()))
    return out


def _relabel(kept: list[dict], labels: dict[str, str]) -> None:
    """Give the page's saved runs their :func:`numbered_labels` (runs never saved keep theirs,
    made unique against the saved ones), and the shown run and the overlay follow."""
    ss = st.session_state
    saved_labels = {labels[r["run"]] for r in kept if r.get("run") in labels}
    renamed: dict[str, str] = {}
    for i, r in enumerate(kept):
        new = labels.get(r.get("run")) or (_unique(r["label"], "unsaved", saved_labels) if r.get("run") is None
                                           else r["label"])
        if new != r["label"]:
            renamed[r["label"]] = new
            kept[i] = {**r, "label": new}
    if renamed:
        if ss.get(SHOW_KEY) in renamed:
            ss[SHOW_KEY] = renamed[ss[SHOW_KEY]]
        ss[OVERLAY_KEY] = [renamed.get(x, x) for x in ss.get(OVERLAY_KEY) or []]


def sync_open(names: list[str], lm, labels: dict[str, str] | None = None) -> list[str]:
    """Make the page's runs the open saved runs (plus runs that were never saved), named by
    ``labels`` (:func:`numbered_labels`); returns the names that could not be read, with the
    reason shown."""
    ss = st.session_state
    labels = labels or {}
    runs = ss.setdefault(RUNS_KEY, [])
    kept = [r for r in runs if not r.get("run") or r["run"] in names]
    _relabel(kept, labels)
    by_name = {r["run"]: r for r in kept if r.get("run")}
    overlay = list(ss.get(OVERLAY_KEY) or [])
    for name in names:
        old = by_name.get(name)
        if old is not None and old.get("status") != "running":
            continue  # on screen already, and an ended run changes no more
        try:
            record = record_of(name, lm)
        except LabError as e:
            st.warning(f"Run {name} cannot be opened: {e}")
            continue
        if record is None:
            continue
        if old is not None:  # a run still going in the background: its newer arrays replace the old
            record = {**record, "label": old["label"]}
            kept[kept.index(old)] = record
            by_name[name] = record
            continue
        record = {**record, "label": labels.get(name) or _unique(record["label"], name, {r["label"] for r in kept})}
        kept.append(record)
        by_name[name] = record
        ss[SHOW_KEY] = record["label"]  # the run opened last is the one shown
        if record["kind"] != "decode" and record["label"] not in overlay:
            overlay.append(record["label"])
    ss[RUNS_KEY] = kept
    labels = {r["label"] for r in kept}
    ss[OVERLAY_KEY] = [x for x in overlay if x in labels]
    return names


def _delete(names: list[str]) -> None:
    ss = st.session_state
    errors = []
    for name in names:
        try:
            saved.delete(name)
        except LabError as e:
            errors.append(str(e))
    gone = [n for n in names if not saved.run_folder(n).exists()]
    ss[OPEN_KEY] = [n for n in ss.get(OPEN_KEY) or [] if n not in gone]
    ss["cons_delete_pick"] = []
    ss["_cons_delete_errors"] = errors


def _stop(name: str) -> None:
    try:
        saved.stop(name)
    except LabError as e:
        st.session_state["_cons_delete_errors"] = [str(e)]


def runs_table(infos: list[saved.RunInfo]) -> pd.DataFrame:
    return pd.DataFrame({
        "run": [i.name for i in infos], "state": [i.state for i in infos], "kind": [i.kind for i in infos],
        "label": [i.label for i in infos], "model": [spec_label(i.model) if i.model else "" for i in infos],
        "prompts": [i.prompts for i in infos],
        "progress": [f"{(i.done or 0):,}/{i.total:,}" if i.total else "" for i in infos],
        "seconds": [None if i.seconds is None else round(float(i.seconds), 2) for i in infos]})


def _running(infos: list[saved.RunInfo]) -> None:
    for info in infos:
        c1, c2 = st.columns([5, 1])
        text = f"{info.name} · {shorten(info.label, 60)} · {(info.done or 0):,} / {(info.total or 0):,}"
        c1.progress(info.fraction, text=text)
        if info.pid != os.getpid():  # a run of this page stops with the page's Stop button
            c2.button("Stop", key=f"cons_stop_{info.name}", on_click=_stop, args=(info.name,),
                      help="Ask the background run to stop; what it computed is kept.")
        folder = info.path
        try:
            metric = np.load(folder / "stat_metric.npy", allow_pickle=False)
            steps = np.load(folder / "steps.npy", allow_pickle=False)
        except (OSError, ValueError):
            continue
        if metric.ndim == 2 and metric.shape[1] == len(steps) and len(steps):
            frame = pd.DataFrame(metric.T.astype(np.float64), index=steps,
                                 columns=[f"prompt {b}" for b in range(metric.shape[0])])
            st.line_chart(frame, height=160, x_label="layer-step", y_label="1 - mean |cos(h0, hj)|")


@st.fragment(run_every=POLL_S)
def _follow(names: tuple[str, ...]) -> None:
    """Background runs, looked at every POLL_S seconds; when one ends the whole page runs again,
    so its final arrays replace the partial ones."""
    infos = [saved.run_info(saved.run_folder(n)) for n in names if saved.run_folder(n).is_dir()]
    if any(not i.running for i in infos):
        st.rerun()
    _running([i for i in infos if i.running])


def open_runs(lm) -> list[saved.RunInfo]:
    """Which saved runs are open on the page (a widget bound to the URL), and the background
    runs going now; returns every saved run (for :func:`saved_table`)."""
    ss = st.session_state
    infos, error = attempt(saved.list_runs)
    if error:
        st.error(error)
        infos = []
    names = [i.name for i in infos]
    seen = ss.setdefault(_SEEN_KEY, set())
    for r in ss.get(RUNS_KEY) or []:  # a run that just ended on this page joins the open runs
        if r.get("run") and r["run"] not in seen:
            seen.add(r["run"])
            _open(r["run"])
    ss[OPEN_KEY] = [n for n in ss.get(OPEN_KEY) or [] if n in names]
    for message in ss.pop("_cons_delete_errors", []) or []:
        st.error(message)
    opened = st.multiselect("Open runs", names, key=OPEN_KEY, bind="query-params",  # names: the URL holds them
                            placeholder="Pick saved runs to show and overlay",
                            help="Every run is kept in a run folder (the CLI's runs too; see the list of saved runs "
                                 "at the bottom); the ones picked here are shown and overlaid below, and stay open "
                                 "after a reload.")
    seen.update(opened)
    sync_open(list(opened), lm, numbered_labels(infos))
    for i in infos:
        if i.name in opened and i.state in ("failed", "unreadable") and not (i.path / "steps.npy").is_file():
            st.error(f"Run {i.name} ({shorten(i.label, 60)}) failed before it computed anything: {i.reason}")
    ended_here = {r["run"] for r in ss.get(RUNS_KEY) or [] if r.get("run") and r.get("status") != "running"}
    running = tuple(i.name for i in infos if i.running and i.name not in ended_here)  # not a run this page stopped
    if running:
        _follow(running)
    return infos


def saved_table(infos: list[saved.RunInfo]) -> None:
    """Every saved run in a table, and delete."""
    if not infos:
        st.caption(f"No saved runs yet in {saved.consensus_root()}.")
        return
    label = {i.name: f"{i.name} · {shorten(i.label, 50)} · {i.state}" for i in infos}
    with st.expander(f"All saved runs ({len(infos)}) in {spec_label(str(saved.consensus_root()))}"):
        st.dataframe(runs_table(infos), hide_index=True)
        c1, c2 = st.columns([4, 1])
        pick = c1.multiselect("Runs to delete", [i.name for i in infos if not i.running], key="cons_delete_pick",
                              format_func=label.get)
        c2.button("Delete", key="cons_delete_go", disabled=not pick, on_click=_delete, args=(list(pick),),
                  help="Removes the run folders for good.")
        for i in infos:
            if i.state in ("failed", "unreadable") and i.reason:
                st.caption(f"{STATE_BADGE.get(i.state, i.state)} **{i.name}**: {shorten(i.reason, 300)}")
