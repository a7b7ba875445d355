"""The feature card and the small views it is made of: contexts with activations highlighted,
the activation histogram, promoted and suppressed tokens.

Contexts are HTML (``st.html``): one span per token, every token's text escaped, the background's
intensity proportional to the feature's activation on that token (scaled by the feature's largest
activation, so contexts compare), and the token the window was cut around in bold with an outline.
"""
from __future__ import annotations

import html
import re
from typing import Sequence

import altair as alt
import pandas as pd
import streamlit as st

from core.interp.config import SIM_SCALE
from core.interp.explain import BUILTIN
from core.interp.scoring import METHODS, score_label
from core.interp.store import HIST_EDGES, Context, FeatureCard, FeatureStats, Score

FIRE_RGB = (255, 140, 0)           # the highlight colour of an activation
ATTR_POS_RGB = (44, 160, 44)       # positive / negative attribution in a completion
ATTR_NEG_RGB = (214, 39, 40)
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|$<>~:&])")


def md_escape(text: str) -> str:
    """Text shown through st.markdown as written (explanations quote tokens like ``*`` or ``$``)."""
    return _MD_SPECIAL.sub(r"\\\1", text or "")


def shown_token(text: str) -> str:
    """A token as it is drawn: newlines and tabs visible, an empty token as a small box."""
    return (text.replace("\r", "").replace("\n", "↵").replace("\t", "⇥")) or "□"


def _span(text: str, alpha: float, rgb: tuple[int, int, int], title: str, firing: bool = False) -> str:
    style = f"background: rgba({rgb[0]}, {rgb[1]}, {rgb[2]}, {alpha:.2f}); border-radius: 3px;"
    if firing:
        return (f'<b class="firing" style="{style} outline: 2px solid #d62728;" title="{html.escape(title)}">'
                f"{html.escape(shown_token(text))}</b>")
    return f'<span style="{style}" title="{html.escape(title)}">{html.escape(shown_token(text))}</span>'


def activation_alpha(act: float, scale: float) -> float:
    """Background opacity for an activation: 0 when silent, 0.15..0.9 in proportion to ``act / scale``."""
    if not act > 0 or not scale > 0:
        return 0.0
    return 0.15 + 0.75 * min(1.0, act / scale)


def context_html(ctx: Context, scale: float, label: str | None = None) -> str:
    """One context as a line of highlighted tokens, its activation (or ``label``) in front."""
    head = html.escape(label if label is not None else f"{ctx.activation:.3g}")
    spans = [_span(tok, activation_alpha(a, scale), FIRE_RGB, f"activation {a:.4g}", firing=(i == ctx.position))
             for i, (tok, a) in enumerate(zip(ctx.tokens, ctx.acts))]
    return (f'<div style="font-family: monospace; font-size: 0.85rem; line-height: 1.9; white-space: pre-wrap; '
            f'margin: 0.1rem 0;"><span style="color: #888; display: inline-block; min-width: 4.5em;">{head}</span>'
            f'{"".join(spans)}</div>')


def contexts_html(contexts: Sequence[Context], scale: float, labels: Sequence[str] | None = None) -> str:
    rows = [context_html(c, scale, None if labels is None else labels[i]) for i, c in enumerate(contexts)]
    return f'<div class="contexts">{"".join(rows)}</div>'


def attribution_html(tokens: Sequence[str], values: Sequence[float], n_prompt: int) -> str:
    """The completion's tokens coloured by one layer's attribution at each position (green helped
    the generated text, red worked against it); prompt tokens in grey."""
    scale = max((abs(v) for v in values), default=0.0)
    spans = []
    for i, tok in enumerate(tokens):
        v = values[i] if i < len(values) else 0.0
        rgb = ATTR_POS_RGB if v >= 0 else ATTR_NEG_RGB
        alpha = 0.0 if scale == 0 else 0.8 * abs(v) / scale
        colour = "#888" if i < n_prompt else "inherit"
        spans.append(f'<span style="background: rgba({rgb[0]}, {rgb[1]}, {rgb[2]}, {alpha:.2f}); color: {colour}; '
                     f'border-radius: 3px;" title="attribution {v:+.4g}">{html.escape(shown_token(tok))}</span>')
    return (f'<div style="font-family: monospace; font-size: 0.85rem; line-height: 1.9; white-space: pre-wrap;">'
            f'{"".join(spans)}</div>')


def histogram_frame(stats: FeatureStats) -> pd.DataFrame:
    """The stored activation histogram (counts on the log-spaced bins starting at
    :data:`HIST_EDGES`), from its first to its last non-empty bin."""
    counts = list(stats.hist)
    nonzero = [i for i, c in enumerate(counts) if c]
    if not nonzero:
        return pd.DataFrame({"from": [], "count": []})
    lo, hi = nonzero[0], nonzero[-1]
    return pd.DataFrame({"from": [f"{HIST_EDGES[i]:.3g}" for i in range(lo, hi + 1)], "count": counts[lo:hi + 1]})


def histogram_chart(stats: FeatureStats) -> alt.Chart:
    df = histogram_frame(stats)
    return alt.Chart(df, title="Activation histogram", height=260).mark_bar().encode(
        x=alt.X("from:N", sort=None, title="activation from (log-spaced bins)", axis=alt.Axis(labelAngle=-45)),
        y=alt.Y("count:Q", title="tokens"),
        tooltip=["from", "count"])


def density_chart(edges: list[float], counts: list[int]) -> alt.Chart:
    """How often a layer's features fire: a histogram of log10(frequency) over its live features."""
    df = pd.DataFrame({"from": edges[:-1], "to": edges[1:], "features": counts})
    return alt.Chart(df, title="Feature frequency", height=220).mark_bar().encode(
        x=alt.X("from:Q", bin="binned", title="log10 frequency (share of tokens a feature fires on)"), x2="to:Q",
        y=alt.Y("features:Q"), tooltip=["from", "to", "features"])


def logit_frame(pairs: Sequence[tuple[str, float]]) -> pd.DataFrame:
    """Tokens written as Python strings, so a leading space or a newline shows."""
    return pd.DataFrame({"token": [repr(t) for t, _ in pairs], "effect": [float(v) for _, v in pairs]})


def score_lines(rows: dict[str, Score]) -> list[str]:
    """Each stored score of one explanation with its sample size (:func:`core.interp.scoring.score_label`)."""
    return [score_label(rows[m]) for m in METHODS if m in rows]


def scorer_note(explainer: str, rows: dict[str, Score]) -> str:
    """Who scored it: the built-in explainer is scored by the same quoted-token rule it writes."""
    if not rows:
        return f"{explainer} · not scored"
    if explainer == BUILTIN:
        return f"{explainer} · scored on held-out text by the rule detector and simulator (its quoted tokens)"
    asked = (["answering yes/no"] if {"detection", "fuzzing"} & set(rows) else []) + \
        ([f"rating each token 0-{SIM_SCALE}"] if "simulation" in rows else [])
    return f"{explainer} · scored on held-out text by {explainer} " + " and ".join(asked or ["answering yes/no"])


def draw_card(card: FeatureCard) -> None:
    """The whole card of one feature (the page has picked and loaded it)."""
    s = card.stats
    st.subheader(f"Feature {s.feature} · layer {s.layer}")
    st.caption(f"`{card.address}`")
    cols = st.columns([1.05, 1.15, 1.25, 0.95])  # "Mean activation" is the longest label: never cut at 1400 px
    cols[0].metric("Frequency", f"{s.density:.2%}" if s.density >= 0.001 else f"{s.density:.1e}",
                   help="Share of the collected tokens it fires on.")
    cols[1].metric("Max activation", f"{s.max_act:.3g}")
    cols[2].metric("Mean activation", f"{s.mean_act:.3g}", help="Over the tokens where it fires.")
    cols[3].metric("Fired on", f"{s.n_active:,}", help="Tokens of the collection where it fired.")
    if s.n_active == 0:
        st.info("This feature never fired on the collected text: it has no contexts and no explanation.")
        return
    if card.explanations:
        for explainer, text in card.explanations.items():
            rows = card.score_rows.get(explainer, {})
            with st.container(border=True, key=f"feat_expl_{s.layer}_{s.feature}_{explainer}"):
                st.markdown(f"{md_escape(text)}")
                st.caption(" · ".join([scorer_note(explainer, rows), *score_lines(rows)]))
    else:
        st.caption("No explanation yet: run a describe job below.")
    st.markdown("**Top contexts**")
    st.html(contexts_html(card.top, s.max_act))
    left, right = st.columns([3, 2])
    with left:
        st.altair_chart(histogram_chart(s), width="stretch")
    with right:
        st.markdown("**Fires most on**")
        st.dataframe(pd.DataFrame({"token": [repr(t) for t, _ in s.top_tokens],
                                   "times": [int(n) for _, n in s.top_tokens]}),
                     hide_index=True, key=f"feat_top_tokens_{s.layer}_{s.feature}", height=180)
    if card.quantiles:
        st.markdown("**Samples across the activation range**")
        labels = [f"q{c.quantile:.2f}" if c.quantile is not None else f"{c.activation:.3g}" for c in card.quantiles]
        st.html(contexts_html(card.quantiles, s.max_act, labels))
    left, right = st.columns(2)
    with left:
        st.markdown("**Promoted tokens**")
        st.dataframe(logit_frame(s.promoted), hide_index=True, key=f"feat_promoted_{s.layer}_{s.feature}",
                     column_config={"effect": st.column_config.NumberColumn(format="%.4f")})
    with right:
        st.markdown("**Suppressed tokens**")
        st.dataframe(logit_frame(s.suppressed), hide_index=True, key=f"feat_suppressed_{s.layer}_{s.feature}",
                     column_config={"effect": st.column_config.NumberColumn(format="%.4f")})
    st.caption("Promoted and suppressed: the feature's decoder direction through the final norm's gain and the "
               "unembedding (the direct path only), so they rank tokens rather than give logit changes.")
