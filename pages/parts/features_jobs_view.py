"""The Features page's background jobs: a form that starts ``python -m core transcoders
train|collect|describe`` as its own process (core.interp.jobs), and a live list of jobs with their
progress (read from each job's events file), log and a Stop button, re-read every
:data:`REFRESH_S` seconds while one runs.
"""
from __future__ import annotations


import streamlit as st

from core.devices import available_devices
from core.interp.config import SIM_WINDOWS, CollectConfig
from core.interp.jobs import (Job, console_lines, job_argv, jobs_root, launch, list_jobs, new_set_folder, progress,
                              read_job, sets_root, shipped, stop, write_check)
from core.interp.transcoder import transcoder_dir_for
from core.models.loading import LoadedModel
from pages.parts.common import DTYPE_KEY, STATE_BADGE, attempt, spec_label

REFRESH_S = 2.0
JOBS_SHOWN = 5
LOG_LINES = 40
NOTICE_KEY = "feat_j_notice"
REFUSAL_KEY = "feat_j_refusal"     # (job id, message) of a refused stop
FOLLOW_KEY = "feat_j_follow"       # the job launched here whose set the picker opens when it is done
REPLACE_KEY = "feat_j_replace"     # the tick that lets a job write over a set or a feature store
_REPLACE_FOR = "_feat_j_replace_for"  # (action, folder) the tick was given for: another target asks again
ACTION_LABELS = {"train": "Train transcoders", "collect": "Collect features", "describe": "Describe features"}
EXPLAINER_CHOICES = {"builtin": "Built-in (offline)", "lm": "Language model"}
COLLECT = CollectConfig()          # the collection defaults, stated once in core.interp.config


def jkey(name: str) -> str:
    return f"feat_j_{name}"


def device_options() -> list[str]:
    return [d for d in available_devices() if d != "auto"] or ["cpu"]


# -- the form -------------------------------------------------------------------------------------

def _corpus_field() -> str:
    choice = st.selectbox("Corpus", ["shakespeare", "path"], key=jkey("dataset"),
                            format_func={"shakespeare": "Shakespeare (built in)", "path": "Local file / folder…"}.get,
                            help="The text the model reads while the transcoders learn or features are collected.")
    if choice == "path":
        return st.text_input("Corpus file or folder", key=jkey("dataset_path"),
                             placeholder="/path/to/corpus.txt (.txt or .jsonl, or a folder of them)")
    return "shakespeare"


def _collect_fields() -> dict:
    cols = st.columns(6)
    values = dict(
        collect_tokens=cols[0].number_input("Collect tokens", 256, 100_000_000, 262_144, step=1024,
                                            key=jkey("collect_tokens"), help="Corpus tokens scanned for contexts."),
        collect_seq_len=cols[1].number_input("Window", 8, 4096, 64, step=8, key=jkey("collect_seq_len"),
                                             help="Tokens per window the model reads while collecting."),
        top_k=cols[2].number_input("Top contexts", 1, 200, 20, step=1, key=jkey("top_k"),
                                   help="Strongest contexts kept per feature (shown to explainers)."),
        n_quantile=cols[3].number_input("Quantile samples", 0, 100, 10, step=1, key=jkey("n_quantile")),
        n_heldout=cols[4].number_input("Held-out", 0, 1000, COLLECT.n_heldout, step=1, key=jkey("n_heldout"),
                                       help="Held-out activating windows, for the scores."),
        n_negative=cols[5].number_input("Negatives", 0, 1000, COLLECT.n_negative, step=1, key=jkey("n_negative"),
                                        help="Held-out random windows where the feature is silent, for the scores."))
    values["n_hard"] = st.columns(6)[0].number_input(
        "Hard negatives", 0, 1000, COLLECT.n_hard, step=1, key=jkey("n_hard"),
        help=f"Held-out windows holding one of the feature's {COLLECT.n_hard_tokens} top tokens where it is silent "
             f"(scoring only, --n-hard): they tell an explanation that names the right tokens from one that only "
             f"lists them.")
    return values


def _describe_fields(with_explainer: bool) -> dict:
    values: dict = {}
    if with_explainer:
        cols = st.columns([2, 3, 1], vertical_alignment="bottom")
        kind = cols[0].radio("Explainer", list(EXPLAINER_CHOICES), format_func=EXPLAINER_CHOICES.get,
                             key=jkey("explainer_kind"), horizontal=True)
        spec = cols[1].text_input("Explainer model", key=jkey("explainer_spec"), disabled=kind == "builtin",
                                  placeholder="google/flan-t5-base or /path/to/model")
        values["explainer"] = "builtin" if kind == "builtin" else spec.strip()
        values["explainer_device"] = cols[2].selectbox("Explainer device", device_options(),
                                                       key=jkey("explainer_device"))
    cols = st.columns(3, vertical_alignment="bottom")
    values["max_features"] = cols[0].number_input("Features per layer", 1, 1_000_000, None, step=1,
                                                  key=jkey("max_features"), placeholder="all",
                                                  help="Explain at most this many per layer, most frequent first.")
    values["n_top"] = cols[1].number_input("Contexts shown", 1, 100, 10, step=1, key=jkey("n_top"),
                                           help="Top contexts the explainer reads per feature.")
    values["score"] = cols[2].toggle(
        "Score on held-out text", True, key=jkey("score"),
        help=f"Detection, fuzzing and simulation. A language model answers one yes/no question per held-out window "
             f"(detection, fuzzing) and rates every token of {SIM_WINDOWS['lm']} firing and {SIM_WINDOWS['lm']} "
             f"silent windows per feature, one call per window (simulation).")
    return values


def _train_fields(lm: LoadedModel) -> dict:
    n_layer = lm.stack.n_layer
    cols = st.columns(4)
    v: dict = dict(
        expansion=cols[0].number_input("Expansion", 1, 256, 8, step=1, key=jkey("expansion"),
                                       help=f"Features per layer = expansion x d_model ({lm.stack.d_model})."),
        activation=cols[1].selectbox("Activation", ["topk", "relu"], key=jkey("activation"),
                                     help="topk: exactly k features per token; relu: sparsity from an L1 penalty."))
    if v["activation"] == "topk":
        v["k"] = cols[2].number_input("k", 1, 4096, 32, step=1, key=jkey("k"), help="Active features per token.")
    else:
        v["l1_coeff"] = cols[2].number_input("L1 coefficient", 0.0, 10.0, 3e-4, step=1e-4, format="%.5f",
                                             key=jkey("l1_coeff"))
    v["lr"] = cols[3].number_input("Learning rate", 1e-6, 1.0, 1e-3, step=1e-4, format="%.5f", key=jkey("lr"))
    cols = st.columns(4)
    v["steps"] = cols[0].number_input("Steps", 1, 10_000_000, None, step=100, key=jkey("steps"),
                                      placeholder="from tokens", help="Optimiser steps; empty: train tokens / batch.")
    v["train_tokens"] = cols[1].number_input("Train tokens", 1024, 10_000_000_000, 1_000_000, step=65536,
                                             key=jkey("train_tokens"), disabled=v["steps"] is not None,
                                             help="Tokens per layer (used when Steps is empty).")
    v["batch_tokens"] = cols[2].number_input("Batch tokens", 16, 1_000_000, 1024, step=256, key=jkey("batch_tokens"))
    v["seq_len"] = cols[3].number_input("Window", 8, 8192, min(128, lm.stack.context_length), step=8,
                                        key=jkey("seq_len"), help="Tokens per corpus window the model reads.")
    v["layers"] = st.multiselect("Layers", list(range(n_layer)), key=jkey("layers"), placeholder="all layers")
    cols = st.columns(2)
    v["collect"] = cols[0].toggle("Then collect features", True, key=jkey("then_collect"))
    v["describe"] = cols[1].toggle("Then describe them (built-in)", True, key=jkey("then_describe"),
                                   disabled=not v["collect"])
    if v["collect"]:
        v |= _collect_fields()
        if v["describe"]:
            v |= _describe_fields(with_explainer=False)
    return v


def confirm_replace(action: str, folder: str | None, replaces: str | None) -> bool:
    """Ask before a job writes over ``replaces`` in ``folder``: a warning and a tick, given again
    for each folder and action (a tick never carries over to another target)."""
    ss = st.session_state
    if ss.get(_REPLACE_FOR) != (action, folder):
        ss[REPLACE_KEY] = False
        ss[_REPLACE_FOR] = (action, folder)
    if replaces is None:
        return False
    what = {"the transcoder set": "its weights, metrics and feature store are written anew",
            "the feature store": "its contexts and every explanation in it are collected anew"}.get(replaces, "")
    st.warning(f"`{spec_label(str(folder))}` already holds {replaces}; this job replaces it ({what}).",
               icon=":material/warning:")
    return st.checkbox(f"Replace {replaces} in this folder", key=REPLACE_KEY)


def job_form(lm: LoadedModel, set_folder: str | None) -> tuple[str, dict, str, bool] | None:
    """The new-job form; ``(action, values, set folder, replace)`` when Start is clicked."""
    action = st.radio("Job", list(ACTION_LABELS), format_func=ACTION_LABELS.get, key=jkey("action"),
                      horizontal=True)
    own = transcoder_dir_for(lm)
    if action == "train":
        fresh = shipped(own)  # the model's own folder is shipped in assets/: a new folder instead
        where = f"a new folder under {spec_label(str(sets_root()))}/" if fresh else "the model's own transcoder folder"
        out = st.text_input("Write the set to", key=jkey("output"),
                            placeholder=spec_label(str(new_set_folder(lm.spec) if fresh else own)),
                            help=f"A folder; empty: {where}, where this page finds it. A set already there is replaced "
                                 f"only when you tick Replace; the shipped assets/ folder is never written.")
        folder = out.strip() or (None if fresh else str(own))  # None: a new folder, named when Start is pressed
    else:
        if set_folder is None:
            st.info("Pick a transcoder set above (or train one) to collect or describe its features.")
            return None
        folder = set_folder
        st.caption(f"Set: `{spec_label(folder)}`")
    refusal, replaces = write_check(action, folder, lm.spec)
    if refusal:
        st.error(refusal)
    replace = confirm_replace(action, folder, replaces)
    cols = st.columns(3)
    values: dict = {"device": cols[0].selectbox("Device", device_options(), key=jkey("device")),
                    "dtype": st.session_state.get(DTYPE_KEY, "float32")}
    if action in ("train", "collect"):
        with cols[1]:
            values["dataset"] = _corpus_field()
        values["seed"] = cols[2].number_input("Seed", 0, 2**31 - 1, 0, step=1, key=jkey("seed"))
    if action == "train":
        values |= _train_fields(lm)
    elif action == "collect":
        values["layers"] = st.multiselect("Layers", list(range(lm.stack.n_layer)), key=jkey("collect_layers"),
                                          placeholder="all layers of the set")
        values |= _collect_fields()
    else:
        values["layers"] = st.multiselect("Layers", list(range(lm.stack.n_layer)), key=jkey("describe_layers"),
                                          placeholder="all layers of the store")
        values |= _describe_fields(with_explainer=True)
    blocked = bool(refusal) or (replaces is not None and not replace)
    if st.button(f"Start: {ACTION_LABELS[action].lower()}", key=jkey("launch"), type="primary",
                 icon=":material/play_arrow:", disabled=blocked,
                 help="Tick Replace above first." if replaces and not replace else None):
        return action, values, folder or str(new_set_folder(lm.spec)), replace
    return None


# -- the jobs -------------------------------------------------------------------------------------

def _stop(job: Job, force: bool) -> None:
    _, error = attempt(stop, job, force=force)
    if error:
        st.session_state[REFUSAL_KEY] = (job.id, error)


def job_panel(job: Job) -> None:
    with st.container(border=True, key=f"feat_job_{job.id}"):
        st.markdown(f"**{ACTION_LABELS.get(job.action, job.action)}** {STATE_BADGE.get(job.state, job.state)} "
                    f"· `{job.id}`  \n:gray[model `{spec_label(job.model)}`"
                    + (f" · set `{spec_label(job.output)}`" if job.output else "") + "]")
        if job.running:
            p = progress(job)
            if p is None:
                st.progress(0.0, text="starting…")
            else:
                of = f" / {p.total:,}" if p.total else ""
                st.progress(p.fraction, text=f"{p.stage}: {p.done:,}{of}" + (f" · {p.text}" if p.text else ""))
            cols = st.columns(4)
            cols[0].button("Stop", key=f"feat_j_stop_{job.id}", icon=":material/stop:", on_click=_stop,
                           args=(job, False), help="Ctrl-C: training saves what it has learnt, describing keeps "
                                                   "the explanations written so far.")
            if job.stop_requested:
                cols[1].button("Kill", key=f"feat_j_kill_{job.id}", icon=":material/cancel:", on_click=_stop,
                               args=(job, True), help="End the process at once.")
        elif job.state == "failed":
            st.error(f"Job failed: {job.reason or 'no reason was recorded'}")
        elif job.state == "unreadable":
            st.error(f"Job unreadable: {job.reason}")
        elif job.state == "stopped":
            st.caption(f"Stopped: {job.reason or 'on request'}")
        elif job.state == "finished":
            st.caption(f"Finished {job.ended or ''}.")
        refusal = st.session_state.get(REFUSAL_KEY)
        if refusal and refusal[0] == job.id:
            st.error(refusal[1])
        st.code(job.command, language="bash", wrap_lines=True)
        with st.expander("Log"):
            st.code("\n".join(console_lines(job, LOG_LINES)) or "(empty)", language=None)


def jobs_view(polling: bool) -> None:
    """The job list; a fragment re-run every REFRESH_S while a job runs."""
    jobs, error = attempt(list_jobs)
    if error:
        st.error(f"Could not read the jobs folder {jobs_root()}: {error}")
        return
    if polling and not any(j.running for j in jobs):
        st.rerun()  # the last job ended: redraw the whole page so the set picker sees what it wrote
    if not jobs:
        st.caption(f"No jobs yet (they go to `{spec_label(str(jobs_root()))}`).")
        return
    for job in jobs[:JOBS_SHOWN]:
        job_panel(job)
    if len(jobs) > JOBS_SHOWN:
        st.caption(f"{len(jobs) - JOBS_SHOWN} older jobs in `{spec_label(str(jobs_root()))}`.")


def jobs_section(lm: LoadedModel, set_folder: str | None, expanded: bool) -> None:
    """Form + live job list. A started job reruns the page (which then polls)."""
    ss = st.session_state
    st.subheader("Background jobs")
    st.caption("Train transcoders, collect what their features fire on, describe features in words. Each job is "
               "its own process (`python -m core transcoders …`, the command is shown) and keeps running if you "
               "leave this page.")
    with st.expander("New job", expanded=expanded, icon=":material/add:"):
        picked = job_form(lm, set_folder)
    if picked is not None:
        action, values, folder, replace = picked
        made, error = attempt(job_argv, action, values, lm.spec, folder, replace)
        if error is None:
            argv, out = made
            job, error = attempt(launch, action, argv, lm.spec, out)
        if error:
            st.error(error)
        else:
            ss[NOTICE_KEY] = f"Started {action} job **{job.id}**; it keeps running if you leave this page."
            ss[FOLLOW_KEY] = job.id
            st.rerun()
    notice = ss.pop(NOTICE_KEY, None)
    if notice:
        st.success(notice)
    jobs, _ = attempt(list_jobs)
    polling = any(j.running for j in jobs or [])
    st.fragment(jobs_view, run_every=REFRESH_S if polling else None)(polling)


def followed_set() -> str | None:
    """The set folder of the job launched from this page, once it has finished (then forgotten)."""
    ss = st.session_state
    job_id = ss.get(FOLLOW_KEY)
    if not job_id:
        return None
    folder = jobs_root() / job_id
    if not (folder / "config.json").is_file():
        ss.pop(FOLLOW_KEY, None)
        return None
    job, _ = attempt(read_job, folder)
    if job is None or job.running:
        return None
    ss.pop(FOLLOW_KEY, None)
    return job.output if job.state in ("finished", "stopped") and job.output else None


__all__ = ["jobs_section", "job_form", "jobs_view", "followed_set", "FOLLOW_KEY"]
