"""Driving app.py with Streamlit's AppTest.

Why a harness: AppTest builds a fresh PagesManager for every run, and a ``pages/`` folder next to
app.py makes each run start in Streamlit's legacy multipage mode, which on reruns executes the
page file without the frame (no sidebar, lost widget state). A running server leaves that mode
for good on the first ``st.navigation`` call; ``_NavigationPages`` does the same for every test
run, so AppTest sees what a browser sees.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import streamlit.testing.v1.app_test as _app_test
from streamlit.runtime.pages_manager import PagesManager
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "app.py"
TIMEOUT = 60.0  # seconds per run; the first run imports torch and loads a model


class _NavigationPages(PagesManager):
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
