"""Token ids as text a person can read, whatever ids they are.

Random prompts (and a logit lens's argmax tokens) are arbitrary token sequences: a byte-level
tokenizer may cut a UTF-8 character in two, or a sequence may hold a byte no character starts
with. Decoding such a sequence yields U+FFFD ("�"), which says nothing about what is there.
Here the sequence is decoded as a whole (characters split across tokens come out whole) and only
bytes that are not UTF-8 read as escapes (``\\x80``), as Python writes them.
"""
from __future__ import annotations

from typing import Sequence

from ..models.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"


def readable_text(tok: Tokenizer, ids: Sequence[int]) -> str:
    """``ids`` decoded as one sequence; bytes that make no character read as ``\\xNN`` escapes
    instead of U+FFFD (a tokenizer that cannot give bytes leaves the sequence as decoded, its
    U+FFFD written ``\\ufffd``)."""
    text = tok.decode(ids)
    if REPLACEMENT not in text:
        return text
    parts = [tok.token_bytes(i) for i in ids]
    if any(p is None for p in parts):
        return text.replace(REPLACEMENT, "\\ufffd")
    return b"".join(parts).decode("utf-8", errors="backslashreplace")


def readable_tokens(tok: Tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token's own text: a token holding part of a character shows that part's bytes as
    ``\\xNN`` escapes (so the heatmap's and the logit lens's labels never read "�")."""
    return [readable_text(tok, [int(i)]) for i in ids]
