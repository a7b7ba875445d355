"""GPT Lab, the app: the frame around the workbench pages.

Run with ``streamlit run app.py``. This file owns navigation and the shared sidebar (model picker,
device, dtype, status); the pages in pages/ are thin views that call into core/.
"""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from core.commands.models import hub_cache_status
from core.devices import available_devices
from core.models.config import DTYPE_NAMES
from core.models.loading import KNOWN_HUB_MODELS
from core.models.shipped import shipped_names
from pages.parts.common import (DEVICE_KEY, DTYPE_KEY, HOME, SPEC_KEY, TRUST_KEY, WORKBENCHES, checkpoint_specs,
                                forget_outcome, load_outcome, model_from_url, model_to_url, spec_label, status_line)
from pages.parts.server_process import prepare_server_process

OTHER = "other…"
CHOICE_KEY = "model_choice"        # the picker's selectbox
OTHER_KEY = "model_other"          # the picker's free-text spec / path
_SHOWN_KEY = "_picker_spec"        # the spec the picker showed last run, to notice outside changes


def _same_place(a: str, b: str) -> bool:
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except OSError:
        return False


def _sync_picker_from_spec(options: list[str]) -> None:
    """When a page set ``model_spec`` (e.g. "open in Generate"), point the picker widgets at it
    before they are drawn."""
    ss = st.session_state
    spec = ss.setdefault(SPEC_KEY, "default")
    if ss.get(_SHOWN_KEY) == spec:
        return
    match = next((o for o in options if o == spec), None)
    if match is None and ("/" in spec or spec.startswith(".")):
        match = next((o for o in options if o != OTHER and "/" in o and _same_place(o, spec)), None)
    if match is not None:
        ss[CHOICE_KEY] = match
    else:
        ss[CHOICE_KEY] = OTHER
        ss[OTHER_KEY] = spec
    ss[_SHOWN_KEY] = spec


def picker_label(option: str, uncached: set[str]) -> str:
    """A picker entry: checkpoints relative to the repository, hub ids missing from the local Hugging
    Face cache marked as ``python -m core models`` marks them."""
    return f"{option} (not cached)" if option in uncached else spec_label(option)


def model_sidebar() -> None:
    ss = st.session_state
    forget_outcome()
    options = [*shipped_names(), *KNOWN_HUB_MODELS, *checkpoint_specs(), OTHER]
    uncached = {m for m in KNOWN_HUB_MODELS if not hub_cache_status(m)}  # file lookups only: fresh every run
    model_from_url()  # a reloaded tab keeps its model
    _sync_picker_from_spec(options)
    with st.sidebar:
        st.subheader("Model")
        choice = st.selectbox("Model", options, key=CHOICE_KEY, format_func=lambda o: picker_label(o, uncached),
                              label_visibility="collapsed",
                              help="`default` is the shipped GPT (and `diffusion` the shipped masked-diffusion LM, where installed); hub ids load from the local Hugging Face cache "
                                   "(\"not cached\" ones need `hf download` where there is internet); runs/… are "
                                   "checkpoints of your training runs.")
        spec = choice
        if choice == OTHER:
            spec = st.text_input("Model spec or path", key=OTHER_KEY, placeholder="gpt2, /path/to/folder, …",
                                 help="A hub id, a local Hugging Face folder (with config.json), or a GPT Lab "
                                      "checkpoint folder.").strip()
            st.checkbox("Trust remote code", key=TRUST_KEY,
                        help="Let transformers run Python code shipped with this model or its tokenizer. "
                             "Off unless you tick it.")
            if ss.get(TRUST_KEY):
                st.warning("Remote code runs with your permissions on this machine: tick this only for models "
                           "whose authors you trust.", icon=":material/warning:")
        else:
            ss[TRUST_KEY] = False  # the listed models never need it; it never outlives the choice
        devices = available_devices()
        if ss.get(DEVICE_KEY) not in devices:
            ss[DEVICE_KEY] = devices[0]
        st.selectbox("Device", devices, key=DEVICE_KEY,
                     help="`auto` spreads a Hugging Face model over the visible GPUs.")
        st.selectbox("Dtype", DTYPE_NAMES, key=DTYPE_KEY,
                     help="16-bit types halve memory; float32 is exact and the only sensible choice on CPU.")
        if spec:
            ss[SPEC_KEY] = spec
            ss[_SHOWN_KEY] = spec
        model_to_url()
        model, error = load_outcome()
        if error:
            st.error(error)
        else:
            st.caption(status_line(model, error))


prepare_server_process()
st.set_page_config(page_title="GPT Lab", page_icon=":material/science:", layout="wide")
pages = [st.Page(HOME.file, title=HOME.title, icon=HOME.icon, default=True)]
pages += [st.Page(w.file, title=w.title, icon=w.icon) for w in WORKBENCHES if w.exists]
page = st.navigation(pages)
model_sidebar()
page.run()
