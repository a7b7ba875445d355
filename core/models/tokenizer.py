"""Tokenizers behind one interface.

Three sources, one shape: a model folder's own Hugging Face tokenizer, our trained byte-level
BPE (a bare ``tokenizer.json`` made by ``tokenizers``), and tiktoken's GPT-2 encoding.
Everything downstream (generation, consensus, the token view) only sees :class:`Tokenizer`.

Special tokens: ``encode(text)`` gives the ids the model expects to read, which for a Hugging Face
tokenizer is what transformers gives with its defaults (``tok(text).input_ids``): the BOS of Llama,
Mistral and Gemma, OPT's ``</s>``, nothing for GPT-2, GPT-NeoX or Qwen. Which tokens those are is
read from the tokenizer itself (its post-processor and ``add_bos_token`` settings), never from a
table of families. ``encode(text, add_special_tokens=False)`` gives the text's own ids, for a
researcher who wants them raw and for text that already holds its special tokens (a chat
template's output). Our trained BPE and tiktoken add nothing either way: our models are trained
on raw token windows, so nothing is what they expect.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import tiktoken
from tokenizers import Tokenizer as _Tok, decoders, models, pre_tokenizers, trainers

from ..errors import LabError, first_line, shorten
from ..files import atomic_write_text, check_folder_links

EOS = "<|endoftext|>"
MASK = "<|mask|>"


class Tokenizer:
    """``encode``/``decode`` plus the few facts generation needs."""

    name: str = "tokenizer"
    vocab_size: int = 0
    eos_id: int | None = None
    mask_id: int | None = None
    prefix_ids: tuple[int, ...] = ()   # what encode() puts before every text's own ids (a BOS)
    suffix_ids: tuple[int, ...] = ()   # what it puts after them (an EOS, for the few tokenizers set so)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``text`` as the ids the model reads: with the special tokens the tokenizer frames every
        text with (:attr:`prefix_ids`, :attr:`suffix_ids`), or its own ids alone when
        ``add_special_tokens`` is False."""
        raise NotImplementedError

    def strip_prefix(self, ids: list[int]) -> list[int]:
        """``ids`` without the leading :attr:`prefix_ids` when they start with them (to show a
        prompt's text without its BOS)."""
        n = len(self.prefix_ids)
        return list(ids[n:]) if n and tuple(ids[:n]) == self.prefix_ids else list(ids)

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def token_str(self, token_id: int) -> str:
        """How one token reads on its own (for token views and feature cards)."""
        return self.decode([int(token_id)])

    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes one token stands for, when the tokenizer works on bytes (a token may hold half
        of a UTF-8 character); None when it cannot tell."""
        return None

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str | None:
        """``messages`` as the prompt the model was tuned on, ready for its answer, when the
        tokenizer carries a chat template; None when it has none (ours never do)."""
        return None


class BPETokenizer(Tokenizer):
    """A bare ``tokenizer.json`` from the ``tokenizers`` library (our trained BPE)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        try:
            self._tok = _Tok.from_file(self.path)
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise LabError(f"Could not read tokenizer file {self.path}: {e}; point at a valid tokenizer.json.") from e
        self.name = f"BPE ({Path(self.path).name}, {self._tok.get_vocab_size()} tokens)"
        self.vocab_size = self._tok.get_vocab_size()
        self.eos_id = self._tok.token_to_id(EOS)
        self.mask_id = self._tok.token_to_id(MASK)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # never the file's post-processor: our trainer trains on raw windows (core.training.data), so raw is
        # what a model made with this tokenizer reads
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes | None:
        return _byte_level_bytes(self._tok.id_to_token(int(token_id))) if isinstance(
            self._tok.decoder, decoders.ByteLevel) else None


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer (a model folder's own, or a hub id)."""

    def __init__(self, source: str, local_files_only: bool = False, trust_remote_code: bool = False,
                 revision: str | None = None):
        from transformers import AutoTokenizer  # a second of import: only Hugging Face tokenizers pay it

        try:
            self._tok = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only,
                                                      trust_remote_code=trust_remote_code,
                                                      **({"revision": revision} if revision else {}))
        except ValueError as e:
            if "trust_remote_code" in str(e):
                raise LabError(f"Tokenizer '{source}' ships its own Python code, which GPT Lab runs only when asked; "
                               f"pass --trust-remote-code (trust_remote_code=True) if you trust its authors.") from None
            raise LabError(f"Tokenizer '{source}' cannot be read ({shorten(first_line(e), 160)}); pass a tokenizer.json, "
                           f"a model folder or a cached hub id.") from None
        except OSError as e:
            raise LabError(f"No tokenizer '{shorten(source, 80)}' here: it is neither a tokenizer.json, a model folder "
                           f"nor a hub id in the local cache ({shorten(first_line(e), 120)}); check the path or "
                           f"the id.") from None
        except Exception as e:  # a tokenizer_config.json whose values the tokenizer class refuses
            raise LabError(f"Tokenizer '{source}' cannot be read ({type(e).__name__}: {shorten(first_line(e), 160)}); "
                           f"pass a tokenizer.json, a model folder or a cached hub id.") from None
        self.name = f"{type(self._tok).__name__} ({len(self._tok)} tokens)"
        self.vocab_size = len(self._tok)
        self.eos_id = self._tok.eos_token_id
        self.mask_id = self._tok.mask_token_id if getattr(self._tok, "mask_token", None) else None
        self.prefix_ids, self.suffix_ids = _special_frame(self._tok)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], clean_up_tokenization_spaces=False)

    def token_bytes(self, token_id: int) -> bytes | None:
        backend = getattr(self._tok, "backend_tokenizer", None)  # fast tokenizers only
        if backend is None or not isinstance(backend.decoder, decoders.ByteLevel):
            return None
        return _byte_level_bytes(self._tok.convert_ids_to_tokens(int(token_id)))

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str | None:
        if not getattr(self._tok, "chat_template", None):
            return None
        return self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class TiktokenTokenizer(Tokenizer):
    """tiktoken's GPT-2 encoding (what the custom consensus script used)."""

    def __init__(self, encoding: str = "gpt2"):
        try:
            self._enc = tiktoken.get_encoding(encoding)
        except Exception as e:
            raise LabError(f"tiktoken's '{encoding}' encoding files are not cached and cannot be downloaded "
                           f"here; set TIKTOKEN_CACHE_DIR to a folder holding them, or use the model's own "
                           f"tokenizer.") from e
        self.name = f"tiktoken {encoding} ({self._enc.n_vocab} tokens)"
        self.vocab_size = self._enc.n_vocab
        self.eos_id = self._enc.eot_token

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._enc.encode(text, allowed_special="all")  # GPT-2's encoding frames nothing

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode([int(i) for i in ids])

    def token_bytes(self, token_id: int) -> bytes | None:
        try:
            return self._enc.decode_single_token_bytes(int(token_id))
        except KeyError:  # an id the encoding does not have
            return None


_FRAME_PROBE = "Hello world, 12 times."


def _special_frame(tok) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(prefix, suffix)``: the ids a transformers tokenizer adds around a text by default, found by
    encoding a probe with and without special tokens (so the tokenizer's own post-processor and
    ``add_bos_token`` settings decide). ``((), ())`` when the added ids do not frame the text's ids
    (encode still returns what transformers gives; only the prefix is then unknown)."""
    try:
        raw = list(tok.encode(_FRAME_PROBE, add_special_tokens=False))
        full = list(tok.encode(_FRAME_PROBE, add_special_tokens=True))
    except TypeError:  # a remote-code tokenizer may refuse the keyword; it then adds what it adds
        return (), ()
    for i in range(len(full) - len(raw) + 1):
        if full[i:i + len(raw)] == raw:
            return tuple(full[:i]), tuple(full[i + len(raw):])
    return (), ()


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable bytes stand for themselves, the
    others for chr(256 + k) in byte order (what a byte-level BPE's token strings are written in)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    others = [b for b in range(256) if b not in keep]
    return {**{chr(b): b for b in keep}, **{chr(256 + k): b for k, b in enumerate(others)}}


_BYTE_OF = _byte_level_alphabet()


def _byte_level_bytes(token: str | None) -> bytes | None:
    """A byte-level token string as its bytes; special tokens (``<|endoftext|>``) read as their text."""
    if token is None:
        return None
    if all(c in _BYTE_OF for c in token):
        return bytes(_BYTE_OF[c] for c in token)
    return token.encode()


def load_tokenizer(source: str | os.PathLike, local_files_only: bool = False,
                   trust_remote_code: bool = False, revision: str | None = None) -> Tokenizer:
    """Open a tokenizer from a ``tokenizer.json`` file, a model folder, ``tiktoken:NAME`` or a hub id.
    ``trust_remote_code`` lets transformers run a repository's own tokenizer code (off unless asked)."""
    s = str(source)
    if s.startswith("tiktoken:") or s == "tiktoken":
        return TiktokenTokenizer(s.split(":", 1)[1] if ":" in s else "gpt2")
    p = Path(s).expanduser()
    if p.exists() and not (p.is_file() or p.is_dir()):
        raise LabError(f"Tokenizer {s} is neither a file nor a folder (a FIFO or a device); pass a tokenizer.json or "
                       f"a model folder.")
    if p.is_file():
        if p.suffix != ".json":
            raise LabError(f"Tokenizer file {p} is not a tokenizer.json; pass a tokenizer.json or a model folder.")
        return BPETokenizer(p)
    if p.is_dir():
        p = check_folder_links(p)
        if (p / "tokenizer_config.json").exists() or (p / "vocab.json").exists():
            return HFTokenizer(str(p), local_files_only=True, trust_remote_code=trust_remote_code)
        if (p / "tokenizer.json").exists():
            return BPETokenizer(p / "tokenizer.json")
        raise LabError(f"No tokenizer found in {p}: expected tokenizer.json or tokenizer_config.json there.")
    if s.endswith(".json") or s.startswith((".", "/", "~")):
        raise LabError(f"Tokenizer {'file' if s.endswith('.json') else 'path'} {s} does not exist; check the path.")
    return HFTokenizer(s, local_files_only=local_files_only, trust_remote_code=trust_remote_code, revision=revision)


def iter_text_chunks(texts: Iterable[str], chunk_chars: int = 1 << 16) -> Iterator[str]:
    for t in texts:
        for i in range(0, len(t), chunk_chars):
            yield t[i:i + chunk_chars]


def train_bpe(texts: Iterable[str], vocab_size: int, out_path: str | os.PathLike | None = None) -> BPETokenizer:
    """Train a byte-level BPE (deterministic for the same texts in the same order).

    The vocabulary always holds ``<|endoftext|>`` (document separator) and ``<|mask|>``
    (the absorbing state of masked diffusion), so one tokenizer serves both objectives.
    """
    if vocab_size < 300:
        raise LabError(f"vocab_size must be at least 300 for a byte-level BPE (got {vocab_size}).")
    tok = _Tok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, MASK], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(iter_text_chunks(texts), trainer=trainer)
    if out_path is None:
        out_path = Path(tempfile.mkdtemp()) / "tokenizer.json"
    atomic_write_text(out_path, tok.to_str())
    return BPETokenizer(out_path)
