"""What every page shares: the workbench table, the model request in session state, and one
cached loader so a model is read from disk once per process and shared by every session.

The sidebar in app.py writes the request (spec, device, dtype); pages call :func:`current_model`.
Other pages may open a model elsewhere by setting ``st.session_state[SPEC_KEY]`` and calling
``st.switch_page``: the sidebar picks the new spec up on the next run.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import streamlit as st

from core.devices import dtype_name
from core.errors import LabError, failure, first_line
from core.models.config import DEFAULT_DTYPE, DTYPE_NAMES
from core.models.loading import ROOT, LoadedModel, load_model, model_message
from core.training.runs import runs_root

SPEC_KEY = "model_spec"       # the model spec every page uses; set it to open another model
DEVICE_KEY = "model_device"
DTYPE_KEY = "model_dtype"
TRUST_KEY = "model_trust_remote_code"  # let transformers run code shipped with the model (off unless ticked)
_OUTCOME_KEY = "_model_outcome"  # (request, weak reference to the model or None, error or None) of this run's load
# A load error's remedy in the app's words (the engine's sentences name the command line's flags)
APP_REMEDIES = dict(use_default="pick `default` in the sidebar's model picker",
                    trust="tick Trust remote code below the model spec in the sidebar", weights=None)


@dataclass(frozen=True)
class Workbench:
    file: str      # relative to the repository root, as st.Page and st.page_link take it
    title: str
    icon: str
    blurb: str

    @property
    def exists(self) -> bool:
        return (ROOT / self.file).is_file()


HOME = Workbench("pages/home.py", "Home", ":material/home:", "What the lab does and which model is loaded.")
WORKBENCHES = [
    Workbench("pages/generate.py", "Generate", ":material/edit_note:",
              "Prompt a model with full sampling control, watch tokens stream, see their probabilities."),
    Workbench("pages/consensus.py", "Consensus", ":material/hub:",
              "Iterate a model's layer stack and watch token representations converge, live."),
    Workbench("pages/training.py", "Training", ":material/model_training:",
              "Train GPT or text-diffusion models on local GPUs or CPU, monitor curves, stop, resume."),
    Workbench("pages/features.py", "Features", ":material/psychology:",
              "Browse transcoder features per layer and explain how a model produced a completion."),
    Workbench("pages/attention.py", "Attention", ":material/grid_view:",
              "See every head's attention pattern on a prompt; enlarge a head, ablate it."),
    Workbench("pages/patching.py", "Patching", ":material/compare_arrows:",
              "Activation patching: which (layer, position) of a clean run restores its answer in a corrupted one."),
]


def checkpoint_specs(runs_dir: Path | None = None) -> list[str]:
    """Checkpoint folders of training runs (``runs/<id>/checkpoints/<step>``), newest step first
    within each run; each one is a loadable model spec. The runs folder is the training engine's
    (``$GPTLAB_RUNS``, default ``runs``), so the picker lists what the Training page shows."""
    runs_dir = runs_root() if runs_dir is None else Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    found = [p for p in runs_dir.glob("*/checkpoints/*") if (p / "config.json").is_file()]

    def order(p: Path) -> tuple[str, int, str]:
        step = int(p.name) if p.name.isdigit() else -1
        return (p.parent.parent.name, -step, p.name)

    return [str(p) for p in sorted(found, key=order)]


def spec_label(spec: str) -> str:
    """Checkpoint paths shown relative to the repository, everything else as written."""
    try:
        return str(Path(spec).relative_to(ROOT))
    except ValueError:
        return spec


def model_request() -> tuple[str, str, str, bool]:
    """The (spec, device, dtype, trust_remote_code) the user asked for; defaults before the sidebar has run."""
    ss = st.session_state
    return (str(ss.get(SPEC_KEY) or "default").strip() or "default", ss.get(DEVICE_KEY, "cpu"),
            ss.get(DTYPE_KEY, DEFAULT_DTYPE), bool(ss.get(TRUST_KEY, False)))


@st.cache_resource(max_entries=3, show_spinner="Loading model…")
def _load_cached(spec: str, device: str, dtype: str, trust_remote_code: bool = False) -> LoadedModel:
    # Failures raise and so are not cached: a model fetched later loads on the next try.
    return load_model(spec, device=device, dtype=dtype, trust_remote_code=trust_remote_code)


def load_outcome() -> tuple[LoadedModel | None, str | None]:
    """Load the requested model (cached) and return it, or None and a message saying what to change.

    The outcome is remembered for the rest of the run, so a failing spec is tried once per run even
    though the sidebar and the page both ask. The model is remembered by a weak reference: the
    cache owns it, so a model the cache drops (another session filled it) is freed rather than kept
    alive by every idle session whose state still names it.
    """
    request = model_request()
    memo = st.session_state.get(_OUTCOME_KEY)
    if memo is not None and memo[0] == request:
        if memo[2] is not None:
            return None, memo[2]
        model = memo[1]()
        if model is not None:
            return model, None
    spec, device, dtype, trust = request
    model, error = None, None
    try:
        model = _load_cached(spec, device, dtype, trust)
    except LabError as e:
        error = app_message(e)
    except Exception as e:  # anything else is a bug, but the user still gets one line, not a traceback
        error = f"Could not load model '{spec}': " + failure(
            e, "the device ran out of memory; pick a smaller model, a 16-bit dtype, or another device.")
    st.session_state[_OUTCOME_KEY] = (request, None if model is None else weakref.ref(model), error)
    return model, error


def app_message(error: LabError) -> str:
    """A model's load error as the app says it: the same sentence, its remedy naming the sidebar's
    controls instead of a command-line flag (the error carries its words as ``fix["message"]``)."""
    said = error.fix.get("message")
    return model_message(*said, **APP_REMEDIES) if said else str(error)


URL_FIELDS = ((SPEC_KEY, "model"), (DEVICE_KEY, "device"), (DTYPE_KEY, "dtype"))  # session key -> query parameter
URL_DEFAULTS = {"model": "default", "device": "cpu", "dtype": DEFAULT_DTYPE}  # left out of the URL


def model_from_url() -> None:
    """A session that has not picked a model yet (a reloaded tab, a bookmarked or shared address)
    takes the one the URL names (``?model=SPEC&device=...&dtype=...``). Trusting remote code is
    never taken from a URL: a link must not make anyone run a model's code."""
    ss = st.session_state
    if SPEC_KEY in ss:
        return
    for key, param in URL_FIELDS:
        value = (st.query_params.get(param) or "").strip()
        if value and (param != "dtype" or value in DTYPE_NAMES):  # a device the sidebar does not offer it resets
            ss[key] = value


def model_to_url() -> None:
    """Write the sidebar's model, device and dtype into the URL, so a reload opens the same model."""
    spec, device, dtype, _ = model_request()
    for param, value in (("model", spec), ("device", device), ("dtype", dtype)):
        if value == URL_DEFAULTS[param] or not value:
            if param in st.query_params:
                del st.query_params[param]
        elif st.query_params.get(param) != value:
            st.query_params[param] = value


def load_spec(spec: str) -> LoadedModel:
    """Load another model with the sidebar's device, dtype and trust setting (cached like the
    sidebar's; a LabError says what to change)."""
    _, device, dtype, trust = model_request()
    return _load_cached(spec, device, dtype, trust)


def forget_outcome() -> None:
    """Start of a run: the next load_outcome() looks again (the sidebar calls this first)."""
    st.session_state.pop(_OUTCOME_KEY, None)


def ensure_frame() -> None:
    """Make sure this page runs inside app.py's frame (navigation + sidebar).

    Streamlit treats a ``pages/`` folder as a legacy multipage app until the entry script calls
    ``st.navigation``. When a fresh server's first request names a page (a reloaded tab), that page
    would run bare; this switches to ``st.navigation`` mode and reruns, so app.py draws the frame.
    Call it first thing on every page.

    Why a private attribute: Streamlit 1.67 has no public switch for this. ``PagesManager``
    sets the class attribute ``uses_pages_directory`` from the mere existence of ``pages/`` beside
    the entry script (no config option turns that off), the script runner then runs the requested
    page file itself (``_mpa_v1``), and only a call of ``st.navigation`` clears the flag; a page run
    bare has no public way to clear it before its own navigation call would come. DESIGN.md fixes
    the folder's name, so the flag is cleared here. Remove this when Streamlit drops the legacy mode.
    """
    try:
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:  # a Streamlit without the legacy mode: nothing to do
        return
    if getattr(PagesManager, "uses_pages_directory", False):
        PagesManager.uses_pages_directory = False
        st.rerun()


def current_model() -> LoadedModel | None:
    """The loaded model for this page, or None after showing the load error on the page."""
    ensure_frame()
    model, error = load_outcome()
    if error:
        st.error(error)
    return model


def status_line(model: LoadedModel | None, error: str | None) -> str:
    """One line for the sidebar: what is loaded and where."""
    if model is None:
        return f"Not loaded: {error}"
    parts = [f"**{spec_label(model.spec)}**"]
    if model.untrained:
        parts.append(":orange[untrained]")
    parts += [model.family, model.device, dtype_name(model.dtype)]
    return " · ".join(parts)


def stream_run(record: dict, run, live, out_of_memory: str, show: Callable[[Any], None]) -> None:
    """Stream a sampler's ``run`` (core.generation.sampler.Run) into ``record`` and a ``live``
    placeholder: ``show(event)`` draws each event (refreshing ``record["result"]`` where it needs),
    and at the end the record holds the run's result, done. A failure becomes one line in
    ``record["error"]`` (``out_of_memory`` says what to change when the device ran out), the run is
    closed however the loop ends (also on Stop, when Streamlit aborts the script mid-loop), and the
    live view is cleared once the loop is over."""
    try:
        for event in run:
            show(event)
        record["result"], record["status"] = run.result, "done"
    except LabError as e:
        record["status"], record["error"] = "failed", str(e)
    except Exception as e:  # a bug or the device failing: one line for the user, no traceback
        record["status"], record["error"] = "failed", f"Generation failed: {failure(e, out_of_memory)}"
    finally:
        run.close()
    live.empty()


STATE_BADGE = {"running": ":green-badge[running]", "finished": ":blue-badge[finished]",  # a run's or job's state
               "failed": ":red-badge[failed]", "stopped": ":orange-badge[stopped]",
               "unreadable": ":gray-badge[unreadable]"}


def attempt(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, str | None]:
    """Call the engine; a LabError (or anything unexpected: a file-system surprise, a bug) becomes
    one line for st.error, never a traceback."""
    try:
        return fn(*args, **kwargs), None
    except LabError as e:
        return None, str(e)
    except Exception as e:
        return None, f"{type(e).__name__}: {first_line(e)}"


def visible(text: str | None) -> str:
    """A token's text with its whitespace made visible (space ␣, newline ↵, tab ⇥; nothing ∅) and
    any other unprintable character as its escape, so no cell or label is blank."""
    if text is None:
        return ""
    text = text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text) or "∅"
