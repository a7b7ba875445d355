"""Sampling settings for both samplers, their defaults and choice lists stated once: the CLI's
flags and the Generate page's widgets read them from here. No torch, so ``--help`` stays fast.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

from ..errors import LabError

SEED_MIN, SEED_MAX = -2**63, 2**63 - 1  # torch generators take 64 bits; consensus adds step counts on top
DRAWN_SEEDS = 2**31  # a seed drawn for a run that named none is below this; the pages' seed boxes stop under it
MAX_TEMPERATURE = 10.0  # the pages' temperature boxes go up to this (the engine takes any finite value)

# Which sampler a model takes, by the objective it was trained with: stated here, read by
# core.generation.sampler.sampler_for and by each sampler's own guard.
SAMPLER_OF_OBJECTIVE = {"ar": "autoregressive", "diffusion": "diffusion"}


def sampler_name(objective: str) -> str:
    """``"autoregressive"`` or ``"diffusion"``: the sampler a model trained with ``objective`` takes."""
    try:
        return SAMPLER_OF_OBJECTIVE[objective]
    except KeyError:
        raise LabError(f"No sampler knows models trained with the objective '{objective}'; GPT Lab samples "
                       f"{' and '.join(SAMPLER_OF_OBJECTIVE)} models.") from None


def draw_seed() -> int:
    """A fresh seed, drawn up front so a run stopped early still reports the seed that repeats it."""
    return secrets.randbelow(DRAWN_SEEDS)


def check_seed(seed: int | None) -> None:
    """Raise :class:`LabError` for a seed no torch generator can take (None means "draw one")."""
    if seed is not None and not SEED_MIN <= int(seed) <= SEED_MAX:
        raise LabError(f"The seed must be a whole number between {SEED_MIN} and {SEED_MAX} (got {seed}); "
                       f"pick a smaller one, such as 42.")



# Beam scores divide by length ** length_penalty; within +-10 that power stays a finite float for any
# length a context allows (4096 ** 10 is about 1e36), beyond it Python raises OverflowError.
MAX_LENGTH_PENALTY = 10.0


@dataclass
class SamplingConfig:
    max_new_tokens: int = 50
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0                 # 0 = off
    top_p: float = 1.0             # 1 = off
    min_p: float = 0.0             # 0 = off
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None        # None = draw one (and report it, so the run can be repeated)
    num_beams: int = 1             # > 1: beam search (deterministic; sampling settings ignored)
    length_penalty: float = 1.0    # beam scores are sum(logprob) / length ** length_penalty
    n_alternatives: int = 5

    def check(self, context_left: int | None = None) -> None:
        """Raise LabError naming the setting to change when a value is impossible."""
        if self.max_new_tokens < 1:
            raise LabError(f"max new tokens must be at least 1 (got {self.max_new_tokens}).")
        if context_left is not None and self.max_new_tokens > context_left:
            raise LabError(f"The prompt leaves room for {max(context_left, 0)} new tokens in the model's context; "
                           f"ask for at most {max(context_left, 0)} new tokens or shorten the prompt.")
        if not self.greedy and self.num_beams == 1 and not 0 < self.temperature < math.inf:
            raise LabError(f"temperature must be above 0 and finite (got {self.temperature}); use greedy "
                           f"decoding for temperature 0.")
        if self.top_k < 0:
            raise LabError(f"top-k must be 0 (off) or a positive count (got {self.top_k}).")
        if not 0.0 < self.top_p <= 1.0:
            raise LabError(f"top-p must be in (0, 1] (got {self.top_p}); 1 turns it off.")
        if not 0.0 <= self.min_p < 1.0:
            raise LabError(f"min-p must be in [0, 1) (got {self.min_p}); 0 turns it off.")
        if not 0 < self.repetition_penalty < math.inf:
            raise LabError(f"repetition penalty must be above 0 and finite (got {self.repetition_penalty}); "
                           f"1 turns it off.")
        if self.num_beams < 1:
            raise LabError(f"number of beams must be at least 1 (got {self.num_beams}).")
        if self.num_beams > 1 and not -MAX_LENGTH_PENALTY <= self.length_penalty <= MAX_LENGTH_PENALTY:
            raise LabError(f"length penalty must be between {-MAX_LENGTH_PENALTY:g} and {MAX_LENGTH_PENALTY:g} "
                           f"(got {self.length_penalty}); 1 ranks beams by mean log-probability.")
        if self.n_alternatives < 0:
            raise LabError(f"number of alternatives must be 0 or more (got {self.n_alternatives}).")
        if any(s == "" for s in self.stop):
            raise LabError("stop strings must not be empty; remove the empty one.")
        check_seed(self.seed)



STRATEGIES = ("confidence", "random")
# Gumbel-max sampling precision. float32 uniforms are multiples of 2**-24, which caps the Gumbel
# noise near 16.6 and starves the tail of the distribution: masked-diffusion samples drawn in float32
# are less diverse than the model (Zheng et al. 2024, "Masked diffusion models are secretly
# time-agnostic masked models and exploit inaccurate categorical sampling"). float64 is the default.
GUMBEL_DTYPES = ("float64", "float32")
DEFAULT_SCORER = "default"  # generative perplexity is measured under the shipped autoregressive model
MAX_SCORED_SAMPLES = 10_000  # samples one generative-perplexity run may draw

# The Generate page starts a diffusion model on the reverse process it was trained for: random
# positions revealed, each token drawn at temperature 1 (ancestral sampling). The engine's and the
# command line's default (temperature 0, most confident first) is deterministic, but on a young model
# the most confident prediction everywhere is a newline, so it writes a page of blank lines (seen on
# a 300-step Shakespeare run: 48 newlines of 48 tokens at temperature 0 and 0.7; text from this).
PAGE_DIFFUSION_DEFAULTS = {"temperature": 1.0, "strategy": "random"}


@dataclass
class DiffusionConfig:
    gen_length: int = 64           # tokens to generate after the prompt
    steps: int = 32                # denoising steps; above gen_length some steps reveal nothing (and cost nothing)
    strategy: str = "confidence"   # reveal the most confident predictions, or random positions
    temperature: float = 0.0       # 0 = the most likely token at each revealed position
    top_k: int = 0                 # 0 = off (with temperature > 0)
    top_p: float = 1.0             # 1 = off (with temperature > 0)
    min_p: float = 0.0             # 0 = off (with temperature > 0)
    block_length: int = 0          # semi-autoregressive blocks (LLaDA); 0 = one block, the whole generation
    gumbel_dtype: str = "float64"  # precision of the Gumbel-max draws (GUMBEL_DTYPES)
    cache: bool = True             # reuse the model's output when no token changed since the last step
    seed: int | None = None

    def n_blocks(self) -> int:
        """How many blocks the generation is decoded in, left to right."""
        if self.block_length <= 0 or self.block_length >= self.gen_length:
            return 1
        return -(-self.gen_length // self.block_length)

    def check(self, context_left: int | None = None) -> None:
        if self.gen_length < 1:
            raise LabError(f"generation length must be at least 1 (got {self.gen_length}).")
        if context_left is not None and self.gen_length > context_left:
            raise LabError(f"The prompt leaves room for {max(context_left, 0)} tokens in the model's context; ask for "
                           f"at most {max(context_left, 0)} tokens or shorten the prompt.")
        if self.steps < 1:
            raise LabError(f"steps must be at least 1 (got {self.steps}).")
        if self.strategy not in STRATEGIES:
            raise LabError(f"strategy must be one of {', '.join(STRATEGIES)} (got '{self.strategy}').")
        if not 0 <= self.temperature < math.inf:
            raise LabError(f"temperature must be 0 (most likely token) or above, and finite (got {self.temperature}).")
        if self.top_k < 0:
            raise LabError(f"top-k must be 0 (off) or a positive count (got {self.top_k}).")
        if not 0.0 < self.top_p <= 1.0:
            raise LabError(f"top-p must be in (0, 1] (got {self.top_p}); 1 turns it off.")
        if not 0.0 <= self.min_p < 1.0:
            raise LabError(f"min-p must be in [0, 1) (got {self.min_p}); 0 turns it off.")
        if self.block_length < 0:
            raise LabError(f"block length must be 0 (one block) or a positive count (got {self.block_length}).")
        if self.steps < self.n_blocks():
            raise LabError(f"{self.n_blocks()} blocks of {self.block_length} tokens need at least one denoising step "
                           f"each (got {self.steps} steps); raise the steps to {self.n_blocks()} or lengthen the "
                           f"blocks.")
        if self.gumbel_dtype not in GUMBEL_DTYPES:
            raise LabError(f"Gumbel precision must be one of {', '.join(GUMBEL_DTYPES)} (got '{self.gumbel_dtype}').")
        check_seed(self.seed)
