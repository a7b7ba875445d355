"""What a consensus run hands back: its result arrays and the events of its stream (numpy only)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ..errors import LabError
from .config import ConsensusConfig, DecodeConfig

STAT_NAMES = ("metric", "mean_cosine", "mean_dot", "effective_rank", "centroid_distance")


FIRST_COLUMNS = 4096  # columns the recordings of a run start with (ConsensusResult.reserve grows them)


def recordings(*shape: int) -> np.ndarray:
    """float32 NaN array of ``shape`` whose last axis (columns) starts at :data:`FIRST_COLUMNS`."""
    return np.full(shape[:-1] + (min(shape[-1], FIRST_COLUMNS),), np.nan, dtype=np.float32)


def _grown(a: np.ndarray, columns: int) -> np.ndarray:
    out = np.full(a.shape[:-1] + (columns,), np.nan, dtype=a.dtype)
    out[..., :a.shape[-1]] = a
    return out


@dataclass
class ConsensusResult:
    """Everything one run recorded, as numpy arrays in the user's prompt order.

    The recordings (the statistics and the matrices) grow as the run reaches their columns
    (:meth:`reserve`) and hold all ``P`` once it is complete; entries not computed yet (a stopped
    run, prompts whose length group had not started) are NaN. Readers cut them at
    :attr:`columns_done`.
    ``B`` prompts, ``P = len(steps)`` columns, ``T = max prompt length`` (shorter prompts are
    NaN-padded at the end of their token axes), ``D`` the model width.
    """

    model: str
    prompts: list[str]  # display text of each prompt (random prompts decoded)
    token_ids: list[list[int]]
    config: ConsensusConfig
    n_layer: int
    steps: np.ndarray  # int64 [P] layer-step of each column
    metric: np.ndarray  # float32 [B, P] 1 - mean_j |cos(h_0, h_j)|
    mean_cosine: np.ndarray  # float32 [B, P] mean cos(h_i, h_j) over i != j
    mean_dot: np.ndarray  # float32 [B, P] mean <h_i, h_j> over i != j (raw)
    effective_rank: np.ndarray  # float32 [B, P] participation ratio of the centred token cloud
    centroid_distance: np.ndarray  # float32 [B, P] mean_j |h_j - mean_k h_k|
    hidden: np.ndarray  # float32 [B, T, D] state when the prompt stopped (after the last final norm when complete)
    matrix: np.ndarray | None = None  # float32 [B, T, T, P] token cosine matrices, when asked
    decodings: dict[int, list[str | None]] = field(default_factory=dict)  # iteration -> text per prompt
    # iteration -> per prompt, the logit lens's argmax token at each input position, as readable text
    lens_tokens: dict[int, list[list[str] | None]] = field(default_factory=dict)
    steps_done: np.ndarray | None = None  # int64 [B] layer-steps each prompt completed
    seconds: float = 0.0
    device: str = "cpu"

    @property
    def total_steps(self) -> int:
        """``N*L``: layer-steps a complete run makes per prompt."""
        return self.config.iterations * self.n_layer

    @property
    def lengths(self) -> list[int]:
        return [len(t) for t in self.token_ids]

    @property
    def complete(self) -> bool:
        return bool((self.steps_done == self.total_steps).all())

    @property
    def columns_done(self) -> int:
        """Columns recorded for the prompt that got furthest (arrays may be cut here)."""
        if self.steps_done is None or self.steps_done.max() < 0:
            return 0
        return int(np.searchsorted(self.steps, self.steps_done.max(), side="right"))

    def reserve(self, columns: int) -> None:
        """Make the recordings hold at least ``columns`` columns (at most ``P``), new ones NaN.

        Why grown and not allocated whole at the start: a run of millions of layer-steps would
        first fill gigabytes with NaN (seconds before its first step, on a slow machine), and a run
        stopped early would have held memory for steps it never reached. Doubling keeps the
        copying to about one more pass over what the run records."""
        have = self.metric.shape[1]
        if columns <= have:
            return
        size = min(len(self.steps), max(int(columns), 2 * have))
        for name in STAT_NAMES:
            setattr(self, name, _grown(getattr(self, name), size))
        if self.matrix is not None:
            self.matrix = _grown(self.matrix, size)

    def series(self, name: str) -> np.ndarray:
        """One of :data:`core.consensus.metrics.STAT_NAMES` by name, ``[B, P]``."""
        if name not in STAT_NAMES:
            raise LabError(f"Unknown consensus series '{name}'; use one of {', '.join(STAT_NAMES)}.")
        return getattr(self, name)

    @property
    def eplot(self) -> np.ndarray:
        """float32 [B, P-1, 2]: (mean pairwise cosine, mean pairwise dot) after each recorded block
        (column 0, the embeddings, left out): the GPT-2 script's Eplot layout."""
        return np.stack([self.mean_cosine[:, 1:], self.mean_dot[:, 1:]], axis=-1).astype(np.float32)

    def trimmed(self) -> "ConsensusResult":
        """A copy whose arrays stop at :attr:`columns_done` (what a stopped run should save)."""
        p = self.columns_done
        cut = {name: getattr(self, name)[:, :p].copy() for name in STAT_NAMES}
        matrix = self.matrix[..., :p].copy() if self.matrix is not None else None
        return replace(self, steps=self.steps[:p].copy(), matrix=matrix, hidden=self.hidden.copy(),
                       decodings={k: list(v) for k, v in self.decodings.items()},
                       lens_tokens={k: list(v) for k, v in self.lens_tokens.items()},
                       steps_done=self.steps_done.copy(), **cut)


@dataclass
class ConsensusDecodeResult:
    """Consensus decoding of ``B`` prompts, ``K`` new tokens each, in the user's order."""

    model: str
    prompts: list[str]
    token_ids: list[list[int]]  # prompt ids
    new_ids: list[list[int]]  # sampled ids per prompt (fewer than K when stopped)
    completions: list[str]  # decoded new tokens
    texts: list[str]  # prompt + completion, decoded from all ids
    traces: np.ndarray  # float32 [B, K, P] reference metric of the consensus run behind each token
    steps: np.ndarray  # int64 [P]
    config: ConsensusConfig
    decode: DecodeConfig
    n_layer: int
    seconds: float = 0.0
    device: str = "cpu"

    @property
    def complete(self) -> bool:
        return all(len(n) == self.decode.new_tokens for n in self.new_ids)

    @property
    def tokens_done(self) -> int:
        """New tokens every prompt has (the traces to keep after a stop)."""
        return min(len(n) for n in self.new_ids) if self.new_ids else 0


# -- events ---------------------------------------------------------------------------------------

@dataclass
class MetricChunk:
    """The columns recorded since the previous event, for the prompts ``rows`` (user order)."""

    rows: list[int]
    steps: np.ndarray  # int64 [n] layer-steps of the new columns
    metric: np.ndarray  # float32 [len(rows), n]
    mean_cosine: np.ndarray
    mean_dot: np.ndarray
    effective_rank: np.ndarray
    centroid_distance: np.ndarray
    token: int | None = None  # consensus decoding: which new token's run these columns belong to


@dataclass
class Started:
    info: dict  # model, prompts, lengths, groups, n_layer, iterations, total (layer-steps), columns, bytes
    result: ConsensusResult | ConsensusDecodeResult  # live: filled in place as the run goes


@dataclass
class Progress:
    step: int  # layer-steps done so far, over all prompt groups (and tokens when decoding)
    total: int
    chunk: MetricChunk


@dataclass
class Decoded:
    """Logit-lens argmax decoding of every position after ``iteration`` (0-based)."""

    iteration: int
    rows: list[int]
    texts: list[str]
    tokens: list[list[str]] | None = None  # per row, the argmax token at each position (readable text)


@dataclass
class TokenSampled:
    """Consensus decoding sampled new token ``index`` (0-based) for the prompts ``rows``."""

    index: int
    rows: list[int]
    token_ids: list[int]
    texts: list[str]  # each new token's text


@dataclass
class Finished:
    result: ConsensusResult | ConsensusDecodeResult


ConsensusEvent = Started | Progress | Decoded | TokenSampled | Finished
