"""The models GPT Lab ships in ``assets/``, by the name that loads them (``--model default``,
``--model diffusion``). Torch-free, so the CLI's ``--help`` and the app's picker can list them.

Two defaults exist so both halves of the reference pipeline run offline: an autoregressive GPT
(gpt-training-suite, consensus, transcoders) and a masked-diffusion LM (diffusion-interpretability),
trained by our own trainer on the same corpus with the same tokenizer, so their numbers compare."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository (installed: the folder that holds core/)

# name -> the objective it is trained for; the first is the default spec. A name is offered (picker,
# `models`) once its folder is in assets/ (python -m core.models.default ship RUN --name NAME puts it there)
SHIPPED_MODELS = {"default": "ar", "diffusion": "diffusion"}


def find_assets() -> Path:
    """The shipped assets (the default models, their tokenizer and transcoders): ``core/assets/`` inside
    an installed wheel, where the build (setup.py) puts the repository's ``assets/`` as package data, else
    ``assets/`` beside ``core/`` (a checkout, or an editable install, which runs from it)."""
    packaged = Path(__file__).resolve().parents[1] / "assets"
    return packaged if packaged.is_dir() else ROOT / "assets"


ASSETS = find_assets()


def shipped_dir(name: str) -> Path:
    """The folder of the shipped model ``name`` (one of SHIPPED_MODELS)."""
    return ASSETS / name


def is_shipped(spec: str) -> bool:
    """Whether ``spec`` names a shipped model of this install. ``default`` always does (its absence is a
    broken install, said so on load); another name only once its folder has been shipped, so before
    that it is no different from any other spec."""
    spec = (spec or "").strip()
    return spec == "default" or (spec in SHIPPED_MODELS and (shipped_dir(spec) / "config.json").is_file())


def shipped_names() -> list[str]:
    """The shipped models present in this install, ``default`` first."""
    return [name for name in SHIPPED_MODELS if is_shipped(name)]
