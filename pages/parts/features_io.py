"""The Features page's import and export: the same engine calls as ``python -m core transcoders
export|import`` (core.interp.saelens, core.interp.neuronpedia), from the page.

- Export the set as SAELens folders (per layer cfg.json, sae_weights.safetensors and, with a
  feature store, sparsity.safetensors), or its feature store as the JSON Neuronpedia and
  SAEDashboard load.
- Import SAELens transcoder folders (a folder, or ORG/NAME[/PATH][@REV] from the local Hugging Face
  cache) as a new set for the sidebar's model; the page then opens it (collect its features with
  the job form).

Nothing is written into the shipped assets/ (git tracks it) and nothing is written over: every
destination must be a new or empty folder (core.files.check_output_dir), filled whole or not at all.
"""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from core.errors import LabError
from core.files import atomic_folder, check_output_dir
from core.interp.config import EXPORT_FORMATS, FOLD_LN, NEURONPEDIA_SET, SAVE_DTYPES
from core.interp.jobs import new_set_folder, shipped, usable_path
from core.interp.store import FeatureStore
from core.interp.transcoder import TranscoderSet
from core.models.loading import LoadedModel
from core.training.runs import runs_root
from pages.parts.common import attempt, spec_label

OPEN_FOLDER_KEY = "_feat_io_open"       # a folder the set picker opens at the top of the next run
NOTICE_KEY = "_feat_io_notice"
FORMAT_LABELS = {"saelens": "SAELens folders (the set's weights)",
                 "neuronpedia": "Neuronpedia / SAEDashboard JSON (the feature store)"}
FOLD_LABELS = {"auto": "auto (read the folders' metadata)", "yes": "yes (TransformerLens fold_ln)", "no": "no"}


def iokey(name: str) -> str:
    return f"feat_io_{name}"


def export_folder(model: str, fmt: str) -> Path:
    """A fresh ``<runs root>/exports/<model>-<format>-<time>`` folder name (not created)."""
    stem = new_set_folder(model).name
    base = runs_root() / "exports" / f"{stem}-{fmt}"
    folder, n = base, 2
    while folder.exists():
        folder, n = base.with_name(f"{base.name}-{n}"), n + 1
    return folder


def destination(typed: str, default: Path, what: str) -> Path:
    """The folder to write: typed or ``default``; never in assets/, new or empty (one sentence otherwise)."""
    text = typed.strip()
    if text:
        usable_path(text, what)
    path = Path(text).expanduser() if text else default
    if shipped(path):
        raise LabError(f"{path} is in the shipped assets/ folder, which the app never writes (git tracks it); "
                       f"leave the field empty for a new folder under {runs_root()}.")
    return check_output_dir(path, what)


def do_export(tset: TranscoderSet, store: FeatureStore | None, fmt: str, to: Path, dtype: str, model_id: str,
              sae_set: str) -> str:
    """Write the export; the sentence saying what was written."""
    if fmt == "neuronpedia":
        from core.interp.neuronpedia import export_neuronpedia

        if store is None:
            raise LabError("This set has no feature store to export; collect one with the job form below first.")
        folders = export_neuronpedia(store, to, model_id=model_id.strip() or None, sae_set=sae_set.strip())
        return f"Wrote {len(folders)} Neuronpedia source(s) to `{to}`: {', '.join(f.name for f in folders)}."
    from core.interp.saelens import export_saelens

    folders = export_saelens(tset, to, store=store, dtype=dtype)
    note = "" if store is not None else " (no feature store, so no sparsity.safetensors)"
    return (f"Wrote {len(folders)} SAELens folder(s) to `{to}`{note}; load one with "
            f"`sae_lens.SAE.load_from_disk(\"{folders[0]}\")`.")


def do_import(lm: LoadedModel, source: str, fold_ln: str, to: Path) -> str:
    from core.interp.saelens import import_saelens

    if not source.strip():
        raise LabError("Enter the SAELens folder(s) to import: a folder, or ORG/NAME from the Hugging Face cache.")
    tset = import_saelens(source.strip(), lm, fold_ln=fold_ln)
    with atomic_folder(to) as tmp:  # the set appears whole or not at all
        tset.save(tmp, tset.origin.get("dtype", "float32"))
    st.session_state[OPEN_FOLDER_KEY] = str(to)
    return (f"Imported {len(tset.layers)} transcoder(s) into `{to}`; it is open above. Collect its features with "
            f"the job form below (or `python -m core transcoders collect --transcoders {to}`).")


def io_section(lm: LoadedModel, tset: TranscoderSet | None, store: FeatureStore | None) -> None:
    """The expander with the export and import forms."""
    ss = st.session_state
    with st.expander("Import and export (SAELens, Neuronpedia)", icon=":material/swap_horiz:"):
        notice = ss.pop(NOTICE_KEY, None)
        if notice:
            st.success(notice)
        export_tab, import_tab = st.tabs(["Export this set", "Import SAELens transcoders"])
        with export_tab:
            if tset is None:
                st.info("Pick a transcoder set above to export it.")
            else:
                export_form(lm, tset, store)
        with import_tab:
            import_form(lm)


def export_form(lm: LoadedModel, tset: TranscoderSet, store: FeatureStore | None) -> None:
    fmt = st.radio("Format", list(EXPORT_FORMATS), format_func=FORMAT_LABELS.get, key=iokey("format"))
    default = export_folder(lm.spec, fmt)
    to = st.text_input("Write to", key=iokey("to"), placeholder=spec_label(str(default)),
                       help="A new or empty folder; empty: a new folder under the runs root. Never assets/.")
    cols = st.columns(3)
    dtype, model_id, sae_set = "float32", "", NEURONPEDIA_SET
    if fmt == "saelens":
        dtype = cols[0].selectbox("Weights dtype", list(SAVE_DTYPES), key=iokey("dtype"))
    else:
        model_id = cols[0].text_input("Neuronpedia model id", key=iokey("model_id"), placeholder=spec_label(lm.spec))
        sae_set = cols[1].text_input("Source set", NEURONPEDIA_SET, key=iokey("sae_set"),
                                     help="Layer i's source is i-NAME.")
    if st.button("Export", key=iokey("export"), icon=":material/upload:"):
        path, error = attempt(destination, to, default, "The export folder")
        if error is None:
            said, error = attempt(do_export, tset, store, fmt, path, dtype, model_id, sae_set)
        if error:
            st.error(error)
        else:
            st.success(said)


def import_form(lm: LoadedModel) -> None:
    source = st.text_input("SAELens folder(s) or ORG/NAME", key=iokey("source"),
                           placeholder="/path/to/saelens or ORG/NAME[/PATH][@REV]",
                           help="One SAE folder (cfg.json + sae_weights.safetensors), a folder of them (one per layer), "
                                "or a repo already in the local Hugging Face cache. Each must read "
                                "blocks.{i}.ln2.hook_normalized and write blocks.{i}.hook_mlp_out.")
    cols = st.columns(2)
    fold = cols[0].selectbox("Fold ln2 into the encoder", list(FOLD_LN), format_func=FOLD_LABELS.get,
                             key=iokey("fold_ln"))
    default = new_set_folder(lm.spec)
    to = cols[1].text_input("Write the set to", key=iokey("import_to"), placeholder=spec_label(str(default)),
                            help="A new or empty folder; empty: a new folder under the runs root. Never assets/.")
    if st.button("Import", key=iokey("import"), icon=":material/download:"):
        path, error = attempt(destination, to, default, "The set folder")
        if error is None:
            said, error = attempt(do_import, lm, source, fold, path)
        if error:
            st.error(error)
        else:
            st.session_state[NOTICE_KEY] = said
            st.rerun()


def pending_folder() -> str | None:
    """The folder an import just wrote, for the set picker (then forgotten)."""
    return st.session_state.pop(OPEN_FOLDER_KEY, None)


__all__ = ["io_section", "pending_folder", "destination", "export_folder"]
