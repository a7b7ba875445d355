"""The app frame and the Home page, driven through app.py with AppTest (see app_harness.py); the model
picker's text and the dtype at their extremes end in one sentence or a loaded model, never an exception."""
from __future__ import annotations

from pathlib import Path

import pytest
from app_harness import TEXTS, clean, no_exception, open_app, texts

from core.errors import fmt_count
from core.models.loading import load_model
from pages.parts.common import WORKBENCHES


def metrics(at) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def test_home_shows_default_model_card():
    at = open_app()
    assert not at.exception
    assert not at.error
    assert metrics(at) == {"Layers": "4", "Width": "256", "Heads": "4", "Parameters": "5.3M", "Context": "256"}
    assert not at.warning  # the shipped default is trained: no untrained banner
    status = " ".join(texts(at.sidebar.caption))
    assert "default" in status and "untrained" not in status and "cpu" in status and "float32" in status
    assert at.sidebar.selectbox(key="model_choice").value == "default"
    assert at.sidebar.selectbox(key="model_device").value == "cpu"
    assert at.sidebar.selectbox(key="model_dtype").value == "float32"
    facts = at.table[0].value
    assert facts.loc["parameters"].iloc[0] == "5,322,240"
    assert facts.loc["trained"].iloc[0] == "yes"
    assert [e.label for e in at.expander] == ["Model card"]
    assert "trained on Shakespeare" in " ".join(texts(at.markdown))
    # every installed workbench is a link (Generate always is); the others are named without one
    installed = [w.title for w in WORKBENCHES if w.exists]
    assert "Generate" in installed
    assert [p.label for p in at.page_link] == installed


def test_picker_offers_both_shipped_models_and_loads_the_diffusion_one():
    at = open_app()
    assert at.sidebar.selectbox(key="model_choice").options[:2] == ["default", "diffusion"]
    at.sidebar.selectbox(key="model_choice").set_value("diffusion").run()
    assert not at.exception and not at.error
    assert at.session_state["model_spec"] == "diffusion"
    expected = load_model("diffusion").card()
    assert metrics(at) == {"Layers": "4", "Width": "256", "Heads": "4", "Parameters": fmt_count(expected["parameters"]),
                           "Context": "256"}
    assert not at.warning  # trained: no untrained banner
    assert "masked-diffusion LM trained on Shakespeare" in " ".join(texts(at.markdown))


def test_picker_other_loads_fixture_and_updates_card(tiny_gptlab_dir: Path):
    at = open_app()
    at.sidebar.selectbox(key="model_choice").set_value("other…").run()
    at.sidebar.text_input(key="model_other").input(str(tiny_gptlab_dir)).run()
    assert not at.exception
    assert not at.error
    expected = load_model(str(tiny_gptlab_dir)).card()
    assert expected["parameters"] < 1_000_000
    assert metrics(at) == {"Layers": "2", "Width": "32", "Heads": "2", "Parameters": fmt_count(expected['parameters']),
                           "Context": "64"}
    assert not at.warning  # trained-or-not flag is false for this checkpoint: no untrained banner
    assert at.session_state["model_spec"] == str(tiny_gptlab_dir)
    assert str(tiny_gptlab_dir) in " ".join(texts(at.sidebar.caption))


def test_unknown_path_shows_error_not_exception(tmp_path: Path):
    at = open_app()
    at.sidebar.selectbox(key="model_choice").set_value("other…").run()
    missing = tmp_path / "no-such-model"
    at.sidebar.text_input(key="model_other").input(str(missing)).run()
    assert not at.exception
    errors = texts(at.error)
    # once in the sidebar status, once on the page
    assert len(errors) == 2 and all("does not exist" in e and str(missing) in e for e in errors)
    assert not at.metric
    # going back to default recovers
    at.sidebar.selectbox(key="model_choice").set_value("default").run()
    assert not at.error and metrics(at)["Layers"] == "4"


def test_model_spec_set_by_another_page_moves_the_picker(tiny_gpt2_dir: Path):
    """Workbenches open a model elsewhere by setting ``model_spec`` and switching page."""
    at = open_app()
    at.session_state["model_spec"] = str(tiny_gpt2_dir)
    at.run()
    assert not at.exception and not at.error
    assert at.sidebar.selectbox(key="model_choice").value == "other…"
    assert at.sidebar.text_input(key="model_other").value == str(tiny_gpt2_dir)
    assert metrics(at)["Layers"] == "3" and metrics(at)["Width"] == "32"
    at.session_state["model_spec"] = "default"
    at.run()
    assert at.sidebar.selectbox(key="model_choice").value == "default"
    assert metrics(at)["Layers"] == "4"


def test_checkpoints_of_runs_are_listed_newest_step_first(tmp_path: Path):
    from pages.parts.common import checkpoint_specs

    for run, step in [("run-a", "100"), ("run-a", "2000"), ("run-b", "5"), ("run-b", "7")]:
        folder = tmp_path / run / "checkpoints" / step
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    (tmp_path / "run-b" / "checkpoints" / "broken").mkdir()  # no config.json: not a checkpoint
    found = [Path(p).relative_to(tmp_path).as_posix() for p in checkpoint_specs(tmp_path)]
    assert found == ["run-a/checkpoints/2000", "run-a/checkpoints/100", "run-b/checkpoints/7", "run-b/checkpoints/5"]
    assert checkpoint_specs(tmp_path / "missing") == []


def test_untrained_model_is_labelled_everywhere(tmp_path: Path):
    import torch

    from core.models.gpt import GPT, GPTConfig
    from core.models.loading import DEFAULT_DIR, save_checkpoint

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=8192, block_size=32, n_layer=1, n_head=2, d_model=16))
    folder = save_checkpoint(tmp_path / "untrained", model, str(DEFAULT_DIR / "tokenizer.json"), untrained=True)
    at = open_app()
    at.sidebar.selectbox(key="model_choice").set_value("other…").run()
    at.sidebar.text_input(key="model_other").input(str(folder)).run()
    assert not at.exception and not at.error
    assert any("Untrained" in w for w in texts(at.warning))
    assert "untrained" in " ".join(texts(at.sidebar.caption))
    assert at.table[0].value.loc["trained"].iloc[0] == "no (untrained)"


def test_trust_remote_code_is_off_unless_ticked_and_warns(tiny_gpt2_dir: Path, monkeypatch):
    import core.models.loading as loading
    import pages.parts.common as common

    calls = []
    real = loading.load_model

    def spy(spec, **kw):
        calls.append(kw.get("trust_remote_code"))
        return real(spec, **kw)

    monkeypatch.setattr(common, "load_model", spy)
    common._load_cached.clear()
    at = open_app()
    at.sidebar.selectbox(key="model_choice").set_value("other…").run()
    at.sidebar.text_input(key="model_other").input(str(tiny_gpt2_dir)).run()
    assert at.sidebar.checkbox(key="model_trust_remote_code").value is False
    assert not at.sidebar.warning and calls and set(calls) == {False}
    at.sidebar.checkbox(key="model_trust_remote_code").check().run()
    assert not at.exception and calls[-1] is True
    assert "your permissions" in " ".join(texts(at.sidebar.warning))
    at.sidebar.selectbox(key="model_choice").set_value("default").run()  # leaving "other" turns it off
    assert at.session_state["model_trust_remote_code"] is False
    common._load_cached.clear()


# -- the model picker and the dtype at their extremes ----------------------------------------------

@pytest.mark.parametrize("name", list(TEXTS))
def test_home_model_spec_text_extremes_end_in_one_line_each(name):
    at = open_app()
    at.sidebar.selectbox(key="model_choice").set_value("other…").run()
    at.sidebar.text_input(key="model_other").input(TEXTS[name]).run()
    no_exception(at)
    if name in ("empty", "blank"):  # nothing typed: the picker keeps the model it had
        clean(at)
        assert [m.value for m in at.metric][:1] == ["4"]
        return
    sidebar, page = texts(at.sidebar.error), texts(at.main.error)
    assert len(sidebar) == 1 and len(page) == 1 and sidebar == page
    assert len(page[0]) < 1000 and not at.metric  # one sentence, no card of another model
    at.sidebar.selectbox(key="model_choice").set_value("default").run()
    clean(at)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_home_every_dtype_loads_the_default_model(dtype):
    at = open_app()
    at.sidebar.selectbox(key="model_dtype").set_value(dtype).run()
    clean(at)
    facts = at.table[0].value
    assert facts.loc["dtype"].iloc[0] == dtype
    assert {m.label: m.value for m in at.metric}["Layers"] == "4"


# -- the picker's hub ids and load errors in the app's words ---------------------------------------

@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch) -> Path:
    """A local Hugging Face cache holding gpt2's config and weights only (files, never the network)."""
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hub"
    repo = cache / "models--gpt2"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_ids_missing_from_the_cache_say_so(hub_cache):
    from core.commands.models import collect

    at = open_app()
    picker = at.sidebar.selectbox(key="model_choice")
    hub = {h["id"]: h["cached"] for h in collect()["hub"]}  # what `python -m core models` says
    assert hub["gpt2"] and not any(v for k, v in hub.items() if k != "gpt2")
    labels = [o for o in picker.options if o.split(" ")[0] in hub]
    assert labels == [k if cached else f"{k} (not cached)" for k, cached in hub.items()]
    assert picker.options[0] == "default" and picker.options[-1] == "other…"


def test_load_errors_name_the_picker_not_command_line_flags(hub_cache, tmp_path: Path):
    from core.models.loading import model_message

    at = open_app()
    at.sidebar.selectbox(key="model_choice").set_value("gpt2-medium").run()
    assert not at.exception
    errors = texts(at.error)
    assert len(errors) == 2 and len(set(errors)) == 1  # the sidebar's and the page's
    assert errors[0] == ("Model 'gpt2-medium' is not in the local Hugging Face cache and the hub cannot be reached; "
                         "download it where there is internet (`hf download gpt2-medium`) and copy the cache or folder "
                         "here, or pick `default` in the sidebar's model picker, which works offline.")
    assert "use --model default" in model_message("offline", "gpt2-medium")  # the CLI's sentence is unchanged

    custom = tmp_path / "custom-code"
    custom.mkdir()
    (custom / "config.json").write_text('{"model_type": "gptlab_custom", "auto_map": {"AutoConfig": '
                                        '"configuration_custom.CustomConfig"}}')
    a_file = tmp_path / "weights.pt"
    a_file.write_bytes(b"")
    cases = {str(tmp_path / "nowhere" / "model") + "/": "does not exist; check the path, or pick `default` in the "
                                                        "sidebar's model picker.",
             str(custom): "ships its own Python code, which GPT Lab runs only when asked; tick Trust remote code "
                          "below the model spec in the sidebar if you trust its authors.",
             str(a_file): "is a file; pass a model folder (with config.json)."}
    at.sidebar.selectbox(key="model_choice").set_value("other…").run()
    for spec, ending in cases.items():
        at.sidebar.text_input(key="model_other").input(spec).run()
        assert not at.exception
        errors = texts(at.error)
        assert errors and all(e.endswith(ending) for e in errors), errors
        assert not any("--" in e for e in errors)
