"""Explanation scores on synthetic features whose rule is known: the right explanation scores
high, a wrong one near chance, through the scoring functions and through a whole store; AUC checked
against scikit-learn-free brute force (every positive/negative pair), fuzzing and hard negatives."""
from __future__ import annotations

import random

import pytest

from core.interp import (BuiltinExplainer, Context, FeatureEvidence, FeatureStats, FeatureStore, RuleDetector,
                         RuleSimulator, balanced_accuracy, describe_store, detection_score,
                         interpretability_from_scores, quoted_tokens, simulation_score)
from core.interp.scoring import auc, fuzz_windows, fuzzing_score, score_label
from core.interp.store import HIST_EDGES, Score

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
    assert right.details["balanced_accuracy"] == 1.0 and right.details["yes_no"]
    # a wrong explanation naming a token that is everywhere (in both classes) is near chance
    wrong = detection_score('Fires on "the", "a"', held, neg, RuleDetector())
    assert abs(wrong.value - 0.5) < 0.15
    # naming a token that never occurs: it never says yes, exactly chance
    assert detection_score('Fires on "zebra"', held, neg, RuleDetector()).value == 0.5

    sim_right = simulation_score(explanation, held + neg, RuleSimulator())
    sim_wrong = simulation_score('Fires on "the"', held + neg, RuleSimulator())
    assert sim_right.value > 0.9 and abs(sim_wrong.value) < 0.2
    assert simulation_score('Fires on "zebra"', held + neg, RuleSimulator()).value == 0.0  # constant guess


def test_auc_is_the_pairwise_win_rate():
    rng = random.Random(3)
    for _ in range(20):
        scores = [rng.choice([0.0, 0.2, 0.5, 0.5, 0.9, 1.0]) for _ in range(30)]
        truth = [rng.random() < 0.4 for _ in range(30)]
        pos = [s for s, t in zip(scores, truth) if t]
        neg = [s for s, t in zip(scores, truth) if not t]
        if not pos or not neg:
            continue
        brute = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
        assert auc(scores, truth) == pytest.approx(brute, abs=1e-12)
    assert auc([0.1, 0.2], [True, True]) is None
    # a yes/no detector: AUC equals balanced accuracy by construction (the page then shows only one)
    pred, truth = [1.0, 0.0, 1.0, 1.0, 0.0], [True, True, False, True, False]
    assert auc(pred, truth) == pytest.approx(balanced_accuracy([p > 0.5 for p in pred], truth))


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
        assert events[-1].layer_descriptions[0] == (
            'Layer 0: of its 2 most active features, 1 has an explanation that holds up on held-out text (detection '
            'AUC 0.7 or more), firing on "cat" (detection AUC 1.00, n=40).')
        card0, card1 = store.feature(0, 0), store.feature(0, 1)
        assert card0.explanations["builtin"] == 'Fires on "cat".'
        assert card0.scores["builtin"]["detection"] == 1.0 and card0.scores["builtin"]["simulation"] > 0.9
        assert card0.scores["builtin"]["fuzzing"] == 1.0 and card0.score_rows["builtin"]["detection"].n == 40
        assert card1.scores["builtin"]["detection"] < 0.8   # no single-token rule: far from perfect
        assert [f.feature for f in store.features(0, order_by="score")] == [0, 1]


class _Graded:
    """A detector with graded probabilities: 0.9 for a quoted token, 0.6 for a token that merely
    starts like one, 0.1 otherwise; so AUC and balanced accuracy differ."""

    name = "graded"

    def _p(self, explanation, toks):
        quoted = set(quoted_tokens(explanation))
        best = 0.1
        for t in toks:
            t = t.strip().lower()
            if t in quoted:
                best = max(best, 0.9)
            elif any(t[:1] == q[:1] for q in quoted):
                best = max(best, 0.6)
        return best

    def detect(self, explanation, texts):
        return [self._p(explanation, t) for t in texts]

    def fuzz(self, explanation, windows):
        return [self._p(explanation, [toks[p] for p in marks]) for toks, marks in windows]


def test_synthetic_features_exact_token_scores_auc_one_random_near_chance():
    """The acceptance rule: a feature firing exactly on one token scores AUC ~ 1 in detection and
    fuzzing (and r ~ 1 in simulation) with its explanation; a feature firing on random tokens scores
    AUC ~ 0.5 with the explanation the built-in explainer writes from its top windows."""
    exact_pos, exact_neg = _feature(10, n=120)
    ex = BuiltinExplainer()
    text = ex.explain_feature(FeatureEvidence(0, 0, exact_pos[:20]))
    held = exact_pos[20:70]
    det = detection_score(text, held, exact_neg[:50], RuleDetector())
    fuzz = fuzzing_score(text, held, RuleDetector())
    sim = simulation_score(text, held + exact_neg[:50], RuleSimulator())
    assert det.value == 1.0 and det.n == 100 and fuzz.value == 1.0 and fuzz.n == 100 and sim.value > 0.95

    rng = random.Random(11)
    rand_pos = [_window(rng, rng.choice(VOCAB)) for _ in range(400)]
    rand_neg = [_window(rng, None) for _ in range(200)]
    text = ex.explain_feature(FeatureEvidence(0, 1, rand_pos[:20]))
    det = detection_score(text, rand_pos[20:220], rand_neg, RuleDetector())
    fuzz = fuzzing_score(text, rand_pos[20:220], RuleDetector())
    assert abs(det.value - 0.5) < 0.1 and abs(fuzz.value - 0.5) < 0.1


def test_fuzzing_marks_the_firing_tokens_or_as_many_silent_ones():
    pos, _ = _feature(4, n=10)
    right, wrong = fuzz_windows(pos, seed=1)
    assert len(right) == len(wrong) == 10
    for c, (toks, on), (toks2, off) in zip(pos, right, wrong):
        assert toks is c.tokens is toks2
        assert on == [c.position] and len(off) == 1 and c.acts[off[0]] == 0
    assert fuzz_windows(pos, seed=1) == (right, wrong)   # seeded: the same marks every time


def test_hard_negatives_catch_an_explanation_that_only_lists_tokens():
    """A feature that fires on " king" only after " my": its explanation "king" says yes to every
    window holding " king", so the hard negatives (" king" without " my") pull detection below 1 and
    their own true-negative rate is 0; a graded detector's AUC and balanced accuracy differ and both are kept."""
    rng = random.Random(5)

    def win(fire: bool, hard: bool) -> Context:
        c = _window(rng, None)
        c.tokens = [t if t not in (" king", " my") else " the" for t in c.tokens]
        p = 6
        if fire or hard:
            c.tokens[p - 1] = " my" if fire else " a"
            c.tokens[p] = " king"
        c.acts = [0.0] * len(c.tokens)
        if fire:
            c.acts[p] = 1.5
        c.position, c.activation, c.kind = p, c.acts[p], "heldout" if fire else ("hard" if hard else "negative")
        return c

    pos = [win(True, False) for _ in range(50)]
    neg = [win(False, False) for _ in range(50)] + [win(False, True) for _ in range(25)]
    sc = detection_score('Fires on "king"', pos, neg, RuleDetector())
    assert sc.n == 125 and sc.details["n_hard"] == 25 and sc.details["hard_tnr"] == 0.0
    assert sc.value == pytest.approx((1.0 + 50 / 75) / 2)          # yes/no: AUC = balanced accuracy
    assert score_label(sc) == "detection AUC 0.83 (n=125: 50 firing, 75 silent incl. 25 hard)"
    graded = detection_score('Fires on "king"', pos, neg, _Graded())
    assert not graded.details["yes_no"] and graded.details["balanced_accuracy"] != graded.value
    assert "balanced accuracy" in score_label(graded)
    sim = Score("simulation", 0.5, 1500, {})
    assert score_label(sim) == "simulation r 0.50 (n=1,500 tokens)"
