"""Features: browse a model's transcoder features layer by layer (what each fires on, how well its
explanation holds up on held-out text, what it writes), search them by words, explain how the model
produced a completion, and train / collect / describe transcoder sets as background jobs.

The engine is core.interp: a transcoder set is a folder (``TranscoderSet``), its features live in
the set's ``features.sqlite`` (``FeatureStore``, opened read-only per run, so a job writing it
meanwhile is never in the way). The sidebar picks the model; the set picker lists the model's own
set (``<model folder>/transcoders/``), sets written by this page's jobs for the model, and any
folder typed in.
"""
from __future__ import annotations

import hashlib
import shlex
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import streamlit as st

from core.errors import LabError, first_line, is_out_of_memory, shorten
from core.interp.scoring import METHOD_HELP, METHODS
from core.interp.store import SORT_KEYS, FeatureStore, store_path
from core.interp.transcoder import (CONFIG_FILENAME, SET_FORMAT, TranscoderSet, is_transcoder_folder,
                                    load_transcoder_set, transcoder_dir_for)
from core.models.loading import LoadedModel
from pages.parts.common import current_model, ensure_frame, spec_label
from pages.parts.features_card import density_chart, draw_card, md_escape
from pages.parts.features_completion import completion_panel
from core.interp.jobs import list_jobs, usable_path
from pages.parts.common import attempt
from pages.parts.features_jobs_view import followed_set, jobs_section
from pages.parts.features_io import io_section, pending_folder
from pages.parts.interventions_features import feature_actions

SET_KEY = "feat_set"              # the set picker (a folder, or OTHER)
SET_OTHER_KEY = "feat_set_other"  # the folder typed for OTHER
SECTION_KEY = "feat_section"      # the tabs
LAYER_KEY = "feat_layer"
FEATURE_KEY = "feat_feature"      # the feature whose card is open
SORT_KEY = "feat_sort"
DESC_KEY = "feat_desc"
EXPLAINER_KEY = "feat_explainer"
METHOD_KEY = "feat_method"
SEARCH_KEY = "feat_search"
_CARD_LAYER = "_feat_card_layer"  # the layer the open feature belongs to (a new layer opens its top feature)
_FOR_SET = "_feat_for_set"        # the set the layer / feature keys refer to
_APPLIED = "_feat_applied"        # the last list / search selection turned into an open card
_PENDING = "_feat_pending_open"   # (layer, feature) to open at the top of the next run
_SETS_SEEN = "_feat_sets_seen"    # (model spec, whether it had sets) when the picker was last drawn
OTHER = "other…"
IMPORT_FORMATS = {"saelens": "SAELens"}  # an imported set's origin format -> its name in the set's card
BROWSE, EXPLAIN = "Features", "Explain a completion"
SORTS = {label: key for key, label in SORT_KEYS.items()}  # the sort picker shows labels
LIST_LIMIT = 5000
SEARCH_LIMIT = 50


# -- the transcoder set ---------------------------------------------------------------------------

def known_sets(lm: LoadedModel) -> dict[str, str]:
    """``{folder: label}``: the model's own set, then sets this page's jobs wrote for the model."""
    found: dict[str, str] = {}
    own = transcoder_dir_for(lm)
    if is_transcoder_folder(own):
        found[str(own.resolve())] = f"{spec_label(str(own))} (the model's own)"
    jobs, _ = attempt(list_jobs)
    for job in jobs or []:
        if job.model == lm.spec and job.output and job.output not in found and is_transcoder_folder(job.output):
            found[job.output] = f"{spec_label(job.output)} (job {job.id})"
    return found


def _stamp(folder: Path) -> tuple:
    """Modification times of the set's files: a retrained set is read again."""
    return tuple(sorted((p.name, p.stat().st_mtime_ns) for p in folder.glob("*.json")))


@st.cache_resource(max_entries=4, show_spinner="Loading transcoders…")
def _load_set(folder: str, stamp: tuple, device: str) -> TranscoderSet:
    return load_transcoder_set(folder, device)


def load_set(lm: LoadedModel, folder: str) -> TranscoderSet:
    path = usable_path(folder, "The set folder")
    if not is_transcoder_folder(path):
        raise LabError(f"{shorten(str(path), 300)} is not a transcoder set (no {CONFIG_FILENAME} with format "
                       f"'{SET_FORMAT}'); pick another folder or train one below.")
    tset = _load_set(str(path.resolve()), _stamp(path), str(lm.stack.device))
    tset.check_model(lm)
    return tset


def pick_set(lm: LoadedModel) -> tuple[str | None, bool]:
    """The set picker: ``(the chosen folder or None when none is chosen or typed, whether any set
    was found for the model)``."""
    ss = st.session_state
    sets = known_sets(lm)
    options = [*sets, OTHER]
    before = ss.get(_SETS_SEEN)
    if ss.get(SET_KEY) not in options or before is None or before[0] != lm.spec or (not before[1] and sets):
        ss[SET_KEY] = options[0]  # another model, or its first set appeared: show a set rather than a blank
    ss[_SETS_SEEN] = (lm.spec, bool(sets))
    follow = followed_set()
    if follow and follow in sets:  # a job started here has just written it
        ss[SET_KEY] = follow
    imported = pending_folder()
    if imported:  # an import on this page has just written it
        ss[SET_KEY], ss[SET_OTHER_KEY] = (imported, None) if imported in sets else (OTHER, imported)
    cols = st.columns([3, 3], vertical_alignment="bottom")
    choice = cols[0].selectbox("Transcoder set", options, key=SET_KEY,
                               format_func=lambda f: sets.get(f, "Another folder…"),
                               help="One transcoder per MLP layer, with its feature store. The model's own set lives "
                                    "in its folder's transcoders/; sets trained below are listed too.")
    if choice != OTHER:
        return choice, True
    typed = cols[1].text_input("Set folder", key=SET_OTHER_KEY, placeholder="/path/to/transcoders",
                               help="A folder written by `python -m core transcoders train`.").strip()
    return typed or None, bool(sets)


def set_summary(tset: TranscoderSet) -> str:
    c = tset.config
    imported = tset.origin.get("format")
    sparsity = {"topk": f"top-{c.k}", "jumprelu": "JumpReLU",
                "relu": "ReLU" if imported else f"ReLU, L1 {c.l1_coeff:g}"}.get(c.activation, c.activation)
    steps = (tset.metrics or {}).get("steps")
    source = str(tset.origin.get("source") or "")
    return (f"{len(tset.layers)} layers × {c.n_features:,} features ({sparsity})"
            + (f" · {steps:,} training steps" if steps else "")
            + (f" · imported from {md_escape(IMPORT_FORMATS.get(imported, str(imported)))} "
               f"`{spec_label(source)}` for `{spec_label(tset.model)}`" if imported
               else f" · trained on `{spec_label(tset.model)}`" if tset.model else ""))


def set_notes(tset: TranscoderSet) -> list[str]:
    """What an import changed (its first note is the summary's "imported from" already)."""
    notes = tset.origin.get("notes")
    return [str(n) for n in notes[1:]] if isinstance(notes, list) else []


def guarded(fn: Callable[..., None], *args: Any, **kwargs: Any) -> None:
    """Draw one section; whatever goes wrong in it (a damaged store, a file that vanished) becomes
    one line of st.error and the rest of the page still draws."""
    try:
        fn(*args, **kwargs)
    except LabError as e:
        st.error(str(e))
    except Exception as e:  # a file-system surprise or a bug: one line, never a traceback
        if is_out_of_memory(e):
            st.error("The device ran out of memory drawing this section; pick a smaller model or another device "
                     "in the sidebar.")
        else:
            detail = f"{type(e).__name__}: {first_line(e)}" if str(e).strip() else type(e).__name__
            st.error(f"Could not draw this section: {detail}")


def quality_table(store: FeatureStore) -> None:
    st.dataframe(quality_frame(store), hide_index=True, key="feat_quality",
                 column_config={k: st.column_config.NumberColumn(format="%.4f") for k in ("FVE", "loss", "spliced",
                                                                                        "ablated")}
                 | {k: st.column_config.NumberColumn(format="percent") for k in ("dead", "recovered")}
                 | {"dead": st.column_config.NumberColumn(format="percent", help="Never fired on the validation text "
                                                                                   "the set was evaluated on."),
                    "live features": st.column_config.NumberColumn(help="Fired at least once on the text the feature "
                                                                        "store was collected from (other text than "
                                                                        "the validation's).")})


def quality_frame(store: FeatureStore) -> pd.DataFrame:
    rows = store.layers()
    return pd.DataFrame({
        "layer": [r.layer for r in rows], "FVE": [r.fve for r in rows], "L0": [r.l0 for r in rows],
        "dead": [r.dead_fraction for r in rows], "loss": [r.loss_clean for r in rows],
        "spliced": [r.loss_replaced for r in rows], "ablated": [r.loss_ablated for r in rows],
        "recovered": [r.loss_recovered for r in rows], "live features": [r.n_alive for r in rows],
        "features": [r.n_features for r in rows]})


# -- browsing -------------------------------------------------------------------------------------

def show_card(layer: int, feature: int) -> None:
    """Open ``feature`` of ``layer`` in the card (before the layer picker and the card are drawn)."""
    ss = st.session_state
    ss[LAYER_KEY] = layer
    ss[FEATURE_KEY] = feature
    ss[_CARD_LAYER] = layer


def open_card(layer: int, feature: int) -> None:
    """From the completion panel: rerun on the Features tab, showing that feature (the tabs are
    drawn already in this run, so the switch happens at the top of the next)."""
    st.session_state[_PENDING] = (layer, feature)
    st.rerun()


def apply_pending_open() -> None:
    pending = st.session_state.pop(_PENDING, None)
    if pending is not None:
        st.session_state[SECTION_KEY] = BROWSE
        show_card(*pending)


def _selected_row(event, marker_key: str) -> int | None:
    """The row newly selected in a selectable dataframe (None if the selection is old or empty)."""
    rows = list(event.selection.rows) if event is not None else []
    if not rows:
        return None
    ss = st.session_state
    if ss.get(_APPLIED, {}).get(marker_key) == rows[0]:
        return None
    ss.setdefault(_APPLIED, {})[marker_key] = rows[0]
    return rows[0]


def search_section(store: FeatureStore) -> None:
    query = st.text_input("Search explanations", key=SEARCH_KEY, placeholder="words, e.g. Romeo",
                          help="Features of every layer whose explanation contains all these words (prefix match).")
    if not query.strip():
        return
    hits, error = attempt(store.search, query, limit=SEARCH_LIMIT)
    if error:
        st.error(error)
        return
    if not hits:
        st.caption(f"No explanation contains {shorten(query.strip(), 80)!r}.")
        return
    df = pd.DataFrame({"layer": [h.layer for h in hits], "feature": [h.feature for h in hits],
                       "explainer": [h.explainer for h in hits], "explanation": [h.text for h in hits]})
    key = "feat_hits_" + hashlib.sha1(query.strip().encode()).hexdigest()[:10]
    st.caption(f"{len(hits)} match{'es' if len(hits) != 1 else ''}" + (" (the first 50)" if len(hits) == SEARCH_LIMIT
                                                                         else "") + "; select one to open its card.")
    event = st.dataframe(df, hide_index=True, key=key, on_select="rerun", selection_mode="single-row", height=180)
    row = _selected_row(event, key)
    if row is not None:
        show_card(int(df.iloc[row]["layer"]), int(df.iloc[row]["feature"]))


def corpus_notes(store: FeatureStore, tset: TranscoderSet | None, layer: int) -> tuple[str, str]:
    """``(where "dead" was measured, where "live" was counted)``: the training run's validation text
    and the feature store's collection are different samples, so each number names its own."""
    sets = store.sets()
    collect = (sets[-1]["config"] or {}).get("collect", {}) if sets else {}
    info = next((l for l in store.layers() if l.layer == layer), None)
    n_coll = info.n_tokens if info is not None and info.n_tokens else collect.get("n_tokens")
    coll = f"{n_coll:,} tokens" if n_coll else "the collected tokens"
    coll += f" of {collect['dataset']}" if collect.get("dataset") else ""
    q = ((tset.metrics or {}).get("layers") or {}).get(str(layer), {}) if tset is not None else {}
    n_val = q.get("n_tokens")
    val = f"{n_val:,} validation tokens" if n_val else "the validation text"
    dataset = (tset.training or {}).get("dataset") if tset is not None else None
    val += f" of {dataset}" if dataset else ""
    if tset is not None and tset.origin.get("format"):
        val = f"{val} (measured at import)"
    return val, coll


def layer_overview(store: FeatureStore, info, explainer: str | None, tset: TranscoderSet | None = None) -> None:
    val, coll = corpus_notes(store, tset, info.layer)
    with st.container(border=True, key="feat_layer_overview"):
        cols = st.columns(5)
        fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
        cols[0].metric("FVE", fmt(info.fve, ".3f"), help="Fraction of the MLP output's variance the transcoder explains.")
        cols[1].metric("L0", fmt(info.l0, ".1f"), help="Active features per token.")
        cols[2].metric("Dead", fmt(info.dead_fraction, ".1%"),
                       help=f"Features that never fired on {val}, when the set was evaluated.")
        cols[3].metric("Loss recovered", fmt(info.loss_recovered, ".1%"),
                       help="(ablated - spliced) / (ablated - clean): 100% is a perfect stand-in for the MLP.")
        cols[4].metric("Live", f"{info.n_alive:,} / {info.n_features:,}",
                       help=f"Features that fired at least once on {coll}, when the feature store was collected.")
        st.caption(f"Dead: on {val}. Live: on {coll}. Different text, so they need not add up.")
        text = store.description("layer", info.layer, explainer)
        if text:
            st.markdown(f"**Layer {info.layer}** — {md_escape(text)}")
        edges, counts = store.density_histogram(info.layer)
        if counts:
            st.altair_chart(density_chart(edges, counts), width="stretch")


def feature_list(store: FeatureStore, layer: int, order: str, descending: bool, explainer: str | None,
                 method: str) -> list[int]:
    """The layer's live features as a selectable table; returns their ids in the order shown."""
    feats = store.features(layer, order_by=order, descending=descending, limit=LIST_LIMIT, explainer=explainer,
                           method=method)
    total = store.count_features(layer)
    df = pd.DataFrame({"feature": [f.feature for f in feats], "frequency": [f.density * 100 for f in feats],
                       "score": [f.score for f in feats], "n": [f.score_n for f in feats],
                       "explanation": [f.explanation or "" for f in feats],
                       "fires on": [" ".join(repr(t) for t in f.top_tokens[:5]) for f in feats]})
    key = f"feat_list_{layer}_{order}_{descending}_{explainer}_{method}"
    event = st.dataframe(df, hide_index=True, key=key, on_select="rerun", selection_mode="single-row", height=520,
                         column_config={
                             "frequency": st.column_config.NumberColumn("frequency %", format="%.3f",
                                                                        help="Share of tokens it fires on."),
                             "score": st.column_config.NumberColumn(
                                 f"{method} {'r' if method == 'simulation' else 'AUC'}", format="%.2f",
                                 help=METHOD_HELP[method]),
                             "n": st.column_config.NumberColumn(
                                 "n", format="%d", help="Held-out windows (tokens for simulation) it was scored on."),
                             "explanation": st.column_config.TextColumn(width="large")})
    st.caption(f"{total:,} live features" + (f", the first {LIST_LIMIT:,} shown" if total > LIST_LIMIT else "")
               + "; select a row to open its card.")
    row = _selected_row(event, key)
    if row is not None:  # the layer picker is drawn already; the card is not
        st.session_state[FEATURE_KEY] = int(df.iloc[row]["feature"])
        st.session_state[_CARD_LAYER] = layer
    return [f.feature for f in feats]


def browse(store: FeatureStore, tset: TranscoderSet | None = None) -> None:
    ss = st.session_state
    infos = {i.layer: i for i in store.layers()}
    if not infos:
        st.info("This feature store holds no layers; collect features below.")
        return
    total = store.description("total")
    if total:
        st.caption(f"**The set as a whole:** {md_escape(total)}")
    search_section(store)
    layers = sorted(infos)
    if ss.get(LAYER_KEY) not in layers:
        ss[LAYER_KEY] = layers[0]
    explainers = store.explainers()
    cols = st.columns([2, 2, 1.5, 2, 2], vertical_alignment="bottom")  # wide enough for "Descending" uncut
    layer = cols[0].selectbox("Layer", layers, key=LAYER_KEY, format_func=lambda i: f"Layer {i}")
    sort = cols[1].selectbox("Sort by", list(SORTS), key=SORT_KEY, persist_state="session")
    descending = cols[2].toggle("Descending", True, key=DESC_KEY, persist_state="session")
    explainer = None
    if explainers:
        if ss.get(EXPLAINER_KEY) not in explainers:
            ss[EXPLAINER_KEY] = explainers[0]
        explainer = cols[3].selectbox("Explanations by", explainers, key=EXPLAINER_KEY)
    method = cols[4].selectbox("Score", list(METHODS), key=METHOD_KEY, persist_state="session",
                               help=" ".join(f"{m.capitalize()}: {h}" for m, h in METHOD_HELP.items()))
    info = infos[layer]
    layer_overview(store, info, explainer, tset)
    left, right = st.columns([5, 6])
    with left:
        shown = feature_list(store, layer, SORTS[sort], descending, explainer, method)
    with right:
        if ss.get(_CARD_LAYER) != layer or ss.get(FEATURE_KEY) is None:
            ss[FEATURE_KEY] = shown[0] if shown else 0
            ss[_CARD_LAYER] = layer
        ss[FEATURE_KEY] = min(max(0, int(ss[FEATURE_KEY])), info.n_features - 1)
        feature = st.number_input("Feature", 0, info.n_features - 1, step=1, key=FEATURE_KEY,
                                  help="Any feature of this layer by number; or select a row of the list.")
        card, error = attempt(store.feature, layer, int(feature))
        if error:
            st.error(error)
        else:
            draw_card(card)
            feature_actions(ss.get(_FOR_SET), layer, int(feature))


# -- the page -------------------------------------------------------------------------------------

def no_set_message(lm: LoadedModel) -> None:
    own = transcoder_dir_for(lm)
    st.info(f"No transcoder set for `{spec_label(lm.spec)}` yet (looked in `{spec_label(str(own))}`). Train one "
            f"with the form below, or from a shell:")
    st.code(f"python -m core transcoders train --model {shlex.quote(lm.spec)}", language="bash")


def open_store(folder: str) -> tuple[FeatureStore | None, str | None]:
    path = store_path(folder)
    if not path.is_file():
        return None, None
    return attempt(FeatureStore, path, readonly=True)


def page() -> None:
    ss = st.session_state
    st.title("Features")
    st.markdown("Each MLP layer of the model has a **transcoder**: a wider, sparse stand-in whose features each "
                "write one fixed direction. Browse what each feature fires on and what it promotes, read and check "
                "its explanation, and explain how the model produced a completion, layer by layer.")
    lm = current_model()
    if lm is None:
        st.stop()
    if lm.untrained:
        st.caption(f":orange[`{spec_label(lm.spec)}` is untrained]: its features describe noise.")
    folder, found = pick_set(lm)
    tset, error = (None, None) if folder is None else attempt(load_set, lm, folder)
    if folder is None:
        if found:
            st.info("Enter the folder of a transcoder set.")
        else:
            no_set_message(lm)
    elif error:
        st.error(error)
    if tset is None:
        guarded(io_section, lm, None, None)
        guarded(jobs_section, lm, None, expanded=True)
        return
    folder = str(tset.folder.resolve())
    if ss.get(_FOR_SET) != folder:  # another set: its own layers and features
        for k in (LAYER_KEY, FEATURE_KEY, _CARD_LAYER):
            ss.pop(k, None)
        ss[_FOR_SET] = folder
    apply_pending_open()
    st.caption(set_summary(tset))
    for note in set_notes(tset):
        st.caption(md_escape(note))
    store, error = open_store(folder)
    try:
        if error:
            st.error(error)
        if store is not None:
            with st.expander("Quality per layer"):
                guarded(quality_table, store)
        browse_tab, explain_tab = st.tabs([BROWSE, EXPLAIN], key=SECTION_KEY, on_change="rerun")
        if browse_tab.open:
            with browse_tab:
                if store is not None:
                    guarded(browse, store, tset)
                elif error is None:
                    st.info(f"This set has no feature store yet ({spec_label(str(store_path(folder)))}): collect "
                            f"one with the form below, or `python -m core transcoders collect --model "
                            f"{shlex.quote(lm.spec)} --transcoders {shlex.quote(folder)}`.")
        if explain_tab.open:
            with explain_tab:
                guarded(completion_panel, lm, tset, store, folder, open_card)
        guarded(io_section, lm, tset, store)
        guarded(jobs_section, lm, folder, expanded=False)
    finally:
        if store is not None:
            store.close()


ensure_frame()
page()
