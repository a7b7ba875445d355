"""The masked-diffusion sampler: run the absorbing-state process (:mod:`core.training.objective`)
backwards. Start from the prompt followed by masks, and at each of ``steps`` steps reveal a
scheduled number of positions (the most confident predictions, or a random choice), never touching
the prompt, until no mask is left.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Iterator, Union

import torch
import torch.nn as nn

from ..errors import LabError
from ..models.loading import mask_token
from .autoregressive import encode_prompt
from .config import STRATEGIES, DiffusionConfig, draw_seed, sampler_name  # noqa: F401  (STRATEGIES: this sampler's API)

if TYPE_CHECKING:
    from ..models.loading import LoadedModel
    from ..models.tokenizer import Tokenizer

# -- sampler ------------------------------------------------------------------------------------

def unmask_schedule(n: int, steps: int) -> list[int]:
    """How many positions each step reveals: the linear schedule, masks left after step s =
    floor(n * (1 - (s+1)/steps)); every step reveals at least one when steps <= n."""
    steps = max(1, min(steps, n))
    left = [n * (steps - s - 1) // steps for s in range(steps)]  # integer floor: no float round-off
    return [(n if s == 0 else left[s - 1]) - left[s] for s in range(steps)]


@dataclass
class DiffusionStarted:
    prompt_ids: list[int]
    gen_length: int
    mask_id: int
    steps: int


@dataclass
class DenoiseStep:
    step: int                      # 1-based
    total_steps: int
    ids: list[int]                 # prompt + generation; still-masked positions hold mask_id
    masked: list[bool]             # per position: still masked after this step
    revealed: list[int]            # absolute positions revealed at this step
    text: str                      # the generation so far, masks shown as [MASK]


@dataclass
class DiffusionResult:
    prompt: str
    completion: str
    prompt_ids: list[int]
    completion_ids: list[int]
    states: list[list[int]]        # every intermediate state, from all masks to the final one
    steps: int
    seconds: float
    settings: dict
    model: str
    mask_id: int
    reveal_step: list[int] = field(default_factory=list)  # per generated token: step that revealed it

    @property
    def text(self) -> str:
        return self.prompt + self.completion

    def to_json(self) -> dict:
        return {**asdict(self), "text": self.text}


@dataclass
class DiffusionFinished:
    result: DiffusionResult


DiffusionEvent = Union[DiffusionStarted, DenoiseStep, DiffusionFinished]


def render(tokenizer: "Tokenizer", ids: list[int], masked: list[bool], mask_text: str = "[MASK]") -> str:
    """Decode a partly masked sequence, masks shown as ``mask_text``."""
    out: list[str] = []
    run: list[int] = []
    for tok, m in zip(ids, masked):
        if m:
            if run:
                out.append(tokenizer.decode(run))
                run = []
            out.append(mask_text)
        else:
            run.append(tok)
    if run:
        out.append(tokenizer.decode(run))
    return "".join(out)


@torch.no_grad()
def denoise(model: nn.Module, prompt_ids: list[int], mask_id: int, cfg: DiffusionConfig,
            tokenizer: "Tokenizer | None" = None, seed: int = 0) -> Iterator[DenoiseStep]:
    """The reverse process on ids: one :class:`DenoiseStep` per step (closing the generator stops it)."""
    device = next(model.parameters()).device
    P, L = len(prompt_ids), cfg.gen_length
    x = torch.tensor([prompt_ids + [mask_id] * L], device=device)          # (1, P + L)
    masked = torch.zeros(P + L, dtype=torch.bool, device=device)
    masked[P:] = True
    gen = torch.Generator(device=device).manual_seed(seed)
    counts = unmask_schedule(L, cfg.steps)
    was_training = model.training
    model.eval()
    try:
        for s, k in enumerate(counts):
            logits = model(x)[0].float()                                      # (P + L, V)
            logits[:, mask_id] = float("-inf")
            if cfg.temperature > 0:
                logits = logits / cfg.temperature
                if 0 < cfg.top_k < logits.shape[-1]:
                    kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = logits.softmax(-1)
                cand = torch.multinomial(probs, 1, generator=gen)[:, 0]        # (P + L,)
                conf = probs.gather(1, cand[:, None])[:, 0]
            else:
                conf, cand = logits.softmax(-1).max(-1)
            if cfg.strategy == "confidence":
                score = conf.masked_fill(~masked, float("-inf"))
                chosen = torch.topk(score, k).indices
            else:
                pool = masked.nonzero()[:, 0]
                chosen = pool[torch.randperm(pool.numel(), generator=gen, device=device)[:k]]
            x[0, chosen] = cand[chosen]
            masked[chosen] = False
            ids, m = x[0].tolist(), masked.tolist()
            text = render(tokenizer, ids[P:], m[P:]) if tokenizer is not None else ""
            yield DenoiseStep(step=s + 1, total_steps=len(counts), ids=ids, masked=m,
                              revealed=sorted(chosen.tolist()), text=text)
    finally:
        model.train(was_training)


def stream(lm: "LoadedModel", prompt: str, cfg: DiffusionConfig) -> Iterator[DiffusionEvent]:
    """Diffusion generation from ``prompt`` as events: Started, one DenoiseStep per step, Finished."""
    if sampler_name(lm.objective) != "diffusion":
        raise LabError(f"{lm.name} is an {sampler_name(lm.objective)} model; sample it with "
                       f"core.generation.sampler.sampler_for(lm).")
    mask_id = mask_token(lm)
    ids = encode_prompt(lm, prompt)
    cfg.check(lm.stack.context_length - len(ids))
    seed = cfg.seed if cfg.seed is not None else draw_seed()
    steps = min(cfg.steps, cfg.gen_length)
    yield DiffusionStarted(prompt_ids=ids, gen_length=cfg.gen_length, mask_id=mask_id, steps=steps)
    t0 = time.perf_counter()
    states = [ids + [mask_id] * cfg.gen_length]
    reveal = [0] * cfg.gen_length
    P = len(ids)
    for ev in denoise(lm.model, ids, mask_id, cfg, lm.tokenizer, seed=seed):
        states.append(ev.ids)
        for pos in ev.revealed:
            reveal[pos - P] = ev.step
        yield ev
    final = states[-1][P:]
    yield DiffusionFinished(DiffusionResult(
        prompt=prompt, completion=lm.tokenizer.decode(final), prompt_ids=ids, completion_ids=final, states=states,
        steps=steps, seconds=time.perf_counter() - t0, settings={**asdict(cfg), "seed": seed}, model=lm.name,
        mask_id=mask_id, reveal_step=reveal))


def generate(lm: "LoadedModel", prompt: str, cfg: DiffusionConfig | None = None) -> DiffusionResult:
    for ev in stream(lm, prompt, cfg or DiffusionConfig()):
        if isinstance(ev, DiffusionFinished):
            return ev.result
    raise AssertionError("stream ended without a result")


# -- results for viewers: stopped runs, every state as text ---------------------------------------

def partial_result(lm: "LoadedModel", prompt: str, cfg: DiffusionConfig, started: DiffusionStarted,
                   steps: list[DenoiseStep], seconds: float) -> DiffusionResult:
    """The result of a run the user stopped: every state reached so far. The last state may still
    hold masks; the completion shows them as ``[MASK]``, so it is never mistaken for a finished text.
    Pass a ``cfg`` whose seed is set, so the stopped run can be repeated."""
    P, L = len(started.prompt_ids), started.gen_length
    states = [started.prompt_ids + [started.mask_id] * L] + [s.ids for s in steps]
    reveal = [0] * L
    for s in steps:
        for pos in s.revealed:
            reveal[pos - P] = s.step
    last = states[-1][P:]
    return DiffusionResult(
        prompt=prompt, completion=render(lm.tokenizer, last, [r == 0 for r in reveal]), prompt_ids=started.prompt_ids,
        completion_ids=last, states=states, steps=started.steps, seconds=seconds, settings=asdict(cfg),
        model=lm.name, mask_id=started.mask_id, reveal_step=reveal)


def state_masked(result: DiffusionResult, state: int) -> list[bool]:
    """Per generated position: still masked in ``result.states[state]`` (state 0 = all masks)."""
    return [r == 0 or r > state for r in result.reveal_step]


def state_texts(tokenizer: "Tokenizer", result: DiffusionResult, mask_text: str = "[MASK]") -> list[str]:
    """The generated part of every state as text, masks shown as ``mask_text``."""
    P = len(result.prompt_ids)
    return [render(tokenizer, ids[P:], state_masked(result, s), mask_text) for s, ids in enumerate(result.states)]


def result_json(tokenizer: "Tokenizer", result: DiffusionResult, stopped: bool = False) -> dict:
    """:meth:`DiffusionResult.to_json` plus every state as readable text, for downloads and ``--json``."""
    return {**result.to_json(), "state_texts": state_texts(tokenizer, result), "stopped": stopped}
