"""The feature store: everything known about a transcoder set's features, in one SQLite file.

Tables (one file may hold several sets; most hold one, and ``set_id=None`` means "the latest"):

- ``sets``: model spec, transcoder folder, config (JSON).
- ``layers``: per-layer quality (FVE, L0, dead fraction, replacement losses) and collection size.
- ``vocab``: the text of every token that appears in the store, so contexts read without the model.
- ``features``: per feature: density (share of tokens it fires on), max/mean activation, a
  histogram of its activations on log-spaced bins (:data:`HIST_EDGES`), its most frequent
  activating tokens, and the output tokens it promotes and suppresses.
- ``contexts``: token windows around activations: ``top`` (the strongest, shown to explainers),
  ``quantile`` (samples across its activation range), each with the activation of every token.
- ``scoring`` and ``windows``: the material of explanation scores, from held-out text explainers
  never see: ``heldout`` (activating windows), ``negative`` (random windows where the feature is
  silent) and ``hard`` (windows holding one of its top tokens where it is nevertheless silent).
  Hundreds of them a feature would be most of the file as rows of their own, so they are packed:
  one row per feature and kind holds arrays of (corpus window, position, scale, activations), and
  the held-out corpus windows' tokens are stored once in ``windows``. (A rowid table: its rows of a
  few kilobytes stay on their leaf pages, where a WITHOUT ROWID table would spill each to a page of
  its own.) A store written before these
  tables existed keeps its scoring windows as ``contexts`` rows, and reads the same.
- ``explanations`` (+ FTS5 index ``explanations_fts``), ``scores``, ``descriptions`` (per-layer and
  total descriptions of the set) and ``completions`` (explained completions), each tagged with
  the explainer that wrote it (``builtin``, ``lm:<model>``).

Writes go through transactions; a fresh store is built in a temp file and renamed into place
(:meth:`FeatureStore.build`), so a reader never sees half a store. One process writes a store at
a time (:func:`writer_lock`): a second writer waits a few seconds, then is refused with a sentence; readers
wait out a writer's commit (SQLite's busy timeout). A file that is not a whole feature store of a
known format (garbage, truncated, another schema) is refused when opened, and anything SQLite or
the decoding of a row raises later becomes one LabError naming the file, never a traceback.
Full-text search uses SQLite's FTS5 when this Python's sqlite3 has it (:data:`FTS5`) and falls
back to ``LIKE`` otherwise. Feature addresses are :func:`core.models.hooks.act_name` names
(``blocks.{layer}.transcoder.{feature}``).
"""
from __future__ import annotations

import functools
import json
import os
import re
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np

from ..errors import LabError, first_line, shorten
from ..files import check_output, parse_json
from ..models.hooks import act_name
from ..jobs.lock import FolderLock, acquire
from .config import transcoder_hooks

MIN_FIRING = 10   # firing windows a score needs to rank among a list's best (a perfect AUC on one or two is luck)

STORE_FORMAT = 1
STORE_NAME = "features.sqlite"
HIST_EDGES = [0.0] + [round(10 ** e, 6) for e in np.linspace(-2, 3, 41)]  # activation histogram bins
CONTEXT_KINDS = ("top", "quantile", "heldout", "negative", "hard")
SCORING_KINDS = ("heldout", "negative", "hard")   # packed in the scoring table (module docstring)
# what a feature list sorts by -> its label; the first is the default: the best-explained features first (by
# the chosen score among those scored on at least MIN_FIRING firing windows, then the rest; ties by sample
# size), so a newcomer's first card is one whose explanation holds up on enough text to mean it
SORT_KEYS = {"score": "explanation score", "density": "frequency", "max_act": "max activation",
             "mean_act": "mean activation", "feature": "feature"}
BUSY_TIMEOUT_S = 10.0   # how long a reader waits out a writer's commit before giving up
COLLECT_HINT = "collect a new one with `python -m core transcoders collect`"


def _probe_fts5() -> bool:
    try:
        conn = sqlite3.connect(":memory:")
        conn.execute("CREATE VIRTUAL TABLE t USING fts5(x)")
        conn.close()
        return True
    except sqlite3.OperationalError:
        return False


FTS5 = _probe_fts5()  # False: search falls back to LIKE over explanation text


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sets (
    id INTEGER PRIMARY KEY, model TEXT NOT NULL, folder TEXT, config TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS layers (
    set_id INTEGER NOT NULL, layer INTEGER NOT NULL, n_features INTEGER NOT NULL, hook_in TEXT, hook_out TEXT,
    fve REAL, l0 REAL, dead_fraction REAL, loss_clean REAL, loss_replaced REAL, loss_ablated REAL,
    loss_recovered REAL, n_tokens INTEGER, PRIMARY KEY (set_id, layer));
CREATE TABLE IF NOT EXISTS vocab (
    set_id INTEGER NOT NULL, token_id INTEGER NOT NULL, text TEXT NOT NULL, PRIMARY KEY (set_id, token_id));
CREATE TABLE IF NOT EXISTS features (
    set_id INTEGER NOT NULL, layer INTEGER NOT NULL, feature INTEGER NOT NULL,
    density REAL NOT NULL, n_active INTEGER NOT NULL, max_act REAL NOT NULL, mean_act REAL NOT NULL,
    hist TEXT NOT NULL, top_tokens TEXT NOT NULL, promoted TEXT NOT NULL, suppressed TEXT NOT NULL,
    PRIMARY KEY (set_id, layer, feature)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS contexts (
    set_id INTEGER NOT NULL, layer INTEGER NOT NULL, feature INTEGER NOT NULL, kind TEXT NOT NULL,
    rank INTEGER NOT NULL, quantile REAL, window INTEGER NOT NULL, position INTEGER NOT NULL,
    activation REAL NOT NULL, scale REAL NOT NULL, token_ids BLOB NOT NULL, acts BLOB NOT NULL,
    PRIMARY KEY (set_id, layer, feature, kind, rank)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS scoring (
    set_id INTEGER NOT NULL, layer INTEGER NOT NULL, feature INTEGER NOT NULL, kind TEXT NOT NULL,
    before INTEGER NOT NULL, after INTEGER NOT NULL, windows BLOB NOT NULL, positions BLOB NOT NULL,
    scales BLOB NOT NULL, acts BLOB NOT NULL, UNIQUE (set_id, layer, feature, kind));
CREATE TABLE IF NOT EXISTS windows (
    set_id INTEGER NOT NULL, window INTEGER NOT NULL, token_ids BLOB NOT NULL,
    PRIMARY KEY (set_id, window)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS explanations (
    id INTEGER PRIMARY KEY, set_id INTEGER NOT NULL, layer INTEGER NOT NULL, feature INTEGER NOT NULL,
    explainer TEXT NOT NULL, text TEXT NOT NULL, created REAL NOT NULL, UNIQUE (set_id, layer, feature, explainer));
CREATE TABLE IF NOT EXISTS scores (
    set_id INTEGER NOT NULL, layer INTEGER NOT NULL, feature INTEGER NOT NULL, explainer TEXT NOT NULL,
    method TEXT NOT NULL, value REAL, n INTEGER NOT NULL, details TEXT NOT NULL,
    PRIMARY KEY (set_id, layer, feature, explainer, method)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS descriptions (
    set_id INTEGER NOT NULL, scope TEXT NOT NULL, layer INTEGER NOT NULL, explainer TEXT NOT NULL,
    text TEXT NOT NULL, created REAL NOT NULL, PRIMARY KEY (set_id, scope, layer, explainer));
CREATE TABLE IF NOT EXISTS completions (
    id INTEGER PRIMARY KEY, set_id INTEGER NOT NULL, prompt TEXT NOT NULL, completion TEXT NOT NULL,
    explainer TEXT NOT NULL, result TEXT NOT NULL, created REAL NOT NULL);
"""

_FTS_SCHEMA = """
CREATE VIRTUAL TABLE IF NOT EXISTS explanations_fts USING fts5(text, content='explanations', content_rowid='id');
CREATE TRIGGER IF NOT EXISTS explanations_ai AFTER INSERT ON explanations BEGIN
    INSERT INTO explanations_fts(rowid, text) VALUES (new.id, new.text); END;
CREATE TRIGGER IF NOT EXISTS explanations_ad AFTER DELETE ON explanations BEGIN
    INSERT INTO explanations_fts(explanations_fts, rowid, text) VALUES ('delete', old.id, old.text); END;
CREATE TRIGGER IF NOT EXISTS explanations_au AFTER UPDATE ON explanations BEGIN
    INSERT INTO explanations_fts(explanations_fts, rowid, text) VALUES ('delete', old.id, old.text);
    INSERT INTO explanations_fts(rowid, text) VALUES (new.id, new.text); END;
"""


# -- records ----------------------------------------------------------------------------------

@dataclass
class LayerInfo:
    layer: int
    n_features: int
    hook_in: str
    hook_out: str
    fve: float | None
    l0: float | None
    dead_fraction: float | None
    loss_clean: float | None
    loss_replaced: float | None
    loss_ablated: float | None
    loss_recovered: float | None
    n_tokens: int | None           # tokens the collection ran over
    n_alive: int = 0               # features that fired at least once during collection


@dataclass
class Context:
    """A window of tokens around one activation; ``acts[i]`` is the feature's activation on ``tokens[i]``."""

    kind: str                      # top | quantile | heldout | negative | hard
    rank: int
    tokens: list[str]
    token_ids: list[int]
    acts: list[float]
    position: int                  # index in tokens of the activation the window was cut around
    activation: float              # acts[position]
    window: int = -1               # index of the corpus window it came from
    quantile: float | None = None

    @property
    def token(self) -> str:
        return self.tokens[self.position]


@dataclass
class FeatureStats:
    """What collection measures for one feature (the ``features`` row)."""

    layer: int
    feature: int
    density: float                             # share of tokens with activation > 0
    n_active: int
    max_act: float
    mean_act: float                            # mean over the tokens where it fires
    hist: list[int]                            # counts on HIST_EDGES
    top_tokens: list[tuple[str, int]]          # most frequent activating tokens (text, count)
    promoted: list[tuple[str, float]]          # output tokens whose logits its decoder row raises most
    suppressed: list[tuple[str, float]]


@dataclass
class FeatureSummary:
    """One row of the feature list."""

    layer: int
    feature: int
    density: float
    max_act: float
    mean_act: float
    top_tokens: list[str]
    explanation: str | None = None
    score: float | None = None                 # the chosen score's value (detection AUC by default)
    score_n: int | None = None                 # and its sample size


@dataclass
class FeatureCard:
    """Everything the feature card shows."""

    stats: FeatureStats
    top: list[Context]
    quantiles: list[Context]
    explanations: dict[str, str]               # explainer -> text
    scores: dict[str, dict[str, float | None]]  # explainer -> {method: value}
    score_rows: dict[str, dict[str, "Score"]] = field(default_factory=dict)  # explainer -> {method: Score (with n)}

    @property
    def address(self) -> str:
        return act_name("transcoder", self.stats.layer, self.stats.feature)


@dataclass
class SearchHit:
    layer: int
    feature: int
    explainer: str
    text: str
    rank: float                                # lower is better (bm25), 0 for LIKE matches


@dataclass
class Score:
    method: str                                # "detection" | "fuzzing" | "simulation" (core.interp.scoring)
    value: float | None                        # AUC in [0, 1] | Pearson r in [-1, 1]
    n: int                                     # windows (detection, fuzzing) or tokens (simulation) scored
    details: dict = field(default_factory=dict)


# -- the store ---------------------------------------------------------------------------------

def _quantise(acts: Sequence[float]) -> tuple[float, bytes]:
    """Activations in a window as one byte each, relative to the window's largest (``scale``):
    a card shows them as shading, and 1/255 of the peak is finer than any eye or score needs."""
    a = np.asarray(acts, dtype=np.float64)
    scale = float(a.max(initial=0.0))
    if scale <= 0:
        return 0.0, bytes(len(a))
    return scale, np.round(np.clip(a, 0, None) / scale * 255).astype(np.uint8).tobytes()


def _dequantise(scale: float, blob: bytes) -> list[float]:
    return (np.frombuffer(blob, dtype=np.uint8).astype(np.float64) * (scale / 255)).tolist()


def _round(pairs: Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
    return [(t, float(f"{v:.4g}")) for t, v in pairs]


def _trim(hist: Sequence[int]) -> list[int]:
    """A histogram without its trailing empty bins (read back padded to HIST_EDGES)."""
    out = list(hist)
    while out and out[-1] == 0:
        out.pop()
    return out


def store_error(path: str | os.PathLike, e: BaseException) -> LabError:
    """One sentence for what went wrong reading or writing the store ``path``: SQLite's errors and
    a row that does not decode mean the file is busy, unwritable, full or damaged."""
    text = first_line(e)
    low = text.lower()
    if "locked" in low or "busy" in low:
        return LabError(f"The feature store {path} is busy: another process is writing it; wait for it to finish and "
                        f"try again.")
    if "readonly" in low or "read-only" in low:
        return LabError(f"The feature store {path} cannot be written here (it is open read-only, or its folder or "
                        f"file is not writable); open it for writing or copy the set somewhere you can write.")
    if "disk is full" in low or "disk i/o" in low:
        return LabError(f"Could not write the feature store {path} ({text}); free some disk space and try again.")
    return LabError(f"The feature store {path} is damaged or not a feature store ({type(e).__name__}: {text}); "
                    f"{COLLECT_HINT}.")


_LATER_TABLES = ("scoring", "windows")   # added after format 1's first stores: may be missing (not different)
_DAMAGE = (sqlite3.Error, ValueError, TypeError, IndexError, OverflowError)  # what a bad file makes reading raise
F = TypeVar("F", bound=Callable)


def _plain_errors(fn: F) -> F:
    """A store method whose SQLite errors (and rows that do not decode) become one LabError naming
    the file (:func:`store_error`) instead of a traceback."""
    @functools.wraps(fn)
    def wrapper(self: "FeatureStore", *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except _DAMAGE as e:
            raise store_error(self.label, e) from None
    return wrapper  # type: ignore[return-value]


def _header_size(path: Path) -> int | None:
    """The size in bytes an SQLite file's header says it has (None when the header does not say:
    not SQLite, or written by a tool that leaves the in-header size stale), read before SQLite
    itself, which stumbles over a cut-off schema page before it could tell the file is short."""
    with open(path, "rb") as fh:
        head = fh.read(100)
    if len(head) < 100 or not head.startswith(b"SQLite format 3\x00"):
        return None
    page_size = int.from_bytes(head[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    if head[24:28] != head[92:96]:  # the size field is only valid when its change counter matches
        return None
    return int.from_bytes(head[28:32], "big") * page_size


@functools.lru_cache(maxsize=1)
def _expected_tables() -> dict[str, list[str]]:
    """``{table: its columns in order}`` of a store this version writes (inserts are positional)."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.executescript(_SCHEMA)
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: [r[1] for r in conn.execute(f"PRAGMA table_info({t})")] for t in names}
    finally:
        conn.close()


def check_store_input(path: Path) -> None:
    """An existing store file to open: a regular file, and not a link leading out of its folder
    (a store is read and written only where it lives); one sentence otherwise."""
    try:
        if not path.is_file():
            raise LabError(f"No feature store at {path}; {COLLECT_HINT}.")
        if path.is_symlink() and path.resolve().parent != path.parent.resolve():
            raise LabError(f"The feature store {path} is a link to {shorten(str(path.resolve()), 80)}, outside its "
                           f"folder; GPT Lab reads and writes a store only where it lives, so copy the file in instead "
                           f"of linking it.")
    except OSError as e:
        raise LabError(f"Cannot open the feature store {path} ({e.strerror or e}); check the path.") from None


def check_store_output(path: str | os.PathLike | None, flag: str = "--store") -> Path | None:
    """Where a collection will write a new store, checked before the work: a file that can be
    written (:func:`core.files.check_output`) and, when it exists, a feature store (a fresh one
    replaces it) rather than some other file it would destroy."""
    out = check_output(path, flag)
    if out is None or not out.is_file():
        return out
    with open(out, "rb") as fh:
        head = fh.read(16)
    if head and head != b"SQLite format 3\x00":
        raise LabError(f"{flag} {shorten(str(path), 120)} exists and is not a feature store; collecting would replace "
                       f"it, so name a new file (or a store to rebuild).")
    return out


WRITER_WAIT_S = 5.0  # how long a second writer of a store waits before it is refused


def writer_lock(path: str | os.PathLike, wait_s: float = WRITER_WAIT_S) -> FolderLock:
    """The one-writer lock (:mod:`core.jobs.lock`) of the folder holding the store at ``path``: the
    same lock a transcoder job holds on its set folder, so a hand-started ``describe`` and a job
    writing that set take turns. Re-entrant within a process (a collection holds it from its first
    batch to the rename, and the store it builds asks again)."""
    return acquire(Path(path).parent, "The feature store", "wait for it to finish (or stop it) and try again.",
                   wait_s=wait_s, named=path)


class FeatureStore:
    """A connection to one feature store file. Use :meth:`build` to make a new one atomically.

    Opened for writing (``readonly=False``) it holds the store's writer lock (:func:`writer_lock`) until
    closed, waiting at most ``wait_s`` seconds for another writer to finish.
    """

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False, wait_s: float = WRITER_WAIT_S,
                 _create: bool = False, _label: str | os.PathLike | None = None):
        self.path = Path(path)
        self.label = Path(_label or path)   # the file messages name (a store being built: its final place)
        self._vocab_cache: dict[int, dict[int, str]] = {}
        self._windows_cache: tuple[int, dict[int, np.ndarray]] | None = None
        self.conn: sqlite3.Connection | None = None
        self._lock: FolderLock | None = None
        if not _create:
            check_store_input(self.path)
        if not readonly and not _create:
            self._lock = writer_lock(self.path, wait_s)
        try:
            if readonly:
                # as_uri escapes a folder name's '?', '#' or '%', which a bare file: URI would misread
                self.conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True,
                                            check_same_thread=False, timeout=BUSY_TIMEOUT_S)
            else:
                self.conn = sqlite3.connect(str(self.path), check_same_thread=False, timeout=BUSY_TIMEOUT_S)
            self.conn.row_factory = sqlite3.Row
            if _create:
                self._create_schema()
            else:
                self._check_file()
            self.fts = FTS5 and self._has_fts()
            self.packed = self.conn.execute("SELECT 1 FROM sqlite_master WHERE name='scoring'").fetchone() is not None
            row = self.conn.execute("SELECT value FROM meta WHERE key='ids_dtype'").fetchone()
            self.ids_dtype = np.dtype(row[0] if row else "int32")
        except BaseException as e:
            self.close()
            if isinstance(e, _DAMAGE):
                raise store_error(self.label, e) from None
            raise

    def _check_file(self) -> None:
        """Refuse, in one sentence, a file that is not a whole store of a format this version reads."""
        size, expected = self.path.stat().st_size, _header_size(self.path)
        if expected is not None and expected > size:
            raise LabError(f"The feature store {self.label} is truncated ({size:,} of its {expected:,} bytes are "
                           f"there); copy it again or {COLLECT_HINT}.")
        try:
            row = self.conn.execute("SELECT value FROM meta WHERE key='format'").fetchone()
        except sqlite3.DatabaseError as e:
            raise LabError(f"{self.label} is not a feature store ({first_line(e)}); {COLLECT_HINT}.") from None
        if row is None or not str(row[0]).isdigit():
            raise LabError(f"{self.label} is not a feature store (it has no format mark); {COLLECT_HINT}.")
        if int(row[0]) > STORE_FORMAT:
            raise LabError(f"{self.label} is a feature store of a newer format ({row[0]}); update GPT Lab or "
                           f"{COLLECT_HINT}.")
        have = {t: [r[1] for r in self.conn.execute(f"PRAGMA table_info({t})")] for t in _expected_tables()}
        wrong = [t for t, cols in _expected_tables().items() if have[t] != cols
                 and not (t in _LATER_TABLES and not have[t])]  # a store older than a later table lacks it
        if wrong:
            raise LabError(f"{self.label} is not a feature store this version can read (table"
                           f"{'s' if len(wrong) > 1 else ''} {', '.join(wrong)} missing or different); "
                           f"{COLLECT_HINT}.")

    def _create_schema(self) -> None:
        with self.conn:
            self.conn.executescript(_SCHEMA)
            if FTS5:
                self.conn.executescript(_FTS_SCHEMA)
            self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('format', ?)", (str(STORE_FORMAT),))
            self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('hist_edges', ?)", (json.dumps(HIST_EDGES),))
            self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('ids_dtype', 'int32')")

    @_plain_errors
    def set_vocab_size(self, vocab_size: int) -> None:
        """Store context token ids as uint16 when the vocabulary allows (half the bytes); call before
        writing contexts."""
        self.ids_dtype = np.dtype(np.uint16 if vocab_size <= 65536 else np.int32)
        with self.conn:
            self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('ids_dtype', ?)", (self.ids_dtype.name,))

    def _has_fts(self) -> bool:
        return self.conn.execute("SELECT 1 FROM sqlite_master WHERE name='explanations_fts'").fetchone() is not None

    # -- lifecycle ----------------------------------------------------------------------------
    @classmethod
    @contextmanager
    def build(cls, path: str | os.PathLike, wait_s: float = WRITER_WAIT_S) -> Iterator["FeatureStore"]:
        """A new, empty store written to a temp file next to ``path`` and renamed onto it when the
        block finishes without error (an existing store stays untouched until then). The writer
        lock of ``path`` is held throughout, so no one is writing the store it replaces."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with writer_lock(path, wait_s):
            if tmp.exists():
                tmp.unlink()
            store = cls(tmp, _create=True, _label=path)
            try:
                # A temp file renamed only when complete needs no journal or per-commit syncs: one fsync at the end.
                store.conn.execute("PRAGMA synchronous=OFF")
                store.conn.execute("PRAGMA journal_mode=MEMORY")
                yield store
                store.conn.commit()
                store.conn.execute("VACUUM")
                store.close()
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
                store.path = path
            except BaseException as e:
                store.close()
                if tmp.exists():
                    tmp.unlink()
                if isinstance(e, sqlite3.Error):
                    raise store_error(path, e) from None
                raise

    def close(self) -> None:
        """Close the connection and give back the writer lock (safe to call twice)."""
        if self.conn is not None:
            try:
                self.conn.close()
            except sqlite3.ProgrammingError:
                pass
        if self._lock is not None:
            self._lock, held = None, self._lock
            held.release()

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writing ------------------------------------------------------------------------------
    @_plain_errors
    def add_set(self, model: str, folder: str | None, config: dict) -> int:
        with self.conn:
            cur = self.conn.execute("INSERT INTO sets (model, folder, config, created) VALUES (?, ?, ?, ?)",
                                    (model, folder, json.dumps(config), time.time()))
        return int(cur.lastrowid)

    @_plain_errors
    def put_layer(self, layer: int, n_features: int, quality: dict | None = None, n_tokens: int | None = None,
                  set_id: int | None = None) -> None:
        """``quality``: a :class:`~core.interp.quality.LayerQuality` dict (or None)."""
        q = quality or {}
        sid = self._set(set_id)
        with self.conn:
            self.conn.execute(
                "INSERT OR REPLACE INTO layers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (sid, layer, n_features, *transcoder_hooks(layer),
                 q.get("fve"), q.get("l0"), q.get("dead_fraction"), q.get("loss_clean"), q.get("loss_replaced"),
                 q.get("loss_ablated"), q.get("loss_recovered"), n_tokens))

    @_plain_errors
    def put_vocab(self, tokens: dict[int, str], set_id: int | None = None) -> None:
        sid = self._set(set_id)
        with self.conn:
            self.conn.executemany("INSERT OR REPLACE INTO vocab VALUES (?, ?, ?)",
                                  [(sid, int(k), v) for k, v in tokens.items()])
        self._vocab_cache.pop(sid, None)

    @_plain_errors
    def put_features(self, rows: Sequence[FeatureStats], set_id: int | None = None) -> None:
        sid = self._set(set_id)
        with self.conn:
            self.conn.executemany(
                "INSERT OR REPLACE INTO features VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(sid, r.layer, r.feature, r.density, r.n_active, r.max_act, r.mean_act, json.dumps(_trim(r.hist)),
                  json.dumps(r.top_tokens), json.dumps(_round(r.promoted)), json.dumps(_round(r.suppressed)))
                 for r in rows])

    @_plain_errors
    def put_contexts(self, layer: int, feature: int, contexts: Sequence[Context], set_id: int | None = None) -> None:
        sid = self._set(set_id)
        with self.conn:
            self.conn.executemany(
                "INSERT OR REPLACE INTO contexts (set_id, layer, feature, kind, rank, quantile, window, position, "
                "activation, scale, acts, token_ids) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(sid, layer, feature, c.kind, c.rank, c.quantile, c.window, c.position, c.activation,
                  *_quantise(c.acts), np.asarray(c.token_ids, dtype=self.ids_dtype).tobytes()) for c in contexts])

    @_plain_errors
    def put_windows(self, windows: dict[int, Sequence[int]], set_id: int | None = None) -> None:
        """The token ids of held-out corpus windows the packed scoring contexts point into."""
        sid = self._set(set_id)
        with self.conn:
            self.conn.executemany("INSERT OR REPLACE INTO windows VALUES (?, ?, ?)",
                                  [(sid, int(w), np.asarray(ids, dtype=self.ids_dtype).tobytes())
                                   for w, ids in windows.items()])
        self._windows_cache = None

    @_plain_errors
    def put_scoring(self, layer: int, feature: int, kind: str, before: int, after: int,
                    picks: Sequence[tuple[int, int, Sequence[float]]], set_id: int | None = None) -> None:
        """One feature's scoring windows of one ``kind`` (:data:`SCORING_KINDS`), packed: ``picks``
        are ``(corpus window, position in it, activations of the cut-out tokens)``; the tokens are
        the window's (:meth:`put_windows`) from ``position - before`` to ``position + after``."""
        if kind not in SCORING_KINDS:
            raise LabError(f"A scoring kind is one of {', '.join(SCORING_KINDS)} (got {kind!r}).")
        sid = self._set(set_id)
        tokens = self._window_tokens(sid)
        for w, p, a in picks:  # the activations must cover exactly the tokens a reader will cut
            full = tokens.get(int(w))
            if full is None or not 0 <= p < len(full) or \
                    len(a) != min(len(full), p + after + 1) - max(0, p - before):
                raise LabError(f"Scoring window {w} (position {p}) of feature {feature}, layer {layer}, does not match "
                               f"the stored windows; store the windows (put_windows) and cut {before} before and "
                               f"{after} after the position.")
        scales, acts = [], []
        for _, _, a in picks:
            scale, blob = _quantise(a)
            scales.append(scale)
            acts.append(blob if scale > 0 else b"")  # a silent window is all zeros: nothing to keep
        positions = np.asarray([p for _, p, _ in picks], dtype=np.int64)
        # the narrowest arrays that hold them; a reader tells the width from the blob's length
        pos_dtype = np.uint16 if positions.size == 0 or positions.max() < 65536 else np.int32
        scale_blob = b"" if not any(scales) else np.asarray(scales, dtype=np.float16 if all(
            np.isfinite(np.float16(x)) for x in scales) else np.float32).tobytes()
        with self.conn:
            self.conn.execute("INSERT OR REPLACE INTO scoring VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", (
                sid, layer, feature, kind, int(before), int(after),
                np.asarray([w for w, _, _ in picks], dtype=np.int32).tobytes(), positions.astype(pos_dtype).tobytes(),
                scale_blob, b"".join(acts)))

    @_plain_errors
    def put_explanations(self, rows: Sequence[tuple[int, int, str]], explainer: str, set_id: int | None = None) -> None:
        """``rows``: ``(layer, feature, text)``; replaces that explainer's earlier text."""
        sid = self._set(set_id)
        now = time.time()
        with self.conn:
            self.conn.executemany(
                "INSERT INTO explanations (set_id, layer, feature, explainer, text, created) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (set_id, layer, feature, explainer) DO UPDATE SET text=excluded.text, "
                "created=excluded.created", [(sid, l, f, explainer, t, now) for l, f, t in rows])

    @_plain_errors
    def put_scores(self, rows: Sequence[tuple[int, int, Score]], explainer: str, set_id: int | None = None) -> None:
        sid = self._set(set_id)
        with self.conn:
            self.conn.executemany(
                "INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(sid, l, f, explainer, s.method, s.value, s.n, json.dumps(s.details)) for l, f, s in rows])

    @_plain_errors
    def put_description(self, scope: str, layer: int, explainer: str, text: str, set_id: int | None = None) -> None:
        """``scope``: "layer" (with its layer) or "total" (layer -1)."""
        if scope not in ("layer", "total"):
            raise LabError(f"A description's scope is 'layer' or 'total' (got {scope!r}).")
        sid = self._set(set_id)
        with self.conn:
            self.conn.execute("INSERT OR REPLACE INTO descriptions VALUES (?, ?, ?, ?, ?, ?)",
                              (sid, scope, layer, explainer, text, time.time()))

    @_plain_errors
    def add_completion(self, prompt: str, completion: str, explainer: str, result: dict,
                       set_id: int | None = None) -> int:
        sid = self._set(set_id)
        with self.conn:
            cur = self.conn.execute("INSERT INTO completions (set_id, prompt, completion, explainer, result, created) "
                                    "VALUES (?, ?, ?, ?, ?, ?)", (sid, prompt, completion, explainer,
                                                                  json.dumps(result), time.time()))
        return int(cur.lastrowid)

    # -- reading ------------------------------------------------------------------------------
    def _set(self, set_id: int | None) -> int:
        if set_id is not None:
            return int(set_id)
        row = self.conn.execute("SELECT MAX(id) FROM sets").fetchone()
        if row is None or row[0] is None:
            raise LabError(f"The feature store {self.label} holds no transcoder set yet; {COLLECT_HINT}.")
        return int(row[0])

    @_plain_errors
    def sets(self) -> list[dict]:
        return [{"id": r["id"], "model": r["model"], "folder": r["folder"], "config": parse_json(r["config"]),
                 "created": r["created"]} for r in self.conn.execute("SELECT * FROM sets ORDER BY id")]

    @_plain_errors
    def vocab(self, set_id: int | None = None) -> dict[int, str]:
        sid = self._set(set_id)
        if sid not in self._vocab_cache:
            self._vocab_cache[sid] = {r[0]: r[1] for r in
                                      self.conn.execute("SELECT token_id, text FROM vocab WHERE set_id=?", (sid,))}
        return self._vocab_cache[sid]

    @_plain_errors
    def layers(self, set_id: int | None = None) -> list[LayerInfo]:
        sid = self._set(set_id)
        alive = dict(self.conn.execute("SELECT layer, COUNT(*) FROM features WHERE set_id=? AND n_active > 0 "
                                       "GROUP BY layer", (sid,)).fetchall())
        out = []
        for r in self.conn.execute("SELECT * FROM layers WHERE set_id=? ORDER BY layer", (sid,)):
            d = {k: r[k] for k in r.keys() if k != "set_id"}
            out.append(LayerInfo(**d, n_alive=int(alive.get(r["layer"], 0))))
        return out

    @_plain_errors
    def explainers(self, set_id: int | None = None) -> list[str]:
        sid = self._set(set_id)
        return [r[0] for r in self.conn.execute(
            "SELECT explainer FROM explanations WHERE set_id=? GROUP BY explainer ORDER BY MAX(created) DESC", (sid,))]

    def _pick_explainer(self, explainer: str | None, sid: int) -> str | None:
        if explainer is not None:
            return explainer
        names = self.explainers(sid)
        return names[0] if names else None

    @_plain_errors
    def features(self, layer: int, *, order_by: str = "density", descending: bool = True, limit: int | None = None,
                 offset: int = 0, explainer: str | None = None, method: str = "detection",
                 include_dead: bool = False, set_id: int | None = None) -> list[FeatureSummary]:
        """The feature list of one layer, sorted by ``order_by`` (one of :data:`SORT_KEYS`);
        ``explainer=None`` shows the most recent explainer's text and scores."""
        if order_by not in SORT_KEYS:
            raise LabError(f"Sort features by one of {', '.join(SORT_KEYS)} (got '{order_by}').")
        sid = self._set(set_id)
        ex = self._pick_explainer(explainer, sid)
        key = "s.value" if order_by == "score" else f"f.{order_by}"
        direction = "DESC" if descending else "ASC"
        sql = (f"SELECT f.layer, f.feature, f.density, f.max_act, f.mean_act, f.top_tokens, e.text AS explanation, "
               f"s.value AS score, s.n AS score_n FROM features f "
               f"LEFT JOIN explanations e ON e.set_id=f.set_id AND e.layer=f.layer AND e.feature=f.feature "
               f"AND e.explainer=? "
               f"LEFT JOIN scores s ON s.set_id=f.set_id AND s.layer=f.layer AND s.feature=f.feature "
               f"AND s.explainer=? AND s.method=? "
               f"WHERE f.set_id=? AND f.layer=? {'' if include_dead else 'AND f.n_active > 0'} "
               f"ORDER BY {key} IS NULL, "
               + (f"COALESCE(json_extract(s.details, '$.n_pos'), 0) >= {int(MIN_FIRING)} {direction}, "
                  if order_by == "score" else "")
               + f"{key} {direction}, "
               + (f"s.n {direction}, f.density {direction}, " if order_by == "score" else "")
               + "f.feature ASC")
        params: list = [ex, ex, method, sid, layer]
        if limit is not None:
            sql += " LIMIT ? OFFSET ?"
            params += [int(limit), int(offset)]
        return [FeatureSummary(layer=r["layer"], feature=r["feature"], density=r["density"], max_act=r["max_act"],
                               mean_act=r["mean_act"], top_tokens=[t for t, _ in parse_json(r["top_tokens"])],
                               explanation=r["explanation"], score=r["score"], score_n=r["score_n"])
                for r in self.conn.execute(sql, params)]

    @_plain_errors
    def count_features(self, layer: int, include_dead: bool = False, set_id: int | None = None) -> int:
        sid = self._set(set_id)
        cond = "" if include_dead else " AND n_active > 0"
        return int(self.conn.execute(f"SELECT COUNT(*) FROM features WHERE set_id=? AND layer=?{cond}",
                                     (sid, layer)).fetchone()[0])

    @_plain_errors
    def stats(self, layer: int, feature: int, set_id: int | None = None) -> FeatureStats:
        sid = self._set(set_id)
        r = self.conn.execute("SELECT * FROM features WHERE set_id=? AND layer=? AND feature=?",
                              (sid, layer, feature)).fetchone()
        if r is None:
            raise LabError(f"Feature {feature} of layer {layer} is not in the store {self.label}; pick a feature "
                           f"from the list.")
        return FeatureStats(layer=layer, feature=feature, density=r["density"], n_active=r["n_active"],
                            max_act=r["max_act"], mean_act=r["mean_act"],
                            hist=(parse_json(r["hist"]) + [0] * len(HIST_EDGES))[:len(HIST_EDGES)],
                            top_tokens=[tuple(x) for x in parse_json(r["top_tokens"])],
                            promoted=[tuple(x) for x in parse_json(r["promoted"])],
                            suppressed=[tuple(x) for x in parse_json(r["suppressed"])])

    @_plain_errors
    def contexts(self, layer: int, feature: int, kind: str = "top", limit: int | None = None,
                 set_id: int | None = None) -> list[Context]:
        if kind not in CONTEXT_KINDS:
            raise LabError(f"A context kind is one of {', '.join(CONTEXT_KINDS)} (got {kind!r}).")
        sid = self._set(set_id)
        vocab = self.vocab(sid)
        if kind in SCORING_KINDS and self.packed:
            packed = self._packed(sid, layer, feature, kind, vocab)
            if packed is not None:
                return packed if limit is None else packed[:int(limit)]
        sql = "SELECT * FROM contexts WHERE set_id=? AND layer=? AND feature=? AND kind=? ORDER BY rank"
        params: list = [sid, layer, feature, kind]
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        out = []
        for r in self.conn.execute(sql, params):
            ids = np.frombuffer(r["token_ids"], dtype=self.ids_dtype).tolist()
            acts = _dequantise(r["scale"], r["acts"])
            out.append(Context(kind=kind, rank=r["rank"], tokens=[vocab.get(i, f"<{i}>") for i in ids], token_ids=ids,
                               acts=acts, position=r["position"], activation=r["activation"], window=r["window"],
                               quantile=r["quantile"]))
        return out

    def _window_tokens(self, sid: int) -> dict[int, np.ndarray]:
        if self._windows_cache is None or self._windows_cache[0] != sid:
            self._windows_cache = (sid, {r[0]: np.frombuffer(r[1], dtype=self.ids_dtype) for r in self.conn.execute(
                "SELECT window, token_ids FROM windows WHERE set_id=?", (sid,))})
        return self._windows_cache[1]

    def _packed(self, sid: int, layer: int, feature: int, kind: str, vocab: dict[int, str]) -> list[Context] | None:
        """A feature's packed scoring windows of ``kind`` (None when it has no packed row)."""
        r = self.conn.execute("SELECT * FROM scoring WHERE set_id=? AND layer=? AND feature=? AND kind=?",
                              (sid, layer, feature, kind)).fetchone()
        if r is None:
            return None
        wins = np.frombuffer(r["windows"], dtype=np.int32)
        n = len(wins)
        poss = np.frombuffer(r["positions"], dtype=np.uint16 if len(r["positions"]) == 2 * n else np.int32)
        blob = r["scales"]
        scales = np.zeros(n, dtype=np.float32) if not blob else \
            np.frombuffer(blob, dtype=np.float16 if len(blob) == 2 * n else np.float32)
        if not len(wins) == len(poss) == len(scales):
            raise ValueError(f"scoring row of feature {feature} (layer {layer}) has arrays of unequal length")
        tokens = self._window_tokens(sid)
        acts_blob, at, out = r["acts"], 0, []
        for rank, (w, p, scale) in enumerate(zip(wins.tolist(), poss.tolist(), scales.tolist())):
            full = tokens.get(w)
            if full is None:  # a damaged store: the caller's _plain_errors names the file
                raise IndexError(f"window {w} of feature {feature} (layer {layer}) is not in the store")
            lo, hi = max(0, p - r["before"]), min(len(full), p + r["after"] + 1)
            if not lo <= p < hi:
                raise IndexError(f"position {p} is outside window {w}")
            ids = full[lo:hi].tolist()
            if scale > 0:
                acts = _dequantise(scale, acts_blob[at:at + len(ids)])
                at += len(ids)
            else:
                acts = [0.0] * len(ids)
            if len(acts) != len(ids):
                raise ValueError(f"scoring row of feature {feature} (layer {layer}) is cut short")
            out.append(Context(kind=kind, rank=rank, tokens=[vocab.get(i, f"<{i}>") for i in ids], token_ids=ids,
                               acts=acts, position=p - lo, activation=acts[p - lo], window=w))
        return out

    @_plain_errors
    def explanation(self, layer: int, feature: int, explainer: str | None = None,
                    set_id: int | None = None) -> str | None:
        return self._latest_text("explanations", "layer=? AND feature=?", [layer, feature], explainer, set_id)

    @_plain_errors
    def explanations(self, layer: int, explainer: str | None = None, set_id: int | None = None) -> dict[int, str]:
        """``{feature: text}`` for one layer (one explainer; None = the most recent)."""
        sid = self._set(set_id)
        ex = self._pick_explainer(explainer, sid)
        return {r[0]: r[1] for r in self.conn.execute(
            "SELECT feature, text FROM explanations WHERE set_id=? AND layer=? AND explainer=?", (sid, layer, ex))}

    @_plain_errors
    def scores(self, layer: int, feature: int, set_id: int | None = None) -> dict[str, dict[str, Score]]:
        """``{explainer: {method: Score}}``."""
        sid = self._set(set_id)
        out: dict[str, dict[str, Score]] = {}
        for r in self.conn.execute("SELECT * FROM scores WHERE set_id=? AND layer=? AND feature=?",
                                   (sid, layer, feature)):
            out.setdefault(r["explainer"], {})[r["method"]] = Score(method=r["method"], value=r["value"], n=r["n"],
                                                                    details=parse_json(r["details"]))
        return out

    @_plain_errors
    def layer_scores(self, layer: int, explainer: str | None = None, method: str = "detection",
                     set_id: int | None = None) -> dict[int, float]:
        """``{feature: value}`` of one explainer's scores on one layer."""
        sid = self._set(set_id)
        ex = self._pick_explainer(explainer, sid)
        return {r[0]: r[1] for r in self.conn.execute(
            "SELECT feature, value FROM scores WHERE set_id=? AND layer=? AND explainer=? AND method=? "
            "AND value IS NOT NULL", (sid, layer, ex, method))}

    @_plain_errors
    def feature(self, layer: int, feature: int, n_top: int | None = None, set_id: int | None = None) -> FeatureCard:
        sid = self._set(set_id)
        exps = {r[0]: r[1] for r in self.conn.execute(
            "SELECT explainer, text FROM explanations WHERE set_id=? AND layer=? AND feature=? ORDER BY created DESC",
            (sid, layer, feature))}
        rows = self.scores(layer, feature, sid)
        scores = {ex: {m: s.value for m, s in d.items()} for ex, d in rows.items()}
        return FeatureCard(stats=self.stats(layer, feature, sid), top=self.contexts(layer, feature, "top", n_top, sid),
                           quantiles=self.contexts(layer, feature, "quantile", None, sid), explanations=exps,
                           scores=scores, score_rows=rows)

    @_plain_errors
    def description(self, scope: str, layer: int = -1, explainer: str | None = None,
                    set_id: int | None = None) -> str | None:
        return self._latest_text("descriptions", "scope=? AND layer=?", [scope, layer], explainer, set_id)

    def _latest_text(self, table: str, where: str, params: list, explainer: str | None,
                     set_id: int | None) -> str | None:
        """The newest ``text`` of ``table`` matching ``where`` in a set, by one explainer or any."""
        sql = f"SELECT text FROM {table} WHERE set_id=? AND {where}"
        params = [self._set(set_id), *params]
        if explainer is not None:
            sql += " AND explainer=?"
            params.append(explainer)
        row = self.conn.execute(sql + " ORDER BY created DESC LIMIT 1", params).fetchone()
        return row[0] if row else None

    @_plain_errors
    def completions(self, limit: int = 20, set_id: int | None = None) -> list[dict]:
        sid = self._set(set_id)
        return [{"id": r["id"], "prompt": r["prompt"], "completion": r["completion"], "explainer": r["explainer"],
                 "result": parse_json(r["result"]), "created": r["created"]} for r in self.conn.execute(
            "SELECT * FROM completions WHERE set_id=? ORDER BY id DESC LIMIT ?", (sid, limit))]

    @_plain_errors
    def density_histogram(self, layer: int, bins: int = 40, set_id: int | None = None) -> tuple[list[float], list[int]]:
        """Histogram of log10(feature density) over a layer's live features: ``(edges, counts)``."""
        sid = self._set(set_id)
        dens = np.asarray([r[0] for r in self.conn.execute(
            "SELECT density FROM features WHERE set_id=? AND layer=? AND density > 0", (sid, layer))], dtype=np.float64)
        if dens.size == 0:
            return [], []
        counts, edges = np.histogram(np.log10(dens), bins=bins)
        return edges.tolist(), counts.tolist()

    @_plain_errors
    def search(self, query: str, layer: int | None = None, explainer: str | None = None, limit: int = 50,
               set_id: int | None = None) -> list[SearchHit]:
        """Features whose explanation contains every word of ``query`` (prefix match on each word),
        best first. Words only: FTS5 syntax in the query is treated as plain text."""
        sid = self._set(set_id)
        words = re.findall(r"\w+", query or "", flags=re.UNICODE)
        if not words:
            return []
        cond, params = "e.set_id=?", [sid]
        if layer is not None:
            cond += " AND e.layer=?"
            params.append(layer)
        if explainer is not None:
            cond += " AND e.explainer=?"
            params.append(explainer)
        if self.fts:
            match = " ".join(f'"{w}"*' for w in words)
            sql = (f"SELECT e.layer, e.feature, e.explainer, e.text, bm25(explanations_fts) AS r "
                   f"FROM explanations_fts JOIN explanations e ON e.id = explanations_fts.rowid "
                   f"WHERE explanations_fts MATCH ? AND {cond} ORDER BY r LIMIT ?")
            rows = self.conn.execute(sql, [match, *params, limit]).fetchall()
        else:
            likes = " AND ".join("e.text LIKE ?" for _ in words)
            sql = (f"SELECT e.layer, e.feature, e.explainer, e.text, 0.0 AS r FROM explanations e "
                   f"WHERE {likes} AND {cond} ORDER BY e.layer, e.feature LIMIT ?")
            rows = self.conn.execute(sql, [f"%{w}%" for w in words] + params + [limit]).fetchall()
        return [SearchHit(layer=r[0], feature=r[1], explainer=r[2], text=r[3], rank=float(r[4])) for r in rows]


def store_path(folder: str | os.PathLike) -> Path:
    """The feature store inside a transcoder set folder."""
    return Path(folder) / STORE_NAME


def open_store(folder_or_file: str | os.PathLike, readonly: bool = True) -> FeatureStore:
    """A set folder (its features.sqlite) or a store file."""
    p = Path(folder_or_file)
    return FeatureStore(store_path(p) if p.is_dir() else p, readonly=readonly)


__all__ = ["FeatureStore", "FeatureStats", "FeatureSummary", "FeatureCard", "Context", "LayerInfo", "SearchHit",
           "Score", "FTS5", "HIST_EDGES", "CONTEXT_KINDS", "SCORING_KINDS", "SORT_KEYS", "STORE_NAME", "store_error", "store_path",
           "open_store"]
