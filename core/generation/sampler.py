"""Which sampler a loaded model takes, decided in one place: :func:`sampler_for`.

An autoregressive model continues its prompt token by token (:mod:`.autoregressive`); a
masked-diffusion model starts its completion as masks and reveals them step by step
(:mod:`.diffusion`). The generate command, the Generate page and feature explanations ask
:func:`sampler_for` for the :class:`Sampler` instead of testing ``lm.objective`` themselves, so a
third kind of model is added here, once. What differs between the two and every caller needs is
on the object: its settings type, stream and generate, the result of a run stopped early
(:class:`Run`), its JSON, and which positions of the model's input predict which token.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any, Iterator

from . import autoregressive as ar
from . import diffusion as diff
from .config import DiffusionConfig, SamplingConfig, sampler_name
from ..models.loading import LoadedModel, mask_token


@dataclass(frozen=True)
class Sampler:
    """How one kind of model writes text. ``name`` (``"autoregressive"`` or ``"diffusion"``) is
    what views key their drawing on; ``mask_id`` is the diffusion model's mask token."""

    name: str
    config_type: type
    module: ModuleType  # .autoregressive or .diffusion: stream and generate are looked up there when called
    finished: type  # the event carrying the result
    progress: type  # the event that counts one unit of progress (a token, a denoising step)
    done: str  # what those units are, for "the 3 tokens generated so far"
    denoises: bool  # fills masked positions anywhere, rather than continuing left to right
    mask_id: int | None = None

    def stream(self, lm: LoadedModel, prompt: str, cfg) -> Iterator:
        """The sampler's events: started, one per token or denoising step, finished."""
        return self.module.stream(lm, prompt, cfg)

    def generate(self, lm: LoadedModel, prompt: str, cfg=None):
        """:meth:`stream` run to the end: its result."""
        return self.module.generate(lm, prompt, cfg)

    def settings(self, max_new_tokens: int, *, greedy: bool = False, temperature: float | None = None,
                 seed: int | None = None, steps: int | None = None, top_p: float | None = None,
                 n_alternatives: int | None = None):
        """The settings this sampler takes for the knobs every generator shares, checked; a knob
        left ``None`` keeps its config's default. Greedy means temperature 0 for diffusion;
        ``top_p`` applies to both, ``steps`` (denoising) and ``n_alternatives`` (sampling) where they mean something."""
        given: dict[str, Any]
        if self.denoises:
            given = dict(gen_length=max_new_tokens, steps=steps, seed=seed, top_p=top_p,
                         temperature=0.0 if greedy else temperature)
        else:
            given = dict(max_new_tokens=max_new_tokens, greedy=greedy, temperature=temperature, top_p=top_p,
                         seed=seed, n_alternatives=n_alternatives)
        cfg = self.config_type(**{k: v for k, v in given.items() if v is not None})
        cfg.check()
        return cfg

    def start(self, lm: LoadedModel, prompt: str, cfg) -> "Run":
        """A generation to iterate; its :attr:`Run.result` is there however the loop ends."""
        return Run(self, lm, prompt, cfg)

    def to_json(self, lm: LoadedModel, result, stopped: bool = False) -> dict:
        """The result as JSON for downloads and ``--json`` (a diffusion run adds every state as text)."""
        if self.denoises:
            return diff.result_json(lm.tokenizer, result, stopped=stopped)
        return result.to_json()

    def token_ids(self, lm: LoadedModel, result) -> tuple[list[int], list[int]]:
        """``(prompt ids, completion ids)`` of a result of this sampler."""
        if self.denoises:
            return list(result.prompt_ids), list(result.completion_ids)
        return ar.encode_prompt(lm, result.prompt), [t.token_id for t in result.tokens]

    def reads(self, prompt_ids: list[int], completion_ids: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
        """``(model input, [(position, token)])``: what the model read when it produced
        ``completion_ids`` after ``prompt_ids``, and which position's output predicted each token
        (an autoregressive model's position ``P-1+j`` predicts token ``j``; a diffusion model's
        masked position ``P+j`` does)."""
        P = len(prompt_ids)
        if self.denoises:
            return prompt_ids + [self.mask_id] * len(completion_ids), [(P + j, t) for j, t in enumerate(completion_ids)]
        ids = prompt_ids + completion_ids
        return ids[:-1], [(P - 1 + j, t) for j, t in enumerate(completion_ids)]


def _ar_partial(run: "Run") -> ar.GenerationResult:
    tokens = [ev.token for ev in run.seen if isinstance(ev, ar.TokenEvent)]
    completion = next((ev.completion for ev in reversed(run.seen) if isinstance(ev, ar.TokenEvent)), "")
    return ar.partial_result(run.lm, run.prompt, run.cfg, tokens, completion, run.seconds)


def _diffusion_partial(run: "Run") -> diff.DiffusionResult | None:
    started = next((ev for ev in run.seen if isinstance(ev, diff.DiffusionStarted)), None)
    if started is None:
        return None
    steps = [ev for ev in run.seen if isinstance(ev, diff.DenoiseStep)]
    return diff.partial_result(run.lm, run.prompt, run.cfg, started, steps, run.seconds)


class Run:
    """One generation as it goes. Iterate it for the sampler's events; :attr:`result` is the
    finished result, or what was produced so far (a stopped result: the autoregressive tokens with
    ``stop_reason = "stopped"``, the denoising states reached, masks shown), so Stop in the app and
    Ctrl-C on the command line keep the same thing. ``close()`` stops the generator behind it."""

    def __init__(self, sampler: Sampler, lm: LoadedModel, prompt: str, cfg):
        self.sampler, self.lm, self.prompt, self.cfg = sampler, lm, prompt, cfg
        self.seen: list = []
        self.finished = None
        self._events = sampler.stream(lm, prompt, cfg)
        self._t0 = time.perf_counter()

    def __iter__(self) -> Iterator:
        for ev in self._events:
            self.seen.append(ev)
            if isinstance(ev, self.sampler.finished):
                self.finished = ev.result
            yield ev

    @property
    def done(self) -> int:
        """Tokens generated (or denoising steps done) so far."""
        return sum(isinstance(ev, self.sampler.progress) for ev in self.seen)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self._t0

    @property
    def result(self):
        """The finished result, else the partial one (``None`` before a diffusion run has started)."""
        if self.finished is not None:
            return self.finished
        return (_diffusion_partial if self.sampler.denoises else _ar_partial)(self)

    def close(self) -> None:
        self._events.close()


AUTOREGRESSIVE = Sampler("autoregressive", SamplingConfig, ar, ar.Finished, ar.TokenEvent, "tokens generated",
                         denoises=False)
DIFFUSION = Sampler("diffusion", DiffusionConfig, diff, diff.DiffusionFinished, diff.DenoiseStep,
                    "denoising steps done", denoises=True)
SAMPLERS = {s.name: s for s in (AUTOREGRESSIVE, DIFFUSION)}


def sampler_for(lm: LoadedModel) -> Sampler:
    """The sampler ``lm`` takes, by the objective it was trained with (a diffusion model's carries
    its mask token; one without is refused here, as at load)."""
    sampler = SAMPLERS[sampler_name(lm.objective)]
    return replace(sampler, mask_id=mask_token(lm)) if sampler.denoises else sampler
