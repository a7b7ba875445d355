"""OpenAI request bodies turned into GPT Lab's sampling settings, every bad field named in one sentence.

Bodies are read by hand rather than by a schema library so that each mistake ends in a
:class:`~core.errors.LabError` saying what to change (the server answers it with 400), and so that
fields OpenAI clients send but we do not use (``user``, ``metadata``...) pass quietly, while
fields whose effect we cannot honour (``presence_penalty``, ``logit_bias``, ``tools``...) are
refused instead of being silently ignored.

Parameters beyond OpenAI's, as vLLM spells them: ``top_k`` (0 or -1 = off), ``min_p``,
``repetition_penalty``, and ``num_beams`` / ``length_penalty`` for beam search. Temperature 0 is
greedy decoding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import LabError
from ..generation.config import SamplingConfig
from .config import COMPLETIONS_MAX_TOKENS, MAX_N, MAX_TOP_LOGPROBS

# Fields OpenAI defines whose effect this server cannot produce: refused unless left at their neutral value.
_UNSUPPORTED = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None, "suffix": None,
                "tools": None, "functions": None, "tool_choice": None, "function_call": None}


@dataclass
class GenerationRequest:
    """One /v1/completions or /v1/chat/completions request, checked."""

    model: str | None
    prompts: list[str]
    sampling: SamplingConfig          # the seed of choice i is seed + i; max_new_tokens comes from max_tokens
    max_tokens: int | None = None     # None (chat only): all the room the context leaves after the prompt
    n: int = 1
    logprobs: int | None = None       # None: no log-probabilities; k: the chosen token's and k alternatives
    echo: bool = False                # completions: return the prompt before the completion
    stream: bool = False
    include_usage: bool = False       # stream_options.include_usage: a last chunk with token counts
    chat: bool = False
    extra_stop: list[str] = field(default_factory=list)  # added by the chat transcript, not by the client
    add_special_tokens: bool = True   # False for a chat template's text, which writes the model's BOS itself

    def choice_config(self, index: int, max_new_tokens: int) -> SamplingConfig:
        """The settings of choice ``index``: its own seed, so n samples differ and each can be repeated."""
        seed = None if self.sampling.seed is None else self.sampling.seed + index
        return replace(self.sampling, seed=seed, max_new_tokens=max_new_tokens,
                       stop=list(self.sampling.stop) + list(self.extra_stop))


# -- typed fields ------------------------------------------------------------------------------------

def _number(body: dict, name: str, default, *, whole: bool = False):
    value = body.get(name)
    if value is None:
        return default
    kind = "a whole number" if whole else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LabError(f"'{name}' must be {kind} (got {value!r}).")
    if not math.isfinite(value):
        raise LabError(f"'{name}' must be a finite number (got {value!r}).")
    if whole:
        if float(value) != int(value):
            raise LabError(f"'{name}' must be a whole number (got {value!r}).")
        return int(value)
    return float(value)


def _bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise LabError(f"'{name}' must be true or false (got {value!r}).")
    return value


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise LabError(f"'stop' must be a string or a list of strings (got {stop!r}).")
    if any(s == "" for s in stops):
        raise LabError("'stop' holds an empty string; remove it.")
    return stops


def _refuse_unsupported(body: dict) -> None:
    for name, neutral in _UNSUPPORTED.items():
        value = body.get(name)
        if value is None or value == neutral or value in ({}, [], "none"):
            continue
        hint = "; use repetition_penalty instead" if name.endswith("_penalty") else ""
        raise LabError(f"'{name}' is not supported by this server{hint}; leave it out.")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type", "text") == "text"):
        raise LabError("Only plain-text responses are supported; leave 'response_format' out.")


def _sampling(body: dict, max_tokens: int) -> SamplingConfig:
    temperature = _number(body, "temperature", 1.0)
    if temperature < 0:
        raise LabError(f"'temperature' must be 0 (greedy) or above (got {temperature:g}).")
    top_k = _number(body, "top_k", 0, whole=True)
    cfg = SamplingConfig(
        max_new_tokens=max(max_tokens, 1),
        greedy=temperature == 0,
        temperature=temperature if temperature > 0 else 1.0,
        top_k=0 if top_k == -1 else top_k,
        top_p=_number(body, "top_p", 1.0),
        min_p=_number(body, "min_p", 0.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0),
        stop=_stops(body),
        seed=_number(body, "seed", None, whole=True),
        num_beams=_number(body, "num_beams", 1, whole=True),
        length_penalty=_number(body, "length_penalty", 1.0),
        n_alternatives=0,
    )
    cfg.check()  # its sentence names the setting ("top-p must be in (0, 1]"): the 400's message
    return cfg


def _n(body: dict) -> int:
    n = _number(body, "n", 1, whole=True)
    if not 1 <= n <= MAX_N:
        raise LabError(f"'n' must be between 1 and {MAX_N} (got {n}).")
    best_of = _number(body, "best_of", None, whole=True)
    if best_of is not None and best_of != n:
        raise LabError(f"'best_of' must equal 'n' here (got best_of={best_of}, n={n}); leave it out.")
    return n


def _top(value: int, name: str) -> int:
    if not 0 <= value <= MAX_TOP_LOGPROBS:
        raise LabError(f"'{name}' must be between 0 and {MAX_TOP_LOGPROBS} (got {value}).")
    return value


def _stream(body: dict) -> tuple[bool, bool]:
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise LabError(f"'stream_options' must be an object such as {{\"include_usage\": true}} (got {options!r}).")
    if not stream:
        raise LabError("'stream_options' only applies with \"stream\": true; drop it or stream.")
    return stream, _bool(options, "include_usage")


def _model(body: dict) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise LabError(f"'model' must be a string (got {model!r}).")
    return model


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise LabError("The request body must be a JSON object with at least a prompt or messages.")
    return body


# -- the two endpoints --------------------------------------------------------------------------------

def parse_completion(body: Any) -> GenerationRequest:
    """A /v1/completions body: ``prompt`` (a string or a list of strings), ``max_tokens`` (default
    :data:`COMPLETIONS_MAX_TOKENS`; 0 only with ``echo``, to score a text), ``logprobs`` (0-20)."""
    body = _object(body)
    _refuse_unsupported(body)
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise LabError("'prompt' must be a string or a non-empty list of strings (token ids are not accepted; "
                       "send the text).")
    echo = _bool(body, "echo")
    max_tokens = _number(body, "max_tokens", COMPLETIONS_MAX_TOKENS, whole=True)
    if max_tokens < (0 if echo else 1):
        raise LabError(f"'max_tokens' must be at least 1 (got {max_tokens}); 0 is allowed only with \"echo\": true.")
    logprobs = _number(body, "logprobs", None, whole=True)
    stream, usage = _stream(body)
    return GenerationRequest(model=_model(body), prompts=prompts, sampling=_sampling(body, max_tokens),
                             max_tokens=max_tokens, n=_n(body),
                             logprobs=None if logprobs is None else _top(logprobs, "logprobs"), echo=echo,
                             stream=stream, include_usage=usage)


def parse_chat(body: Any) -> tuple[GenerationRequest, list[dict[str, str]]]:
    """A /v1/chat/completions body and its messages as ``{"role", "content"}`` text pairs; the
    prompt is built from them by :func:`core.serve.chat.chat_prompt`. ``logprobs`` is true/false,
    ``top_logprobs`` (0-20) the alternatives; ``max_completion_tokens`` or ``max_tokens``."""
    body = _object(body)
    _refuse_unsupported(body)
    messages = _messages(body.get("messages"))
    max_tokens = _number(body, "max_completion_tokens", None, whole=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", None, whole=True)
    if max_tokens is not None and max_tokens < 1:
        raise LabError(f"'max_tokens' must be at least 1 (got {max_tokens}).")
    want = _bool(body, "logprobs")
    top = _number(body, "top_logprobs", None, whole=True)
    if top is not None and not want:
        raise LabError("'top_logprobs' needs \"logprobs\": true; set it or drop top_logprobs.")
    stream, usage = _stream(body)
    req = GenerationRequest(model=_model(body), prompts=[""], sampling=_sampling(body, max_tokens or 1),
                            max_tokens=max_tokens, n=_n(body), logprobs=_top(top or 0, "top_logprobs") if want else None,
                            stream=stream, include_usage=usage, chat=True)
    return req, messages


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise LabError("'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} objects.")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"].strip():
            raise LabError(f"Message {i} needs a \"role\" (system, user or assistant) and a \"content\".")
        out.append({"role": m["role"].strip(), "content": _content(m.get("content"), i)})
    return out


def _content(content: Any, i: int) -> str:
    """Message content as text: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise LabError(f"Message {i} has a content part that is not text; this server reads text only.")
            texts.append(part["text"])
        return "".join(texts)
    raise LabError(f"Message {i}'s \"content\" must be a string or a list of text parts.")


__all__ = ["GenerationRequest", "parse_completion", "parse_chat"]
