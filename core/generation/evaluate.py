"""Generative perplexity: how likely an autoregressive model finds the text another model wrote.

The usual yardstick for masked-diffusion samples (MDLM, SEDD, and the float64 sampling study of
Zheng et al. 2024): the scorer's exp(mean negative log-likelihood) per token over the completions.
Lower means the samples look more like the text the scorer learned from; read it together with the
samples' diversity, since a sampler that repeats one likely phrase scores low too.

Each sample is re-tokenized with the scorer's own tokenizer. Only the completion is scored, given
the prompt: the scored tokens are those after the longest shared prefix of the scorer's encoding of
the prompt and of the whole text, so a token that spans the prompt's end is counted with the
completion. Texts longer than the scorer's context are scored with a sliding window
(:func:`core.generation.autoregressive.token_logprobs`). The mean is over tokens, not samples.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Iterator

from ..errors import LabError
from .autoregressive import token_logprobs
from .config import DEFAULT_SCORER, MAX_SCORED_SAMPLES, DiffusionConfig, draw_seed, sampler_name  # noqa: F401
# (DEFAULT_SCORER: this module's API, the scorer used when none is named)

if TYPE_CHECKING:
    from ..models.loading import LoadedModel


@dataclass
class GenerativePerplexity:
    perplexity: float              # exp(mean_nll)
    mean_nll: float                # nats per scored token, over all samples' tokens
    n_tokens: int                  # completion tokens scored (in the scorer's tokenization)
    n_samples: int
    per_sample: list[float]        # each sample's own perplexity (nan for one with no scored token)
    scorer: str                    # the scoring model's name

    def to_json(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def check_scorer(scorer: "LoadedModel") -> None:
    """Only an autoregressive model gives a likelihood token by token."""
    if sampler_name(scorer.objective) != "autoregressive":
        raise LabError(f"{scorer.name} is a {sampler_name(scorer.objective)} model; generative perplexity needs an "
                       f"autoregressive scorer; name one, such as the default model.")


def completion_logprobs(scorer: "LoadedModel", prompt: str, completion: str) -> list[float]:
    """The scorer's log-probability of each completion token given everything before it."""
    text = prompt + completion
    ids, lps = token_logprobs(scorer, text)           # lps[j] scores ids[j + 1]
    head = scorer.tokenizer.encode(prompt) if prompt else []
    shared = 0
    while shared < min(len(head), len(ids)) and head[shared] == ids[shared]:
        shared += 1
    return lps[max(shared, 1) - 1:]


def generative_perplexity(scorer: "LoadedModel", completions: list[str],
                          prompts: list[str] | str = "") -> GenerativePerplexity:
    """exp(mean NLL per token) of ``completions`` under the autoregressive ``scorer``, each given its
    prompt (one string for all, or one per completion)."""
    check_scorer(scorer)
    if not completions:
        raise LabError("No samples to score; generate at least one.")
    if isinstance(prompts, str):
        prompts = [prompts] * len(completions)
    if len(prompts) != len(completions):
        raise LabError(f"{len(prompts)} prompts for {len(completions)} samples; give one prompt per sample.")
    total, count, per = 0.0, 0, []
    for prompt, completion in zip(prompts, completions):
        lps = completion_logprobs(scorer, prompt, completion) if (prompt + completion) else []
        total -= sum(lps)
        count += len(lps)
        per.append(math.exp(-sum(lps) / len(lps)) if lps else math.nan)
    if count == 0:
        raise LabError("The samples hold no token the scorer can score; generate longer samples.")
    mean = total / count
    return GenerativePerplexity(perplexity=math.exp(mean), mean_nll=mean, n_tokens=count, n_samples=len(completions),
                                per_sample=per, scorer=scorer.name)


def sample_seeds(seed: int | None, n: int) -> list[int]:
    """Seeds of ``n`` samples: ``seed, seed + 1, ...`` (one drawn when ``seed`` is None)."""
    first = draw_seed() if seed is None else seed
    return [first + i for i in range(n)]


def sample_diffusion(lm: "LoadedModel", prompt: str, cfg: DiffusionConfig, n_samples: int) -> Iterator:
    """``n_samples`` diffusion results from ``prompt``, seeds ``cfg.seed, cfg.seed + 1, ...``."""
    from .diffusion import generate  # the sampler loads only when sampling

    if not 1 <= n_samples <= MAX_SCORED_SAMPLES:
        raise LabError(f"The number of samples must be between 1 and {MAX_SCORED_SAMPLES} (got {n_samples}).")
    for seed in sample_seeds(cfg.seed, n_samples):
        yield generate(lm, prompt, replace(cfg, seed=seed))
