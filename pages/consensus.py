"""Consensus: apply a model's layer stack again and again and watch its tokens converge, live.

Three modes share one set of charts: a consensus run (core.consensus.engine.consensus_stream), consensus
decoding (consensus_decode_stream) and the paper's continuous-time model (core.consensus.simulation). All
the math is in core; this page collects settings, streams the events into live views and keeps
every finished, stopped or failed run in ``st.session_state[RUNS_KEY]`` as a dict
``{"label", "kind": "run" | "decode" | "sim", "status": "finished" | "stopped" | "failed",
"result", "error", "tokens", "settings", "run"}`` so earlier runs can be overlaid and downloaded;
``run`` names the run folder the run is kept in as it goes (pages/parts/consensus_runs.py: saved
runs reopened after a reload, background runs, one setting over many models).

Stop: pressing any button (or leaving the page) starts a new script run at once, in a new thread,
while the old one is told to stop: Streamlit raises a stop inside its next call into Streamlit,
and again at every later one, session-state access included. The engines fill their result
objects in place, so the new script run archives the stopped run from
``st.session_state[LIVE_KEY]`` (a copy: ``result.trimmed()``) without waiting for the old thread,
which stops at its next progress event; that thread's ``finally`` touches nothing of Streamlit's,
it only closes the engine and sets the record's ``done`` event. A run that ends by itself is
archived by its own script run.
"""
from __future__ import annotations

import copy
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import streamlit as st

from core.consensus.config import (INTEGRATORS, MAX_TOKENS, PAGE_INITS, PAGE_ITERATIONS, PAGE_NEW_TOKENS, REINIT_MODES,
                                   parse_iterations)
from core.consensus.engine import (ConsensusConfig, ConsensusDecodeResult, ConsensusResult, DecodeConfig, Decoded,
                                   Finished, Progress, Started, TokenSampled, consensus_decode_stream, consensus_stream,
                                   random_prompt_ids)
from core.consensus.estimate import estimate_run
from core.consensus.files import (diag_array, eplot_array, hidden_array, matrix_array, metric_array, npy_bytes,
                                  texts_array)
from core.consensus.metrics import STAT_NAMES
from core.consensus.runs import run_config
from core.consensus.simulation import SimulationConfig, SimulationResult, simulation_stream
from core.consensus.text import readable_tokens
from core.errors import LabError, failure
from core.generation.config import DRAWN_SEEDS, MAX_TEMPERATURE
from core.models.loading import LoadedModel
from pages.parts import consensus_runs as runs_view
from pages.parts.interventions_consensus import consensus_interventions
from pages.parts.common import current_model, ensure_frame, spec_label
from pages.parts.charts import chart_download, draw
from pages.parts.consensus_charts import (HEATMAP_TOKENS, csv_bytes, decodings_frame, heat_step, heatmap_chart,
                                         heatmap_frame, overlay_chart, pick_lines, prompt_names, record_chart,
                                         run_groups, show_decodings, trace_names, traces_chart)

RUNS_KEY = "cons_runs"        # archived runs, oldest first
LIVE_KEY = "cons_live"        # the run in progress (its result is filled in place)
SHOW_KEY = "cons_show"
OVERLAY_KEY = "cons_overlay"
MAX_RUNS = 12                 # older runs are dropped (a run with cosine matrices can be large)
MAX_EVENTS = 2000             # progress events per run: Stop is noticed at the next one
REDRAW_S = 0.5                # the live chart is redrawn at most this often
SIM_MAX_DIM = 4096            # the simulation's d on this page (see sim_controls)
PREFIX_MAX = 100              # characters of a download file prefix

MODE_RUN, MODE_DECODE, MODE_SIM = "Consensus run", "Consensus decoding", "Simulation"
DEFAULT_PROMPTS = "The quick brown fox jumps over the lazy dog.\nTo be, or not to be, that is the question."
SERIES_LABELS = {
    "metric": "1 - mean |cos(h0, hj)| (the scripts' metric)",
    "mean_cosine": "mean pairwise cosine",
    "mean_dot": "mean pairwise dot product",
    "effective_rank": "effective rank of the token cloud",
    "centroid_distance": "mean distance to the centroid",
}
REINIT_LABELS = {"none": "none", "once": "once (--randominit)", "iteration": "after each iteration (--fullrandom)",
                 "block": "after each block (--const-reset)"}  # one label for each of REINIT_MODES
REINIT_TAGS = {"none": "", "once": " randominit", "iteration": " fullrandom", "block": " const-reset"}
KEEP = dict(persist_state="session", bind="query-params")  # control values survive page switches and reloads
C, D, S = ConsensusConfig, DecodeConfig, SimulationConfig  # the controls' defaults are the configs' (or PAGE_*)
OUT_OF_MEMORY = ("The device ran out of memory; use fewer or shorter prompts, drop the cosine matrices, record every "
                 "k-th step, or run on the CPU. What was computed before is kept.")


@dataclass
class Request:
    """A run the controls describe: ``start()`` checks everything and returns the event stream
    (raising :class:`LabError` for bad settings); ``record_key`` is its record-every widget."""

    kind: str
    label: str
    start: Callable[[], Iterator]
    record_key: str
    settings: dict
    config: dict | None = None  # the run folder's config.json (core.consensus.runs.run_config)


# -- controls --------------------------------------------------------------------------------------

def _default(key: str, value) -> None:
    """Defaults through session state, so callbacks may change these widgets without a warning."""
    st.session_state.setdefault(key, value)


def prompt_controls(lm: LoadedModel | None) -> tuple[str, list[str], int, int]:
    """The prompt source and its values: ``(source, typed prompts, random N, random L)``."""
    source = st.radio("Prompts", ["typed", "random"], horizontal=True, key="cons_source", **KEEP,
                      format_func={"typed": "typed, one per line", "random": "random tokens (N x L)"}.get)
    typed, n, length = [], 4, 16
    if source == "typed":
        text = st.text_area("Prompts, one per line", DEFAULT_PROMPTS, key="cons_prompts", height=100, **KEEP,
                            help="Each line is one prompt; lines of different token lengths run as separate batches.")
        typed = [line for line in text.splitlines() if line.strip()]
    else:
        c1, c2 = st.columns(2)
        n = c1.number_input("Random prompts N", 1, 1024, 4, key="cons_rand_n", **KEEP)
        length = c2.number_input("Tokens per prompt L", 1, 100_000, 16, key="cons_rand_len", **KEEP,
                                 help="Token ids drawn uniformly from the vocabulary, seeded by the seed below.")
    return source, typed, int(n), int(length)


def stack_controls() -> dict:
    """The switches a consensus run and consensus decoding share."""
    _default("cons_record_every", C.record_every)
    c = st.columns(4)
    iterations = c[0].number_input("Iterations N", 1, 10_000_000, PAGE_ITERATIONS, key="cons_iterations", **KEEP,
                                   help="One iteration is every block once, in order, then the final norm.")
    reinit = c[1].selectbox("Re-initialise weights", REINIT_MODES, key="cons_reinit", **KEEP,
                            format_func=REINIT_LABELS.get,
                            help="Random weights with the seed (once), SEED+i+1 after iteration i, or SEED+s after "
                                 "layer-step s; the run works on a copy, so the loaded model is never changed.")
    seed = c[2].number_input("Seed", 0, DRAWN_SEEDS - 1, C.seed, key="cons_seed", **KEEP)
    record_every = c[3].number_input("Record every k-th layer-step", 1, 10_000_000, key="cons_record_every", **KEEP,
                                     help="Keep layer-steps 0, k, 2k, ... and the last; for long runs.")
    skip_mlp = st.toggle("Skip MLPs (--noff)", key="cons_noff", **KEEP,
                         help="Drop every block's feed-forward sublayer: attention and norms only.")
    return dict(iterations=int(iterations), reinit=reinit, seed=int(seed), record_every=int(record_every),
                skip_mlp=bool(skip_mlp))


def _prompts_config(source: str, typed: list[str], n: int, length: int) -> dict:
    return {"source": "random", "n": n, "length": length} if source == "random" else {"source": "typed", "texts": typed}


def _prompts_for(lm: LoadedModel, source: str, typed: list[str], n: int, length: int, seed: int):
    return random_prompt_ids(lm, n, length, seed) if source == "random" else typed


def _model_label(lm: LoadedModel, source: str, n: int, length: int, s: dict) -> str:
    label = f"{spec_label(lm.spec)} N={s['iterations']}" + (" noff" if s["skip_mlp"] else "") + REINIT_TAGS[s["reinit"]]
    if source == "random":
        label += f" random {n}x{length}"
    if source == "random" or s["reinit"] != "none":
        label += f" seed={s['seed']}"
    if s.get("interventions"):
        label += " " + " ".join(s["interventions"])
    return label


def _estimate_caption(lm: LoadedModel, source: str, typed: list[str], n: int, length: int,
                      cfg: ConsensusConfig, new_tokens: int = 0) -> None:
    ids = [[0] * length] * n if source == "random" else [lm.tokenizer.encode(p) for p in typed]
    if not ids or not all(ids):
        return
    st.caption(estimate_run(lm, ids, cfg, new_tokens, [] if source == "random" else typed).caption())


def run_controls(lm: LoadedModel | None) -> Request | None:
    source, typed, n, length = prompt_controls(lm)
    s = stack_controls()
    s["interventions"] = consensus_interventions(lm)
    c1, c2 = st.columns([1, 2])
    matrix = c1.toggle("Token cosine matrices", key="cons_matrix", **KEEP,
                       help="Record the T x T cosine matrix at every recorded layer-step (heatmap, --matrixerror).")
    decode_text = c2.text_input("Logit-lens decoding after iterations", "", key="cons_decode", **KEEP,
                                placeholder="e.g. 0,4,9 (0-based)",
                                help="The argmax token at every position after these iterations' final norm.")
    if lm is None:
        return None

    def config() -> ConsensusConfig:
        return ConsensusConfig(iterations=s["iterations"], skip_mlp=s["skip_mlp"], reinit=s["reinit"], seed=s["seed"],
                               record_every=s["record_every"], matrix=bool(matrix),
                               decode_iterations=parse_iterations(decode_text), max_events=MAX_EVENTS,
                               interventions=s["interventions"])

    try:
        _estimate_caption(lm, source, typed, n, length, config())
    except LabError:
        pass  # shown when Run is pressed

    def start():
        return consensus_stream(lm, _prompts_for(lm, source, typed, n, length, s["seed"]), config())

    settings = dict(s, matrix=bool(matrix), decode=decode_text, prompts=source)
    label = _model_label(lm, source, n, length, s)
    try:
        kept = run_config("run", lm.spec, _prompts_config(source, typed, n, length), config(), label=label)
    except LabError:
        kept = None  # Run shows the error
    return Request("run", label, start, "cons_record_every", settings, kept)


def decode_controls(lm: LoadedModel | None) -> Request | None:
    source, typed, n, length = prompt_controls(lm)
    s = stack_controls()
    s["interventions"] = consensus_interventions(lm)
    c = st.columns(3)
    k = c[0].number_input("New tokens K", 1, 100_000, PAGE_NEW_TOKENS, key="cons_new_tokens", **KEEP,
                          help="Each new token is sampled after a full consensus run over the whole sequence.")
    top_p = c[1].slider("Top-p", 0.01, 1.0, D.top_p, step=0.01, key="cons_top_p", **KEEP,
                        help="Nucleus sampling from the final state; 1 turns it off.")
    temperature = c[2].number_input("Temperature", 0.0, MAX_TEMPERATURE, D.temperature, step=0.05, key="cons_temperature", **KEEP)
    if lm is None:
        return None
    cfg = ConsensusConfig(iterations=s["iterations"], skip_mlp=s["skip_mlp"], reinit=s["reinit"], seed=s["seed"],
                          record_every=s["record_every"], max_events=MAX_EVENTS, interventions=s["interventions"])
    decode = DecodeConfig(new_tokens=int(k), top_p=float(top_p), temperature=float(temperature), seed=s["seed"])
    try:
        _estimate_caption(lm, source, typed, n, length, cfg, int(k))
    except LabError:
        pass

    def start():
        return consensus_decode_stream(lm, _prompts_for(lm, source, typed, n, length, s["seed"]), cfg, decode)

    label = _model_label(lm, source, n, length, s) + f" decode K={int(k)} top-p={float(top_p):g}"
    settings = dict(s, new_tokens=int(k), top_p=float(top_p), temperature=float(temperature), prompts=source)
    return Request("decode", label, start, "cons_record_every", settings,
                   run_config("decode", lm.spec, _prompts_config(source, typed, n, length), cfg, decode, label=label))


def sim_controls(lm: LoadedModel | None) -> Request:
    st.markdown(r"The paper's continuous-time model: $n$ tokens on the unit sphere in $\mathbb{R}^d$, each moving "
                r"along the tangent projection of its attention-weighted average, "
                r"$\dot x_i = P_{x_i}\big(\sum_j \operatorname{softmax}_j(\beta\langle Qx_i, Kx_j\rangle)\,Vx_j\big)$, "
                r"$P_x(y) = y - \langle x, y\rangle x$. One integration step stands where a layer-step does, so "
                r"the charts line up with model runs.")
    _default("sim_record_every", S.record_every)
    c = st.columns(4)
    tokens = c[0].number_input("Tokens n", 2, MAX_TOKENS, S.tokens, key="sim_tokens", **KEEP)
    qkv_kind = c[1].selectbox("Q, K, V", ["identity", "random", "layer"], key="sim_qkv", **KEEP,
                              format_func={"identity": "identity", "random": "random (seeded)",
                                           "layer": "a layer of the loaded model"}.get)
    qkv = qkv_kind
    if qkv_kind == "layer":
        if lm is None:
            c[2].caption("Load a model in the sidebar to take Q, K, V from one of its layers.")
        else:
            layer = c[2].number_input("Layer", 0, lm.stack.n_layer - 1, 0, key="sim_layer", **KEEP)
            head = c[3].selectbox("Head", ["all"] + list(range(lm.stack.n_head)), key="sim_head", **KEEP,
                                  format_func=lambda h: "all (averaged scores, V = W_O W_V)" if h == "all" else str(h))
            qkv = f"layer:{int(layer)}" + ("" if head == "all" else f":{head}")
            st.caption(f"d = the model's width, {lm.stack.d_model}.")
    else:
        # d x d matrices: 4096 is 64 MB each and a second to set up on a CPU; the engine's own limit (65536,
        # 17 GB a matrix) is no sphere a page should offer. A model's layer brings its own d.
        dim = c[2].number_input("Dimension d", 2, SIM_MAX_DIM, S.dim, key="sim_dim", **KEEP)
    c = st.columns(4)
    dt = c[0].number_input("Step size dt", 0.0, 100.0, S.dt, step=0.01, format="%.4f", key="sim_dt", **KEEP)
    beta = c[1].number_input("beta (inverse temperature)", -1000.0, 1000.0, S.beta, step=0.1, key="sim_beta", **KEEP)
    steps = c[2].number_input("Steps", 1, 10_000_000, S.steps, key="sim_steps", **KEEP)
    integrator = c[3].selectbox("Integrator", INTEGRATORS, index=INTEGRATORS.index(S.integrator), key="sim_integrator", **KEEP,
                                help="Each step is followed by re-projection onto the sphere.")
    c = st.columns(4)
    batch = c[0].number_input("Initial conditions", 1, 1024, PAGE_INITS, key="sim_inits", **KEEP,
                              help="Independent random clouds, integrated as one batch.")
    seed = c[1].number_input("Seed", 0, DRAWN_SEEDS - 1, S.seed, key="sim_seed", **KEEP)
    record_every = c[2].number_input("Record every k-th step", 1, 10_000_000, key="sim_record_every", **KEEP)
    causal = c[3].toggle("Causal (masked) attention", key="sim_causal", **KEEP)
    matrix = st.toggle("Token cosine matrices", key="sim_matrix", **KEEP)
    cfg = SimulationConfig(tokens=int(tokens), dim=int(dim) if qkv_kind != "layer" else 16, qkv=qkv, dt=float(dt),
                           beta=float(beta), steps=int(steps), seed=int(seed), batch=int(batch),
                           integrator=integrator, causal=bool(causal), record_every=int(record_every),
                           matrix=bool(matrix), max_events=MAX_EVENTS)

    def start():
        if qkv_kind == "layer" and lm is None:
            raise LabError("Q, K, V from a layer need a loaded model; pick one in the sidebar or use identity/random.")
        return simulation_stream(cfg, lm=lm if qkv_kind == "layer" else None,
                                 device=lm.stack.device if lm is not None else None)

    label = cfg.label()
    if qkv_kind == "layer" and lm is not None:
        label = label.replace(f" d={cfg.dim}", f" d={lm.stack.d_model}") + f" of {spec_label(lm.spec)}"
    label += f" seed={int(seed)}"
    return Request("sim", label, start, "sim_record_every",
                   dict(tokens=int(tokens), qkv=qkv, dt=float(dt), beta=float(beta), steps=int(steps)),
                   run_config("sim", lm.spec if qkv_kind == "layer" and lm is not None else None, None,
                              simulation=cfg, label=label))


# -- running ---------------------------------------------------------------------------------------

def _token_strings(lm: LoadedModel | None, result) -> list[list[str]] | None:
    if lm is None or isinstance(result, SimulationResult):
        return None
    return [readable_tokens(lm.tokenizer, ids) for ids in result.token_ids]


def _failure(e: Exception) -> str:
    text = failure(e, OUT_OF_MEMORY)
    return text if text == OUT_OF_MEMORY else f"The run failed: {text}. What was computed before is kept."


def offer_record_every(error: LabError, request: Request) -> None:
    """The memory estimate names a record-every that fits (``error.fix``): offer it as one click."""
    k = error.fix.get("record_every")
    if k is None:
        return

    def use():
        st.session_state[request.record_key] = k

    st.button(f"Record every {k}-th step", key="cons_offer", on_click=use,
              help="Sets the record-every control; press Run again to start.")


def execute(request: Request, lm: LoadedModel | None) -> None:
    """Stream one run into live views, archiving whatever it computed however it ends."""
    ss = st.session_state
    try:
        events = request.start()
    except LabError as e:
        st.error(str(e))
        offer_record_every(e, request)
        return
    events = runs_view.keep(request, events)  # the run folder, written as the run goes
    bar = st.progress(0.0, text="starting…")
    live_chart, live_text = st.empty(), st.empty()
    record = None
    drawn = 0.0
    try:
        for ev in events:
            if isinstance(ev, Started):
                record = dict(label=request.label, kind=request.kind, status="running", result=ev.result,
                              error=None, tokens=_token_strings(lm, ev.result), settings=request.settings,
                              new_texts=[[] for _ in ev.result.prompts], done=threading.Event(),
                              lock=threading.Lock(), run=ev.info.get("run"))
                ss[LIVE_KEY] = record
            elif isinstance(ev, Progress):
                unit = "steps" if request.kind == "sim" else "layer-steps"
                bar.progress(min(1.0, ev.step / max(1, ev.total)), text=f"{ev.step:,} / {ev.total:,} {unit}")
                if time.monotonic() - drawn > REDRAW_S:
                    draw(record_chart(record, "metric", log=False), live_chart)
                    drawn = time.monotonic()
            elif isinstance(ev, Decoded):
                live_text.dataframe(decodings_frame(record), hide_index=True)
            elif isinstance(ev, TokenSampled):
                for r, text in zip(ev.rows, ev.texts):
                    record["new_texts"][r].append(text)
                live_text.code("\n\n".join(record["result"].texts), language=None, wrap_lines=True)
            elif isinstance(ev, Finished):
                record["result"], record["status"] = ev.result, "finished"
    except LabError as e:
        if record is not None:
            record["status"], record["error"] = "failed", str(e)
        else:
            st.error(str(e))
    except Exception as e:  # a bug or the device failing: one line for the user, no traceback
        if record is not None:
            record["status"], record["error"] = "failed", _failure(e)
        else:
            st.error(_failure(e))
    finally:
        # Also on Stop, when Streamlit aborts the script mid-loop. Nothing of Streamlit's here: after
        # a Stop every call into it raises again, session state included.
        events.close()
        if record is not None:
            record["done"].set()  # the engine is closed: the result is written no more
    # Only a run that ended by itself gets here; a stopped one is archived by the next script run.
    kept = record is not None and archive(record)
    bar.empty()
    live_chart.empty()
    live_text.empty()
    if record is not None and record["error"] and not kept:  # failed before computing anything to keep
        st.error(record["error"])


def snapshot(live: dict) -> dict | None:
    """The record to keep of a live run, or None when it computed nothing. A copy, with a copy of
    the result when the run is not over: a run still stopping writes it for a moment longer."""
    record = {k: v for k, v in live.items() if k not in ("done", "lock", "archived")}
    if record["status"] == "running":
        record["status"] = "stopped"
    over = live.get("done") is None or live["done"].is_set()
    record["new_texts"] = [list(t) for t in record.get("new_texts") or []]
    result = record["result"]
    if isinstance(result, ConsensusResult):
        if result.columns_done == 0:
            return None
        if record["status"] != "finished":
            record["result"] = result.trimmed()
    elif isinstance(result, ConsensusDecodeResult):
        if not np.isfinite(result.traces).any():
            return None
        if not over:
            record["result"] = copy.deepcopy(result)
    return record


def archive(live: dict) -> bool:
    """Keep a run that ended (finished, stopped or failed) in the list of runs, if it computed
    anything; True when it did. Once, whichever script run gets here first: the run's own when it
    ended by itself, the next one after a Stop (both may, when Stop comes as the run finishes)."""
    ss = st.session_state
    with live.setdefault("lock", threading.Lock()):
        first = not live.get("archived")
        record = snapshot(live) if first else None
        if first and record is None and live.get("run") and live.get("done") is not None and not live["done"].is_set():
            # Its engine is still being closed by the script run it was cut off in (Streamlit starts
            # the next one before the last has unwound), so nothing it computed has reached the
            # result yet; the run folder will hold it: the run is opened from there when it ends.
            runs_view.open_saved(live["run"])
        if record is not None:
            runs = ss.setdefault(RUNS_KEY, [])  # a stopped script run raises here, before anything changed
            labels = {r["label"] for r in runs}
            label, k = record["label"], 2
            while label in labels:
                label, k = f"{record['label']} #{k}", k + 1
            record["label"] = label
            runs.append(record)
            del runs[:-MAX_RUNS]
        live["archived"] = True
    if ss.get(LIVE_KEY) is live:
        ss.pop(LIVE_KEY, None)
    if record is None:
        return False
    ss[SHOW_KEY] = record["label"]
    kept = {r["label"] for r in ss[RUNS_KEY]}
    overlay = [x for x in ss.get(OVERLAY_KEY, []) if x in kept]
    if record["kind"] != "decode":
        overlay.append(record["label"])
    ss[OVERLAY_KEY] = overlay
    return True


def settle_interrupted() -> None:
    """Archive a run left by an earlier script run of this session (Stop, Run again, any widget,
    or a visit to another page cut it off), as it stands: its thread stops at its next progress
    event, and the page never waits for that."""
    record = st.session_state.get(LIVE_KEY)
    if record is not None:
        archive(record)


def clear_runs() -> None:
    ss = st.session_state
    ss[RUNS_KEY] = []
    ss[OVERLAY_KEY] = []
    ss[runs_view.OPEN_KEY] = []  # closed on the page; still saved on disk
    ss.pop(SHOW_KEY, None)


# -- showing ---------------------------------------------------------------------------------------

def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.")[:PREFIX_MAX] or "consensus"


def show_status(record: dict) -> None:
    result = record["result"]
    if record.get("error"):
        st.error(record["error"])
    if record["kind"] == "decode":
        done = result.tokens_done
        if record["status"] != "finished":
            st.warning(f"{record['status'].capitalize()} after {done} of {result.decode.new_tokens} new tokens; "
                       f"what was computed is kept and downloadable.")
        st.caption(f"{result.model} · {len(result.prompts)} prompt(s) · {result.seconds:.2f} s on {result.device}")
        return
    done = int(result.steps_done.max()) if result.steps_done is not None else 0
    unit = "steps" if record["kind"] == "sim" else "layer-steps"
    if record["status"] != "finished":
        st.warning(f"{record['status'].capitalize()} after {max(done, 0):,} of {result.total_steps:,} {unit}; "
                   f"what was computed is kept and downloadable.")
    what = "initial condition(s)" if record["kind"] == "sim" else "prompt(s)"
    where = f"{result.model} · {len(result.prompts)} {what}"
    st.caption(f"{where} · {len(result.steps)} recorded points · {result.seconds:.2f} s on {result.device}")
    if isinstance(result, SimulationResult):
        st.caption(f"Q, K, V: {result.qkv_description}")


def show_run(record: dict, name: str, log: bool) -> None:
    result = record["result"]
    show_status(record)
    prefix = _safe(st.session_state.get("cons_prefix") or "consensus")
    if record["kind"] == "decode":
        show_decoding(record, prefix, log)
        return
    what = "initial conditions" if record["kind"] == "sim" else "prompts"
    picks = pick_lines(run_groups(record), "cons_pick_prompts", what)
    heatmap = result.matrix is not None and result.columns_done > 0
    chart = record_chart(record, name, log, picks, mark_step=heat_step(record) if heatmap else None)
    draw(chart)
    if heatmap:
        show_heatmap(record)
    if result.decodings:
        st.markdown("**Logit-lens decodings**: the argmax token at every input position after the iteration's "
                    "final norm (the lens's guess at the next token; ␣ is a space, ↵ a newline)")
        show_decodings(record)
    cols = st.columns(6)
    # Each download's bytes are made when its button is pressed, not on every rerun: a long run's
    # matrices reach the memory budget (gigabytes), and serialising them whenever a slider moves
    # would stall the page and hold a second copy in memory.
    cols[0].download_button("Metric .npy", lambda: npy_bytes(metric_array(result)), file_name=f"{prefix}.npy",
                            key="cons_dl_metric", on_click="ignore", help="float32 [B, P]: the --savefile PREFIX.npy")
    cols[1].download_button("Hidden .npy", lambda: npy_bytes(hidden_array(result)), file_name=f"{prefix}_hidden.npy",
                            key="cons_dl_hidden", on_click="ignore", help="float32 [B, T, D]: the final state")
    cols[2].download_button("Eplot .npy", lambda: npy_bytes(eplot_array(result)), file_name=f"{prefix}_eplot.npy",
                            key="cons_dl_eplot", on_click="ignore",
                            help="float32 [B, P-1, 2]: mean pairwise cosine and dot product (--eplot)")
    if result.matrix is not None:
        cols[3].download_button("Matrices .npy", lambda: npy_bytes(matrix_array(result)),
                                file_name=f"{prefix}_matrix.npy", key="cons_dl_matrix", on_click="ignore",
                                help="float32 [B, T, T, P-1]: token cosine matrices (--matrixerror)")
    cols[4].download_button("CSV", lambda: csv_bytes(record), file_name=f"{prefix}.csv", mime="text/csv",
                            key="cons_dl_csv", on_click="ignore",
                            help="Long format: prompt, step, then one column per statistic.")
    with cols[5]:
        chart_download(chart, f"{prefix}_chart", "cons_dl_chart")


def show_heatmap(record: dict) -> None:
    result = record["result"]
    p = result.columns_done
    steps = [int(s) for s in result.steps[:p]]
    st.markdown("**Token-by-token cosine similarity**")
    c1, c2 = st.columns([1, 3])
    b = 0
    if len(result.prompts) > 1:
        b = c1.selectbox("Prompt", range(len(result.prompts)), key="cons_heat_prompt",
                         format_func=lambda i: prompt_names(result)[i])
    if st.session_state.get("cons_heat_step") not in steps:
        st.session_state["cons_heat_step"] = steps[-1]
    unit = "Step" if record["kind"] == "sim" else "Layer-step"
    step = c2.select_slider(unit, steps, key="cons_heat_step",
                            help="0 is the embeddings (the initial condition); 1 + i*L + l is after block l of "
                                 "iteration i.")
    col = steps.index(step)
    if result.lengths[b] > HEATMAP_TOKENS:
        st.caption(f"The first {HEATMAP_TOKENS} of {result.lengths[b]} tokens are shown; the download holds them all.")
    draw(heatmap_chart(heatmap_frame(record, b, col)))


def show_decoding(record: dict, prefix: str, log: bool) -> None:
    result: ConsensusDecodeResult = record["result"]
    for b, text in enumerate(result.texts):
        st.markdown(f"**Prompt {b}** · {len(result.new_ids[b])} new token(s)")
        st.code(text, language=None, wrap_lines=True)
    st.markdown("**Per-token traces**: the reference metric of the consensus run behind each new token")
    names = prompt_names(result)
    b = 0
    if len(names) > 1:
        b = st.selectbox("Traces of prompt", range(len(names)), key="cons_trace_prompt", format_func=names.__getitem__)
    picks = pick_lines(trace_names(record, b), "cons_pick_tokens", "new tokens")
    chart = traces_chart(record, b, log, picks)
    draw(chart)
    cols = st.columns(4)
    cols[0].download_button("Texts .npy", lambda: npy_bytes(texts_array(result)), file_name=f"{prefix}.npy",
                            key="cons_dl_texts", on_click="ignore", help="unicode [B]: prompt + generated text")
    cols[1].download_button("Traces .npy", lambda: npy_bytes(diag_array(result)), file_name=f"{prefix}_diag.npy",
                            key="cons_dl_diag", on_click="ignore",
                            help="float32 [K*B, P]: row k*B + b is prompt b's trace for new token k")
    cols[2].download_button("CSV", lambda: csv_bytes(record), file_name=f"{prefix}.csv", mime="text/csv",
                            key="cons_dl_csv", on_click="ignore")
    with cols[3]:
        chart_download(chart, f"{prefix}_traces", "cons_dl_chart")


def show_results() -> None:
    ss = st.session_state
    runs = ss.get(RUNS_KEY, [])
    if not runs:
        st.caption("No runs yet: set things up above and press Run.")
        return
    st.divider()
    labels = [r["label"] for r in runs]
    if ss.get(SHOW_KEY) not in labels:
        ss[SHOW_KEY] = labels[-1]
    c = st.columns([3, 2, 1, 2])
    shown = c[0].selectbox("Run", labels, key=SHOW_KEY)
    if runs[labels.index(shown)]["kind"] == "decode" and not ss.get(OVERLAY_KEY):  # traces hold the metric only
        name = ss.get("cons_series") or STAT_NAMES[0]
    else:
        name = c[1].selectbox("Series", STAT_NAMES, key="cons_series", format_func=SERIES_LABELS.get, **KEEP)
    log = c[2].toggle("Log y", key="cons_log", **KEEP,
                      help="Log scale with a label at every power of ten, so a convergence rate reads off as a "
                           "slope; values at or below 1e-8 (zero, rounding noise) sit on the bottom line.")
    c[3].text_input("File prefix", "consensus", key="cons_prefix", **KEEP)
    show_run(runs[labels.index(shown)], name, log)

    st.subheader("Overlay")
    overlayable = [r["label"] for r in runs if r["kind"] != "decode"]
    ss[OVERLAY_KEY] = [x for x in ss.get(OVERLAY_KEY, []) if x in overlayable]
    picked = st.multiselect("Runs to overlay", overlayable, key=OVERLAY_KEY,
                            help="Earlier runs in one chart: with and without MLPs, trained and random weights, "
                                 "model and simulation.")
    if picked:
        chart = overlay_chart([r for r in runs if r["label"] in picked], name, log)
        draw(chart)
        with st.columns(4)[0]:
            chart_download(chart, f"{_safe(ss.get('cons_prefix') or 'consensus')}_overlay", "cons_dl_overlay")
    st.button("Clear all runs", key="cons_clear", on_click=clear_runs)


# -- page ------------------------------------------------------------------------------------------

ensure_frame()
st.title("Consensus")
st.markdown("Apply a model's layer stack again and again and watch its tokens converge to one point "
            "(*Consensus Is All You Get*, Abella, Silvestre & Tabuada, ICML 2025).")
settle_interrupted()
lm = current_model()
mode = st.radio("Mode", [MODE_RUN, MODE_DECODE, MODE_SIM], horizontal=True, key="cons_mode", **KEEP)
if mode == MODE_RUN:
    request = run_controls(lm)
elif mode == MODE_DECODE:
    request = decode_controls(lm)
else:
    request = sim_controls(lm)

b1, b2, b3, _ = st.columns([1, 1, 2, 4])
go = b1.button("Run", type="primary", key="cons_run", disabled=request is None, width="stretch")
b2.button("Stop", key="cons_stop", width="stretch", help="Stop the run; what was computed so far is kept.")
background = runs_view.background_toggle(b3)
if request is not None and go:
    runs_view.start(request, lm, execute, background)
if mode != MODE_SIM:
    runs_view.over_training(request, execute, background)
saved_runs = runs_view.open_runs(lm)
show_results()
runs_view.saved_table(saved_runs)
