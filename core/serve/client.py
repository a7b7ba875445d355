"""The client side of the protocol: ask any OpenAI-compatible server (vLLM, llama.cpp's server,
Ollama, text-generation-webui, a hosted API, or ``python -m core serve``) for greedy answers.

The remote explainer (:class:`core.interp.explain.RemoteExplainer`) is built on :class:`Endpoint`.
What can go wrong on a network is handled here, once:

- timeouts, lost connections, 429 rate limits and 5xx answers (a busy ``core serve`` says 503)
  are retried by the official ``openai`` client with exponential backoff, honouring Retry-After;
  whatever still fails ends in one :class:`~core.errors.LabError` sentence naming the server;
- a prompt longer than the server's context is cut from the left (so the question at its end
  stays), first by an estimate of its tokens and then, if the server still says it is too long,
  shorter, a few times;
- the API key comes from ``GPTLAB_EXPLAINER_KEY`` or ``OPENAI_API_KEY`` when the connection is
  made and lives only in the client object: no config, name, message or store holds it.

URLs: ``http://HOST:PORT/v1`` talks to ``/v1/chat/completions``, the API every server offers; a
URL ending in ``/completions`` (``http://HOST:PORT/v1/completions``) uses plain completions instead,
for base models served without a chat template.
"""
from __future__ import annotations

import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar
from urllib.parse import urlsplit, urlunsplit

from ..errors import LabError, first_line, shorten
from .config import EXPLAINER_KEY_ENVS, EndpointConfig

BYTES_PER_TOKEN = 2          # a cautious estimate of prompt tokens when the server cannot be asked to count
CHAT_OVERHEAD_TOKENS = 32    # what a chat template or transcript adds around the prompt
OVERFLOW_RETRIES = 3         # shorter prompts tried after the server says one is too long
_TOO_LONG = re.compile(r"context|too long|too many tokens", re.IGNORECASE)
T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Answer:
    text: str
    top: dict[str, float] | None = None   # the first answer token's alternatives {token: logprob}, when given
    steps: list[tuple[str, float, dict[str, float]]] | None = None  # every answer token: (text, logprob, alternatives)


_RAISE = object()


class _TooLong(Exception):
    """The server said the prompt does not fit its context."""


def explainer_key() -> str | None:
    """The first of :data:`EXPLAINER_KEY_ENVS` that is set."""
    return next((os.environ[k] for k in EXPLAINER_KEY_ENVS if os.environ.get(k)), None)


def split_url(url: str) -> tuple[str, str]:
    """``(base URL, "chat" or "completions")``: the API a URL names (see the module docstring)."""
    parts = urlsplit(url.strip())
    path, api = parts.path.rstrip("/"), "chat"
    for suffix, kind in (("/chat/completions", "chat"), ("/completions", "completions")):
        if path.endswith(suffix):
            path, api = path[:-len(suffix)], kind
            break
    return urlunsplit((parts.scheme, parts.netloc, path or "/v1", parts.query, "")), api


def shown_url(url: str) -> str:
    """``url`` without credentials or query string, for names and messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return urlunsplit((parts.scheme, host + (f":{parts.port}" if parts.port else ""), parts.path, "", ""))


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN)


def keep_tail(text: str, tokens: int) -> str:
    """The end of ``text`` that :func:`estimate_tokens` puts at ``tokens`` or fewer."""
    data = text.encode("utf-8")
    return data[max(0, len(data) - tokens * BYTES_PER_TOKEN):].decode("utf-8", errors="ignore")


def _server_message(e: Exception) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        body = inner.get("message", inner) if isinstance(inner, dict) else inner
    return shorten(first_line(Exception(str(body))) if body else first_line(e), 200)


class Endpoint:
    """One model behind an OpenAI-compatible server, asked for greedy answers."""

    def __init__(self, config: EndpointConfig):
        import openai  # the official client: retries with backoff, Retry-After, timeouts

        config.check()
        self.config = config
        self.base, self.api = split_url(config.url)
        self.shown = shown_url(self.base)
        self._openai = openai
        self._client = openai.OpenAI(base_url=self.base, api_key=explainer_key() or "no-key",
                                     timeout=config.timeout_s, max_retries=config.max_retries)
        self._logprobs = True                  # cleared when the server refuses to give them
        self.model, listed_context = self._model()
        self.context = listed_context or config.context_tokens
        if self.api == "chat":
            self.context -= CHAT_OVERHEAD_TOKENS

    @property
    def name(self) -> str:
        """How explanations written through this endpoint are labelled in a feature store."""
        return f"api:{self.model}@{self.shown}"

    # -- calls -----------------------------------------------------------------------------------------
    def _model(self) -> tuple[str, int | None]:
        """The model to ask (the one the server lists when none was named) and its context, if listed."""
        page = self._call(self._client.models.list, missing=None)
        if page is None:                           # a server without /models: the first request will tell
            if self.config.model is None:
                raise LabError(f"The server at {self.shown} does not list its models; pass --explainer-model NAME.")
            return self.config.model, None
        listed = list(page)
        ids = [m.id for m in listed]
        name = self.config.model
        if name is None:
            if len(ids) != 1:
                offered = ", ".join(ids[:10]) or "none"
                raise LabError(f"The server at {self.shown} offers {len(ids)} models ({offered}); pass "
                               f"--explainer-model NAME to pick one.")
            name = ids[0]
        entry = next((m for m in listed if m.id == name), None)
        context = getattr(entry, "max_model_len", None) if entry is not None else None
        return name, context if isinstance(context, int) and context > 0 else None

    def _call(self, fn: Callable[..., T], missing: object = _RAISE, **kwargs) -> T:
        """``fn(**kwargs)`` with every failure the ``openai`` client gives up on turned into one
        sentence; a 404 returns ``missing`` instead when it is given."""
        oa, where, tries = self._openai, f"The explainer server at {self.shown}", self.config.max_retries
        try:
            return fn(**kwargs)
        except (oa.AuthenticationError, oa.PermissionDeniedError) as e:
            raise LabError(f"{where} refused the API key ({e.status_code}); set {EXPLAINER_KEY_ENVS[0]} (or "
                           f"{EXPLAINER_KEY_ENVS[1]}) to the server's key.") from None
        except oa.RateLimitError:
            raise LabError(f"{where} kept answering 'too many requests' (429) after {tries} retries; wait and run "
                           f"again, or give the server more capacity.") from None
        except oa.APITimeoutError:
            raise LabError(f"{where} did not answer within {self.config.timeout_s:g}s ({tries} retries); check that "
                           f"it is running and not overloaded.") from None
        except oa.APIConnectionError as e:
            raise LabError(f"Could not reach the explainer server at {self.shown} ({first_line(e.__cause__ or e)}); "
                           f"start it or check --explainer.") from None
        except oa.NotFoundError as e:
            if missing is not _RAISE:
                return missing  # type: ignore[return-value]
            raise LabError(f"{where} answered 404 ({_server_message(e)}); check --explainer-model and the URL "
                           f"(it usually ends in /v1).") from None
        except oa.BadRequestError as e:
            message = _server_message(e)
            if _TOO_LONG.search(message):
                raise _TooLong(message) from None
            raise LabError(f"{where} refused the request ({message}).") from None
        except oa.APIStatusError as e:
            raise LabError(f"{where} failed with {e.status_code} ({_server_message(e)}) after {tries} retries.") from None

    def complete(self, prompt: str, max_tokens: int, top_logprobs: int = 0) -> Answer:
        """One greedy answer to ``prompt`` (as it is; see :meth:`ask` for fitting it to the context)."""
        top = top_logprobs if self._logprobs else 0
        try:
            if self.api == "chat":
                extra = dict(logprobs=True, top_logprobs=top) if top else {}
                r = self._call(self._client.chat.completions.create, model=self.model, temperature=0,
                               messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, **extra)
                choice = r.choices[0]
                content = getattr(choice.logprobs, "content", None) if top else None
                alts = {t.token: t.logprob for t in content[0].top_logprobs} if content else None
                steps = [(t.token, t.logprob, {a.token: a.logprob for a in t.top_logprobs or []}) for t in content] \
                    if content else None
                return Answer(choice.message.content or "", alts, steps)
            extra = dict(logprobs=top) if top else {}
            r = self._call(self._client.completions.create, model=self.model, prompt=prompt, temperature=0,
                           max_tokens=max_tokens, **extra)
            choice = r.choices[0]
            tops = getattr(choice.logprobs, "top_logprobs", None) if top else None
            toks, lps = (getattr(choice.logprobs, "tokens", None), getattr(choice.logprobs, "token_logprobs", None)) \
                if top else (None, None)
            steps = [(t, lp, dict(alts or {})) for t, lp, alts in zip(toks, lps, tops)] \
                if toks and lps and tops and len(toks) == len(lps) == len(tops) else None
            return Answer(choice.text or "", dict(tops[0]) if tops and tops[0] else None, steps)
        except LabError as e:
            if top and "logprob" in str(e).lower():  # a server without log-probabilities: read the text instead
                self._logprobs = False
                return self.complete(prompt, max_tokens)
            raise

    def ask(self, prompt: str, max_tokens: int | None = None, top_logprobs: int = 0) -> Answer:
        """:meth:`complete`, with ``prompt`` cut from the left to fit the server's context."""
        max_tokens = max_tokens or self.config.max_new_tokens
        budget = self.context - max_tokens
        for _ in range(OVERFLOW_RETRIES + 1):
            fitted = prompt if estimate_tokens(prompt) <= budget else keep_tail(prompt, budget)
            try:
                return self.complete(fitted, max_tokens, top_logprobs)
            except _TooLong as e:
                budget = min(budget, estimate_tokens(fitted)) * 2 // 3
                reason = str(e)
            if budget < 8:
                break
        raise LabError(f"The explainer server at {self.shown} finds even a shortened prompt too long ({reason}); "
                       f"serve a model with a longer context.")

    def yes_no(self, prompt: str) -> bool:
        """Whether "yes" is likelier than "no" as the answer's first token (read from the top
        log-probabilities; from the answer's text when the server gives none)."""
        answer = self.ask(prompt, 3, top_logprobs=5)
        if answer.top:
            def best(word: str) -> float:
                return max((lp for tok, lp in answer.top.items() if tok.strip().lower() == word), default=-math.inf)
            yes, no = best("yes"), best("no")
            if yes > -math.inf or no > -math.inf:
                return yes > no
        from ..interp.prompts import parse_yes_no

        return parse_yes_no(answer.text) is True

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """``[fn(x) for x in items]`` with up to ``concurrency`` requests in flight, in order; the
        first failure is raised once the requests already sent have finished (no more are sent)."""
        if len(items) <= 1 or self.config.concurrency == 1:
            return [fn(x) for x in items]
        pool = ThreadPoolExecutor(max_workers=min(self.config.concurrency, len(items)))
        try:
            return list(pool.map(fn, items))
        finally:  # after a failure, the requests not yet sent are dropped
            pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        self._client.close()


def connect(url: str, model: str | None = None, **settings) -> Endpoint:
    """An :class:`Endpoint` for ``url`` (and ``model``, else the server's only one); ``settings``
    are :class:`EndpointConfig` fields (``timeout_s``, ``max_retries``, ``concurrency``...)."""
    return Endpoint(EndpointConfig(url=url, model=model, **settings))


__all__ = ["Answer", "Endpoint", "connect", "explainer_key", "split_url", "shown_url", "estimate_tokens", "keep_tail"]
