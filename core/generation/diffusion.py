"""The masked-diffusion sampler: run the absorbing-state process (:mod:`core.training.objective`)
backwards. Start from the prompt followed by masks, and at each of ``steps`` steps reveal a
scheduled number of positions (the most confident predictions, or a random choice), never touching
the prompt, until no mask is left.

Options, all in :class:`DiffusionConfig`: semi-autoregressive blocks (LLaDA's block length, see
:func:`block_plan`); temperature with top-k, top-p and min-p; Gumbel-max draws in float64 (float32
draws distort the tail of the distribution, see :func:`gumbel_from_uniform`); and steps that reveal
nothing (more steps than tokens) run no forward pass. :mod:`.evaluate` scores samples by their
generative perplexity under an autoregressive model.
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
from .sampling import apply_min_p, apply_temperature, apply_top_k, apply_top_p
from .config import STRATEGIES, DiffusionConfig, draw_seed, sampler_name  # noqa: F401  (STRATEGIES: this sampler's API)

if TYPE_CHECKING:
    from ..models.loading import LoadedModel
    from ..models.tokenizer import Tokenizer

# -- sampler ------------------------------------------------------------------------------------

def unmask_schedule(n: int, steps: int) -> list[int]:
    """How many of ``n`` positions each of ``steps`` steps reveals: the linear schedule, masks left
    after step s = floor(n * (1 - (s+1)/steps)). Every step reveals at least one when steps <= n;
    beyond that some steps reveal nothing (MDLM's many-step sampler), and :func:`denoise` runs no
    forward pass for them when caching is on."""
    steps = max(1, steps)
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


def block_plan(gen_length: int, steps: int, block_length: int) -> list[tuple[int, int, list[int]]]:
    """Semi-autoregressive decoding (LLaDA, Nie et al. 2025): the generation is cut into blocks of
    ``block_length`` tokens decoded left to right, each finished before the next starts. Returns
    ``(start, end, counts)`` per block, offsets into the generation; the steps are shared out as
    evenly as possible (earlier blocks take the remainder), each block running :func:`unmask_schedule`
    on its own length. ``block_length`` 0 or >= ``gen_length`` is one block: plain decoding."""
    if block_length <= 0 or block_length >= gen_length:
        return [(0, gen_length, unmask_schedule(gen_length, steps))]
    starts = list(range(0, gen_length, block_length))
    n = len(starts)
    share = [steps // n + (1 if b < steps % n else 0) for b in range(n)]
    return [(a, min(a + block_length, gen_length), unmask_schedule(min(a + block_length, gen_length) - a, k))
            for a, k in zip(starts, share)]


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                  min_p: float = 0.0) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p (the autoregressive sampler's filters, in its
    order): removed tokens end at ``-inf``. ``logits`` ``(N, V)``, temperature above 0."""
    logits = apply_temperature(logits, temperature)
    logits = apply_top_k(logits, top_k)
    logits = apply_top_p(logits, top_p)
    return apply_min_p(logits, min_p)


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator, dtype: str = "float64",
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard Gumbel noise ``-log(-log u)`` from uniforms drawn in ``dtype``; see
    :func:`gumbel_from_uniform` for why the precision matters."""
    u = torch.rand(shape, generator=generator, dtype=getattr(torch, dtype), device=device)
    return gumbel_from_uniform(u)


def gumbel_from_uniform(u: torch.Tensor) -> torch.Tensor:
    """``-log(-log u)`` in ``u``'s dtype. float32 uniforms lie on a grid of 2**-24, so the noise
    never exceeds about 16.6: a token less likely than the top one by a factor beyond ~e**19 can never
    be drawn, and those somewhat less unlikely are drawn too rarely. float64's grid (2**-53) lifts the
    cap to about 36.7. u = 0 (probability 2**-24 in float32) gives -inf: that token is not drawn."""
    return -torch.log(-torch.log(u))


def gumbel_max(logits: torch.Tensor, generator: torch.Generator, dtype: str = "float64") -> torch.Tensor:
    """One token per row of ``logits`` ``(N, V)`` drawn from softmax(logits) by the Gumbel-max
    trick, in ``dtype`` (the logits are promoted to it): ``argmax(logits + g)``."""
    g = gumbel_noise(tuple(logits.shape), generator, dtype, logits.device)
    return (logits.to(g.dtype) + g).argmax(-1)


@torch.no_grad()
def denoise(model: nn.Module, prompt_ids: list[int], mask_id: int, cfg: DiffusionConfig,
            tokenizer: "Tokenizer | None" = None, seed: int = 0) -> Iterator[DenoiseStep]:
    """The reverse process on ids: one :class:`DenoiseStep` per step (closing the generator stops it).

    With ``cfg.block_length`` the generation is decoded block by block (:func:`block_plan`): no
    position beyond the current block is revealed before that block is done. Tokens are drawn only
    for the positions that may be revealed (still masked, in the current block), in float64 by
    default (:func:`gumbel_max`); at temperature 0 each is its most likely token. A step that
    reveals nothing (more steps than tokens) leaves the input as it was, and the model has no time
    input, so its output would be the last one's: with ``cfg.cache`` (MDLM's cached
    sampler) such steps run no forward pass; without it every step runs one, as a plain sampler does.
    The samples are the same either way.
    """
    device = next(model.parameters()).device
    P, L = len(prompt_ids), cfg.gen_length
    x = torch.tensor([prompt_ids + [mask_id] * L], device=device)          # (1, P + L)
    masked = torch.zeros(P + L, dtype=torch.bool, device=device)
    masked[P:] = True
    gen = torch.Generator(device=device).manual_seed(seed)
    plan = block_plan(L, cfg.steps, cfg.block_length)
    total = sum(len(counts) for _, _, counts in plan)
    was_training = model.training
    model.eval()
    s = 0
    try:
        for a, b, counts in plan:
            in_block = torch.zeros(P + L, dtype=torch.bool, device=device)
            in_block[P + a:P + b] = True
            for k in counts:
                chosen = torch.empty(0, dtype=torch.long, device=device)
                if k > 0 or not cfg.cache:                                    # uncached: a forward pass every step
                    logits = model(x)[0].float()                              # (P + L, V)
                    logits[:, mask_id] = float("-inf")
                if k > 0:
                    rows = (masked & in_block).nonzero()[:, 0]                # only these can be revealed
                    if cfg.temperature > 0:
                        kept = filter_logits(logits[rows], cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p)
                        cand = gumbel_max(kept, gen, cfg.gumbel_dtype)         # (len(rows),)
                        conf = kept.softmax(-1).gather(1, cand[:, None])[:, 0]
                    else:
                        conf, cand = logits[rows].softmax(-1).max(-1)
                    if cfg.strategy == "confidence":
                        pick = torch.topk(conf, k).indices
                    else:
                        pick = torch.randperm(rows.numel(), generator=gen, device=device)[:k]
                    chosen = rows[pick]
                    x[0, chosen] = cand[pick]
                    masked[chosen] = False
                s += 1
                ids, m = x[0].tolist(), masked.tolist()
                text = render(tokenizer, ids[P:], m[P:]) if tokenizer is not None else ""
                yield DenoiseStep(step=s, total_steps=total, ids=ids, masked=m,
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
    steps = cfg.steps
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
