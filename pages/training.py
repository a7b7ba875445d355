"""Training: launch GPT and masked-diffusion runs, watch them live, stop, resume or delete them,
and open their checkpoints in the other workbenches.

Runs are separate processes (core.training.runs.launch, a detached job of core.jobs), so they
outlive this page; the page only reads run folders under the runs folder (``runs/``, or
``$GPTLAB_RUNS``), which also holds the runs started with ``python -m core train``. A running run's
progress bar comes from its events file (core.jobs.events), never from its console text. The runs
section is a fragment that re-reads those folders every :data:`REFRESH_S` seconds while any run is
running, and stops polling when none is. A run whose files are broken is listed as unreadable, with
the reason, and can still be deleted.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import streamlit as st

from core.training.data import uploads_dir
from core.training.memory import check_fits
from core.training.runs import (RunInfo, delete, launch, list_runs, log_tail, read_metrics, read_previews, resume,
                                runs_root, stop)
from pages.parts.common import ROOT, SPEC_KEY, STATE_BADGE, attempt, ensure_frame, spec_label
from pages.parts.training_charts import (DEFAULT_SMOOTHING, DEFAULT_X, SMOOTHING_MAX, X_AXES, draw_charts,
                                         metrics_frame)
from pages.parts.training_form import UPLOAD_CHOICE, config_from_values, launch_form, save_uploaded

REFRESH_S = 2.0
SELECT_KEY = "tr_show"      # the runs shown (charts overlaid, one panel each)
NOTICE_KEY = "tr_notice"    # (a success message, when it was given), carried over a rerun
NOTICE_SHOW_S = 6.0         # how long such a message stays (the live view's refresh takes it away)
REFUSALS_KEY = "tr_refusals"  # run id -> (engine message, when) of a refused stop / resume / delete
REFUSAL_SHOW_S = 20.0
FORM_OPEN_KEY = "tr_new_run"  # the "New run" expander's open state
_COLLAPSE_KEY = "_tr_collapse_form"  # set by a launch: close the form on the next run, show the runs
LOG_LINES = 40
PREVIEWS_SHOWN = 3
OPEN_IN = [("pages/generate.py", "Generate"), ("pages/consensus.py", "Consensus"), ("pages/features.py", "Features")]
def runs_dir() -> Path:
    return runs_root().expanduser().resolve()


def fmt_loss(v: float | None) -> str:
    return "–" if v is None else f"{v:.4f}"


def fmt_step(info: RunInfo) -> str:
    return f"{info.step:,}" + (f" / {info.max_steps:,}" if info.max_steps else "")


def runs_table(runs: list[RunInfo]) -> pd.DataFrame:
    return pd.DataFrame({
        "run": [r.id for r in runs], "state": [r.state for r in runs], "step": [fmt_step(r) for r in runs],
        "train loss": [r.train_loss for r in runs], "val loss": [r.val_loss for r in runs],
        "objective": [r.objective for r in runs], "model": [r.model for r in runs],
        "dataset": [r.dataset for r in runs], "checkpoints": [len(r.checkpoints) for r in runs],
        "updated": [r.updated for r in runs]})


def act(info: RunInfo, fn: Callable[..., Any], notice: str, **kwargs: Any) -> None:
    """Stop / resume / delete ``info``'s run. Success reruns the whole page (polling may start or
    stop); a refusal is kept for :data:`REFUSAL_SHOW_S` seconds so the 2-second refresh of a
    running run's panel does not wipe it before it is read."""
    _, error = attempt(fn, info.path, **kwargs)
    if error:
        st.session_state.setdefault(REFUSALS_KEY, {})[info.id] = (error, time.monotonic())
        return
    st.session_state.get(REFUSALS_KEY, {}).pop(info.id, None)
    notify(notice)
    st.rerun()


def notify(text: str) -> None:
    """A success message for the next run of the page, shown for :data:`NOTICE_SHOW_S` seconds."""
    st.session_state[NOTICE_KEY] = (text, time.monotonic())


def fresh_notice() -> str | None:
    """The latest success message while it is fresh (dropped once it is not)."""
    notice = st.session_state.get(NOTICE_KEY)
    if notice and time.monotonic() - notice[1] < NOTICE_SHOW_S:
        return notice[0]
    st.session_state.pop(NOTICE_KEY, None)
    return None


def show_notice() -> bool:
    """Draw the fresh success message, if any, and say whether there was one. It is drawn in the runs
    view, which refreshes every 2 seconds while it is up, so it goes after a few seconds (a banner
    that stayed would soon be read as news)."""
    text = fresh_notice()
    if text:
        st.success(text)
    return text is not None


def show_refusal(run_id: str) -> None:
    refusals = st.session_state.get(REFUSALS_KEY, {})
    if run_id in refusals:
        error, at = refusals[run_id]
        if time.monotonic() - at < REFUSAL_SHOW_S:
            st.error(error)
        else:
            refusals.pop(run_id)


# -- one run ------------------------------------------------------------------------------------

def run_actions(info: RunInfo) -> None:
    cols = st.columns([1, 2, 1], vertical_alignment="bottom")
    if info.state == "unreadable":
        pass  # nothing to stop or resume; deleting is still offered
    elif info.state == "running":
        if cols[0].button("Stop", key=f"tr_stop_{info.id}", icon=":material/stop:",
                          help="Writes a checkpoint at the next step, then ends the process."):
            act(info, stop, notice=f"Stop requested for {info.id}: it saves a checkpoint and stops.")
    else:
        more = None
        if info.state == "finished":
            more = cols[1].number_input("Train up to step", info.step + 1, 100_000_000,
                                        max(2 * info.step, info.step + 1), step=1, key=f"tr_more_{info.id}",
                                        help="A finished run continues only to a larger step count.")
        if cols[0].button("Resume", key=f"tr_resume_{info.id}", icon=":material/play_arrow:",
                          help="Continue from the last checkpoint in a new process."):
            act(info, resume, max_steps=None if more is None else int(more), notice=f"Resumed {info.id}.")
    with cols[2].popover("Delete", icon=":material/delete:"):
        st.markdown(f"Delete run **{info.id}** with its checkpoints and metrics? This cannot be undone.")
        confirmed = st.button(f"Delete {info.id}", key=f"tr_delete_{info.id}", type="primary")
    if confirmed:
        act(info, delete, notice=f"Deleted run {info.id}.")
    show_refusal(info.id)


def run_checkpoints(info: RunInfo) -> None:
    steps = info.checkpoints[::-1]  # newest first
    if not steps:
        st.caption("No checkpoint yet: one is written every 'save every' steps, at the end, and on Stop.")
        return
    ss = st.session_state
    pick_key, newest_key = f"tr_ckpt_{info.id}", f"_tr_ckpt_newest_{info.id}"
    # Follow the newest checkpoint as the run writes more, unless an older one was picked on purpose
    # (and still exists: kept checkpoints rotate).
    if ss.get(pick_key) not in steps or ss.get(pick_key) == ss.get(newest_key):
        ss[pick_key] = steps[0]
    ss[newest_key] = steps[0]
    targets = [(page, title) for page, title in OPEN_IN if (ROOT / page).is_file()]
    cols = st.columns([2] + [1] * len(targets), vertical_alignment="bottom")
    step = cols[0].selectbox("Checkpoint", steps, format_func=lambda s: f"step {s:,}", key=pick_key)
    folder = info.path / "checkpoints" / str(step)
    for cell, (page, title) in zip(cols[1:], targets):
        if cell.button(f"Open in {title}", key=f"tr_open_{title.lower()}_{info.id}", icon=":material/open_in_new:"):
            st.session_state[SPEC_KEY] = str(folder)
            st.switch_page(page)
    st.caption(f"`{spec_label(str(folder))}` is a model spec: `python -m core generate --model {folder}`")


def run_progress(info: RunInfo) -> None:
    """The run's progress bar, from the newest progress event in its events file."""
    p = info.progress
    if p is None:
        st.progress(0.0, text="preparing data…")
        return
    of = f" / {p.total:,}" if p.total else ""
    st.progress(p.fraction, text=f"{p.stage} step {p.done:,}{of}" + (f" · {p.text}" if p.text else ""))


def run_panel(info: RunInfo) -> None:
    with st.container(border=True, key=f"tr_panel_{info.id}"):
        st.markdown(f"**{info.id}** {STATE_BADGE.get(info.state, info.state)}  \n"
                    f":gray[{info.model} · {info.objective} · {info.dataset}]")
        cols = st.columns(3)
        cols[0].metric("Step", fmt_step(info))
        cols[1].metric("Train loss", fmt_loss(info.train_loss))
        cols[2].metric("Val loss", fmt_loss(info.val_loss))
        if info.state == "running":
            run_progress(info)
        if info.state == "unreadable":
            st.error(f"Run unreadable: {info.reason}")
        elif info.state == "failed":
            st.error(f"Run failed: {info.reason or 'no reason was recorded'}")
            if info.last_log:
                st.code("\n".join(info.last_log), language=None)
        elif info.state == "stopped" and info.reason:
            st.caption(f"Stopped: {info.reason}.")
        run_actions(info)
        run_checkpoints(info)
        previews, _ = attempt(read_previews, info.path)
        if previews:
            with st.expander(f"Samples ({len(previews)})", expanded=True):
                for p in previews[-PREVIEWS_SHOWN:][::-1]:
                    st.caption(f"step {p.get('step')}")
                    st.text(f"{p.get('prompt', '')}{p.get('text', '')}")
        with st.expander("Log"):
            lines, error = attempt(log_tail, info.path, LOG_LINES)
            if error:
                st.error(error)
            else:
                st.code("\n".join(lines) or "(empty)", language=None)


# -- all runs -----------------------------------------------------------------------------------

def runs_view(root: Path, polling: bool) -> None:
    """Table, chosen runs' charts and panels; a fragment that reruns every REFRESH_S while polling."""
    noticed = show_notice()
    runs, error = attempt(list_runs, root)
    if error:
        st.error(f"Could not read the runs folder {root}: {error}")
        return
    if polling and not noticed and not any(r.state == "running" for r in runs):
        st.rerun()  # the last run ended and no message waits to go: redraw the page once, without the timer
    if not runs:
        st.info(f"No runs under `{root}` yet. Launch one above, or from a shell with `python -m core train`.")
        return
    st.dataframe(runs_table(runs), hide_index=True, key="tr_table",
                 column_config={"train loss": st.column_config.NumberColumn(format="%.4f"),
                                "val loss": st.column_config.NumberColumn(format="%.4f")})
    ids = [r.id for r in runs]
    ss = st.session_state
    ss[SELECT_KEY] = [i for i in ss.get(SELECT_KEY, ids[:1]) if i in ids]
    chosen = st.multiselect("Show runs", ids, key=SELECT_KEY, persist_state="session",
                            help="Their curves are overlaid, each run in its own colour (in the order picked).")
    if not chosen:
        st.caption("Pick one or more runs to see their curves, samples, log and checkpoints.")
        return
    x_col, smooth_col, log_col = st.columns([2, 2, 1], vertical_alignment="bottom")
    x = x_col.radio("X axis", list(X_AXES), index=list(X_AXES).index(DEFAULT_X), format_func=X_AXES.get,
                    horizontal=True, key="tr_x_axis", persist_state="session",
                    help="Plot against optimizer steps, tokens seen, or training time (wall-clock time spent "
                         "training, without validation and checkpoint pauses).")
    weight = smooth_col.slider("Smoothing", 0.0, SMOOTHING_MAX, DEFAULT_SMOOTHING, step=0.01, key="tr_smoothing",
                               persist_state="session",
                               help="Exponential moving average of the train loss, gradient norm, throughput and "
                                    "MFU, as in TensorBoard (0 = raw values). The raw loss stays faintly behind.")
    log_loss = log_col.toggle("Log-scale loss", key="tr_log_loss", persist_state="session")
    by_id = {r.id: r for r in runs}
    records = {rid: attempt(read_metrics, by_id[rid].path)[0] or [] for rid in chosen}
    draw_charts(metrics_frame(records), log_loss, x=x, weight=weight, runs=chosen)
    for rid in chosen:
        run_panel(by_id[rid])


def launch_section(root: Path, has_runs: bool) -> None:
    ss = st.session_state
    if ss.pop(_COLLAPSE_KEY, False):
        ss[FORM_OPEN_KEY] = False
    with st.expander("New run", expanded=not has_runs, key=FORM_OPEN_KEY, on_change="rerun", icon=":material/add:"):
        values = launch_form()
    if values is None:
        return
    uploads = uploads_dir(root)
    made, error = attempt(config_from_values, values, uploads)
    if error is None:
        cfg, name = made
        _, error = attempt(check_fits, cfg, cfg.device, cfg.devices)  # before a process can die of it
    if error is None and values["dataset"] == UPLOAD_CHOICE:  # written only now that the run is sure to start
        saved, error = attempt(save_uploaded, values["upload"], uploads)
        if saved is not None:
            cfg.dataset = str(saved)
    if error is None:
        info, error = attempt(launch, cfg, name, root)
    if error:
        st.error(error)
        return
    where = f"{len(cfg.devices)} GPUs under torchrun" if cfg.devices else cfg.device
    notify(f"Launched run **{info.id}** on {where}; it keeps running if you leave this page.")
    ss[SELECT_KEY] = [info.id] + [i for i in ss.get(SELECT_KEY, []) if i != info.id]
    ss[_COLLAPSE_KEY] = True
    st.rerun()


ensure_frame()
st.title("Training")
st.markdown("Train a GPT (next-token) or a masked-diffusion language model on the CPU or local GPUs. Each run is "
            "its own process writing a run folder: it survives page reloads, and runs started with "
            "`python -m core train` show here too.")
root = runs_dir()
found, _ = attempt(list_runs, root)  # a launch reruns the page, so this stays current
launch_section(root, has_runs=bool(found))

head, button = st.columns([5, 1], vertical_alignment="bottom")
head.subheader("Runs")
button.button("Refresh", key="tr_refresh", icon=":material/refresh:", help="Look for runs started elsewhere.")
st.caption(f"Runs folder: `{root}` (set GPTLAB_RUNS to use another); uploaded datasets are kept in "
           f"`{uploads_dir(root)}`.")
polling = any(r.state == "running" for r in found or []) or fresh_notice() is not None
st.fragment(runs_view, run_every=REFRESH_S if polling else None)(root, polling)
