"""Prompts for language-model explainers and the parsing of their answers.

The reference pipeline asked flan-t5 for five things; each has a prompt builder here and a
parser for the answer: a feature's explanation, a layer's description, a total description,
an output score (1-10) and an interpretability score (1-10), plus the yes/no questions scoring
asks (detection: does it fire in this text; fuzzing: are the marked tokens the ones it fires on). Prompts are fitted to the explainer's input length by dropping whole
examples first and trimming the remaining ones from the left, so the marked token always stays.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

from .store import Context

MARK_OPEN, MARK_CLOSE = "<<", ">>"
FALLBACK_MAX_INPUT = 512          # tokens, when neither the tokenizer nor the config says
_WORD_NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
                 "nine": 9, "ten": 10}


_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7f] if chr(c) not in "\n\t\r"}


def clean_token(text: str) -> str:
    """A token as one printable line: newlines and tabs made visible, other control bytes escaped."""
    return text.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r").translate(_CONTROL)


def mark_context(tokens: Sequence[str], position: int, start: int = 0) -> str:
    """The window as text with the activating token marked: ``... <<token>> ...``, from ``start``."""
    parts = [clean_token(t) for t in tokens[start:]]
    i = position - start
    if 0 <= i < len(parts):
        parts[i] = f"{MARK_OPEN}{parts[i]}{MARK_CLOSE}"
    return "".join(parts)


def plain_context(tokens: Sequence[str]) -> str:
    return "".join(clean_token(t) for t in tokens)


def fit_examples(header: str, examples: Sequence[tuple[Sequence[str], int]], footer: str,
                 count: Callable[[str], int], max_tokens: int,
                 compact: tuple[str, str] = ("", "Meaning:")) -> tuple[str, int]:
    """``header + numbered examples + footer`` within ``max_tokens`` (as ``count`` measures).

    Keeps as many examples as fit, in order. If not even one fits whole, the first is trimmed
    from the left (never past its marked token); if the header and footer leave no room at all,
    the ``compact`` pair replaces them. Returns the prompt and the number of examples used.
    """
    def build(head: str, lines: list[str], foot: str) -> str:
        return head + "".join(f"{n + 1}. {line}\n" for n, line in enumerate(lines)) + foot

    if not examples:
        return build(header, [], footer), 0
    for head, foot in ((header, footer), compact):
        lines: list[str] = []
        for toks, pos in examples:
            line = mark_context(toks, pos)
            if count(build(head, lines + [line], foot)) > max_tokens:
                break
            lines.append(line)
        if lines:
            return build(head, lines, foot), len(lines)
        toks, pos = examples[0]
        for start in range(0, pos + 1):
            line = mark_context(toks[:pos + 3], pos, start)
            if count(build(head, [line], foot)) <= max_tokens:
                return build(head, [line], foot), 1
    toks, pos = examples[0]
    return f"{MARK_OPEN}{clean_token(toks[pos])}{MARK_CLOSE}", 1  # the explainer's limit is tiny


# -- prompt builders ------------------------------------------------------------------------

FEATURE_HEADER = ("Each line below is a text snippet. A neuron fires on the token marked with << >>.\n")
FEATURE_FOOTER = "In a few words, what does the neuron detect?\nAnswer:"


def feature_prompt(contexts: Sequence[Context], count: Callable[[str], int], max_tokens: int,
                   promoted: Sequence[str] = ()) -> tuple[str, int]:
    """Prompt for one feature's explanation from its top contexts (and promoted tokens when they fit)."""
    footer = FEATURE_FOOTER
    if promoted:
        with_promoted = f"It makes the model more likely to write: {', '.join(repr(t) for t in promoted[:5])}.\n" + footer
        if count(FEATURE_HEADER + with_promoted) < max_tokens // 2:
            footer = with_promoted
    return fit_examples(FEATURE_HEADER, [(c.tokens, c.position) for c in contexts], footer, count, max_tokens)


def _fit_list(header: str, items: Sequence[str], footer: str, count: Callable[[str], int], max_tokens: int,
              compact_footer: str = "Summary:") -> str:
    """``header + "- item" lines + footer`` with as many items as fit; with the compact footer
    (and no header) when nothing fits otherwise, cutting the first item's words as a last resort."""
    def build(head: str, lines: list[str], foot: str) -> str:
        return head + "".join(f"- {x}\n" for x in lines) + foot

    for head, foot in ((header, footer), ("", compact_footer)):
        lines: list[str] = []
        for item in items:
            if count(build(head, lines + [item], foot)) > max_tokens:
                break
            lines.append(item)
        if lines or not items:
            if count(build(head, lines, foot)) <= max_tokens:
                return build(head, lines, foot)
    words = items[0].split() if items else []
    while words and count(build("", [" ".join(words)], compact_footer)) > max_tokens:
        words.pop()
    return build("", [" ".join(words)] if words else [], compact_footer)


def layer_prompt(layer: int, explanations: Sequence[str], count: Callable[[str], int], max_tokens: int) -> str:
    """Describe one layer from its most important features' explanations (most important first)."""
    return _fit_list(f"These are the most important features of layer {layer} of a language model:\n",
                     explanations, "Summarise in one sentence what this layer does.\nAnswer:", count, max_tokens)


def total_prompt(layer_descriptions: Sequence[tuple[int, str]], count: Callable[[str], int], max_tokens: int,
                 prompt: str | None = None, completion: str | None = None) -> str:
    head = "A language model processed text layer by layer.\n"
    if prompt is not None and completion is not None:
        head = f"A language model continued the text {prompt!r} with {completion!r}.\n"
    return _fit_list(head + "What each layer did:\n", [f"layer {i}: {d}" for i, d in layer_descriptions],
                     "In one sentence, how did the model arrive at its output?\nAnswer:", count, max_tokens)


def output_rating_prompt(prompt: str, completion: str) -> str:
    return (f"Text: {prompt}{completion}\nOn a scale of 1 to 10, how fluent and sensible is this text?\n"
            f"Answer with a number.\nScore:")


def interpretation_rating_prompt(prompt: str, completion: str, description: str) -> str:
    return (f"A language model continued {prompt!r} with {completion!r}.\nExplanation of how it did it: "
            f"{description}\nOn a scale of 1 to 10, how clear and specific is this explanation?\n"
            f"Answer with a number.\nScore:")


def detection_prompt(explanation: str, text: str) -> str:
    return (f"A neuron is described as: {explanation}\nText: {text}\n"
            f"Would the neuron fire somewhere in this text? Answer yes or no.\nAnswer:")


def fit_detection_prompt(explanation: str, tokens: Sequence[str], count: Callable[[str], int],
                         max_tokens: int) -> str:
    """:func:`detection_prompt` for the window ``tokens`` within ``max_tokens``: the window loses
    whole tokens from its start until it fits, so the explanation and the question always stay."""
    for start in range(max(len(tokens), 1)):
        prompt = detection_prompt(explanation, plain_context(tokens[start:]))
        if count(prompt) <= max_tokens:
            return prompt
    return prompt


def fuzz_prompt(explanation: str, text: str) -> str:
    return (f"A neuron is described as: {explanation}\nText: {text}\n"
            f"Are the tokens marked with {MARK_OPEN} {MARK_CLOSE} the ones this neuron fires on? Answer yes or no.\n"
            f"Answer:")


def mark_tokens(tokens: Sequence[str], marks: Sequence[int], start: int = 0) -> str:
    """The window as text from ``start`` with every token at ``marks`` marked ``<<token>>``."""
    marked = set(marks)
    return "".join(f"{MARK_OPEN}{clean_token(t)}{MARK_CLOSE}" if i in marked else clean_token(t)
                   for i, t in enumerate(tokens) if i >= start)


def fit_fuzz_prompt(explanation: str, tokens: Sequence[str], marks: Sequence[int], count: Callable[[str], int],
                    max_tokens: int) -> str:
    """:func:`fuzz_prompt` within ``max_tokens``: the window loses tokens from its start, never past its
    first mark, so the explanation, the question and a marked token always stay."""
    last = min(marks) if marks else max(len(tokens) - 1, 0)
    for start in range(last + 1):
        prompt = fuzz_prompt(explanation, mark_tokens(tokens, marks, start))
        if count(prompt) <= max_tokens:
            return prompt
    return prompt


# -- answer parsing ---------------------------------------------------------------------------

_PREFIX = re.compile(r"^\s*(answer|explanation|description|summary|the neuron (detects|fires on)|it detects)\s*[:\-]?\s*",
                     re.IGNORECASE)


def parse_explanation(text: str | None, max_chars: int = 200) -> str | None:
    """The first meaningful line of a generated answer, without echoed labels, quotes or markers;
    None when nothing readable is left."""
    if text is None:
        return None
    for line in str(text).replace("\r", "\n").split("\n"):
        line = _PREFIX.sub("", line.strip())
        line = line.replace(MARK_OPEN, "").replace(MARK_CLOSE, "")
        line = re.sub(r"<pad>|</s>|<unk>|<s>|<\|endoftext\|>", "", line)
        line = re.sub(r"\s+", " ", line).strip(" \t\"'`")
        if re.search(r"\w", line):
            return line[:max_chars].rstrip()
    return None


_NUMBER = re.compile(r"(?<![\w.])(-?\d+(?:\.\d+)?)(?:\s*(?:/|out of)\s*(\d+(?:\.\d+)?))?")


def parse_score(text: str | None, lo: int = 1, hi: int = 10) -> int | None:
    """A 1-10 score from free text: "7", "7/10", "Score: 7", "8 out of 10", "seven", "4.5/5".

    Fractions over another scale are rescaled to ``hi``; the result is rounded and clamped to
    ``[lo, hi]``. None when the text holds no number.
    """
    if text is None:
        return None
    s = str(text).strip().lower()
    m = _NUMBER.search(s)
    value: float | None = None
    if m:
        value = float(m.group(1))
        if m.group(2):
            denom = float(m.group(2))
            if denom > 0:
                value = value / denom * hi
    else:
        for word, v in _WORD_NUMBERS.items():
            if re.search(rf"\b{word}\b", s):
                value = float(v)
                break
    if value is None:
        return None
    return int(min(hi, max(lo, round(value))))


def parse_yes_no(text: str | None) -> bool | None:
    if text is None:
        return None
    m = re.search(r"\b(yes|no|true|false)\b", str(text).lower())
    if not m:
        return None
    return m.group(1) in ("yes", "true")
