"""The Features page's card shows a language-model explainer's simulation score with its sample
size, next to its detection score, as the store holds them (AppTest through app.py).

The scores are made by the real scoring path on the store's held-out windows: a scripted language
model (tests/interp/test_simulation_lm.py) that answers each window's question with the true
activations, so its simulation r is 1.0 on whatever sample it reads."""
from __future__ import annotations

from pathlib import Path

import pytest
from app_harness import described_feature_model, open_app, texts

from core.interp import FeatureStore, store_path
from core.interp.config import SIM_WINDOWS
from core.interp.scoring import LMSimulator, score_feature, score_label
from core.interp.store import Score
from pages.parts.features_card import scorer_note
from tests.interp.test_simulation_lm import Scripted

PAGE = "pages/features.py"
CORPUS = [("ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. "
           "JULIET: O Romeo, Romeo, wherefore art thou Romeo? ") * 8] * 3


@pytest.fixture(scope="module")
def lm_scored(tmp_path_factory, tiny_gptlab_dir: Path):
    """(model folder, layer, feature, explainer name): a described tiny set where one feature also
    has an LM explainer's explanation, its simulation score (exact scripted answers) and a detection
    score."""
    model_dir, set_dir = described_feature_model(tmp_path_factory.mktemp("features-sim"), tiny_gptlab_dir, CORPUS,
                                                 steps=20, n_tokens=2048)
    with FeatureStore(store_path(set_dir)) as store:
        feature = store.features(0, order_by="density")[0].feature
        pos = store.contexts(0, feature, "heldout")
        neg = store.contexts(0, feature, "negative") + store.contexts(0, feature, "hard")
        truth = {tuple(c.tokens): c.acts for c in pos + neg}
        assert pos and neg
        scale = 10 / max(max(c.acts) for c in pos)

        def exact(first, tokens):
            return "".join(f"{i}: {a * scale:.9f}\n" for i, a in enumerate(truth[tuple(tokens)], first))

        ex = Scripted(exact)
        (sim,) = score_feature(store, 0, feature, "Fires on names", None, LMSimulator(ex), methods=["simulation"],
                               n_sim=SIM_WINDOWS["lm"])
        store.put_explanations([(0, feature, "Fires on names")], ex.name)
        store.put_scores([(0, feature, sim), (0, feature, Score("detection", 0.75, len(pos) + len(neg), {
            "detector": ex.name, "n_pos": len(pos), "n_neg": len(neg), "n_hard": 0, "yes_no": False,
            "balanced_accuracy": 0.7}))], ex.name)
    n = SIM_WINDOWS["lm"]
    assert sim.details["n_windows"] == min(n, len(pos)) + min(n, len(neg)) and sim.details["n_pos"] == min(n, len(pos))
    return model_dir, feature, ex.name, sim


def test_the_card_shows_the_lm_simulation_score_with_its_n(lm_scored, env):
    model_dir, feature, name, sim = lm_scored
    assert sim.value == pytest.approx(1.0, abs=1e-9) and sim.n > 0
    at = open_app(PAGE, state={"model_spec": str(model_dir)})
    assert not at.exception, at.exception
    at.selectbox(key="feat_sort").set_value("frequency").run()
    at.number_input(key="feat_feature").set_value(feature).run()
    assert not at.exception and not at.error, texts(at.error)
    caption = next(t for t in texts(at.caption) if t.startswith(f"{name} · "))
    n_pos = sim.details["n_pos"]
    line = (f"simulation r 1.00 (n={sim.n:,} tokens in {sim.details['n_windows']} windows: {n_pos} firing, "
            f"{sim.details['n_windows'] - n_pos} silent")
    assert line in caption
    assert caption.startswith(f"{name} · scored on held-out text by {name} answering yes/no and rating each token "
                              f"0-10 · detection AUC 0.75, balanced accuracy 0.70 (n=")
    rows = {"detection": None, "simulation": sim}
    assert score_label(sim) in caption and "rating each token" in scorer_note(name, rows)
    # the built-in explainer's own scores stay beside it, each with its n
    builtin = next(t for t in texts(at.caption) if t.startswith("builtin · "))
    assert "simulation r" in builtin and "detection AUC" in builtin and builtin.count("(n=") == 3


def test_the_describe_jobs_score_toggle_states_the_calls_a_language_model_makes(lm_scored, env):
    model_dir = lm_scored[0]
    at = open_app(PAGE, state={"model_spec": str(model_dir)})
    at.radio(key="feat_j_action").set_value("describe").run()
    assert not at.exception
    (toggle,) = [t for t in at.toggle if t.key == "feat_j_score"]
    n = SIM_WINDOWS["lm"]
    assert toggle.value is True and f"rates every token of {n} firing and {n} silent windows" in toggle.help
    assert "one call per window" in toggle.help
