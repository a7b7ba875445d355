"""Home: what the lab does, and the card of the model the sidebar loaded."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from core.errors import fmt_count
from pages.parts.common import WORKBENCHES, current_model, ensure_frame, spec_label

ensure_frame()
st.title("GPT Lab")
st.markdown("A laboratory for GPT-style language models: load one, prompt it, look inside it, train your own. "
            "The same engine runs from the command line (`python -m core --help`) and from Python.")

for bench in WORKBENCHES:
    left, right = st.columns([1, 4], vertical_alignment="center")
    with left:
        if bench.exists:
            st.page_link(bench.file, label=bench.title, icon=bench.icon)
        else:
            st.markdown(f"{bench.icon} {bench.title}", help="This workbench is not installed yet.")
    right.markdown(bench.blurb)

st.divider()
model = current_model()
if model is not None:
    card = model.card()
    st.subheader(f"Loaded model: {spec_label(model.spec)}")
    if model.untrained:
        st.warning("**Untrained**: this model has random weights, so its text is noise. Train one on the "
                   "Training page, or pick another model in the sidebar.", icon=":material/warning:")
    cols = st.columns(5)
    cols[0].metric("Layers", card["layers"])
    cols[1].metric("Width", card["width"])
    cols[2].metric("Heads", card["heads"])
    cols[3].metric("Parameters", fmt_count(card["parameters"]), help=f"{card['parameters']:,} parameters")
    cols[4].metric("Context", card["context"], help="Longest sequence the model reads, in tokens.")
    facts = {"family": card["family"], "objective": card["objective"], "tokenizer": card["tokenizer"],
             "vocabulary": f"{card['vocab']:,}", "parameters": f"{card['parameters']:,}",
             "device": card["device"], "dtype": card["dtype"], "source": spec_label(card["source"]),
             "trained": "no (untrained)" if card["untrained"] else "yes"}
    st.table(pd.DataFrame({"value": list(facts.values())}, index=list(facts.keys())))
    if model.card_text:
        with st.expander("Model card"):
            st.markdown(model.card_text)
