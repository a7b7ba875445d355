"""Interventions applied to whole jobs: a generation (or any event stream), and a comparison of a
completion with and without them.

The CLI's ``--ablate`` / ``--steer`` / ``--steer-vector`` and the pages' Interventions panels come
here; consensus runs apply theirs in :mod:`core.consensus.engine` through :func:`prepare`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Iterator, Sequence

from .ablation import build_hooks
from .api import hooked
from .spec import Interventions

if TYPE_CHECKING:
    from ..generation.autoregressive import GenerationResult
    from ..generation.config import SamplingConfig
    from ..interp.transcoder import TranscoderSet
    from ..models.loading import LoadedModel


def transcoders_for(lm: "LoadedModel", iv: Interventions, folder: str | None = None,
                    tset: "TranscoderSet | None" = None) -> "TranscoderSet | None":
    """The transcoder set ``iv`` needs (``tset``, else ``folder``, else the model's own), or None."""
    if tset is not None or not iv.needs_transcoders:
        return tset
    from ..interp.transcoder import find_transcoder_set
    return find_transcoder_set(lm, folder)


def prepare(lm: "LoadedModel", iv: Interventions, prompts: Sequence[Sequence[int]] = (),
            transcoders: str | None = None, tset: "TranscoderSet | None" = None) -> dict[str, list]:
    """The hooks ``iv`` stands for on ``lm``: checked (layers, heads, features, files), with the means of
    ``:mean`` ablations taken over ``prompts`` (token-id lists)."""
    return build_hooks(lm, iv, prompts, transcoders_for(lm, iv, transcoders, tset))


def with_interventions(lm: "LoadedModel", events: Iterator, iv: Interventions, prompts: Sequence[Sequence[int]] = (),
                       transcoders: str | None = None, tset: "TranscoderSet | None" = None) -> Iterator:
    """``events`` (a generation stream) walked under ``iv``; the result's ``settings`` record them
    under ``"interventions"``. Without interventions, ``events`` unchanged."""
    if not iv:
        return events
    fns = prepare(lm, iv, prompts, transcoders, tset)
    return _recorded(hooked(lm, fns, events), iv)


def _recorded(events: Iterator, iv: Interventions) -> Iterator:
    for ev in events:
        result = getattr(ev, "result", None)
        if isinstance(getattr(result, "settings", None), dict):
            result.settings["interventions"] = iv.records()
        yield ev


def generate_with(lm: "LoadedModel", prompt: str, cfg: "SamplingConfig", iv: Interventions,
                  tset: "TranscoderSet | None" = None, transcoders: str | None = None) -> "GenerationResult":
    """:func:`core.generation.autoregressive.generate` under ``iv`` (means over ``prompt``)."""
    from ..generation.autoregressive import Finished, encode_prompt, stream
    events = with_interventions(lm, stream(lm, prompt, cfg), iv, [encode_prompt(lm, prompt)], transcoders, tset)
    for ev in events:
        if isinstance(ev, Finished):
            return ev.result
    raise AssertionError("generation ended without a result")


@dataclass
class Comparison:
    """A completion with and without interventions, and what they do to the original one."""

    original: "GenerationResult"
    intervened: "GenerationResult"
    tokens: list[str]              # the original completion's tokens
    logprob_before: list[float]    # each one's log-probability without the interventions ...
    logprob_after: list[float]     # ... and with them (same prefix: the original completion so far)
    interventions: list[dict]

    @property
    def delta(self) -> list[float]:
        return [a - b for a, b in zip(self.logprob_after, self.logprob_before)]

    def to_json(self) -> dict:
        return dict(original=self.original.to_json(), intervened=self.intervened.to_json(), tokens=self.tokens,
                    logprob_before=self.logprob_before, logprob_after=self.logprob_after, delta=self.delta,
                    interventions=self.interventions)


def compare_generation(lm: "LoadedModel", prompt: str, cfg: "SamplingConfig", iv: Interventions,
                       tset: "TranscoderSet | None" = None, transcoders: str | None = None) -> Comparison:
    """Generate ``prompt`` without and with ``iv`` (the same seed, so sampling differs only by the
    interventions), and score the original completion's tokens under both."""
    from ..generation.autoregressive import encode_prompt, generate, score_continuation
    from ..generation.config import draw_seed
    if cfg.seed is None:
        cfg = replace(cfg, seed=draw_seed())
    original = generate(lm, prompt, cfg)
    intervened = generate_with(lm, prompt, cfg, iv, tset, transcoders)
    prompt_ids = encode_prompt(lm, prompt)
    new_ids = [t.token_id for t in original.tokens]
    before, after = [], []
    if new_ids:
        from .api import hooks
        before = [t.logprob for t in score_continuation(lm, prompt_ids, new_ids, 0)[0]]
        fns = prepare(lm, iv, [prompt_ids], transcoders, tset)
        with hooks(lm, fns):
            after = [t.logprob for t in score_continuation(lm, prompt_ids, new_ids, 0)[0]]
    return Comparison(original, intervened, [t.text for t in original.tokens], before, after, iv.records())


class IntervenedSampler:
    """A :class:`core.generation.sampler.Sampler` whose runs walk under interventions: its streams are
    hooked, and its JSON (also a stopped run's) records the interventions. Everything else is the
    sampler's own."""

    def __init__(self, sampler, iv: Interventions, fns: dict[str, list]):
        self._sampler, self.iv, self.fns = sampler, iv, fns

    def __getattr__(self, name):
        return getattr(self._sampler, name)

    def stream(self, lm: "LoadedModel", prompt: str, cfg) -> Iterator:
        return _recorded(hooked(lm, self.fns, self._sampler.stream(lm, prompt, cfg)), self.iv)

    def generate(self, lm: "LoadedModel", prompt: str, cfg=None):
        run = self.start(lm, prompt, cfg or self._sampler.config_type())
        for _ in run:
            pass
        return run.result

    def start(self, lm: "LoadedModel", prompt: str, cfg):
        from ..generation.sampler import Run
        return Run(self, lm, prompt, cfg)

    def to_json(self, lm: "LoadedModel", result, stopped: bool = False) -> dict:
        return {**self._sampler.to_json(lm, result, stopped=stopped), "interventions": self.iv.records()}


def intervened_sampler(sampler, lm: "LoadedModel", prompt: str, iv: Interventions, transcoders: str | None = None,
                       tset: "TranscoderSet | None" = None):
    """``sampler`` itself without interventions, else an :class:`IntervenedSampler` (means over ``prompt``)."""
    if not iv:
        return sampler
    return IntervenedSampler(sampler, iv, prepare(lm, iv, [lm.tokenizer.encode(prompt)], transcoders, tset))
