"""The model behind the server: one request at a time on its device, and a bounded line of waiting ones.

A model's weights and KV cache live on one device and generation is a loop over it, so running
two requests side by side would only make both slower (and double the memory). :class:`ModelWorker`
runs requests one after another on a single thread; up to ``max_queue`` more may wait, and
:meth:`ModelWorker.submit` refuses the next one at once (:class:`Busy`, answered 503), so no
client is left hanging on a server that cannot take it.

:func:`prepare` checks a request's prompts against the model before it joins the line (so a
prompt that is too long is a 400 at once, also for streaming); :func:`run_choice` produces one
completion with the samplers of :mod:`core.generation`, so a served greedy completion is
token for token what ``python -m core generate --greedy`` prints.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable

from ..errors import LabError
from ..generation.autoregressive import Finished, TokenEvent, TokenInfo, encode_prompt, score_continuation, stream
from ..generation.config import DiffusionConfig, SamplingConfig
from ..generation.sampler import sampler_for
from .protocol import GenerationRequest

if TYPE_CHECKING:
    from ..models.loading import LoadedModel


class Busy(Exception):
    """The server cannot take the request now (queue full, waited too long, shutting down): 503."""


class ModelWorker:
    """Runs jobs on the model one at a time, in arrival order; at most ``max_queue`` wait."""

    def __init__(self, lm: "LoadedModel", max_queue: int, queue_timeout_s: float):
        self.lm, self.max_queue, self.queue_timeout_s = lm, max_queue, queue_timeout_s
        self._slots = threading.BoundedSemaphore(max_queue + 1)     # the running job + the waiting ones
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gptlab-model")

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Queue ``fn(*args)``; raises :class:`Busy` when ``max_queue`` jobs already wait."""
        if not self._slots.acquire(blocking=False):
            raise Busy(f"The server is busy ({self.max_queue} requests are already waiting for the model); "
                       f"retry in a moment.")
        queued = time.monotonic()

        def job():
            try:  # the slot is free before the job's result is, so whoever waits on it finds room
                waited = time.monotonic() - queued
                if waited > self.queue_timeout_s:
                    raise Busy(f"The request waited {waited:.0f}s for the model without starting; retry later.")
                return fn(*args)
            finally:
                self._slots.release()

        try:
            future = self._executor.submit(job)
        except RuntimeError:                                        # shut down
            self._slots.release()
            raise Busy("The server is shutting down; retry against another one.") from None
        future.add_done_callback(lambda f: self._slots.release() if f.cancelled() else None)  # dropped unrun
        return future

    def close(self) -> None:
        """Drop the jobs still waiting; the running one finishes (a streaming one sees its client leave)."""
        self._executor.shutdown(wait=False, cancel_futures=True)


# -- one request --------------------------------------------------------------------------------------

@dataclass
class Prepared:
    """A prompt checked against the model: its ids and the tokens it may be continued by."""

    prompt: str
    ids: list[int]
    max_new_tokens: int               # 0: echo only (score the prompt, generate nothing)
    add_special_tokens: bool = True   # how ``ids`` were encoded (see GenerationRequest)


def prepare(lm: "LoadedModel", req: GenerationRequest) -> list[Prepared]:
    """Check every prompt of ``req`` against ``lm`` (LabError: a 400) before the request waits its turn."""
    if sampler_for(lm).denoises:
        _diffusion_limits(req)
    out = []
    for prompt in req.prompts:
        ids = encode_prompt(lm, prompt, req.add_special_tokens)
        room = lm.stack.context_length - len(ids)
        wanted = room if req.max_tokens is None else req.max_tokens
        if wanted > room or (wanted < 1 and req.max_tokens is None):
            raise LabError(f"The prompt is {len(ids)} tokens and leaves room for {max(room, 0)} new tokens in the "
                           f"model's context of {lm.stack.context_length}; ask for at most {max(room, 0)} "
                           f"(max_tokens) or shorten the prompt.")
        out.append(Prepared(prompt=prompt, ids=ids, max_new_tokens=wanted, add_special_tokens=req.add_special_tokens))
    return out


def _diffusion_limits(req: GenerationRequest) -> None:
    """What a masked-diffusion model cannot give: per-token log-probabilities, and the autoregressive
    controls its sampler has no counterpart for (its top_k, top_p and min_p filter each revealed
    position's distribution, see :func:`_diffusion_choice`)."""
    s = req.sampling
    if req.logprobs is not None:
        raise LabError("This is a diffusion model: it reveals tokens in any order, so it has no per-token "
                       "log-probabilities to return; leave 'logprobs' out.")
    unused = [name for name, value, neutral in (("repetition_penalty", s.repetition_penalty, 1.0),
                                                ("num_beams", s.num_beams, 1)) if value != neutral]
    if unused:
        raise LabError(f"This is a diffusion model; its sampler has no {', '.join(unused)}: leave "
                       f"{'it' if len(unused) == 1 else 'them'} out (temperature, top_k, top_p, min_p, seed and "
                       f"stop apply).")


@dataclass
class ChoiceResult:
    """One completion, ready to be shaped into OpenAI's JSON."""

    index: int                        # the choice's place in the response (prompt-major, then n)
    text: str                         # the completion (the prompt is added for echo by the response)
    tokens: list[TokenInfo]           # the generated tokens the text holds (for logprobs)
    finish_reason: str                # "stop" (end of text or a stop string) or "length"
    n_generated: int                  # tokens generated (usage counts them all, even past a stop string)
    prompt_tokens: list[tuple[str, TokenInfo | None]] = field(default_factory=list)  # echo + logprobs


OnToken = Callable[[TokenInfo, str], None]   # (the new token, the completion so far)


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` up to the earliest stop string, and whether one was found."""
    hits = [text.find(s) for s in stops if s in text]
    return (text[:min(hits)], True) if hits else (text, False)


def run_choice(lm: "LoadedModel", prep: Prepared, cfg: SamplingConfig, index: int, *, logprobs: int | None = None,
               echo: bool = False, on_token: OnToken | None = None,
               cancelled: threading.Event | None = None) -> ChoiceResult:
    """Generate one completion of ``prep`` with ``cfg`` (call it on the worker: it uses the model).

    ``on_token`` sees every token as it comes (streaming); once ``cancelled`` is set (the client
    left) generation stops after the current token.
    """
    prompt_tokens = _echo_tokens(lm, prep.ids, logprobs) if echo and logprobs is not None else []
    if prep.max_new_tokens == 0:
        return ChoiceResult(index, "", [], "length", 0, prompt_tokens)
    if sampler_for(lm).denoises:
        return _diffusion_choice(lm, prep, cfg, index)
    cfg = replace(cfg, n_alternatives=logprobs or 0)
    tokens: list[TokenInfo] = []
    completion, reason = "", "max_new_tokens"
    events = stream(lm, prep.prompt, cfg, add_special_tokens=prep.add_special_tokens)
    try:
        for ev in events:
            if isinstance(ev, TokenEvent):
                tokens.append(ev.token)
                completion = ev.completion
                if on_token is not None:
                    on_token(ev.token, completion)
                if cancelled is not None and cancelled.is_set():
                    reason = "stopped"
                    break
            elif isinstance(ev, Finished):
                completion, reason = ev.result.completion, ev.result.stop_reason
    finally:
        events.close()
    finish = "length" if reason in ("max_new_tokens", "stopped") else "stop"
    return ChoiceResult(index, completion, _held(tokens, completion), finish, len(tokens), prompt_tokens)


def _held(tokens: list[TokenInfo], text: str) -> list[TokenInfo]:
    """The tokens that begin inside ``text`` (a stop string cuts the text, and the tokens with it)."""
    kept, offset = [], 0
    for t in tokens:
        if offset >= len(text) and kept:
            break
        kept.append(t)
        offset += len(t.text)
    return kept if text else []


def _echo_tokens(lm: "LoadedModel", ids: list[int], top: int) -> list[tuple[str, TokenInfo | None]]:
    """The prompt's tokens with their log-probabilities given what precedes them (the first has none).
    A BOS the tokenizer put before the text is not echoed (it is not part of the text, and the
    offsets count the text's characters); the text's first token is then scored given it."""
    n_bos = len(lm.tokenizer.prefix_ids)
    if n_bos and len(ids) > n_bos and tuple(ids[:n_bos]) == lm.tokenizer.prefix_ids:
        infos, _ = score_continuation(lm, ids[:n_bos], ids[n_bos:], top)
        return [(t.text, t) for t in infos]
    first = (lm.tokenizer.token_str(ids[0]), None)
    if len(ids) < 2:
        return [first]
    infos, _ = score_continuation(lm, ids[:1], ids[1:], top)
    return [first] + [(t.text, t) for t in infos]


def _diffusion_choice(lm: "LoadedModel", prep: Prepared, cfg: SamplingConfig, index: int) -> ChoiceResult:
    from ..generation.diffusion import generate as diffusion_generate

    dcfg = DiffusionConfig(gen_length=prep.max_new_tokens, temperature=0.0 if cfg.greedy else cfg.temperature,
                           top_k=cfg.top_k, top_p=cfg.top_p, min_p=cfg.min_p, seed=cfg.seed)
    dcfg.steps = min(dcfg.steps, dcfg.gen_length)
    result = diffusion_generate(lm, prep.prompt, dcfg)
    text, hit = cut_at_stop(result.completion, cfg.stop)
    return ChoiceResult(index, text, [], "stop" if hit else "length", len(result.completion_ids))


__all__ = ["Busy", "ModelWorker", "Prepared", "prepare", "ChoiceResult", "run_choice", "cut_at_stop"]
