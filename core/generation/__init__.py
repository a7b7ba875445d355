"""Sampling text from a loaded model: autoregressive decoding (:mod:`.autoregressive`, with the
logits processors in :mod:`.sampling`) and masked-diffusion denoising (:mod:`.diffusion`), side by
side. :func:`core.generation.sampler.sampler_for` picks the one a model needs.

``from core.generation import SamplingConfig, generate, stream, perplexity`` keeps working: the
autoregressive API is re-exported here, loaded on first use.
"""
from ..lazy import lazy_exports, names

__getattr__, __dir__ = lazy_exports(__name__, {
    **names(".autoregressive", "SamplingConfig", "TokenInfo", "Started", "TokenEvent", "GenerationResult", "Finished",
            "Event", "encode_prompt", "stream", "generate", "partial_result", "beam_bytes", "score_continuation",
            "token_logprobs", "perplexity"),
    **names(".sampler", "Sampler", "Run", "sampler_for"),
})
