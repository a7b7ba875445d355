"""Several sampling settings on one prompt, decoded together in one walk of the model.

The Generate page's compare mode runs two settings on the same prompt. Run one after the other they
take twice as long; here the prompt is read once, its KV cache is shared by every row, and each
decoding step runs the rows as one batch, so two settings cost about one generation where the
device has room for a batch (a small model on a CPU, any model on a GPU). Each row picks its tokens
exactly as :func:`core.generation.autoregressive.stream` does (its own seed, filters, stop strings
and end), so a row's text is the one a single run with its settings gives, up to the rounding of
a batched matrix product. Beam search keeps its own loop and is not batched here.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from typing import Iterator, Union

import torch

from ..errors import LabError
from ..models.loading import LoadedModel
from .autoregressive import (Finished, GenerationResult, Started, TokenEvent, TokenInfo, _banned_ids, _cut_at_stop,
                             _prompt_perplexity, _token_info, choose_token, encode_prompt)
from .config import SamplingConfig, draw_seed, sampler_name

RowEvent = tuple[int, Union[Started, TokenEvent, Finished]]  # (row, what happened to it)


class _Row:
    """One setting's decoding state: its generator, tokens so far and why it ended."""

    def __init__(self, lm: LoadedModel, cfg: SamplingConfig, prompt_ids: torch.Tensor, seed: int, banned: list[int]):
        self.lm, self.cfg, self.banned = lm, cfg, banned
        self.settings = {**asdict(cfg), "seed": seed}
        self.gen = torch.Generator(device=prompt_ids.device).manual_seed(seed)
        self.previous = prompt_ids                      # (1, P + tokens so far)
        self.out_ids: list[int] = []
        self.tokens: list[TokenInfo] = []
        self.completion, self.reason, self.done = "", "max_new_tokens", False
        self.seconds = 0.0

    def pick(self, next_logits: torch.Tensor) -> TokenEvent | None:
        """Choose the next token from logits ``(1, V)``; None when the model ended the text."""
        cfg, lm = self.cfg, self.lm
        logp = next_logits.log_softmax(-1)[0]
        tok = choose_token(next_logits, self.previous, cfg, self.gen, self.banned)
        if lm.tokenizer.eos_id is not None and tok == lm.tokenizer.eos_id:
            self.reason, self.done = "eos", True
            return None
        self.out_ids.append(tok)
        info = _token_info(lm, len(self.tokens), tok, logp, cfg.n_alternatives)
        self.tokens.append(info)
        self.completion = lm.tokenizer.decode(self.out_ids)
        if cfg.stop:
            self.completion, hit = _cut_at_stop(self.completion, cfg.stop)
            if hit:
                self.reason, self.done = "stop_string", True
        if len(self.tokens) == cfg.max_new_tokens:
            self.done = True
        if not self.done:
            self.previous = torch.cat([self.previous, self.previous.new_tensor([[tok]])], dim=1)
        return TokenEvent(token=info, completion=self.completion)

    def result(self, prompt: str, ppl: float | None) -> GenerationResult:
        return GenerationResult(prompt=prompt, completion=self.completion, tokens=self.tokens, stop_reason=self.reason,
                                prompt_perplexity=ppl, seconds=self.seconds,
                                tokens_per_s=len(self.tokens) / max(self.seconds, 1e-9), settings=self.settings,
                                model=self.lm.name)


def batchable(cfgs: list[SamplingConfig]) -> bool:
    """Whether these settings can share one walk (beam search keeps its own loop)."""
    return all(c.num_beams == 1 for c in cfgs)


def stream_many(lm: LoadedModel, prompt: str, cfgs: list[SamplingConfig]) -> Iterator[RowEvent]:
    """Generate ``prompt``'s continuation under every setting in ``cfgs`` at once, yielding
    ``(row, event)``: ``(row, Started)`` for each row, then each row's TokenEvents as the batch
    steps, and ``(row, Finished)`` as soon as that row ends (the others go on without it).
    Closing the generator stops every row."""
    ids_list = encode_prompt(lm, prompt)
    room = lm.stack.context_length - len(ids_list)
    for cfg in cfgs:
        cfg.check(room)
    if sampler_name(lm.objective) != "autoregressive":
        raise LabError(f"{lm.name} is a {sampler_name(lm.objective)} model; sample it with "
                       f"core.generation.sampler.sampler_for(lm).")
    if not cfgs or not batchable(cfgs):
        raise LabError("Settings decoded together must be one or more and none may use beam search; run beam "
                       "search on its own.")
    stack = lm.stack
    ids = torch.tensor([ids_list], device=stack.device)
    banned = _banned_ids(lm)
    rows = [_Row(lm, cfg, ids, cfg.seed if cfg.seed is not None else draw_seed(), banned) for cfg in cfgs]
    for i in range(len(rows)):
        yield i, Started(prompt_ids=ids_list)
    t0 = time.perf_counter()
    with torch.inference_mode():
        cache = stack.new_cache()
        prompt_logits = stack.logits(ids, cache=cache)
        ppl = _prompt_perplexity(prompt_logits, ids)
        alive = list(range(len(rows)))                  # rows still decoding, in batch order
        cache.reorder(torch.zeros(len(alive), dtype=torch.long, device=stack.device))
        next_logits = prompt_logits[:, -1].float().expand(len(alive), -1)  # (B, V)
        try:
            while alive:
                for b, i in enumerate(alive):
                    event = rows[i].pick(next_logits[b:b + 1])
                    if event is not None:
                        yield i, event
                    if rows[i].done:
                        rows[i].seconds = time.perf_counter() - t0
                        yield i, Finished(rows[i].result(prompt, ppl))
                keep = [b for b, i in enumerate(alive) if not rows[i].done]
                if not keep:
                    break
                if len(keep) < len(alive):
                    cache.reorder(torch.tensor(keep, device=stack.device))
                    alive = [alive[b] for b in keep]
                last = torch.tensor([[rows[i].out_ids[-1]] for i in alive], device=stack.device)  # (B, 1)
                next_logits = stack.logits(last, cache=cache, last_only=True)[:, -1].float()
        except GeneratorExit:
            return

