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

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from app_harness import (ODD, TEXTS, clean, described_feature_model, limits, no_exception, one_error, open_app,
                         set_widgets, texts)

from core.errors import LabError
from core.training import runs as runs_mod
from core.training.config import TrainConfig
from core.training.data import save_upload, upload_name, uploads_dir
from core.training.memory import check_fits, parameter_count

CORPUS = ("ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun.\n"
          "JULIET: O Romeo, Romeo, wherefore art thou Romeo? Deny thy father and refuse thy name.\n") * 40


# -- Training ----------------------------------------------------------------------------------------

TR_PAGE = "pages/training.py"
TR_MAX = dict(n_layer=1024, n_head=1024, d_model=65536, block_size=131072, vocab_size=1 << 20, lr=10.0,
              weight_decay=10.0, warmup_steps=10_000_000, seed=2**31 - 1, batch_size=65536, grad_acc_steps=65536,
              max_steps=100_000_000, epochs=100_000.0, val_every=100_000_000, log_every=100_000_000,
              preview_every=100_000_000, save_every=100_000_000, keep_last=100_000)
TR_MIN = dict(n_layer=1, n_head=1, d_model=1, block_size=1, vocab_size=300, lr=0.0, weight_decay=0.0, warmup_steps=0,
              seed=0, batch_size=1, grad_acc_steps=1, max_steps=1, epochs=0.0, val_every=0, log_every=1,
              preview_every=0, save_every=0, keep_last=1)


@pytest.fixture
def launched(monkeypatch) -> list[tuple[TrainConfig, str | None]]:
    """The runs the page would start, captured instead of started (the page re-imports ``launch``
    from core.training.runs on every run, so the stand-in is what it calls)."""
    calls: list = []

    def fake_launch(cfg, run_id=None, root=None):
        calls.append((cfg, run_id))
        raise LabError("captured")  # the page shows it; no folder, no process

    monkeypatch.setattr(runs_mod, "launch", fake_launch)
    return calls


def tr_submit(at, **values):
    set_widgets(at, "tr_", devices=["cpu"], **values)
    at.button(key="tr_launch").click()
    return at.run()


def nothing_started(root: Path) -> bool:
    return not root.exists() or not any(p for p in root.iterdir())


def test_training_form_limits_are_the_ones_tested(runs_root):
    at = open_app(TR_PAGE)
    found = {w.key[3:]: limits(w) for w in at.number_input if w.key.startswith("tr_")}
    assert found == {k: (TR_MIN[k], TR_MAX[k]) for k in TR_MAX}
    assert at.selectbox(key="tr_dataset").options[-1] == "Upload a .txt/.jsonl file…"
    uploader = at.file_uploader(key="tr_upload")
    assert uploader.allowed_type == [".txt", ".jsonl"] and uploader.proto.max_upload_size_mb == 200


def test_training_every_maximum_is_refused_before_a_process_starts(runs_root, launched):
    at = open_app(TR_PAGE)
    tr_submit(at, **TR_MAX)
    one_error(at, "This run needs about", "more than the", "free on cpu",
              "use fewer layers, a smaller d_model, a smaller batch size or a shorter block size")
    assert not launched and nothing_started(runs_root)


@pytest.mark.parametrize("values, message", [
    (dict(lr=0.0), "learning rate must be above 0 (got 0.0)"),
    (dict(epochs=0.0, max_steps=None), "epochs must be above 0 (got 0.0)"),
    (dict(d_model=1, n_head=None), "d_model=1 is not divisible by n_head=4"),
    (dict(n_layer=1024, d_model=65536, n_head=1024), "This run needs about"),
])
def test_training_impossible_extremes_say_what_to_change(runs_root, launched, values, message):
    at = open_app(TR_PAGE)
    base = {**TR_MIN, "lr": None, "epochs": None}
    tr_submit(at, **{**base, **values})
    one_error(at, message)
    assert not launched and nothing_started(runs_root)


def test_training_valid_extremes_reach_the_launch_with_those_values(runs_root, launched):
    """Every count at its maximum on a tiny model, then every setting at its smallest valid value:
    the config handed to the launcher carries them (the launcher is a stand-in here)."""
    at = open_app(TR_PAGE)
    counts = {k: TR_MAX[k] for k in ("lr", "weight_decay", "warmup_steps", "seed", "max_steps", "val_every",
                                     "log_every", "preview_every", "save_every", "keep_last", "grad_acc_steps")}
    tr_submit(at, n_layer=1, n_head=1, d_model=8, block_size=16, batch_size=1, vocab_size=300, **counts)
    one_error(at, "captured")
    tr_submit(at, **{**TR_MIN, "lr": None, "epochs": None})
    one_error(at, "captured")
    (high, _), (low, _) = launched
    assert {k: getattr(high, k) for k in counts} == counts
    assert (high.n_layer, high.d_model, high.block_size) == (1, 8, 16)
    assert {k: getattr(low, k) for k in TR_MIN if k not in ("lr", "epochs")} == \
        {k: v for k, v in TR_MIN.items() if k not in ("lr", "epochs")}
    assert nothing_started(runs_root)


@pytest.mark.parametrize("field, name", [(f, n) for f in ("run_name", "dataset_path") for n in TEXTS])
def test_training_text_extremes(runs_root, launched, field, name):
    at = open_app(TR_PAGE)
    values = {"run_name": "", "dataset": "shakespeare", "dataset_path": ""}
    if field == "dataset_path":
        values["dataset"] = "path"
    values[field] = TEXTS[name]
    tr_submit(at, **values)
    expected = {
        ("run_name", "empty"): "captured", ("run_name", "blank"): "captured",
        ("run_name", "long"): "The run name is 20,000 characters long; use at most 100",
        ("run_name", "unicode"): "is not allowed; use letters, digits",
        ("dataset_path", "empty"): "Enter a local .txt/.jsonl file or folder",
        ("dataset_path", "blank"): "Enter a local .txt/.jsonl file or folder",
        ("dataset_path", "long"): "is not a usable path or dataset name (File name too long)",
        ("dataset_path", "unicode"): "is neither an existing local file or folder nor a Hugging Face dataset id",
    }[(field, name)]
    one_error(at, expected)
    assert len(launched) == (1 if expected == "captured" else 0)
    if launched:
        assert launched[0][1] is None  # a blank name: the engine names the run


# -- Training: uploads ------------------------------------------------------------------------------

def upload(at, name: str, data: bytes, mime: str = "text/plain") -> None:
    at.file_uploader(key="tr_upload").set_value((name, data, mime))


def saved_uploads(root: Path) -> list[Path]:
    folder = uploads_dir(root)
    return sorted(folder.iterdir()) if folder.is_dir() else []


def test_upload_trains_a_run_on_the_saved_copy_with_every_minimum(runs_root):
    """The whole path: a file uploaded with a hostile name is saved under the runs folder's data/,
    the run's dataset is that copy, and a run with every setting at its smallest valid value
    (one layer of width 1, a one-token context, one step) trains on it to the end."""
    at = open_app(TR_PAGE)
    data = CORPUS.encode("utf-8")
    upload(at, "../../../etc/my corpus.txt", data)
    tr_submit(at, dataset="upload", **{**TR_MIN, "lr": None, "epochs": None})
    clean(at)
    assert any("Launched run" in t for t in texts(at.success))
    (saved,) = saved_uploads(runs_root)
    assert saved.name == upload_name("my corpus.txt", data) and saved.name.startswith("my_corpus-")
    assert saved.parent == (runs_root / "data").resolve() and saved.read_bytes() == data
    (folder,) = [p for p in runs_root.iterdir() if p.name != "data"]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["dataset"] == str(saved)
    assert {k: cfg[k] for k in ("n_layer", "n_head", "d_model", "block_size", "batch_size", "max_steps")} == \
        dict(n_layer=1, n_head=1, d_model=1, block_size=1, batch_size=1, max_steps=1)
    deadline = time.monotonic() + 120
    while runs_mod.read_status(folder)["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.5)
    status = runs_mod.read_status(folder)
    assert status["state"] == "finished", (status, runs_mod.log_tail(folder))
    assert status["step"] == 1
    at.run()
    no_exception(at)
    assert at.dataframe[0].value["run"].tolist() == [folder.name]  # the data folder is not a run


def test_upload_refusals_write_nothing(runs_root, launched, monkeypatch):
    import pages.parts.training_form as form

    monkeypatch.setattr(form, "upload_limit_bytes", lambda: 1000)  # the page's cap, as a 200 MB file would meet it
    at = open_app(TR_PAGE)
    tr_submit(at, dataset="upload")
    one_error(at, "Choose a .txt or .jsonl file under 'Upload a dataset file', or pick another dataset.")
    upload(at, "big.txt", b"x" * 1001)
    tr_submit(at, dataset="upload")
    one_error(at, "The file is 0.0 MB, over the 0.0 MB upload limit",
              "copy it to this machine, choose 'Local file / folder or hub id…' and enter its path under "
              "'Path or dataset id'")
    for name, data, message in [
        ("empty.txt", b"", "is empty; upload a file with text in it"),
        ("blank.txt", b" \n\t\n", "is empty; upload a file with text in it"),
        ("latin1.txt", "Ça va, Roméo?".encode("latin-1"), "is not UTF-8 text (byte 0); save it as UTF-8"),
        ("rows.jsonl", b'{"text": "fine"}\n{"text": 3}\n', "line 2 has no string 'text' field"),
        ("rows.jsonl", b'{"text": "fine"}\nnot json\n', "line 2 is not valid JSON"),
    ]:
        upload(at, name, data)
        tr_submit(at, dataset="upload")
        one_error(at, message)
    assert not launched and not saved_uploads(runs_root)


def test_upload_of_odd_and_long_names_and_unicode_text(runs_root, launched):
    at = open_app(TR_PAGE)
    text = (ODD + "\n").encode("utf-8")
    # (no NUL in a name: no file system has one, and Streamlit refuses such an upload itself)
    for name in [ODD.replace("\x00", "") + ".txt", "x" * 20_000 + ".jsonl", "..\\..\\windows.TXT", ".hidden.txt"]:
        data = text if not name.endswith(".jsonl") else json.dumps({"text": ODD}).encode() + b"\n"
        upload(at, name, data)
        tr_submit(at, dataset="upload")
        one_error(at, "captured")
        no_exception(at)
    names = [cfg.dataset for cfg, _ in launched]
    assert len(names) == 4
    for path in map(Path, names):
        assert path.parent == (runs_root / "data").resolve()
        assert len(path.name.encode()) <= 100 + 20 and not path.name.startswith(".")
    assert Path(names[2]).name.startswith("windows-") and Path(names[2]).suffix == ".txt"
    # refused by the stand-in launcher after saving: the saved copies are whole files, no temp files
    assert all(not p.name.startswith(".") for p in saved_uploads(runs_root))


def test_save_upload_sanitises_names_dedupes_and_caps(tmp_path: Path):
    folder = tmp_path / "data"
    a = save_upload("../../x/../corpus.txt", b"first text", folder, 1 << 20)
    b = save_upload("corpus.txt", b"first text", folder, 1 << 20)
    c = save_upload("C:\\Users\\me\\corpus.txt", b"second text", folder, 1 << 20)
    assert a == b and a != c and a.parent == c.parent == folder.resolve()
    assert a.read_bytes() == b"first text" and c.read_bytes() == b"second text"
    assert sorted(p.name for p in folder.iterdir()) == sorted({a.name, c.name})  # no temp files left
    with pytest.raises(LabError, match=r"over the 0 MB limit for uploads; to train on a bigger file, copy it"):
        save_upload("big.txt", b"x" * 11, folder, 10)
    with pytest.raises(LabError, match=r"Only \.txt and \.jsonl files can be uploaded .*got 'notes\.pdf'"):
        save_upload("notes.pdf", b"text", folder, 1 << 20)
    with pytest.raises(LabError, match=r"got 'xxxxx.*\.\.\.'"):
        save_upload("x" * 5000 + ".exe", b"text", folder, 1 << 20)
    assert len(list(folder.iterdir())) == 2
    for hostile in ["..", ".", "/", "\x00", "../..", "a.txt/"]:
        with pytest.raises(LabError):
            upload_name(hostile, b"x")
    assert upload_name("a/../../b.txt.txt", b"x").startswith("b.txt-")


def test_streamlit_config_caps_uploads_at_200_mb():
    import tomllib

    import streamlit as st

    config = tomllib.loads((Path(__file__).resolve().parents[2] / ".streamlit" / "config.toml").read_text())
    assert config["server"]["maxUploadSize"] == 200
    from pages.parts.training_form import upload_limit_bytes

    assert upload_limit_bytes() == st.get_option("server.maxUploadSize") * 2**20 == 200 * 2**20


def test_training_memory_estimate_counts_parameters_exactly_and_refuses_what_cannot_fit(monkeypatch):
    import core.devices as devices
    from core.models.gpt import GPT

    for sizes in (dict(preset="tiny"), dict(n_layer=3, n_head=2, d_model=24), dict(n_layer=1, n_head=1, d_model=1)):
        cfg = TrainConfig(block_size=40, vocab_size=333, **sizes)
        with torch.device("meta"):
            model = GPT(cfg.gpt_config(vocab_size=333, mask_token_id=None))
        assert parameter_count(cfg, 333) == model.num_params()
    cfg = TrainConfig(preset="tiny", block_size=64, batch_size=4, vocab_size=512)
    need = check_fits(cfg, "cpu")
    monkeypatch.setattr(devices, "free_bytes", lambda device: need - 1)
    with pytest.raises(LabError, match=r"This run needs about .* free on cpu; use fewer layers"):
        check_fits(cfg, "cpu")
    with pytest.raises(LabError, match=r"free on cuda:1"):  # under DDP every GPU holds a replica
        check_fits(cfg, "cuda", [1])
    monkeypatch.setattr(devices, "free_bytes", lambda device: None)
    assert check_fits(cfg, "cpu") == need


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
