"""Honest explanation scores, the same for every explainer, on held-out text.

- *Detection* (as in EleutherAI's delphi): given only the explanation, a detector says for each
  held-out window whether the feature fires in it. Positives are activating windows from the
  held-out part of the corpus (never shown to the explainer), negatives are held-out windows
  where the feature never fires. Score: balanced accuracy (mean of the true-positive and
  true-negative rates), so 0.5 is chance whatever the class balance.
- *Simulation* (OpenAI 2023, "Language models can explain neurons in language models"): a
  simulator predicts the activation of every token from the explanation; score: Pearson
  correlation between predicted and true activations over all tokens of the held-out windows.

Detectors and simulators: :class:`RuleDetector` / :class:`RuleSimulator` need no model: they read
the tokens quoted in the explanation (``"the"``) and predict firing exactly on those tokens (what
the built-in explainer writes); :class:`LMDetector` asks the explainer's language model the
yes/no question of :func:`core.interp.prompts.detection_prompt`, locally or through a server.
"""
from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Protocol, Sequence

import numpy as np

from .prompts import clean_token, fit_detection_prompt
from .store import Context, FeatureStore, Score

if TYPE_CHECKING:
    from .explain import PromptedExplainer

METHODS = ("detection", "simulation")


class Detector(Protocol):
    name: str

    def detect(self, explanation: str, texts: Sequence[Sequence[str]]) -> list[bool]:
        """For each window (a list of token texts): does the feature fire in it?"""


class Simulator(Protocol):
    name: str

    def simulate(self, explanation: str, tokens: Sequence[str]) -> list[float]:
        """Predicted activation of every token of one window."""


_QUOTED = re.compile(r"\"([^\"]+)\"|“([^”]+)”")


def quoted_tokens(explanation: str) -> list[str]:
    """The double-quoted strings of an explanation, normalised like tokens are for matching."""
    return [norm_token(a or b) for a, b in _QUOTED.findall(explanation or "") if norm_token(a or b)]


def norm_token(text: str) -> str:
    """Tokens and quoted strings compare after making whitespace visible, stripping and lowercasing."""
    return clean_token(text).strip().lower()


class RuleDetector:
    """Fires on a window that contains one of the explanation's quoted tokens."""

    name = "rule"

    def detect(self, explanation: str, texts: Sequence[Sequence[str]]) -> list[bool]:
        quoted = set(quoted_tokens(explanation))
        return [any(norm_token(t) in quoted for t in toks) for toks in texts]


class RuleSimulator:
    """Predicts 1 on the explanation's quoted tokens and 0 elsewhere."""

    name = "rule"

    def simulate(self, explanation: str, tokens: Sequence[str]) -> list[float]:
        quoted = set(quoted_tokens(explanation))
        return [1.0 if norm_token(t) in quoted else 0.0 for t in tokens]


class LMDetector:
    """The explainer's language model (local or behind a server) as detector: "would the neuron fire
    in this text? yes/no", read off the relative likelihood of "yes" and "no" as the answer's first
    token. A window too long for the explainer's input loses tokens from its start, never the
    explanation or the question."""

    def __init__(self, explainer: "PromptedExplainer"):
        self.explainer = explainer
        self.name = explainer.name

    def detect(self, explanation: str, texts: Sequence[Sequence[str]]) -> list[bool]:
        ex = self.explainer
        return ex.yes_no([fit_detection_prompt(explanation, t, ex.count, ex.max_input) for t in texts])


def balanced_accuracy(pred: Sequence[bool], truth: Sequence[bool]) -> float | None:
    p, t = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if t.all() or (~t).all():
        return None  # one class only: balanced accuracy is undefined
    tpr = float((p & t).sum() / t.sum())
    tnr = float((~p & ~t).sum() / (~t).sum())
    return (tpr + tnr) / 2


def detection_score(explanation: str, positives: Sequence[Context], negatives: Sequence[Context],
                    detector: Detector) -> Score:
    """Balanced accuracy of ``detector`` telling ``positives`` from ``negatives`` given the explanation."""
    texts = [c.tokens for c in positives] + [c.tokens for c in negatives]
    truth = [True] * len(positives) + [False] * len(negatives)
    if not texts:
        return Score("detection", None, 0, {"reason": "no held-out windows"})
    pred = detector.detect(explanation, texts)
    value = balanced_accuracy(pred, truth)
    p, t = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    details = {"detector": detector.name, "n_pos": int(t.sum()), "n_neg": int((~t).sum()),
               "tpr": float((p & t).sum() / t.sum()) if t.any() else None,
               "tnr": float((~p & ~t).sum() / (~t).sum()) if (~t).any() else None}
    return Score("detection", value, len(texts), details)


def simulation_score(explanation: str, contexts: Sequence[Context], simulator: Simulator) -> Score:
    """Pearson correlation of simulated and true activations over every token of ``contexts``."""
    pred: list[float] = []
    true: list[float] = []
    for c in contexts:
        sim = simulator.simulate(explanation, c.tokens)
        pred.extend(sim)
        true.extend(c.acts)
    if len(pred) < 2:
        return Score("simulation", None, len(pred), {"reason": "too few tokens"})
    p, t = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    if p.std() == 0 or t.std() == 0:
        return Score("simulation", 0.0 if t.std() > 0 else None, len(pred),
                     {"simulator": simulator.name, "reason": "constant prediction" if p.std() == 0 else "constant truth"})
    r = float(np.corrcoef(p, t)[0, 1])
    return Score("simulation", r if math.isfinite(r) else None, len(pred), {"simulator": simulator.name})


def score_feature(store: FeatureStore, layer: int, feature: int, explanation: str, detector: Detector | None,
                  simulator: Simulator | None = None, set_id: int | None = None) -> list[Score]:
    """Both scores (as available) for one feature on its stored held-out windows."""
    pos = store.contexts(layer, feature, "heldout", set_id=set_id)
    neg = store.contexts(layer, feature, "negative", set_id=set_id)
    out = []
    if detector is not None:
        out.append(detection_score(explanation, pos, neg, detector))
    if simulator is not None:
        out.append(simulation_score(explanation, pos + neg, simulator))
    return out


def interpretability_from_scores(values: Sequence[float | None], weights: Sequence[float] | None = None) -> int | None:
    """A 1-10 interpretability score grounded in measured detection accuracy: the weighted mean
    balanced accuracy, with chance (0.5) -> 1 and perfect (1.0) -> 10. None without scores."""
    pairs = [(v, 1.0 if weights is None else abs(w)) for v, w in zip(values, weights or [1.0] * len(values))
             if v is not None and math.isfinite(v)]
    if not pairs or sum(w for _, w in pairs) <= 0:
        return None
    mean = sum(v * w for v, w in pairs) / sum(w for _, w in pairs)
    return int(round(1 + 9 * min(1.0, max(0.0, (mean - 0.5) / 0.5))))
