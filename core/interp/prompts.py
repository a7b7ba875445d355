"""Prompts for language-model explainers and the parsing of their answers.

The reference pipeline asked flan-t5 for five things; each has a prompt builder here and a
parser for the answer: a feature's explanation, a layer's description, a total description,
an output score (1-10) and an interpretability score (1-10), plus the yes/no questions scoring
asks (detection: does it fire in this text; fuzzing: are the marked tokens the ones it fires on)
and the simulation question (each token's activation from 0 to 10, one answer per window). Prompts
are fitted to the explainer's input length by dropping whole examples first and trimming the
remaining ones from the left, so the marked token always stays.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .config import SIM_SCALE
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


def simulation_prompt(explanation: str, tokens: Sequence[str], start: int = 0) -> str:
    """Ask for every token's activation from 0 to :data:`SIM_SCALE` in one answer. Tokens are
    numbered from ``start + 1`` (their place in the whole window, so an answer's numbers point at
    the same tokens however much of the window's start was cut) and written as JSON strings, so a
    leading space, a line break or a tab shows."""
    first, last = start + 1, len(tokens)
    listed = "".join(f"{i}. {json.dumps(t, ensure_ascii=False)}\n" for i, t in enumerate(tokens[start:], first))
    return (f"A neuron is described as: {explanation}\nTokens of a text, numbered, as JSON strings:\n{listed}"
            f"Rate how strongly the neuron fires on each token, 0 (not at all) to {SIM_SCALE} (its strongest); most "
            f"are 0. One line per token, \"number: rating\", for tokens {first} to {last}.\nAnswer:\n")


def fit_simulation_prompt(explanation: str, tokens: Sequence[str], count: Callable[[str], int],
                          budget: Callable[[int], int]) -> tuple[str, int] | None:
    """:func:`simulation_prompt` for the window ``tokens`` within ``budget(n)`` tokens, ``n`` being the
    tokens asked about (the answer's room shrinks with them): the window loses tokens from its start
    until it fits. Returns ``(prompt, start)``, or None when not even its last token fits."""
    for start in range(len(tokens)):
        prompt = simulation_prompt(explanation, tokens, start)
        if count(prompt) <= budget(len(tokens) - start):
            return prompt, start
    return None


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


_NUM = r"-?\d+(?:\.\d+)?"
_JSON_LIST = re.compile(r"\[([^\[\]]*)\]")
_JSON_BODY = re.compile(rf"^\s*(?:{_NUM}\s*,\s*)*(?:{_NUM})?\s*,?\s*$")
# "12: 3", "12 = 3", "12. \" king\": 3", "12) 3" is not one (a bare list is ambiguous): an index, perhaps the
# token echoed as a JSON string, then ':' '=' or '->', then the value; anywhere, so one-line answers parse too
_PAIR = re.compile(rf'(?<![\w.\-])(\d+)\s*[.)]?\s*(?:"(?:[^"\\\n]|\\.)*"\s*)?(?::|=|->)\s*({_NUM})(?!\d)')


@dataclass
class ParsedSimulation:
    """What one simulation answer says: a value (0..SIM_SCALE) per asked token, or None where the
    answer gave none, with the characters each value was read from (for log-probabilities)."""

    values: list[float | None]
    spans: list[tuple[int, int] | None] = field(default_factory=list)
    format: str = "none"            # "lines" | "json" | "none" (nothing readable)

    @property
    def answered(self) -> int:
        return sum(v is not None for v in self.values)


def _clamp(x: float) -> float:
    return float(min(SIM_SCALE, max(0.0, x)))


def parse_simulation(text: str | None, n: int, first: int = 1) -> ParsedSimulation:
    """Per-token activations from an answer about ``n`` tokens numbered ``first..first+n-1``:
    ``index: value`` pairs (lines or not; a value for an index outside the range is ignored, the
    first one for an index wins) or a JSON list of numbers (in order from ``first``), whichever
    covers more tokens. Values are clamped to 0..SIM_SCALE; never raises."""
    text = "" if text is None else str(text)
    lines = ParsedSimulation([None] * n, [None] * n, "lines")
    for m in _PAIR.finditer(text):
        i = int(m.group(1)) - first
        if 0 <= i < n and lines.values[i] is None:
            lines.values[i], lines.spans[i] = _clamp(float(m.group(2))), m.span(2)
    listed = ParsedSimulation([None] * n, [None] * n, "json")
    for m in _JSON_LIST.finditer(text):
        if not _JSON_BODY.match(m.group(1)) or not re.search(r"\d", m.group(1)):
            continue
        for i, num in enumerate(re.finditer(_NUM, m.group(1))):
            if i < n:
                listed.values[i] = _clamp(float(num.group()))
                listed.spans[i] = (m.start(1) + num.start(), m.start(1) + num.end())
        break
    best = lines if lines.answered >= listed.answered else listed
    return best if best.answered else ParsedSimulation([None] * n, [None] * n, "none")


# an answer token: its text, log-probability and alternatives ({text: logprob}, or (text, logprob) pairs
# where two tokens may share a text)
Step = tuple[str, float, "dict[str, float] | Sequence[tuple[str, float]]"]


def _digit_value(token: str) -> int | None:
    t = token.strip()
    return int(t) if t.isdigit() and t.isascii() and int(t) <= SIM_SCALE and (t == "0" or not t.startswith("0")) else None


def expected_values(text: str, parsed: ParsedSimulation, steps: Sequence[Step] | None) -> tuple[list[float | None], int]:
    """``parsed``'s values, each replaced by its expected value over 0..SIM_SCALE where the answer
    token that wrote it is that number alone (a leading space or trailing newline aside) and its
    alternatives give the probabilities: sum v * p(v) / sum p(v) over the alternatives that are
    such numbers. A value written over several tokens ("1" then "0" for 10 in a digit-by-digit
    tokenizer) keeps its parsed number. Returns the values and how many came from probabilities;
    nothing changes when ``steps`` are missing or do not spell ``text``."""
    values = list(parsed.values)
    if not steps or "".join(s[0] for s in steps) != text:
        return values, 0
    starts, pos = [], 0
    for tok, _, _ in steps:
        starts.append(pos)
        pos += len(tok)
    used = 0
    k = 0
    order = sorted((span[0], i) for i, span in enumerate(parsed.spans) if span is not None and values[i] is not None)
    for a, i in order:
        while k + 1 < len(steps) and starts[k + 1] <= a:
            k += 1
        tok, lp, alts = steps[k]
        b = parsed.spans[i][1]  # type: ignore[index]
        lo, hi = starts[k], starts[k] + len(tok)
        if not (lo <= a and b <= hi) or tok.strip() != text[a:b]:
            continue
        pairs = list(alts.items()) if isinstance(alts, dict) else list(alts)
        if lp is not None and all(text != tok for text, _ in pairs):
            pairs.append((tok, lp))
        mass: dict[int, float] = {}
        for alt, alp in pairs:
            v = _digit_value(alt)
            if v is not None and alp is not None and alp > -1e30:
                mass[v] = mass.get(v, 0.0) + math.exp(alp)
        total = sum(mass.values())
        if total > 0:
            values[i] = sum(v * p for v, p in mass.items()) / total
            used += 1
    return values, used
