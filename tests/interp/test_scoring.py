"""Explanation scores on synthetic features whose rule is known: the right explanation scores
high, a wrong one near chance, through the scoring functions and through a whole store."""
from __future__ import annotations

import random

import pytest

from core.interp import (BuiltinExplainer, Context, FeatureEvidence, FeatureStats, FeatureStore, RuleDetector,
                         RuleSimulator, balanced_accuracy, describe_store, detection_score,
                         interpretability_from_scores, quoted_tokens, simulation_score)
from core.interp.store import HIST_EDGES

VOCAB = [" the", " a", " king", " queen", " of", " and", " to", " my", " lord", " is", ",", ".", "\n", " dog"]


def _window(rng: random.Random, fire_on: str | None, n: int = 12) -> Context:
    """A window of random tokens; when ``fire_on`` is given it holds that token once, and the
    feature's activation is positive exactly there."""
    toks = [rng.choice(VOCAB) for _ in range(n)]
    acts = [0.0] * n
    pos = rng.randrange(n)
    if fire_on is not None:
        toks[pos] = fire_on
        acts[pos] = 1.0 + rng.random()
    return Context("top" if fire_on else "negative", 0, toks, [VOCAB.index(t) if t in VOCAB else 99 for t in toks],
                   acts, position=pos, activation=acts[pos])


def _feature(seed: int, n: int = 40):
    rng = random.Random(seed)
    pos = [_window(rng, " cat") for _ in range(n)]
    neg = [_window(rng, None) for _ in range(n)]
    return pos, neg


def test_right_explanation_scores_high_wrong_near_chance():
    pos, neg = _feature(0)
    top, held = pos[:20], pos[20:]
    explanation = BuiltinExplainer().explain_feature(FeatureEvidence(0, 0, top))
    assert quoted_tokens(explanation) == ["cat"]
    right = detection_score(explanation, held, neg, RuleDetector())
    assert right.value == 1.0 and right.n == 60 and right.details["tpr"] == 1.0
    # a wrong explanation naming a token that is everywhere (in both classes) is near chance
    wrong = detection_score('Fires on "the", "a"', held, neg, RuleDetector())
    assert abs(wrong.value - 0.5) < 0.15
    # naming a token that never occurs: it never says yes, exactly chance
    assert detection_score('Fires on "zebra"', held, neg, RuleDetector()).value == 0.5

    sim_right = simulation_score(explanation, held + neg, RuleSimulator())
    sim_wrong = simulation_score('Fires on "the"', held + neg, RuleSimulator())
    assert sim_right.value > 0.9 and abs(sim_wrong.value) < 0.2
    assert simulation_score('Fires on "zebra"', held + neg, RuleSimulator()).value == 0.0  # constant guess


def test_balanced_accuracy_ignores_class_balance():
    truth = [True] * 2 + [False] * 98
    assert balanced_accuracy([False] * 100, truth) == 0.5          # plain accuracy would be 0.98
    assert balanced_accuracy(truth, truth) == 1.0
    assert balanced_accuracy([True, False], [True, True]) is None   # one class: undefined
    assert detection_score('"x"', [], [], RuleDetector()).value is None


def test_interpretability_from_scores():
    assert interpretability_from_scores([0.5, 0.5]) == 1
    assert interpretability_from_scores([1.0]) == 10
    assert interpretability_from_scores([0.75]) == pytest.approx(6, abs=1)
    assert interpretability_from_scores([1.0, 0.5], weights=[3.0, -1.0]) == interpretability_from_scores([0.875])
    assert interpretability_from_scores([None, float("nan")]) is None


def test_scores_through_a_store(tmp_path):
    """Two synthetic features in a store: one fires on " cat" (a rule the explainer can find), one
    fires on random tokens (no rule). describe_store explains both from their top windows and
    scores them on held-out windows it never showed the explainer."""
    rng = random.Random(1)
    path = tmp_path / "features.sqlite"
    with FeatureStore.build(path) as store:
        store.add_set("synthetic", None, {})
        store.put_vocab({i: t for i, t in enumerate(VOCAB)} | {99: " cat"})
        store.put_layer(0, 2)
        stats = [FeatureStats(0, f, 0.1, 10, 2.0, 1.0, [0] * len(HIST_EDGES), [], [], []) for f in (0, 1)]
        store.put_features(stats)
        for f in (0, 1):
            def make(kind, n, fire):
                out = []
                for r in range(n):
                    c = _window(rng, fire() if fire else None)
                    c.kind, c.rank = kind, r
                    out.append(c)
                return out
            fire = (lambda: " cat") if f == 0 else (lambda: rng.choice(VOCAB))
            store.put_contexts(0, f, make("top", 10, fire) + make("heldout", 20, fire) + make("negative", 20, None))
    with FeatureStore(path) as store:
        events = list(describe_store(store, BuiltinExplainer()))
        assert events[-1].layer_descriptions[0].startswith("Layer 0 features fire on")
        card0, card1 = store.feature(0, 0), store.feature(0, 1)
        assert card0.explanations["builtin"] == 'Fires on "cat"'
        assert card0.scores["builtin"]["detection"] == 1.0 and card0.scores["builtin"]["simulation"] > 0.9
        assert card1.scores["builtin"]["detection"] < 0.8   # no single-token rule: far from perfect
        assert [f.feature for f in store.features(0, order_by="score")] == [0, 1]
