"""Consensus's intervention controls: skip chosen layers' MLPs and ablate heads, on top of the page's
"Skip MLPs" (every layer). They become ``ConsensusConfig.interventions`` specs (``mlp:L``, ``head:L.H``),
which the run applies at every iteration and records with its settings."""
from __future__ import annotations

import streamlit as st

from core.models.loading import LoadedModel

KEEP = dict(persist_state="session")


def consensus_interventions(lm: LoadedModel | None) -> tuple[str, ...]:
    """The chosen ``--ablate`` specs, drawn as two multiselects (none without a model)."""
    if lm is None:
        return ()
    L, H = lm.stack.n_layer, lm.stack.n_head
    c = st.columns(2)
    mlps = c[0].multiselect("Skip the MLP of layers", list(range(L)), key="cons_iv_mlp", **KEEP,
                            help="Zero these layers' MLP output at every iteration (--ablate mlp:L); "
                                 "'Skip MLPs' above skips every layer's.")
    heads = c[1].multiselect("Ablate heads", [f"{i}.{h}" for i in range(L) for h in range(H)], key="cons_iv_heads",
                             **KEEP, placeholder="layer.head",
                             help="Zero these heads' output (hook_z) at every iteration (--ablate head:L.H).")
    return tuple([f"mlp:{i}" for i in mlps] + [f"head:{h}" for h in heads])
