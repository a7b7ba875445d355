"""Every page's widgets at their extremes, driven through app.py with AppTest (see app_harness.py).

Each number input and slider goes to its minimum and its maximum, text goes in empty, blank, very
long (20,000 characters) and in odd Unicode, selectboxes go through their options where that is
cheap, and then the page's main button is pressed. Whatever happens, the page shows no exception;
where the input is impossible it shows one st.error saying what to change, and nothing computed
earlier is replaced by half a result. Runs stay cheap: tiny models where a maximum would mean a
long run, and where a maximum is long by nature (10 million consensus iterations or simulation
steps) the run is started and stopped.

The Training page's upload (a .txt/.jsonl file saved under the runs folder's data/) is tested
here too, through AppTest's file uploader, down to a real tiny run training on the saved copy.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from app_harness import TEXTS, clean, described_feature_model, limits, no_exception, one_error, open_app, set_widgets, texts

from core.errors import LabError


# -- Features ----------------------------------------------------------------------------------------

FEAT_PAGE = "pages/features.py"
TEXT = ("ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. "
        "JULIET: O Romeo, Romeo, wherefore art thou Romeo? Deny thy father and refuse thy name. ")


@pytest.fixture(scope="module")
def described(tmp_path_factory, tiny_gptlab_dir: Path) -> tuple[Path, Path]:
    """(model folder, its transcoder set folder) with a collected and described feature store."""
    return described_feature_model(tmp_path_factory.mktemp("extremes-features"), tiny_gptlab_dir, [TEXT * 8] * 3,
                                   steps=20, n_tokens=1024)


@pytest.fixture
def feat_env(tmp_path: Path, monkeypatch) -> SimpleNamespace:
    """Runs under tmp_path, and the job launcher a stand-in that records the command it was given."""
    import pages.parts.features_jobs_view as view

    root = tmp_path / "runs"
    monkeypatch.setenv("GPTLAB_RUNS", str(root))
    monkeypatch.setenv("GPTLAB_DATA_CACHE", str(tmp_path / "token-cache"))
    calls: list = []

    def fake_launch(action, argv, model, output, root=None):
        calls.append((action, list(argv), output))
        raise LabError("captured")

    monkeypatch.setattr(view, "launch", fake_launch)
    return SimpleNamespace(root=root, calls=calls)


def feat_page(model_dir: Path, **state):
    at = open_app(FEAT_PAGE, state={"model_spec": str(model_dir), **state})
    clean(at)
    return at


def test_features_browse_controls_at_their_extremes(described, feat_env):
    from core.interp import FeatureStore, store_path

    model_dir, set_dir = described
    at = feat_page(model_dir)
    with FeatureStore(store_path(set_dir), readonly=True) as store:
        n_features = {i.layer: i.n_features for i in store.layers()}
    for layer in sorted(n_features):
        at.selectbox(key="feat_layer").set_value(layer).run()
        assert limits(at.number_input(key="feat_feature")) == (0, n_features[layer] - 1)
        for feature in (0, n_features[layer] - 1):
            at.number_input(key="feat_feature").set_value(feature).run()
            clean(at)
            assert [s.value for s in at.subheader if s.value.startswith("Feature")] == \
                [f"Feature {feature} · layer {layer}"]
    for sort in ("frequency", "explanation score", "max activation", "feature"):
        for descending in (True, False):
            at.selectbox(key="feat_sort").set_value(sort)
            at.toggle(key="feat_desc").set_value(descending).run()
            clean(at)
    for method in ("detection", "simulation"):
        at.selectbox(key="feat_method").set_value(method).run()
        clean(at)
    for name, query in TEXTS.items():
        at.text_input(key="feat_search").input(query).run()
        clean(at)
        if name == "long":
            (caption,) = [c for c in texts(at.caption) if c.startswith("No explanation contains")]
            assert len(caption) < 120
    at.text_input(key="feat_search").input('" OR * ) ( NEAR AND "').run()  # FTS syntax is plain text
    clean(at)


def test_features_explain_controls_at_their_extremes(described, feat_env):
    model_dir, _ = described
    at = feat_page(model_dir, feat_section="Explain a completion")
    found = {w.key: limits(w) for w in at.number_input if w.key.startswith("feat_x_")}
    assert found == {"feat_x_max_new": (1, 1024), "feat_x_temperature": (0.05, 5.0), "feat_x_seed": (0, 2**31 - 1),
                     "feat_x_top": (1, 20)}

    def explain(prompt: str = "ROMEO:", **values):
        at.text_area(key="feat_x_prompt").input(prompt)
        set_widgets(at, "feat_x_", **values)
        at.run()
        at.button(key="feat_x_run").click()
        return at.run()

    explain(max_new=1, top=1)
    clean(at)
    assert "feat_x_result" in at.session_state
    explain(max_new=1024, top=20)
    one_error(at, "ask for at most")
    explain(max_new=2, greedy=False)
    for temperature, seed in ((0.05, 0), (5.0, 2**31 - 1)):
        explain(max_new=2, temperature=temperature, seed=seed, top=20)
        clean(at)
    for name, prompt in TEXTS.items():
        explain(prompt, max_new=2)
        if name in ("empty", "blank"):
            one_error(at, "Enter a prompt to explain; it is empty.")
        elif name in ("long", "unicode"):  # the tiny model's context is 64 tokens
            one_error(at, "but the model's context is 64")
        else:
            clean(at)
    at.radio(key="feat_x_explainer").set_value("lm").run()
    for name, spec in TEXTS.items():
        at.text_input(key="feat_x_lm").input(spec)
        explain(max_new=2)
        one_error(at, {"empty": "Enter the explainer model", "blank": "Enter the explainer model",
                       "long": "The explainer model 'To be, or not to be", "unicode": "contains a NUL character"}[name])


@pytest.mark.parametrize("name", list(TEXTS))
def test_features_set_folder_text_extremes(described, feat_env, name):
    model_dir, _ = described
    at = feat_page(model_dir)
    at.selectbox(key="feat_set").set_value("other…").run()
    at.text_input(key="feat_set_other").input(TEXTS[name]).run()
    no_exception(at)
    if name in ("empty", "blank"):
        assert any("Enter the folder of a transcoder set" in t for t in texts(at.info))
        assert not at.main.error
    elif name == "long":
        one_error(at, "is not a usable path (File name too long)")
    else:
        one_error(at, "contains a NUL character")


SHAPING = ("activation", "steps", "then_collect", "then_describe")  # fields that show, hide or enable others


def _job(at, action: str, **values):
    """Fill the job form as a user does: the fields that change the form first, then the rest, Start."""
    at.radio(key="feat_j_action").set_value(action).run()
    for name in SHAPING:
        if name in values:
            set_widgets(at, "feat_j_", **{name: values[name]})
            at.run()
    set_widgets(at, "feat_j_", **{k: v for k, v in values.items() if k not in SHAPING})
    at.button(key="feat_j_launch").click()
    return at.run()


def test_features_job_forms_at_min_and_max(described, feat_env):
    model_dir, set_dir = described
    calls = feat_env.calls
    at = feat_page(model_dir)
    jmax = dict(expansion=256, activation="topk", k=4096, lr=1.0, steps=10_000_000, batch_tokens=1_000_000,
                seq_len=8192, seed=2**31 - 1, then_collect=True, then_describe=True, collect_tokens=100_000_000,
                collect_seq_len=4096, top_k=200, n_quantile=100, n_heldout=100, n_negative=100,
                max_features=1_000_000, n_top=100, score=True)
    _job(at, "train", **jmax)
    one_error(at, "captured")
    jmin = dict(expansion=1, activation="relu", l1_coeff=0.0, lr=1e-6, steps=None, train_tokens=1024, batch_tokens=16,
                seq_len=8, seed=0, then_collect=True, then_describe=False, collect_tokens=256, collect_seq_len=8,
                top_k=1, n_quantile=0, n_heldout=0, n_negative=0)
    _job(at, "train", **jmin)
    one_error(at, "captured")
    _job(at, "collect", collect_tokens=100_000_000, collect_seq_len=4096, top_k=200, n_quantile=100, n_heldout=100,
         n_negative=100)
    one_error(at, "captured")
    _job(at, "describe", max_features=1, n_top=1, score=False)
    one_error(at, "captured")
    (a, high, _), (b, low, _), (c, collect, _), (d, describe, _) = calls
    assert (a, b, c, d) == ("train", "train", "collect", "describe")

    def flags(argv: list[str]) -> dict[str, str]:
        return {f: v for f, v in zip(argv, argv[1:] + [""]) if f.startswith("--")}

    assert {k: flags(high)[k] for k in ("--expansion", "--k", "--steps", "--batch-tokens", "--seq-len", "--seed",
                                          "--collect-tokens", "--top-k", "--max-features", "--n-top", "--lr")} == \
        {"--expansion": "256", "--k": "4096", "--steps": "10000000", "--batch-tokens": "1000000", "--seq-len": "8192",
         "--seed": str(2**31 - 1), "--collect-tokens": "100000000", "--top-k": "200", "--max-features": "1000000",
         "--n-top": "100", "--lr": "1.0"}
    assert {k: flags(low)[k] for k in ("--expansion", "--activation", "--l1-coeff", "--train-tokens", "--batch-tokens",
                                         "--seq-len", "--n-quantile")} == \
        {"--expansion": "1", "--activation": "relu", "--l1-coeff": "0.0", "--train-tokens": "1024",
         "--batch-tokens": "16", "--seq-len": "8", "--n-quantile": "0"}
    assert "--no-describe" in low and "--steps" not in low
    assert flags(collect)["--collect-tokens"] == "100000000" and "--no-score" in describe


@pytest.mark.parametrize("field", ["output", "dataset_path", "explainer_spec"])
def test_features_job_text_extremes(described, feat_env, field, tmp_path):
    model_dir, _ = described
    at = feat_page(model_dir)
    for name, text in TEXTS.items():
        before = len(feat_env.calls)
        if field == "explainer_spec":
            at.radio(key="feat_j_action").set_value("describe").run()
            at.radio(key="feat_j_explainer_kind").set_value("lm").run()
        else:
            at.radio(key="feat_j_action").set_value("train").run()
            if field == "dataset_path":
                at.selectbox(key="feat_j_dataset").set_value("path").run()
        at.text_input(key=f"feat_j_{field}").input(text).run()
        at.button(key="feat_j_launch").click().run()
        no_exception(at)
        error = one_error(at)
        started = len(feat_env.calls) > before
        if field == "output":  # empty: the model's own folder; otherwise the path, if usable
            assert started == (name in ("empty", "blank")) or error == "captured"
            if name == "long":
                assert "is not a usable path (File name too long)" in error
            if name == "unicode":
                assert "contains a NUL character" in error
        elif field == "dataset_path":
            assert not started
            assert {"empty": "Enter a local .txt/.jsonl file or folder for the corpus",
                    "blank": "Enter a local .txt/.jsonl file or folder for the corpus",
                    "long": "is not a usable path (File name too long)",
                    "unicode": "contains a NUL character"}[name] in error
        else:
            assert (name in ("empty", "blank")) == ("Enter the explainer" in error)
