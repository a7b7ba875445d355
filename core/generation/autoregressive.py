"""Text generation for every supported model, as a stream of events.

One loop serves all families: it walks the model through the layer-stack adapter with a KV
cache, so our GPT, GPT-2 and GPT-Neo decode the same way. Probabilities reported per token are
under the model's own distribution (softmax of the raw logits), so the token view shows what
the model believed, independent of the sampling settings that picked the token.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Iterator, Union

import torch

from .. import devices as _devices
from ..errors import LabError
from ..models.loading import LoadedModel
from .config import SamplingConfig, draw_seed, sampler_name
from .sampling import process_logits

@dataclass
class TokenInfo:
    index: int                     # position among the generated tokens (0 = first new token)
    token_id: int
    text: str
    logprob: float                 # under the model's raw distribution
    prob: float
    alternatives: list[tuple[int, str, float]]  # (token_id, text, prob), most likely first


@dataclass
class Started:
    prompt_ids: list[int]


@dataclass
class TokenEvent:
    token: TokenInfo
    completion: str                # the completion so far


@dataclass
class GenerationResult:
    prompt: str
    completion: str
    tokens: list[TokenInfo]
    stop_reason: str               # max_new_tokens | eos | stop_string | stopped
    prompt_perplexity: float | None
    seconds: float
    tokens_per_s: float
    settings: dict
    model: str

    @property
    def text(self) -> str:
        return self.prompt + self.completion

    def to_json(self) -> dict:
        d = asdict(self)
        d["tokens"] = [{**asdict(t), "alternatives": [{"token_id": a, "text": s, "prob": p}
                                                       for a, s, p in t.alternatives]} for t in self.tokens]
        d["text"] = self.text
        return d


@dataclass
class Finished:
    result: GenerationResult


Event = Union[Started, TokenEvent, Finished]


def encode_prompt(lm: LoadedModel, prompt: str, add_special_tokens: bool = True) -> list[int]:
    """The prompt's ids as the model reads them: with the BOS its tokenizer starts every text with
    (Llama, Mistral, Gemma, OPT; see :mod:`core.models.tokenizer`), unless ``add_special_tokens`` is
    False (a chat template's text, which writes its BOS itself)."""
    if not prompt or not prompt.strip():
        raise LabError("The prompt is empty; type some text to continue.")
    ids = lm.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
    framing = len(lm.tokenizer.prefix_ids) + len(lm.tokenizer.suffix_ids) if add_special_tokens else 0
    if len(ids) <= framing:
        raise LabError("The prompt encodes to no tokens; type some text to continue.")
    if len(ids) >= lm.stack.context_length:
        raise LabError(f"The prompt is {len(ids)} tokens but the model's context is {lm.stack.context_length}; "
                       f"shorten the prompt to fewer than {lm.stack.context_length} tokens.")
    return ids


def _alternatives(lm: LoadedModel, logp: torch.Tensor, n: int) -> list[tuple[int, str, float]]:
    if n == 0:
        return []
    top = torch.topk(logp, min(n, logp.shape[-1]))
    return [(int(i), lm.tokenizer.token_str(int(i)), float(math.exp(v)))
            for v, i in zip(top.values.tolist(), top.indices.tolist())]


def _token_info(lm: LoadedModel, index: int, token_id: int, logp: torch.Tensor, n_alt: int) -> TokenInfo:
    lp = float(logp[token_id])
    return TokenInfo(index=index, token_id=token_id, text=lm.tokenizer.token_str(token_id), logprob=lp,
                     prob=math.exp(lp), alternatives=_alternatives(lm, logp, n_alt))


def _prompt_perplexity(prompt_logits: torch.Tensor, ids: torch.Tensor) -> float | None:
    """exp(mean NLL) of prompt tokens 1.. given their prefixes, from the prefill's logits."""
    if ids.shape[1] < 2:
        return None
    logp = prompt_logits[0, :-1].float().log_softmax(-1)
    nll = -logp.gather(1, ids[0, 1:, None].to(logp.device)).mean()
    return float(nll.exp())


def _banned_ids(lm: LoadedModel) -> list[int]:
    """Tokens an autoregressive model must never emit: the diffusion ``<|mask|>`` placeholder,
    which our shared BPE vocabulary holds but no AR training text contains."""
    mask = lm.tokenizer.mask_id
    return [mask] if mask is not None and mask < lm.stack.vocab_size else []


def _ban(logits: torch.Tensor, banned: list[int]) -> torch.Tensor:
    if banned:
        logits = logits.clone()
        logits[:, banned] = float("-inf")
    return logits


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [text.find(s) for s in stops if s in text]
    return (text[:min(hits)], True) if hits else (text, False)


def choose_token(next_logits: torch.Tensor, previous: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator,
                 banned: list[int]) -> int:
    """The next token from logits ``(1, V)`` under ``cfg`` (greedy, or drawn with ``gen``), given
    the ids so far ``previous`` ``(1, n)``; one place, so a batch of settings
    (:mod:`.batched`) picks exactly as a single run does."""
    if cfg.greedy:
        processed = process_logits(_ban(next_logits, banned), previous, repetition_penalty=cfg.repetition_penalty)
        return int(processed.argmax(-1))
    processed = process_logits(_ban(next_logits, banned), previous, temperature=cfg.temperature, top_k=cfg.top_k,
                               top_p=cfg.top_p, min_p=cfg.min_p, repetition_penalty=cfg.repetition_penalty)
    return int(torch.multinomial(processed.softmax(-1), 1, generator=gen))


def stream(lm: LoadedModel, prompt: str, cfg: SamplingConfig, *, add_special_tokens: bool = True) -> Iterator[Event]:
    """Generate from ``prompt``, yielding Started, one TokenEvent per new token, then Finished.

    The prompt is encoded by :func:`encode_prompt` (``add_special_tokens`` as there); the completion
    is decoded from the new tokens alone, so it never shows the prompt's BOS. Closing the generator
    stops generation; the consumer keeps what it has seen.
    """
    ids_list = encode_prompt(lm, prompt, add_special_tokens)
    cfg.check(lm.stack.context_length - len(ids_list))
    if sampler_name(lm.objective) != "autoregressive":
        raise LabError(f"{lm.name} is a {sampler_name(lm.objective)} model; sample it with "
                       f"core.generation.sampler.sampler_for(lm) (the Generate page and `python -m core generate` "
                       f"pick its sampler automatically).")
    seed = cfg.seed if cfg.seed is not None else draw_seed()
    settings = {**asdict(cfg), "seed": seed}
    if cfg.num_beams > 1:
        yield from _beam_stream(lm, prompt, ids_list, cfg, settings)
        return

    stack = lm.stack
    device = stack.device
    ids = torch.tensor([ids_list], device=device)
    yield Started(prompt_ids=ids_list)
    t0 = time.perf_counter()
    gen = torch.Generator(device=device).manual_seed(seed)
    out_ids: list[int] = []
    tokens: list[TokenInfo] = []
    previous = ids
    completion, reason = "", "max_new_tokens"
    banned = _banned_ids(lm)
    with torch.inference_mode():
        cache = stack.new_cache()
        prompt_logits = stack.logits(ids, cache=cache)
        ppl = _prompt_perplexity(prompt_logits, ids)
        next_logits = prompt_logits[:, -1].float()
        try:
            for step in range(cfg.max_new_tokens):
                logp = next_logits.log_softmax(-1)[0]
                tok = choose_token(next_logits, previous, cfg, gen, banned)
                if lm.tokenizer.eos_id is not None and tok == lm.tokenizer.eos_id:
                    reason = "eos"
                    break
                out_ids.append(tok)
                info = _token_info(lm, step, tok, logp, cfg.n_alternatives)
                tokens.append(info)
                completion = lm.tokenizer.decode(out_ids)
                if cfg.stop:
                    completion, hit = _cut_at_stop(completion, cfg.stop)
                    if hit:
                        yield TokenEvent(token=info, completion=completion)
                        reason = "stop_string"
                        break
                yield TokenEvent(token=info, completion=completion)
                if step + 1 == cfg.max_new_tokens:
                    break
                tok_t = torch.tensor([[tok]], device=device)
                previous = torch.cat([previous, tok_t], dim=1)
                next_logits = stack.logits(tok_t, cache=cache, last_only=True)[:, -1].float()
        except GeneratorExit:
            return
    dt = time.perf_counter() - t0
    yield Finished(GenerationResult(prompt=prompt, completion=completion, tokens=tokens, stop_reason=reason,
                                    prompt_perplexity=ppl, seconds=dt, tokens_per_s=len(tokens) / max(dt, 1e-9),
                                    settings=settings, model=lm.name))


def beam_bytes(lm: LoadedModel, num_beams: int) -> int:
    """Memory beam search holds beyond the weights: a context-long KV cache per beam (reordering
    copies it whole) and a few (beams, vocab) float32 score tensors. Checked first so that a large
    beam count is refused with a sentence instead of being killed by the operating system."""
    stack = lm.stack
    elem = torch.finfo(stack.dtype).bits // 8
    kv_width = stack.n_kv_head * stack.head_dim  # the cache holds the kv heads (fewer with grouped-query attention)
    per_beam = 2 * 2 * stack.n_layer * stack.context_length * kv_width * elem  # cache + its reordered copy
    return num_beams * (per_beam + 6 * stack.vocab_size * 4 + 2 * stack.context_length * 8)


def _beam_search(lm: LoadedModel, ids_list: list[int], cfg: SamplingConfig) -> list[int]:
    """Standard beam search over log-probabilities (repetition penalty applied), returning the
    best finished or surviving hypothesis by ``sum(logprob) / length ** length_penalty``."""
    _devices.require_free(beam_bytes(lm, cfg.num_beams), lm.stack.device, f"{cfg.num_beams:,} beams need",
                          "use fewer beams.")
    stack, nb, eos = lm.stack, cfg.num_beams, lm.tokenizer.eos_id
    device = stack.device
    ids = torch.tensor([ids_list], device=device)
    cache = stack.new_cache()
    logits = stack.logits(ids, cache=cache, last_only=True)[:, -1].float()  # (1, V)
    cache.reorder(torch.zeros(nb, dtype=torch.long, device=device))
    seqs = ids.repeat(nb, 1)                                  # (nb, T)
    scores = torch.full((nb,), float("-inf"), device=device)
    scores[0] = 0.0                                           # all beams start identical: expand one
    logits = logits.repeat(nb, 1)
    finished: list[tuple[float, list[int]]] = []
    prompt_len = len(ids_list)
    banned = _banned_ids(lm)

    def norm(score: float, length: int) -> float:
        return score / max(length, 1) ** cfg.length_penalty

    for step in range(cfg.max_new_tokens):
        logp = process_logits(_ban(logits, banned), seqs, repetition_penalty=cfg.repetition_penalty).log_softmax(-1)
        cand = (scores[:, None] + logp).view(-1)              # (nb * V)
        top = torch.topk(cand, 2 * nb)
        V = logp.shape[-1]
        next_beams: list[tuple[int, int, float]] = []
        for s, flat in zip(top.values.tolist(), top.indices.tolist()):
            beam, tok = divmod(flat, V)
            if s == float("-inf"):
                break
            if eos is not None and tok == eos:
                finished.append((norm(s, step + 1), seqs[beam, prompt_len:].tolist()))
                continue
            next_beams.append((beam, tok, s))
            if len(next_beams) == nb:
                break
        if len(finished) >= nb or not next_beams:
            break
        while len(next_beams) < nb:  # tiny vocabularies: pad with copies that can never win
            next_beams.append((next_beams[0][0], next_beams[0][1], float("-inf")))
        beam_idx = torch.tensor([b for b, _, _ in next_beams], device=device)
        toks = torch.tensor([[t] for _, t, _ in next_beams], device=device)
        scores = torch.tensor([s for _, _, s in next_beams], device=device)
        seqs = torch.cat([seqs.index_select(0, beam_idx), toks], dim=1)
        if step + 1 == cfg.max_new_tokens:
            break
        cache.reorder(beam_idx)
        logits = stack.logits(toks, cache=cache, last_only=True)[:, -1].float()
    length = seqs.shape[1] - prompt_len
    alive = [(norm(float(s), length), seqs[i, prompt_len:].tolist()) for i, s in enumerate(scores.tolist())
             if s != float("-inf")]
    return max(finished + alive, key=lambda x: x[0])[1]


def score_continuation(lm: LoadedModel, prompt_ids: list[int], new_ids: list[int],
                       n_alternatives: int = 5) -> tuple[list[TokenInfo], float | None]:
    """Per-token log-probabilities and alternatives of ``new_ids`` after ``prompt_ids`` (one pass),
    plus the prompt's perplexity."""
    ids = torch.tensor([prompt_ids + new_ids], device=lm.stack.device)
    with torch.inference_mode():
        logits = lm.stack.logits(ids)
    ppl = _prompt_perplexity(logits[:, :len(prompt_ids)], ids[:, :len(prompt_ids)])
    logp = logits[0].float().log_softmax(-1)
    P = len(prompt_ids)
    return [_token_info(lm, i, t, logp[P - 1 + i], n_alternatives) for i, t in enumerate(new_ids)], ppl


def _beam_stream(lm, prompt, ids_list, cfg, settings) -> Iterator[Event]:
    yield Started(prompt_ids=ids_list)
    t0 = time.perf_counter()
    with torch.inference_mode():
        new_ids = _beam_search(lm, ids_list, cfg)
    tokens, ppl = score_continuation(lm, ids_list, new_ids, cfg.n_alternatives)
    completion, reason = "", "max_new_tokens" if len(new_ids) == cfg.max_new_tokens else "eos"
    shown: list[TokenInfo] = []
    for info in tokens:
        shown.append(info)
        completion = lm.tokenizer.decode([t.token_id for t in shown])
        if cfg.stop:
            completion, hit = _cut_at_stop(completion, cfg.stop)
            if hit:
                reason = "stop_string"
                yield TokenEvent(token=info, completion=completion)
                break
        yield TokenEvent(token=info, completion=completion)
    dt = time.perf_counter() - t0
    yield Finished(GenerationResult(prompt=prompt, completion=completion, tokens=shown, stop_reason=reason,
                                    prompt_perplexity=ppl, seconds=dt, tokens_per_s=len(shown) / max(dt, 1e-9),
                                    settings=settings, model=lm.name))


def generate(lm: LoadedModel, prompt: str, cfg: SamplingConfig | None = None) -> GenerationResult:
    """Run :func:`stream` to the end and return its result."""
    for event in stream(lm, prompt, cfg or SamplingConfig()):
        if isinstance(event, Finished):
            return event.result
    raise AssertionError("stream ended without a result")


def partial_result(lm: LoadedModel, prompt: str, cfg: SamplingConfig, tokens: list[TokenInfo],
                   completion: str, seconds: float) -> GenerationResult:
    """The result of a generation stopped by the user: what was produced so far, marked ``stopped``."""
    return GenerationResult(prompt=prompt, completion=completion, tokens=list(tokens), stop_reason="stopped",
                            prompt_perplexity=None, seconds=seconds, tokens_per_s=len(tokens) / max(seconds, 1e-9),
                            settings=asdict(cfg), model=lm.name)


def token_logprobs(lm: LoadedModel, text: str) -> tuple[list[int], list[float]]:
    """Ids of ``text`` and the log-probability of each token after the first, given its prefix.

    The ids start with the tokenizer's BOS where it adds one, so the text's first token is scored
    given BOS (as transformers' perplexity recipe scores it); without a BOS it cannot be scored.

    Texts longer than the context are scored with a sliding window (stride = half the context),
    each token scored once with as much left context as the window allows.
    """
    ids = lm.tokenizer.encode(text) if text else []
    if len(ids) < 2:
        raise LabError("Perplexity needs a text of at least 2 tokens; type a longer text.")
    ctx = lm.stack.context_length
    stride = max(1, ctx // 2)
    out: list[float] = []
    scored_to = 1  # next token index that still needs a score
    start = 0
    with torch.inference_mode():
        while scored_to < len(ids):
            end = min(start + ctx, len(ids))
            window = torch.tensor([ids[start:end]], device=lm.stack.device)
            logp = lm.stack.logits(window)[0].float().log_softmax(-1)
            for pos in range(max(scored_to, start + 1), end):
                out.append(float(logp[pos - start - 1, ids[pos]]))
            scored_to = end
            start += stride
    return ids, out


def perplexity(lm: LoadedModel, text: str) -> float:
    """exp of the mean negative log-likelihood per token of ``text`` under the model."""
    _, lps = token_logprobs(lm, text)
    return float(math.exp(-sum(lps) / len(lps)))
