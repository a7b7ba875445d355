"""GPT Lab's results in OpenAI's JSON shapes: completions, chat completions, their streamed chunks,
log-probabilities and errors.

Log-probabilities are the model's own (the softmax of its raw logits), whatever the sampling
settings, as everywhere in GPT Lab; a token the model rules out entirely reads as
:data:`~core.serve.config.LOGPROB_FLOOR`, because JSON has no minus infinity.
"""
from __future__ import annotations

import math
import secrets
import time
from typing import Any, Sequence

from ..generation.autoregressive import TokenInfo
from .config import LOGPROB_FLOOR
from .engine import ChoiceResult


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else LOGPROB_FLOOR


def _alt_logprob(prob: float) -> float:
    return finite(math.log(prob)) if prob > 0 else LOGPROB_FLOOR


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict:
    """``{"error": {"message", "type", "param", "code"}}``, as OpenAI's API answers a failed request."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# -- log-probabilities ---------------------------------------------------------------------------------

def _top_dict(t: TokenInfo) -> dict[str, float]:
    """The chosen token and its alternatives as ``{text: logprob}`` (two ids with the same text share a key)."""
    top = {t.text: finite(t.logprob)}
    for _, text, prob in t.alternatives:
        top.setdefault(text, _alt_logprob(prob))
    return top


def completion_logprobs(tokens: Sequence[TokenInfo], prompt_tokens: Sequence[tuple[str, TokenInfo | None]] = (),
                        offset: int = 0) -> dict:
    """The legacy completions layout: parallel lists of tokens, their log-probabilities, the top
    alternatives of each and each token's character offset in the returned text."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for text, info in [*prompt_tokens, *((t.text, t) for t in tokens)]:
        out["tokens"].append(text)
        out["token_logprobs"].append(None if info is None else finite(info.logprob))
        out["top_logprobs"].append(None if info is None else _top_dict(info))
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(tokens: Sequence[TokenInfo]) -> dict:
    """The chat layout: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}], "refusal": None}``."""
    return {"content": [{"token": t.text, "logprob": finite(t.logprob), "bytes": _bytes(t.text),
                         "top_logprobs": [{"token": s, "logprob": _alt_logprob(p), "bytes": _bytes(s)}
                                          for _, s, p in t.alternatives]} for t in tokens],
            "refusal": None}


# -- whole responses -----------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(model: str, prompts: Sequence[str], choices: Sequence[ChoiceResult], n: int,
                        logprobs: int | None, echo: bool, prompt_tokens: int) -> dict:
    out = []
    for c in choices:
        prompt = prompts[c.index // n] if echo else ""
        lp = completion_logprobs(c.tokens, c.prompt_tokens) if logprobs is not None else None
        out.append({"index": c.index, "text": prompt + c.text, "logprobs": lp, "finish_reason": c.finish_reason})
    return {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": model, "choices": out,
            "usage": usage(prompt_tokens, sum(c.n_generated for c in choices))}


def chat_response(model: str, choices: Sequence[ChoiceResult], logprobs: int | None, prompt_tokens: int) -> dict:
    out = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
            "logprobs": chat_logprobs(c.tokens) if logprobs is not None else None, "finish_reason": c.finish_reason}
           for c in choices]
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": now(), "model": model,
            "choices": out, "usage": usage(prompt_tokens, sum(c.n_generated for c in choices))}


def models_response(model: str, context_length: int, created: int) -> dict:
    """``/v1/models``: the one model served, with its context as vLLM reports it (``max_model_len``)."""
    return {"object": "list", "data": [model_card(model, context_length, created)]}


def model_card(model: str, context_length: int, created: int) -> dict:
    return {"id": model, "object": "model", "created": created, "owned_by": "gptlab", "max_model_len": context_length}


# -- streaming -----------------------------------------------------------------------------------------

class DeltaBuffer:
    """Turns a growing completion into append-only pieces for streaming.

    The tail that could still change is held back: the start of a stop string (the completion may
    yet be cut there) and an unfinished UTF-8 character (decoded as U+FFFD until its last byte
    arrives). :meth:`finish` releases the rest of the final text.
    """

    def __init__(self, stops: Sequence[str]):
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.sent = ""

    def update(self, completion: str) -> str:
        safe = completion[:max(0, len(completion) - self.hold)].rstrip("\ufffd")
        if len(safe) > len(self.sent) and safe.startswith(self.sent):
            delta, self.sent = safe[len(self.sent):], safe
            return delta
        return ""

    def finish(self, completion: str) -> str:
        if completion.startswith(self.sent):
            delta, self.sent = completion[len(self.sent):], completion
            return delta
        return ""


def completion_chunk(ident: str, model: str, created: int, index: int, text: str, logprobs: dict | None = None,
                     finish_reason: str | None = None) -> dict:
    return {"id": ident, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}


def chat_chunk(ident: str, model: str, created: int, index: int, delta: dict, logprobs: dict | None = None,
               finish_reason: str | None = None) -> dict:
    return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


def usage_chunk(ident: str, model: str, created: int, chat: bool, counts: dict) -> dict[str, Any]:
    """The last chunk when ``stream_options.include_usage`` is set: no choices, the token counts."""
    return {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [], "usage": counts}


__all__ = ["error_body", "completion_logprobs", "chat_logprobs", "completion_response", "chat_response",
           "models_response", "model_card", "DeltaBuffer", "completion_chunk", "chat_chunk", "usage_chunk", "usage",
           "new_id", "now", "finite"]
