"""Driving app.py with Streamlit's AppTest.

Why a harness: AppTest builds a fresh PagesManager for every run, and a ``pages/`` folder next to
app.py makes each run start in Streamlit's legacy multipage mode, which on reruns executes the
page file without the frame (no sidebar, lost widget state). A running server leaves that mode
for good on the first ``st.navigation`` call; ``_NavigationPages`` does the same for every test
run, so AppTest sees what a browser sees.

Why the patch stays (Streamlit 1.67, read in streamlit/runtime/pages_manager.py and
streamlit/testing/v1/app_test.py): ``AppTest._run`` sets ``PagesManager.uses_pages_directory = None``
and builds a new ``PagesManager`` before every run, whose constructor sets the flag to True because
``pages/`` exists; no config option or public API turns that off, and only a ``st.navigation`` call
clears it, which comes too late for the run that started bare. Without the patch every click runs
the page without app.py and pages.parts.common.ensure_frame's rerun drops the click (tried: the
Generate page's Generate button then does nothing). Remove it with ensure_frame's patch when
Streamlit drops its legacy ``pages/`` mode.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import streamlit.testing.v1.app_test as _app_test
from streamlit.elements.progress import ProgressMixin
from streamlit.runtime.pages_manager import PagesManager
from streamlit.runtime.scriptrunner_utils.exceptions import StopException
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "app.py"
TIMEOUT = 60.0  # seconds per run; the first run imports torch and loads a model


class _NavigationPages(PagesManager):
    """A PagesManager that starts in st.navigation mode, as a running server is after its first run."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        PagesManager.uses_pages_directory = False
        super().__init__(*args, **kwargs)


_app_test.PagesManager = _NavigationPages


def open_app(page: str | None = None, state: dict[str, Any] | None = None, timeout: float = TIMEOUT) -> AppTest:
    """Run app.py once (seeding ``state`` into session state first), then switch to ``page``
    (e.g. ``"pages/generate.py"``) and run again. Returns the AppTest after the last run."""
    at = AppTest.from_file(str(APP), default_timeout=timeout)
    for key, value in (state or {}).items():
        at.session_state[key] = value
    at.run()
    if page is not None:
        at.switch_page(page).run()
    return at


def texts(elements) -> list[str]:
    """The ``value`` of every element in an ElementList (errors, markdown, captions…)."""
    return [str(e.value) for e in elements]


def code(at: AppTest) -> list[str]:
    """The st.code blocks' text, as Streamlit keeps it (see ``shown``)."""
    return texts(at.code)


def shown(*outputs: str) -> list[str]:
    """What st.code keeps of each text: Streamlit drops one leading and one trailing newline, so a
    completion that ends a line is shown (and stored in the element) without it."""
    return [re.sub(r"\n\Z", "", re.sub(r"\A\n", "", o)) for o in outputs]


@contextmanager
def stop_at_first_progress() -> Iterator[None]:
    """Press Stop mid-run: Streamlit answers a Stop click by raising StopException at the page's
    next call into Streamlit; inside this block the progress bar's first update after the start
    raises it instead (AppTest cannot click while a script runs)."""
    original = ProgressMixin.progress

    def stop_on_update(self, value, text=None, **kw):
        if value > 0:
            raise StopException()
        return original(self, value, text, **kw)

    ProgressMixin.progress = stop_on_update
    try:
        yield
    finally:
        ProgressMixin.progress = original




def set_widgets(at: AppTest, prefix: str, **values: Any) -> None:
    """Set each ``prefix + name`` widget to its value, whatever kind of widget holds that key."""
    kinds = (at.number_input, at.toggle, at.slider, at.text_area, at.text_input, at.selectbox, at.multiselect,
             at.radio)
    for name, value in values.items():
        key = prefix + name
        for kind in kinds:
            try:
                widget = kind(key=key)
            except KeyError:
                continue
            widget.set_value(value)
            break
        else:
            raise KeyError(key)


def described_feature_model(folder: Path, model_src: Path, texts: list[str], *, steps: int,
                            n_tokens: int) -> tuple[Path, Path]:
    """A copy of ``model_src`` at ``folder/model`` with a trained, collected and described
    transcoder set: ``(model folder, set folder)``, what the Features page's tests open."""
    import shutil

    from core.interp import (BuiltinExplainer, CollectConfig, FeatureStore, TranscoderTrainConfig, collect_features,
                             corpus_from_texts, describe_store, run_to_end, store_path, train_transcoders,
                             transcoder_dir_for)
    from core.models.loading import load_model

    model_dir = folder / "model"
    shutil.copytree(model_src, model_dir)
    lm = load_model(str(model_dir))
    corpus = corpus_from_texts(lm, texts)
    cfg = TranscoderTrainConfig(expansion=2, k=4, steps=steps, batch_tokens=256, seq_len=32, model_batch=8,
                                buffer_batches=2, val_windows=4, warmup_steps=5)
    tset = run_to_end(train_transcoders(lm, cfg, corpus=corpus, out_dir=transcoder_dir_for(lm)))
    ccfg = CollectConfig(n_tokens=n_tokens, seq_len=32, batch_size=8, top_k=5, n_quantile=3, n_heldout=3,
                         n_negative=3)
    for _ in collect_features(lm, tset, ccfg, corpus=corpus):
        pass
    with FeatureStore(store_path(tset.folder)) as store:
        for _ in describe_store(store, BuiltinExplainer()):
            pass
    return model_dir, tset.folder


def chart_data(at, title: str):
    """The rows (a DataFrame) behind the Altair chart titled ``title``."""
    import io
    import json

    import pyarrow as pa

    for chart in at.get("vega_lite_chart"):
        spec = json.loads(chart.proto.spec)
        if spec.get("title") == title:
            (ds,) = chart.proto.datasets
            return pa.ipc.open_stream(io.BytesIO(ds.data.data)).read_all().to_pandas()
    raise KeyError(title)


# -- inputs at their extremes, and what a page must answer them with ---------------------------------

LONG = ("To be, or not to be, that is the question: " * 500)[:20_000]
ODD = "🙂 ünïcödé \u200b\u202e ﷽ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 日本語 \x00 Ω≈ç√∫ \U0010ffff"
TEXTS = {"empty": "", "blank": " \n\t \n", "long": LONG, "unicode": ODD}  # typed text at its extremes


def no_exception(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def one_error(at: AppTest, *phrases: str) -> str:
    """Exactly one error on the page, a sentence holding every phrase (and no echo of 20k characters)."""
    no_exception(at)
    errors = texts(at.main.error)
    assert len(errors) == 1, errors
    for phrase in phrases:
        assert phrase in errors[0], errors[0]
    assert len(errors[0]) < 1000, errors[0][:200]
    return errors[0]


def clean(at: AppTest) -> None:
    """Neither an exception nor an error on the page."""
    no_exception(at)
    assert not at.error, texts(at.error)


def limits(widget) -> tuple:
    """(min, max) of a number input or slider, as the page declared them."""
    return widget.proto.min, widget.proto.max


def pick_model(at: AppTest, folder: Path) -> None:
    """Point the sidebar at a model folder, as a user does (other…, then a path)."""
    at.sidebar.selectbox(key="model_choice").set_value("other…").run()
    at.sidebar.text_input(key="model_other").input(str(folder)).run()
    clean(at)
