"""The Features page, driven through app.py with AppTest (see app_harness.py).

A module fixture trains a tiny transcoder set on a copy of the tiny GPT Lab checkpoint with the
interp engine's Python API (a few steps, 64 features a layer), collects its feature store and
describes it with the built-in explainer; the page is then checked against what the store holds.
One test starts a real background training job from the page (a separate ``python -m core
transcoders train`` process) and waits for its set to appear in the picker; every job process a
test starts is killed at teardown.

At the end every control goes to its extremes (layers, features, sorts, searches, the explain form,
the job forms at their minimum and maximum, text fields empty, blank, very long and in odd Unicode):
the page shows no exception, and an impossible input gets one st.error saying what to change. The
job launcher is a stand-in there, so no job starts.
"""
from __future__ import annotations

import html
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
from app_harness import (TEXTS, chart_data, clean, described_feature_model, limits, no_exception, one_error, open_app,
                         set_widgets, texts)

from core.errors import LabError
from core.generation.autoregressive import SamplingConfig
from core.interp import (BuiltinExplainer, FeatureStore, load_explainer, load_transcoder_set, run_explain_completion,
                         store_path)
from core.interp import jobs as features_jobs
from core.interp.store import HIST_EDGES, Context
from core.jobs.events import EventLog
from core.errors import LabError
from core.models.loading import DEFAULT_DIR, load_model
from pages.parts.features_card import activation_alpha, context_html, histogram_frame, logit_frame, md_escape, shown_token

PAGE = "pages/features.py"
TEXT = ("ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. "
        "JULIET: O Romeo, Romeo, wherefore art thou Romeo? Deny thy father and refuse thy name. ")
CORPUS = [TEXT * 8] * 3


@pytest.fixture(scope="module")
def described(tmp_path_factory, tiny_gptlab_dir: Path) -> tuple[Path, Path]:
    """(model folder, its transcoder set folder) with a collected and described feature store."""
    return described_feature_model(tmp_path_factory.mktemp("features-model"), tiny_gptlab_dir, CORPUS, steps=30,
                                   n_tokens=2048)


def page(model_dir: Path, **state):
    at = open_app(PAGE, state={"model_spec": str(model_dir), **state})
    assert not at.exception, at.exception
    return at


def frame(at, key_prefix: str) -> pd.DataFrame:
    (df,) = [d for d in at.dataframe if (d.key or "").startswith(key_prefix)]
    return df.value


def html_bodies(at) -> list[str]:
    return [h.proto.body for h in at.get("html")]


# -- browsing -------------------------------------------------------------------------------------

def test_list_sorts_and_card_shows_the_stored_feature(described, env):
    model_dir, set_dir = described
    at = page(model_dir)
    assert not at.error, texts(at.error)
    assert at.selectbox(key="feat_set").value == str(set_dir.resolve())
    assert at.selectbox(key="feat_layer").options == ["Layer 0", "Layer 1"]
    with FeatureStore(store_path(set_dir), readonly=True) as store:
        by_freq = [f.feature for f in store.features(0, order_by="density")]
        by_score = store.features(0, order_by="score")
        by_freq_l1 = [f.feature for f in store.features(1, order_by="density")]
    # the first list a newcomer sees is sorted by the explanation's score, not by frequency
    assert at.selectbox(key="feat_sort").value == "explanation score"
    listed = frame(at, "feat_list_0_score")
    assert listed["feature"].tolist() == [f.feature for f in by_score]
    assert listed["n"].tolist()[:1] == [by_score[0].score_n] and by_score[0].score_n > 0
    at.selectbox(key="feat_sort").set_value("frequency").run()
    listed = frame(at, "feat_list_0_density")
    assert listed["feature"].tolist() == by_freq
    assert listed["frequency"].is_monotonic_decreasing

    at.selectbox(key="feat_sort").set_value("explanation score").run()
    listed = frame(at, "feat_list_0_score")
    assert listed["feature"].tolist() == [f.feature for f in by_score]
    scores = listed["score"].dropna().tolist()
    assert scores == sorted(scores, reverse=True) and len(scores) >= 1
    at.toggle(key="feat_desc").set_value(False).run()
    ascending = frame(at, "feat_list_0_score")["score"].dropna().tolist()
    assert ascending == sorted(ascending)

    # a new layer opens its most listed feature
    at.selectbox(key="feat_sort").set_value("frequency").run()
    at.toggle(key="feat_desc").set_value(True).run()
    at.selectbox(key="feat_layer").set_value(1).run()
    assert frame(at, "feat_list_1_density")["feature"].tolist() == by_freq_l1
    assert at.number_input(key="feat_feature").value == by_freq_l1[0]

    # the card of a chosen feature: explanation, contexts, histogram, quantiles, promoted tokens
    at.selectbox(key="feat_layer").set_value(0).run()
    feature = by_freq[1]
    at.number_input(key="feat_feature").set_value(feature).run()
    assert not at.exception and not at.error
    with FeatureStore(store_path(set_dir), readonly=True) as store:
        card = store.feature(0, feature)
    assert [s.value for s in at.subheader if s.value.startswith("Feature")] == [f"Feature {feature} · layer 0"]
    assert md_escape(card.explanations["builtin"]) in texts(at.markdown)
    from core.interp.scoring import score_label

    rows = card.score_rows["builtin"]
    caption = next(t for t in texts(at.caption) if t.startswith("builtin · "))
    assert caption == " · ".join(["builtin · scored on held-out text by the rule detector and simulator (its quoted "
                                  "tokens)"] + [score_label(rows[m]) for m in ("detection", "fuzzing", "simulation")])
    assert f"(n={rows['detection'].n}: " in caption and "balanced accuracy" not in caption  # = AUC for yes/no
    contexts = next(b for b in html_bodies(at) if b.startswith('<div class="contexts">') and "q0." not in b)
    top = card.top[0]
    assert contexts.count('<b class="firing"') == len(card.top)
    firing = f'title="activation {top.acts[top.position]:.4g}">{html.escape(shown_token(top.token))}</b>'
    assert firing in contexts
    alpha = activation_alpha(top.acts[top.position], card.stats.max_act)
    assert f"rgba(255, 140, 0, {alpha:.2f})" in contexts
    quantiles = [b for b in html_bodies(at) if "q0." in b or "q1." in b]
    assert len(quantiles) == 1 and quantiles[0].count('<b class="firing"') == len(card.quantiles)
    hist = chart_data(at, "Activation histogram")
    expected = histogram_frame(card.stats)
    assert hist["count"].tolist() == expected["count"].tolist()
    assert sum(hist["count"]) == card.stats.n_active
    assert len(card.stats.hist) == len(HIST_EDGES)
    promoted = [d.value for d in at.dataframe if list(d.value.columns) == ["token", "effect"]]
    assert len(promoted) == 2
    assert promoted[0]["token"].tolist() == logit_frame(card.stats.promoted)["token"].tolist()
    assert promoted[0]["effect"].tolist() == pytest.approx([v for _, v in card.stats.promoted])
    assert promoted[1]["effect"].tolist() == pytest.approx([v for _, v in card.stats.suppressed])


def test_search_by_a_word_finds_and_opens_the_feature(described, env):
    model_dir, set_dir = described
    with FeatureStore(store_path(set_dir), readonly=True) as store:
        explanations = store.explanations(1)
    # a word that only a few explanations of layer 1 contain
    words: dict[str, set[int]] = {}
    for f, text in explanations.items():
        for w in set(text.replace('"', " ").replace("'", " ").replace(",", " ").split()):
            if w.isalpha() and len(w) >= 3 and w.lower() not in {"fires", "usually", "after", "promotes"}:
                words.setdefault(w, set()).add(f)
    word, feats = min(words.items(), key=lambda kv: (len(kv[1]), kv[0]))
    at = page(model_dir)
    at.text_input(key="feat_search").input(word).run()
    assert not at.exception and not at.error
    (hits_key,) = [d.key for d in at.dataframe if (d.key or "").startswith("feat_hits_")]
    hits = frame(at, "feat_hits_")
    assert {f for l, f in zip(hits["layer"], hits["feature"]) if l == 1} == feats
    assert all(word.lower() in t.lower() for t in hits["explanation"])
    row = next(i for i, l in enumerate(hits["layer"]) if l == 1)
    at.session_state[hits_key] = {"selection": {"rows": [row], "columns": [], "cells": []}}
    at.run()
    assert not at.exception
    assert at.selectbox(key="feat_layer").value == 1
    assert at.number_input(key="feat_feature").value == int(hits["feature"][row])

    at.text_input(key="feat_search").input("zzqx").run()
    assert any("No explanation contains 'zzqx'" in t for t in texts(at.caption))


# -- explaining a completion -----------------------------------------------------------------------

def test_explain_a_completion_with_the_builtin_and_an_lm_explainer(described, env, tiny_gpt2_dir: Path):
    model_dir, set_dir = described
    at = page(model_dir, feat_section="Explain a completion")
    at.text_area(key="feat_x_prompt").input("ROMEO:")
    at.number_input(key="feat_x_max_new").set_value(6)
    at.button(key="feat_x_run").click().run()
    assert not at.exception and not at.error, texts(at.error)

    lm = load_model(str(model_dir))
    tset = load_transcoder_set(set_dir)
    with FeatureStore(store_path(set_dir), readonly=True) as store:
        expected = run_explain_completion(lm, tset, "ROMEO:", store=store, explainer=BuiltinExplainer(),
                                          settings=SamplingConfig(max_new_tokens=6, greedy=True, n_alternatives=0))
    shown = texts(at.markdown)
    assert md_escape(expected.total_description) in shown
    for layer in expected.layers:
        assert md_escape(layer.description) in shown
        assert f"**Layer {layer.layer}** · {layer.share:.0%} of the attribution" in shown
    assert any(html.escape(expected.completion) in b for b in html_bodies(at))
    first = expected.layers[0].features[0]
    table = frame(at, f"feat_x_features_1_{expected.layers[0].layer}")
    assert table["feature"].tolist() == [fa.feature for fa in expected.layers[0].features]
    assert table["attribution"].tolist() == pytest.approx([fa.attribution for fa in expected.layers[0].features],
                                                          rel=1e-4, abs=1e-7)
    # two scores, named for what they are, each with its sample size
    scores = [(m.label, m.value) for m in at.metric if m.label.startswith(("Quality", "Interpretability"))]
    assert scores == [("Quality: perplexity", expected.quality.shown),
                      ("Interpretability (AUC)", expected.interpretability.shown)]
    assert f"n = {expected.quality.n:,} generated tokens" in texts(at.caption)

    # a language model as explainer (a tiny random GPT-2 folder): its own words, the same as the engine's
    at.radio(key="feat_x_explainer").set_value("lm").run()
    at.text_input(key="feat_x_lm").input(str(tiny_gpt2_dir))
    at.button(key="feat_x_run").click().run()
    assert not at.exception and not at.error, texts(at.error)
    with FeatureStore(store_path(set_dir), readonly=True) as store:
        by_lm = run_explain_completion(lm, tset, "ROMEO:", store=store, explainer=load_explainer(str(tiny_gpt2_dir)),
                                       settings=SamplingConfig(max_new_tokens=6, greedy=True, n_alternatives=0))
    shown = texts(at.markdown)
    assert md_escape(by_lm.total_description) in shown
    assert all(md_escape(layer.description) in shown for layer in by_lm.layers)
    assert any(t.startswith(f"lm:{tiny_gpt2_dir} · ar model") for t in texts(at.caption))
    assert [m.label for m in at.metric if m.label.startswith("Quality")] == ["Quality: LM judge grade"]
    at.radio(key="feat_x_explainer").set_value("builtin")
    at.button(key="feat_x_run").click().run()
    assert md_escape(expected.total_description) in texts(at.markdown)

    # selecting a listed feature opens its card in the Features tab
    (key,) = [d.key for d in at.dataframe if (d.key or "").endswith(f"_{first.layer}")
              and d.key.startswith("feat_x_features_")]
    at.session_state[key] = {"selection": {"rows": [0], "columns": [], "cells": []}}
    at.run()
    assert not at.exception and not at.error
    assert at.session_state["feat_section"] == "Features"
    assert at.selectbox(key="feat_layer").value == first.layer
    assert at.number_input(key="feat_feature").value == first.feature
    assert f"Feature {first.feature} · layer {first.layer}" in [s.value for s in at.subheader]


def test_a_diffusion_completion_is_explained_step_by_step(tmp_path_factory, env, tiny_diffusion_dir: Path):
    """A masked-diffusion model's completion: besides the layers, a table of every denoising step that
    revealed tokens, with the features that drove them, and the text a chosen step read."""
    from core.interp.completion import completion_settings
    from pages.parts.features_completion import steps_frame

    model_dir, set_dir = described_feature_model(tmp_path_factory.mktemp("features-diffusion"), tiny_diffusion_dir,
                                                 CORPUS, steps=20, n_tokens=1024)
    at = page(model_dir, feat_section="Explain a completion")
    at.text_area(key="feat_x_prompt").input("ROMEO:")
    at.number_input(key="feat_x_max_new").set_value(6)
    at.number_input(key="feat_x_steps").set_value(3)
    at.button(key="feat_x_run").click().run()
    assert not at.exception and not at.error, texts(at.error)

    lm = load_model(str(model_dir))
    with FeatureStore(store_path(set_dir), readonly=True) as store:
        expected = run_explain_completion(lm, load_transcoder_set(set_dir), "ROMEO:", store=store,
                                          explainer=BuiltinExplainer(),
                                          settings=completion_settings(lm, 6, temperature=None, seed=None, steps=3))
    assert [s.step for s in expected.steps] == [1, 2, 3]
    assert all(sf.explanation for s in expected.steps for sf in s.features)   # a described store names them
    (shown,) = [d.value for d in at.dataframe if "revealed" in d.value.columns]   # a table without selection has no key
    want = steps_frame(expected)
    assert shown[["step", "revealed", "layer", "feature", "explanation"]].astype(str).values.tolist() == \
        want[["step", "revealed", "layer", "feature", "explanation"]].astype(str).values.tolist()
    assert shown["attribution"].tolist() == pytest.approx(want["attribution"].tolist(), rel=1e-4, abs=1e-7)
    assert any(t.startswith("**Step by step** · 3 denoising steps") for t in texts(at.markdown))
    # a chosen step shows the text it read: step 2 read the first step's tokens and masks elsewhere
    at.select_slider(key="feat_x_steps_view_pick").set_value(2).run()
    assert not at.exception
    assert expected.prompt + expected.steps[1].read in [c.value for c in at.code]


def test_an_imported_saelens_set_says_where_it_came_from(described, env, tmp_path: Path):
    """A set imported from SAELens folders (here: written as a TransformerLens fold_ln model's
    transcoders would be) opens like a trained one, and its card says what the import changed."""
    import json

    from core.interp.saelens import SAE_CFG_FILENAME, export_saelens, import_saelens

    model_dir, set_dir = described
    lm = load_model(str(model_dir))
    folders = export_saelens(load_transcoder_set(set_dir), tmp_path / "saelens")
    for folder in folders:  # as TransformerLens' defaults wrote it: no kwargs, no GPT Lab block
        cfg = json.loads((folder / SAE_CFG_FILENAME).read_text())
        del cfg["metadata"]["model_from_pretrained_kwargs"], cfg["metadata"]["gptlab"]
        (folder / SAE_CFG_FILENAME).write_text(json.dumps(cfg))
    imported = import_saelens(tmp_path / "saelens", lm).save(tmp_path / "imported")
    shutil.copy(store_path(set_dir), store_path(imported))
    at = page(model_dir)
    at.selectbox(key="feat_set").set_value("other…").run()
    at.text_input(key="feat_set_other").input(str(imported)).run()
    assert not at.exception and not at.error, texts(at.error)
    captions = texts(at.caption)
    assert any("imported from SAELens" in t and "saelens" in t for t in captions), captions
    assert any("ln2's weight and bias" in t for t in captions) and any("center" in t for t in captions)
    assert frame(at, "feat_list_0_score")["feature"].tolist()
    # its dead share was measured at import, on other text than the collection's live count
    assert any(t.startswith("Dead: on ") and "(measured at import)" in t for t in captions), captions


def test_dead_and_live_name_the_text_each_was_counted_on(described, env):
    model_dir, set_dir = described
    at = page(model_dir)
    tset = load_transcoder_set(set_dir)
    with FeatureStore(store_path(set_dir), readonly=True) as store:
        info = store.layers()[0]
    n_val = tset.metrics["layers"]["0"]["n_tokens"]
    metrics = {m.label: m for m in at.metric}
    assert f"{n_val:,} validation tokens" in metrics["Dead"].proto.help
    assert f"{info.n_tokens:,} tokens of " in metrics["Live"].proto.help
    assert metrics["Live"].value == f"{info.n_alive:,} / {info.n_features:,}"
    assert f"Dead: on {n_val:,} validation tokens" in " ".join(texts(at.caption))


def test_export_and_import_from_the_page(described, env, tmp_path: Path):
    """The page's import/export does what `transcoders export|import` do: SAELens folders that read
    back as the same set, Neuronpedia JSON that reads back as the store's features, never into
    assets/ and never over a folder that holds something; an import opens the new set."""
    import torch

    from core.interp.neuronpedia import read_neuronpedia

    model_dir, set_dir = described
    at = page(model_dir)
    at.text_input(key="feat_io_to").input(str(tmp_path / "sl")).run()
    at.button(key="feat_io_export").click().run()
    assert not at.exception and not at.error, texts(at.error)
    assert any("Wrote 2 SAELens folder(s)" in t for t in texts(at.success))
    mine = load_transcoder_set(set_dir)
    at.radio(key="feat_io_format").set_value("neuronpedia").run()
    at.text_input(key="feat_io_to").input(str(tmp_path / "np")).run()
    at.button(key="feat_io_export").click().run()
    assert not at.error, texts(at.error)
    dash = read_neuronpedia(tmp_path / "np")
    with FeatureStore(store_path(set_dir), readonly=True) as store:
        live = {f.feature for f in store.features(0)}
    assert set(dash[0]) == live
    # a folder that holds something, or one in assets/, is one sentence and nothing is written
    at.text_input(key="feat_io_to").input(str(tmp_path / "np")).run()
    at.button(key="feat_io_export").click().run()
    assert len(at.error) == 1 and "--to" not in at.error[0].value and "new or empty" in at.error[0].value
    shipped = DEFAULT_DIR / "exported-here"
    at.text_input(key="feat_io_to").input(str(shipped)).run()
    at.button(key="feat_io_export").click().run()
    assert len(at.error) == 1 and "assets/" in at.error[0].value and not shipped.exists()

    # import the SAELens export back: the same weights, opened in the picker
    at.text_input(key="feat_io_source").input(str(tmp_path / "sl"))
    at.text_input(key="feat_io_import_to").input(str(tmp_path / "back")).run()
    at.button(key="feat_io_import").click().run()
    assert not at.exception and not at.error, texts(at.error)
    assert at.text_input(key="feat_set_other").value == str(tmp_path / "back")
    assert any("Imported 2 transcoder(s)" in t for t in texts(at.success))
    back = load_transcoder_set(tmp_path / "back")
    for layer in mine.layers:
        torch.testing.assert_close(back[layer].W_dec.float(), mine[layer].W_dec.float(), rtol=1e-5, atol=1e-6)


# -- bad input ------------------------------------------------------------------------------------

def test_bad_input_shows_one_error(described, env, tmp_path: Path):
    model_dir, _ = described
    at = page(model_dir, feat_section="Explain a completion")
    at.text_area(key="feat_x_prompt").input("   ")
    at.button(key="feat_x_run").click().run()
    assert not at.exception
    assert texts(at.error) == ["Enter a prompt to explain; it is empty."]

    at.radio(key="feat_x_explainer").set_value("lm")
    at.text_area(key="feat_x_prompt").input("ROMEO:")
    at.button(key="feat_x_run").click().run()
    assert not at.exception
    assert texts(at.error) == ["Enter the explainer model: a hub id such as google/flan-t5-base, or a local folder."]

    not_a_set = tmp_path / "not-a-set"
    not_a_set.mkdir()
    at.selectbox(key="feat_set").set_value("other…").run()
    assert any("Enter the folder of a transcoder set" in t for t in texts(at.info))
    at.text_input(key="feat_set_other").input(str(not_a_set)).run()
    assert not at.exception
    (error,) = texts(at.error)
    assert f"{not_a_set} is not a transcoder set" in error

    # a job form with a corpus that is not there starts nothing
    at.radio(key="feat_j_action").set_value("train").run()
    at.text_input(key="feat_j_output").input(str(tmp_path / "new-set"))
    at.selectbox(key="feat_j_dataset").set_value("path").run()
    at.text_input(key="feat_j_dataset_path").input(str(tmp_path / "nowhere.txt"))
    at.button(key="feat_j_launch").click().run()
    assert not at.exception
    assert any(f"Corpus {tmp_path / 'nowhere.txt'} does not exist" in t for t in texts(at.error))
    assert not features_jobs.jobs_root(env).exists()


def test_a_damaged_feature_store_is_one_sentence_and_the_rest_still_works(described, env, tmp_path: Path):
    model_dir, set_dir = described
    broken = tmp_path / "broken-set"
    shutil.copytree(set_dir, broken)
    store_file = broken / "features.sqlite"
    good = store_file.read_bytes()
    for damage, words in ((b"not a database at all " * 300, "is not a feature store"),
                          (good[:len(good) // 3], "is truncated")):
        store_file.write_bytes(damage)
        at = page(model_dir)
        at.selectbox(key="feat_set").set_value("other…").run()
        at.text_input(key="feat_set_other").input(str(broken)).run()
        assert not at.exception
        (error,) = texts(at.error)
        assert str(store_file) in error and words in error and "collect" in error and "\n" not in error
        assert at.radio(key="feat_j_action") is not None          # the job form, to collect a new store, still draws


def test_an_explainer_with_its_own_code_runs_only_when_ticked(described, env, own_code_model):
    model_dir, _ = described
    custom, marker = own_code_model
    at = page(model_dir, feat_section="Explain a completion")
    assert at.checkbox(key="feat_x_trust").disabled                # nothing to trust with the built-in explainer
    at.radio(key="feat_x_explainer").set_value("lm").run()
    assert at.checkbox(key="feat_x_trust").value is False and not at.checkbox(key="feat_x_trust").disabled
    at.text_input(key="feat_x_lm").input(str(custom))
    at.button(key="feat_x_run").click().run()
    assert not at.exception
    (error,) = texts(at.error)
    assert "ships its own Python code" in error and "Trust the explainer's code" in error
    assert not marker.exists()


# -- a model without a set, and a background job ----------------------------------------------------

def test_no_set_then_a_background_training_job_makes_one(env, tiny_gptlab_dir: Path, tmp_path: Path):
    model_dir = tmp_path / "bare-model"
    shutil.copytree(tiny_gptlab_dir, model_dir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 30, encoding="utf-8")
    at = page(model_dir)
    assert not at.error
    assert any(t.startswith(f"No transcoder set for `{model_dir}` yet") for t in texts(at.info)), texts(at.info)
    assert f"python -m core transcoders train --model {model_dir}" in texts(at.code)

    for key, value in dict(steps=20, expansion=2, k=4, batch_tokens=256, seq_len=32).items():
        at.number_input(key=f"feat_j_{key}").set_value(value)
    at.selectbox(key="feat_j_dataset").set_value("path").run()
    at.text_input(key="feat_j_dataset_path").input(str(corpus))
    at.toggle(key="feat_j_then_collect").set_value(False).run()
    at.button(key="feat_j_launch").click().run()
    assert not at.exception and not at.error, texts(at.error)
    assert any("Started train job" in t for t in texts(at.success))
    (job,) = features_jobs.list_jobs(env)
    assert job.running and job.output == str((model_dir / "transcoders").resolve())
    assert job.argv[:4] == ["transcoders", "train", "--model", str(model_dir)]
    assert ["--steps", "20"] == job.argv[job.argv.index("--steps"):job.argv.index("--steps") + 2]
    assert "--no-collect" in job.argv
    assert job.command in texts(at.code)

    deadline = time.monotonic() + 90
    while features_jobs.read_job(job.path).running:
        assert time.monotonic() < deadline, features_jobs.console_lines(job)
        time.sleep(0.5)
        at.run()
        assert not at.exception
    at.run()
    done = features_jobs.read_job(job.path)
    assert done.state == "finished", (done.reason, features_jobs.console_lines(job))
    assert not at.exception and not at.error, texts(at.error)
    assert at.selectbox(key="feat_set").value == job.output  # the new set is picked
    tset = load_transcoder_set(job.output)
    assert tset.layers == [0, 1] and tset.config.n_features == 64 and tset.metrics["steps"] == 20
    assert any(t.startswith("This set has no feature store yet") for t in texts(at.info))


def test_stop_a_running_job_from_the_page(described, env, tmp_path: Path):
    model_dir, _ = described
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 30, encoding="utf-8")
    out = tmp_path / "long-set"
    at = page(model_dir)
    at.text_input(key="feat_j_output").input(str(out))
    for key, value in dict(steps=100_000, expansion=2, k=4, batch_tokens=64, seq_len=32).items():
        at.number_input(key=f"feat_j_{key}").set_value(value)
    at.selectbox(key="feat_j_dataset").set_value("path").run()
    at.text_input(key="feat_j_dataset_path").input(str(corpus))
    at.button(key="feat_j_launch").click().run()
    assert not at.exception and not at.error, texts(at.error)
    (job,) = features_jobs.list_jobs(env)
    assert job.output == str(out.resolve()) and ["--collect-tokens", "262144"] == \
        job.argv[job.argv.index("--collect-tokens"):job.argv.index("--collect-tokens") + 2]
    # a second job writing to the same set is refused
    at.button(key="feat_j_launch").click().run()
    assert f"Job {job.id} is still writing to {out.resolve()}" in " ".join(texts(at.error))
    assert len(features_jobs.list_jobs(env)) == 1

    deadline = time.monotonic() + 90
    while features_jobs.progress(job) is None or features_jobs.progress(job).done < 2:
        assert time.monotonic() < deadline and features_jobs.read_job(job.path).running, \
            features_jobs.console_lines(job)
        time.sleep(0.5)
    at.run()
    bars = [p for p in at.get("progress") if "train:" in str(p.proto.text)]
    assert len(bars) == 1 and "/ 100,000" in bars[0].proto.text
    at.button(key=f"feat_j_stop_{job.id}").click().run()
    assert not at.exception
    deadline = time.monotonic() + 60
    while features_jobs.read_job(job.path).running:
        assert time.monotonic() < deadline, features_jobs.console_lines(job)
        time.sleep(0.5)
    stopped = features_jobs.read_job(job.path)
    assert stopped.state == "stopped" and stopped.reason.startswith("on request")
    assert (out / "config.json").is_file()  # training saved what it had learnt
    at.run()
    assert any(t.startswith("Stopped: on request") for t in texts(at.caption))
    assert "interrupted (Ctrl-C)." in features_jobs.console_lines(job)


# -- where jobs write: never into assets/, never over a set unasked ---------------------------------

@pytest.fixture
def launched(env, monkeypatch) -> list:
    """The job launcher replaced by a stand-in that records ``(action, argv, output)`` and starts nothing."""
    import pages.parts.features_jobs_view as view

    calls: list = []

    def fake_launch(action, argv, model, output, root=None):
        calls.append((action, list(argv), output))
        raise LabError("captured")

    monkeypatch.setattr(view, "launch", fake_launch)
    return calls


def start(at):
    button = at.button(key="feat_j_launch")
    assert not button.disabled
    button.click().run()
    assert not at.exception
    assert texts(at.error) == ["captured"], texts(at.error)


def shipped_files() -> dict[str, int]:
    folder = DEFAULT_DIR / "transcoders"
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_the_shipped_set_is_never_written_from_the_page(env, launched):
    """``default``'s own set is assets/default/transcoders (git-tracked): training with the folder left
    empty goes to a new folder under the runs root, a folder in assets/ is refused with a sentence that
    proposes one there, and collect / describe on the shipped set are refused."""
    before = shipped_files()
    at = page("default")
    assert at.radio(key="feat_j_action").value == "train"
    field = at.text_input(key="feat_j_output")
    assert field.placeholder.startswith(str(env / "transcoder-sets" / "default-"))
    assert not at.warning and not at.error
    start(at)
    ((action, argv, out),) = launched
    out = Path(out)
    assert action == "train" and out.parent == (env / "transcoder-sets").resolve() and out.name.startswith("default-")
    assert argv[argv.index("--output-dir") + 1] == str(out)

    for typed in (DEFAULT_DIR / "transcoders", DEFAULT_DIR / "transcoders" / "again", DEFAULT_DIR.parent):
        at.text_input(key="feat_j_output").input(str(typed)).run()
        (error,) = texts(at.error)
        assert error.startswith(f"{typed.resolve()} is in the shipped assets/ folder, which the app never writes")
        assert f"leave the folder empty for a new set under {env / 'transcoder-sets'}" in error
        assert at.button(key="feat_j_launch").disabled
    at.text_input(key="feat_j_output").input("").run()
    for action in ("collect", "describe"):
        at.radio(key="feat_j_action").set_value(action).run()
        (error,) = texts(at.error)
        assert error.startswith(f"The set in {(DEFAULT_DIR / 'transcoders').resolve()} is shipped in assets/")
        assert f"{action} a copy instead" in error and str(env / "transcoder-sets") in error
        assert at.button(key="feat_j_launch").disabled
    assert len(launched) == 1 and shipped_files() == before
    with pytest.raises(LabError, match="never writes"):  # the engine refuses too, whatever the page does
        features_jobs.job_argv("collect", {}, "default", DEFAULT_DIR / "transcoders", replace=True)


def test_replacing_a_set_or_its_store_asks_first(described, env, launched, tmp_path: Path):
    model_dir, set_dir = described
    at = page(model_dir)
    # the model's own folder (the field left empty) holds a set: a warning, and Start waits for the tick
    (warning,) = texts(at.warning)
    assert "already holds the transcoder set; this job replaces it" in warning
    assert at.checkbox(key="feat_j_replace").value is False and at.button(key="feat_j_launch").disabled
    at.checkbox(key="feat_j_replace").check().run()
    start(at)
    assert launched[-1][2] == str(set_dir.resolve())

    # another folder with a set: the tick given for the first does not carry over
    other = tmp_path / "other-set"
    shutil.copytree(set_dir, other)
    at.text_input(key="feat_j_output").input(str(other)).run()
    assert at.checkbox(key="feat_j_replace").value is False and at.button(key="feat_j_launch").disabled
    # an empty folder (or a new one) replaces nothing: no question
    at.text_input(key="feat_j_output").input(str(tmp_path / "fresh")).run()
    assert not at.warning and not [c for c in at.checkbox if c.key == "feat_j_replace"]
    start(at)
    assert launched[-1][2] == str((tmp_path / "fresh").resolve())

    # collecting into a set that has a feature store replaces the store: asked too
    at.radio(key="feat_j_action").set_value("collect").run()
    (warning,) = texts(at.warning)
    assert "already holds the feature store" in warning and "every explanation" in warning
    assert at.button(key="feat_j_launch").disabled
    at.checkbox(key="feat_j_replace").check().run()
    start(at)
    assert launched[-1][0] == "collect"
    # describing adds explanations to the store: nothing to confirm
    at.radio(key="feat_j_action").set_value("describe").run()
    assert not at.warning and not at.button(key="feat_j_launch").disabled

    # the engine refuses without the confirmation, whatever the page does
    with pytest.raises(LabError, match="already holds the transcoder set") as refused:
        features_jobs.job_argv("train", TRAIN_VALUES, str(model_dir), set_dir)
    assert refused.value.fix == {"replace": True}
    argv, out = features_jobs.job_argv("train", TRAIN_VALUES, str(model_dir), set_dir, replace=True)
    assert out == str(set_dir.resolve())


TRAIN_VALUES = dict(device="cpu", dtype="float32", expansion=2, activation="topk", k=4, lr=1e-3, steps=2,
                    train_tokens=1024, batch_tokens=64, seq_len=16, dataset="shakespeare", seed=0, layers=[0],
                    collect=False)


def test_job_command_lines_and_progress_parsing(tmp_path: Path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("x")
    train = dict(device="cpu", dtype="float32", expansion=4, activation="relu", l1_coeff=0.001, k=8, lr=0.002,
                 steps=None, train_tokens=50_000, batch_tokens=512, seq_len=64, dataset=str(corpus), seed=3,
                 layers=[1, 0], collect=True, describe=False, collect_tokens=4096, collect_seq_len=32, top_k=7,
                 n_quantile=2, n_heldout=3, n_negative=4)
    argv, out = features_jobs.job_argv("train", train, "default", tmp_path / "set")
    assert out == str((tmp_path / "set").resolve())
    assert argv == ["transcoders", "train", "--model", "default", "--device", "cpu", "--dtype", "float32",
                    "--output-dir", out, "--expansion", "4", "--activation", "relu", "--batch-tokens", "512",
                    "--seq-len", "64", "--lr", "0.002", "--dataset", str(corpus.resolve()), "--seed", "3",
                    "--l1-coeff", "0.001", "--train-tokens", "50000", "--layers", "1,0", "--collect-tokens", "4096",
                    "--collect-seq-len", "32", "--top-k", "7", "--n-quantile", "2", "--n-heldout", "3",
                    "--n-negative", "4", "--no-describe"]
    describe = dict(device="cpu", explainer=" google/flan-t5-small ", explainer_device="cpu", max_features=50,
                    n_top=5, score=False, layers=[])
    argv, _ = features_jobs.job_argv("describe", describe, "gpt2", tmp_path / "set")
    assert argv[argv.index("--transcoders") + 1] == out
    assert argv[argv.index("--explainer"):] == ["--explainer", "google/flan-t5-small", "--explainer-device", "cpu",
                                                "--n-top", "5", "--max-features", "50", "--no-score"]
    for action, values, message in [
            ("train", {**train, "dataset": ""}, "Enter a local .txt/.jsonl file or folder"),
            ("describe", {**describe, "explainer": "  "}, "Enter the explainer"),
            ("explain", train, "A transcoder job is one of train, collect, describe")]:
        with pytest.raises(Exception, match=message):
            features_jobs.job_argv(action, values, "default", tmp_path / "set")
    with pytest.raises(Exception, match="is a file"):
        features_jobs.job_argv("train", train, "default", corpus)

    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "console.txt").write_text("train:  45%|##  | 9/20 [00:01<00:01]\n")
    assert features_jobs.progress(job_dir) is None  # console text is for people: never parsed for progress
    EventLog(job_dir).progress("describe (builtin)", 64, 128)
    progress = features_jobs.progress(job_dir)
    assert (progress.stage, progress.done, progress.total, progress.fraction) == ("describe (builtin)", 64, 128, 0.5)
    assert features_jobs.console_lines(job_dir)[-1].startswith("train:  45%")


def test_context_html_escapes_tokens_and_marks_the_activation():
    ctx = Context(kind="top", rank=0, tokens=["<b>", " &amp", "\n", "x"], token_ids=[1, 2, 3, 4],
                  acts=[0.0, 2.0, 0.5, 4.0], position=1, activation=2.0)
    body = context_html(ctx, scale=4.0)
    assert "<b>" not in body.replace('<b class="firing"', "")  # the only bold is the marked token
    assert "&lt;b&gt;" in body and "&amp;amp" in body and "↵" in body
    assert body.count('<b class="firing"') == 1
    assert '<b class="firing" style="background: rgba(255, 140, 0, 0.53); border-radius: 3px; outline: 2px solid ' \
           '#d62728;" title="activation 2"> &amp;amp</b>' in body
    assert 'rgba(255, 140, 0, 0.00); border-radius: 3px;" title="activation 0">&lt;b&gt;' in body
    assert 'rgba(255, 140, 0, 0.90); border-radius: 3px;" title="activation 4">x' in body
    assert activation_alpha(0.5, 4.0) == pytest.approx(0.15 + 0.75 / 8)
    assert md_escape('fires on "$x$" and *y*') == 'fires on "\\$x\\$" and \\*y\\*'


# -- every control at its extremes ------------------------------------------------------------------

@pytest.fixture
def launched_jobs(env, monkeypatch) -> list[tuple[str, list[str], str]]:
    """The jobs the page would start, as (action, argv, output), captured instead of started: the
    job launcher is a stand-in that records its command and answers with an error."""
    import pages.parts.features_jobs_view as view

    calls: list = []

    def fake_launch(action, argv, model, output, root=None):
        calls.append((action, list(argv), output))
        raise LabError("captured")

    monkeypatch.setattr(view, "launch", fake_launch)
    return calls


def test_features_browse_controls_at_their_extremes(described, launched_jobs):
    model_dir, set_dir = described
    at = page(model_dir)
    clean(at)
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


def test_features_explain_controls_at_their_extremes(described, launched_jobs):
    model_dir, _ = described
    at = page(model_dir, feat_section="Explain a completion")
    clean(at)
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
def test_features_set_folder_text_extremes(described, launched_jobs, name):
    model_dir, _ = described
    at = page(model_dir)
    clean(at)
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
    at.run()
    confirm_replace(at)
    at.button(key="feat_j_launch").click()
    return at.run()


def confirm_replace(at) -> None:
    """Tick "Replace ... in this folder" when the form asks (the model's own set is already there)."""
    ticks = [c for c in at.checkbox if c.key == "feat_j_replace"]
    if ticks and not ticks[0].value:
        ticks[0].check()
        at.run()


def test_features_job_forms_at_min_and_max(described, launched_jobs):
    model_dir, set_dir = described
    calls = launched_jobs
    at = page(model_dir)
    clean(at)
    jmax = dict(expansion=256, activation="topk", k=4096, lr=1.0, steps=10_000_000, batch_tokens=1_000_000,
                seq_len=8192, seed=2**31 - 1, then_collect=True, then_describe=True, collect_tokens=100_000_000,
                collect_seq_len=4096, top_k=200, n_quantile=100, n_heldout=1000, n_negative=1000,
                max_features=1_000_000, n_top=100, score=True)
    _job(at, "train", **jmax)
    one_error(at, "captured")
    jmin = dict(expansion=1, activation="relu", l1_coeff=0.0, lr=1e-6, steps=None, train_tokens=1024, batch_tokens=16,
                seq_len=8, seed=0, then_collect=True, then_describe=False, collect_tokens=256, collect_seq_len=8,
                top_k=1, n_quantile=0, n_heldout=0, n_negative=0)
    _job(at, "train", **jmin)
    one_error(at, "captured")
    _job(at, "collect", collect_tokens=100_000_000, collect_seq_len=4096, top_k=200, n_quantile=100, n_heldout=1000,
         n_negative=1000)
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
    assert flags(collect)["--n-heldout"] == flags(collect)["--n-negative"] == "1000"


def test_features_job_form_sets_the_hard_negatives(described, launched_jobs):
    """The collect and train forms' "Hard negatives" field starts at the collection default
    (core.interp.config) and reaches the job's command line as --n-hard, at its bounds too."""
    from core.interp.config import CollectConfig

    model_dir, _ = described
    at = page(model_dir)
    clean(at)
    at.radio(key="feat_j_action").set_value("collect").run()
    field = at.number_input(key="feat_j_n_hard")
    assert (field.label, field.value, field.min, field.max) == ("Hard negatives", CollectConfig().n_hard, 0, 1000)
    _job(at, "collect")
    one_error(at, "captured")
    _job(at, "collect", n_hard=0)
    one_error(at, "captured")
    _job(at, "train", then_collect=True, n_hard=1000)
    one_error(at, "captured")
    _job(at, "train", then_collect=False)
    one_error(at, "captured")
    (a, default, _), (b, zero, _), (c, high, _), (d, no_collect, _) = launched_jobs
    assert (a, b, c, d) == ("collect", "collect", "train", "train")
    for argv, value in ((default, str(CollectConfig().n_hard)), (zero, "0"), (high, "1000")):
        assert argv[argv.index("--n-hard") + 1] == value
    assert "--n-hard" not in no_collect


@pytest.mark.parametrize("field", ["output", "dataset_path", "explainer_spec"])
def test_features_job_text_extremes(described, launched_jobs, field, tmp_path):
    model_dir, _ = described
    at = page(model_dir)
    clean(at)
    for name, text in TEXTS.items():
        before = len(launched_jobs)
        if field == "explainer_spec":
            at.radio(key="feat_j_action").set_value("describe").run()
            at.radio(key="feat_j_explainer_kind").set_value("lm").run()
        else:
            at.radio(key="feat_j_action").set_value("train").run()
            if field == "dataset_path":
                at.selectbox(key="feat_j_dataset").set_value("path").run()
        at.text_input(key=f"feat_j_{field}").input(text).run()
        confirm_replace(at)
        at.button(key="feat_j_launch").click().run()
        no_exception(at)
        error = one_error(at)
        started = len(launched_jobs) > before
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


def test_explain_a_completion_with_a_local_llm_server(described, env):
    """What the README says: pick "Language model" and enter the server's URL; the page asks that
    server (here a real `core serve` of the shipped default model) and grades the text with it."""
    from tests.serve.helpers import serving

    model_dir, set_dir = described
    with serving(load_model("default")) as server:
        at = page(model_dir, feat_section="Explain a completion")
        at.number_input(key="feat_x_max_new").set_value(4)
        at.number_input(key="feat_x_top").set_value(1)
        at.radio(key="feat_x_explainer").set_value("lm").run()
        at.text_input(key="feat_x_lm").input(server.url).run()
        at.button(key="feat_x_run").click().run(timeout=600)  # every question is a request to the server
        assert not at.exception and not at.error, texts(at.error)
    assert any(t.startswith(f"api:default@{server.url} · ar model") for t in texts(at.caption)), texts(at.caption)
    assert [m.label for m in at.metric if m.label.startswith("Quality")] == ["Quality: LM judge grade"]
    assert any(t.startswith("n = ") and "token judgements by api:" in t for t in texts(at.caption)) or \
        any(t.startswith("n/a: no cited feature") for t in texts(at.caption))
