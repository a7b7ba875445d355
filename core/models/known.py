"""The model families GPT Lab walks and the hub ids it offers for each, stated once (torch-free).

The app's model picker, ``python -m core models`` and the README's model table read this table;
any other hub id of a supported family loads too when it is cached or the hub can be reached.
A spec may pin a hub revision with ``@``: ``EleutherAI/pythia-160m@step3000`` (Pythia's training
checkpoints are branches named ``stepN``).
"""
from __future__ import annotations

from ..errors import LabError, shorten

# model_type -> (what the family is, its known hub ids). "gated" ids need the licence accepted on the
# hub and `hf auth login` where they are downloaded.
FAMILY_MODELS: dict[str, tuple[str, tuple[str, ...]]] = {
    "gpt2": ("GPT-2", ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")),
    "gpt_neo": ("GPT-Neo", ("EleutherAI/gpt-neo-125M", "EleutherAI/gpt-neo-1.3B", "EleutherAI/gpt-neo-2.7B")),
    "gpt_neox": ("GPT-NeoX / Pythia", ("EleutherAI/pythia-70m", "EleutherAI/pythia-160m", "EleutherAI/pythia-410m",
                                       "EleutherAI/pythia-1b", "EleutherAI/pythia-1.4b", "EleutherAI/pythia-2.8b",
                                       "EleutherAI/pythia-6.9b", "EleutherAI/pythia-12b")),
    "gptj": ("GPT-J", ("EleutherAI/gpt-j-6b",)),
    "opt": ("OPT", ("facebook/opt-125m", "facebook/opt-350m", "facebook/opt-1.3b", "facebook/opt-2.7b", "facebook/opt-6.7b")),
    "llama": ("Llama", ("TinyLlama/TinyLlama_v1.1", "meta-llama/Llama-3.2-1B",
                        "meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.1-8B", "meta-llama/Llama-2-7b-hf")),
    "mistral": ("Mistral", ("mistralai/Mistral-7B-v0.1",)),
    "qwen2": ("Qwen2 / Qwen2.5", ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-7B")),
    "qwen3": ("Qwen3", ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-1.7B", "Qwen/Qwen3-4B", "Qwen/Qwen3-8B")),
    "gemma": ("Gemma", ("google/gemma-2b", "google/gemma-7b")),
    "gemma2": ("Gemma 2", ("google/gemma-2-2b", "google/gemma-2-9b")),
    "phi3": ("Phi-3", ("microsoft/Phi-3-mini-4k-instruct", "microsoft/Phi-3.5-mini-instruct")),
}

GATED_PREFIXES = ("meta-llama/", "google/gemma", "mistralai/")


def known_hub_models() -> list[str]:
    """Every known hub id, family by family."""
    return [m for _, models in FAMILY_MODELS.values() for m in models]


def family_of(hub_id: str) -> str | None:
    """The model_type of a known hub id (revision ignored), else None."""
    repo = hub_id.split("@", 1)[0]
    return next((t for t, (_, models) in FAMILY_MODELS.items() if repo in models), None)


def is_gated(hub_id: str) -> bool:
    return hub_id.startswith(GATED_PREFIXES)


def split_revision(spec: str) -> tuple[str, str | None]:
    """``repo@revision`` as ``(repo, revision)``; a spec without ``@`` has no revision. Hub ids
    cannot hold ``@``, so the last one separates them."""
    if "@" not in spec:
        return spec, None
    repo, revision = spec.rsplit("@", 1)
    if not repo.strip() or not revision.strip() or any(c.isspace() for c in revision):
        raise LabError(f"Model spec '{shorten(spec, 80)}' names a hub revision the wrong way; write MODEL@REVISION, "
                       f"e.g. EleutherAI/pythia-160m@step3000 (a branch, tag or commit of the hub repository).")
    return repo.strip(), revision.strip()
