"""Bare GPT-2 state-dict files (``.pt`` / ``.safetensors``) loaded into our GPT.

The reference scripts pass GPT-2 weights around as a bare state dict
(``torch.save(model.state_dict(), "gpt2_weights.pt")``) whose architecture is implied by
``--model``. A state dict carries no config, so the sizes come from the model spec:

- a GPT-2 hub name (``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``): our GPT-2 presets
  with vocabulary 50257 and context 1024;
- a local Hugging Face GPT-2 folder or a GPT Lab checkpoint folder: its config.json;
- ``default`` (no model named): the GPT-2 size whose width and depth match the tensors.

Both layouts are accepted: Hugging Face's (Conv1D, ``[in, out]``, transposed on the way in by
:func:`core.models.convert.load_gpt2_state_dict`) and our own GPT's (``nn.Linear``, ``[out, in]``).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .convert import config_from_hf_gpt2, load_gpt2_state_dict, normalise_gpt2_keys
from ..devices import resolve_device, resolve_dtype
from ..errors import LabError, first_line, shorten
from ..files import check_folder_links
from .gpt import GPT, PRESETS, GPTConfig
from .loading import LoadedModel, check_tokenizer, is_gptlab_folder, load_state_dict_file, read_checkpoint_meta
from .stack import stack_for
from .tokenizer import Tokenizer, load_tokenizer

GPT2_VOCAB = 50257
GPT2_CONTEXT = 1024
# Hub names of the GPT-2 family -> our preset of the same size.
GPT2_HUB_PRESETS = {"gpt2": "gpt2-small", "gpt2-medium": "gpt2-medium", "gpt2-large": "gpt2-large",
                    "gpt2-xl": "gpt2-xl"}
C_ATTN = "transformer.h.0.attn.c_attn.weight"


def gpt2_hub_name(spec: str) -> str | None:
    """``gpt2``/``openai-community/gpt2-xl`` -> the bare size name; anything else -> None."""
    name = spec.strip().removeprefix("openai-community/")
    return name if name in GPT2_HUB_PRESETS else None


def gpt2_preset_config(name: str, vocab_size: int = GPT2_VOCAB, block_size: int = GPT2_CONTEXT) -> GPTConfig:
    return GPTConfig(**PRESETS[GPT2_HUB_PRESETS[name]], vocab_size=vocab_size, block_size=block_size)


def _hf_folder_config(folder: Path) -> GPTConfig:
    from transformers import AutoConfig  # a second of import: only Hugging Face folders pay it

    check_folder_links(folder)
    try:  # a GPT-2 config needs no code of its own: the folder's is never run
        hf_config = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise LabError(f"{folder} is not a readable Hugging Face model folder ({shorten(first_line(e), 160)}); "
                       f"pass a GPT-2 folder or a GPT-2 size name as --model.") from e
    if hf_config.model_type != "gpt2":
        raise LabError(f"{folder} holds a {hf_config.model_type} model; a bare state dict can only be "
                       f"loaded with a GPT-2 architecture (--model gpt2 ... gpt2-xl or a GPT-2 folder).")
    return config_from_hf_gpt2(hf_config)


def _inferred_config(sd: dict[str, torch.Tensor]) -> GPTConfig:
    """The GPT-2 size whose width and depth match the tensors (only the head count is not in them)."""
    wte = sd.get("transformer.wte.weight")
    wpe = sd.get("transformer.wpe.weight")
    if wte is None or wpe is None:
        raise LabError("The state dict has no token/position embeddings (transformer.wte / transformer.wpe); "
                       "it is not a GPT-2 state dict.")
    n_layer = 1 + max((int(k.split(".")[2]) for k in sd if k.startswith("transformer.h.")), default=-1)
    d_model = wte.shape[1]
    for hub, preset in GPT2_HUB_PRESETS.items():
        if PRESETS[preset]["d_model"] == d_model and PRESETS[preset]["n_layer"] == n_layer:
            return gpt2_preset_config(hub, vocab_size=wte.shape[0], block_size=wpe.shape[0])
    raise LabError(f"The state dict ({n_layer} layers, width {d_model}) is not a standard GPT-2 size; pass "
                   f"--model with a Hugging Face or GPT Lab folder whose config.json describes it.")


def config_for_spec(spec: str, sd: dict[str, torch.Tensor]) -> tuple[GPTConfig, Path | None]:
    """The architecture ``spec`` implies for a bare state dict, and the folder it came from (if any)."""
    spec = (spec or "default").strip()
    if spec == "default":
        return _inferred_config(sd), None
    name = gpt2_hub_name(spec)
    if name is not None:
        return gpt2_preset_config(name), None
    folder = Path(spec).expanduser()
    if folder.is_dir():
        if is_gptlab_folder(folder):
            return read_checkpoint_meta(folder)[1], folder
        return _hf_folder_config(folder), folder
    raise LabError(f"--model '{spec}' does not say which GPT-2 size the state dict is; use gpt2, gpt2-medium, "
                   f"gpt2-large, gpt2-xl, or a local GPT-2 / GPT Lab folder whose config.json gives the sizes.")


def is_linear_layout(sd: dict[str, torch.Tensor], cfg: GPTConfig) -> bool:
    """True for our GPT's layout: c_attn is ``[3d, d]`` there and ``[d, 3d]`` in HF's Conv1D."""
    w = sd.get(C_ATTN)
    return w is not None and tuple(w.shape) == (3 * cfg.d_model, cfg.d_model)


def gpt_from_state_dict(sd: dict[str, torch.Tensor], cfg: GPTConfig) -> GPT:
    """Our GPT with ``cfg``'s sizes and the weights of ``sd`` (either layout).

    The model is built on the meta device (no random init, no memory) and every key and shape is
    checked there, so a state dict of the wrong size fails before anything is allocated.
    """
    sd = normalise_gpt2_keys(sd)
    if cfg.tie_weights and "transformer.wte.weight" in sd:
        sd = {**sd, "lm_head.weight": sd["transformer.wte.weight"]}
    elif not cfg.tie_weights and "lm_head.weight" not in sd:
        raise LabError("The state dict has no lm_head.weight but the model's output head is untied; "
                       "pass the full state dict.")
    with torch.device("meta"):
        model = GPT(cfg)
    if is_linear_layout(sd, cfg):  # our own layout: the tensors become the parameters as they are
        try:
            model.load_state_dict(sd, strict=True, assign=True)
        except RuntimeError as e:
            detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])[:200]
            raise LabError(f"The state dict does not fit the model --model describes ({detail}); "
                           f"pass the --model it was trained with.") from e
    else:  # Hugging Face's Conv1D layout
        load_gpt2_state_dict(model, sd)  # on meta: checks every key and shape, copies nothing
        model = model.to_empty(device="cpu")
        if cfg.tie_weights:
            model.lm_head.weight = model.transformer.wte.weight
        load_gpt2_state_dict(model, sd)
    if cfg.tie_weights:
        model.lm_head.weight = model.transformer.wte.weight  # assign/to_empty do not keep the tie
    return model.eval()


def gpt2_tokenizer(tokenizer: str | None, folder: Path | None, what: str) -> Tokenizer:
    """The tokenizer for a bare GPT-2 state dict: the one asked for, the config folder's own, the
    cached Hugging Face ``gpt2`` tokenizer, or tiktoken's gpt2 encoding, in that order."""
    if tokenizer:
        return load_tokenizer(tokenizer)
    if folder is not None:
        return load_tokenizer(folder)
    try:
        return load_tokenizer("gpt2", local_files_only=True)
    except (OSError, ValueError, LabError):
        pass
    try:
        return load_tokenizer("tiktoken:gpt2")
    except LabError:
        raise LabError(f"No GPT-2 tokenizer is available offline for {what}; pass --tokenizer PATH (a GPT-2 "
                       f"tokenizer.json or model folder), or cache one (`hf download gpt2` or tiktoken's gpt2 "
                       f"files in TIKTOKEN_CACHE_DIR).") from None


def load_state_dict_model(path: str | os.PathLike, spec: str = "default", device: str = "cpu",
                          dtype: str | torch.dtype = "float32", tokenizer: str | None = None) -> LoadedModel:
    """A bare GPT-2 state-dict file as a ready model; ``spec`` names its architecture (see module doc)."""
    path = Path(path)
    sd = normalise_gpt2_keys(load_state_dict_file(path))
    cfg, folder = config_for_spec(spec, sd)
    model = gpt_from_state_dict(sd, cfg)
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    model = model.to(device=dev, dtype=torch_dtype)
    tok = gpt2_tokenizer(tokenizer, folder, str(path))
    check_tokenizer(tok, cfg.vocab_size, str(path))
    return LoadedModel(spec=str(path), model=model, tokenizer=tok, stack=stack_for(model), device=dev,
                       dtype=torch_dtype, source=f"state dict {path}",
                       extra={"config_from": str(folder) if folder else (spec or "default")})
