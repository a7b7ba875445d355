"""Loading a model by spec: a shipped model (``default``, ``diffusion``), a hub id, a local Hugging Face folder, or our checkpoint.

A spec string names a model everywhere (CLI ``--model``, the Python API, the app's picker).
Nothing here unpickles: our checkpoints are safetensors + JSON, ``.pt`` state dicts go through
``torch.load(weights_only=True)``.

What is loaded is checked before anything runs on it, each failure one sentence: a local folder is
read only from inside itself (:func:`core.files.check_folder_links`); a checkpoint's config must
hold sensible sizes (:meth:`GPTConfig.from_dict`) that fit in memory before the model is built;
weights must be finite; the tokenizer must not know more tokens than the model; a diffusion model
must name its mask token. transformers is imported only where a Hugging Face model is loaded: it
costs about a second, which the shipped default should not pay.
"""
from __future__ import annotations

import json
import os
import pickle
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from ..devices import dtype_name, require_free, resolve_device, resolve_dtype
from ..errors import LabError, ModelNotAvailableError, first_line, is_out_of_memory, shorten
from ..files import (atomic_write_bytes, atomic_write_json, atomic_write_text, check_folder_links, parse_json,
                     read_text_inside)
from ..generation.config import SAMPLER_OF_OBJECTIVE
from .config import DTYPE_BYTES
from .gpt import GPT, GPTConfig
from .decode_layout import use_decode_layout
from .stack import LayerStack, stack_for
from .known import known_hub_models, split_revision
from .shipped import ASSETS, ROOT, find_assets, is_shipped, shipped_dir  # noqa: F401  (re-exported)
from .tokenizer import Tokenizer, load_tokenizer

DEFAULT_DIR = shipped_dir("default")
CHECKPOINT_FORMAT = "gptlab"
OBJECTIVES = tuple(SAMPLER_OF_OBJECTIVE)  # what a checkpoint's "objective" may say: those a sampler takes

# Hub ids the picker and `models` offer, by family (core/models/known.py, torch-free); any other
# hub id of a supported family works too when it is cached or reachable.
KNOWN_HUB_MODELS = list(known_hub_models())


@dataclass
class LoadedModel:
    """A model ready to use: the module, its tokenizer, its layer-stack adapter and its card."""

    spec: str
    model: nn.Module
    tokenizer: Tokenizer
    stack: LayerStack
    device: str
    dtype: torch.dtype
    source: str
    untrained: bool = False
    objective: str = "ar"  # "ar" or "diffusion"
    card_text: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.stack.family

    @property
    def name(self) -> str:
        label = self.spec
        if self.untrained:
            label += " (untrained)"
        return label

    def card(self) -> dict:
        """The facts the home page and ``models`` show."""
        d = self.stack.describe()
        return {"model": self.name, "family": d["family"], "objective": self.objective,
                "layers": d["n_layer"], "width": d["d_model"], "heads": d["n_head"],
                "parameters": d["n_params"], "context": d["context_length"], "vocab": d["vocab_size"],
                "tokenizer": self.tokenizer.name, "device": self.device, "dtype": dtype_name(self.dtype),
                "untrained": self.untrained, "source": self.source}


# -- our checkpoint format ----------------------------------------------------------------------

def is_gptlab_folder(path: Path) -> bool:
    """Whether ``path`` is one of our model folders (its config.json says ``"format": "gptlab"``);
    a config.json that is unreadable, not an object, or a link out of the folder says no."""
    try:
        if not (path / "config.json").is_file():
            return False
        meta = parse_json(read_text_inside(path, "config.json") or "null")
    except (LabError, OSError, json.JSONDecodeError):
        return False
    return isinstance(meta, dict) and meta.get("format") == CHECKPOINT_FORMAT


def read_checkpoint_meta(path: Path) -> tuple[dict, GPTConfig]:
    """Our folder's config.json as ``(meta, model config)``, every value checked (types, ranges,
    the objective) before anything is built from it."""
    try:
        meta = parse_json(read_text_inside(path, "config.json") or "null")
    except json.JSONDecodeError as e:
        raise LabError(f"{path / 'config.json'} is not valid JSON ({e.msg} at line {e.lineno}); restore it or load "
                       f"another checkpoint.") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise LabError(f"{path / 'config.json'} has no \"model\" object of sizes; the checkpoint is damaged, so "
                       f"restore it or load another one.")
    try:
        cfg = GPTConfig.from_dict(meta["model"])
    except LabError as e:
        raise LabError(f"{path / 'config.json'} holds an impossible model: {e}") from None
    objective = meta.get("objective", "ar")
    if objective not in OBJECTIVES:
        raise LabError(f"{path / 'config.json'} names the objective {shorten(repr(objective), 40)}; GPT Lab knows "
                       f"{' and '.join(OBJECTIVES)}, so fix the file or load another checkpoint.")
    return meta, cfg


def check_hf_config(path: Path) -> dict:
    """A local Hugging Face folder's config.json, read by us before transformers sees it: JSON
    that is broken, nested too deeply or not an object is one sentence here, not a TypeError or
    RecursionError from inside transformers."""
    try:
        meta = parse_json(read_text_inside(path, "config.json") or "null")
    except json.JSONDecodeError as e:
        raise LabError(f"{path / 'config.json'} is not valid JSON ({e.msg} at line {e.lineno}); restore it or load "
                       f"another model.") from None
    if not isinstance(meta, dict):
        raise LabError(f"{path / 'config.json'} holds {type(meta).__name__} instead of a model config object; "
                       f"restore it or load another model.")
    return meta


def check_finite(tensors, what: str) -> None:
    """Refuse weights holding NaN or infinity: such a model only ever writes nonsense, and says so
    nowhere. ``tensors`` is an iterable of ``(name, tensor)``."""
    for name, t in tensors:
        if t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all()):
            raise LabError(f"The weights of {what} hold NaN or infinite values (first in {name}); the checkpoint is "
                           f"broken, so load an earlier one or train again.")


def check_tokenizer(tok: Tokenizer, vocab_size: int, what: str) -> None:
    """A tokenizer may know fewer tokens than the model (unused rows), never more: its extra ids
    would index past the embedding."""
    if tok.vocab_size > vocab_size:
        raise LabError(f"The tokenizer of {what} has {tok.vocab_size:,} tokens but the model only {vocab_size:,}; "
                       f"pass the tokenizer the model was trained with (--tokenizer).")


def check_mask_token(cfg: GPTConfig | None, tok: Tokenizer, what: str) -> int:
    """The mask token a diffusion model denoises from: its config's, else its tokenizer's; a
    :class:`LabError` when it names none inside its vocabulary."""
    mask = getattr(cfg, "mask_token_id", None)
    if mask is None:
        mask = tok.mask_id
    vocab = getattr(cfg, "vocab_size", None) or tok.vocab_size
    if mask is None or not 0 <= mask < vocab:
        raise LabError(f"{what} is labelled a diffusion model but names no mask token inside its vocabulary; "
                       f"it cannot be sampled, so set mask_token_id in its config.json or load another checkpoint.")
    return int(mask)


def mask_token(lm: LoadedModel) -> int:
    """The mask token of the diffusion model ``lm`` (checked when it loaded; see :func:`check_mask_token`)."""
    return check_mask_token(getattr(lm.model, "config", None), lm.tokenizer, lm.name)


def save_checkpoint(folder: str | os.PathLike, model: GPT, tokenizer_json: str | None = None, *,
                    objective: str = "ar", untrained: bool = False, card: str | None = None,
                    extra: dict | None = None) -> Path:
    """Write our model folder: config.json, model.safetensors, tokenizer.json, and an optional model
    card. Each file lands atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": CHECKPOINT_FORMAT, "format_version": 1, "model": model.config.to_dict(),
            "objective": objective, "untrained": untrained, **(extra or {})}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
               if not (k == "lm_head.weight" and model.config.tie_weights)}
    atomic_write_bytes(folder / "model.safetensors", save(tensors, metadata={"format": "pt"}))
    if tokenizer_json is not None:
        atomic_write_text(folder / "tokenizer.json", Path(tokenizer_json).read_text(encoding="utf-8"))
    if card is not None:
        atomic_write_text(folder / "README.md", card)
    atomic_write_json(folder / "config.json", meta)
    return folder


def _load_gptlab(path: Path, device: str, dtype: torch.dtype) -> tuple[GPT, dict]:
    meta, cfg = read_checkpoint_meta(path)
    weights = path / "model.safetensors"
    from ..training.checkpoint import consolidated_weights, is_sharded, shard_bytes  # an FSDP run's checkpoint

    sharded = not weights.is_file() and is_sharded(path)
    if not weights.is_file() and not sharded:
        raise LabError(f"{path} has a config.json but no model.safetensors; the checkpoint is incomplete.")
    need = cfg.n_params * DTYPE_BYTES[dtype_name(dtype)]
    host = (shard_bytes(path) if sharded else weights.stat().st_size) + (need if torch.device(device).type == "cpu" else 0)
    require_free(host, "cpu", f"{path} needs", "load it on a machine with more memory or in a 16-bit dtype.",
                 detail=f" to load ({cfg.n_params:,} parameters)")
    if torch.device(device).type != "cpu":
        require_free(need, device, f"{path} needs", "use a 16-bit dtype, another device or a smaller model.",
                     detail=f" ({cfg.n_params:,} parameters)")
    with torch.device("meta"):
        model = GPT(cfg)
    try:
        sd = consolidated_weights(path) if sharded else load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise LabError(f"The weights file {weights} is corrupt or truncated ({shorten(first_line(e), 160)}); "
                       f"restore it or load an earlier checkpoint.") from e
    check_finite(sd.items(), str(path))
    if cfg.tie_weights:
        sd.setdefault("lm_head.weight", sd.get("transformer.wte.weight"))
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except (RuntimeError, TypeError) as e:
        raise LabError(f"The weights in {weights} do not match its config.json ({shorten(first_line(e), 160)}); "
                       f"the checkpoint folder is inconsistent.") from e
    if cfg.tie_weights:
        model.lm_head.weight = model.transformer.wte.weight
    return model.to(device=device, dtype=dtype).eval(), meta


# -- Hugging Face -------------------------------------------------------------------------------

def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick check before asking the hub, so an offline machine answers in seconds, not minutes."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


# How the command line words a load error's remedy; the app names its model picker instead (see
# model_message and pages/parts/common.py). The remedies are data in the error's ``fix``.
USE_DEFAULT = "use --model default"
TRUST_REMOTE_CODE = "pass --trust-remote-code (trust_remote_code=True)"
WEIGHTS_FILE = "use --weights/--ckpt for a bare GPT-2 state dict"


def model_message(kind: str, source: str, detail: str = "", *, use_default: str = USE_DEFAULT,
                  trust: str = TRUST_REMOTE_CODE, weights: str | None = WEIGHTS_FILE) -> str:
    """The sentence for a model that cannot be loaded, by ``kind`` (offline, not_on_hub, config,
    remote_code, missing_path, file), with its remedy in the caller's words: the defaults name the
    CLI's flags. The errors raised with these carry ``fix["message"] = [kind, source, detail]``, so
    another interface says the same thing its own way without rewriting the sentence."""
    if kind == "offline":
        repo, revision = source.rsplit("@", 1) if "@" in source else (source, None)
        fetch = f"hf download {repo}" + (f" --revision {revision}" if revision else "")
        return (f"Model '{source}' is not in the local Hugging Face cache and the hub cannot be reached; "
                f"download it where there is internet (`{fetch}`) and copy the cache or folder here, "
                f"or {use_default}, which works offline.")
    if kind == "not_on_hub":
        return f"Model '{source}' was not found on the hub ({detail}); check the id, or {use_default}."
    if kind == "config":
        return (f"Model '{source}' has a config transformers cannot read ({detail}); pass a model of a supported "
                f"family (`python -m core models` lists them), or {use_default}.")
    if kind == "remote_code":
        return (f"Model '{source}' ships its own Python code, which GPT Lab runs only when asked; {trust} if you "
                f"trust its authors.")
    if kind == "missing_path":
        return f"Model path {source} does not exist; check the path, or {use_default}."
    if kind == "file":
        return f"{source} is a file; pass a model folder (with config.json)" + (f", or {weights}." if weights else ".")
    raise ValueError(f"unknown model message kind {kind!r}")


def model_error(kind: str, source: str, detail: str = "", cls: type[LabError] = LabError) -> LabError:
    """A load error worded by :func:`model_message`, its remedy and words kept as ``fix`` data."""
    remedy = {"remote_code": {"trust_remote_code": True}, "file": {}}.get(kind, {"model": "default"})
    return cls(model_message(kind, source, detail), fix={**remedy, "message": [kind, source, detail]})


def offline_message(spec: str, use_default: str = USE_DEFAULT) -> str:
    return model_message("offline", spec, use_default=use_default)


def _remote_code_refused(source: str, error: ValueError) -> LabError:
    """transformers' ValueError for a config it cannot read, as one sentence saying what to do."""
    if "trust_remote_code" in str(error):
        return model_error("remote_code", source)
    return model_error("config", source, shorten(first_line(error), 160))


def _unreadable_config(source: str, error: BaseException) -> LabError:
    """A config.json whose values transformers refuses (a string for a size, say), as one sentence."""
    return model_error("config", source, f"{type(error).__name__}: {shorten(first_line(error), 160)}")


# The sizes a Hugging Face config names, per family, as our GPTConfig's fields (whose LIMITS and
# checks they go through), and its dropout probabilities.
_HF_SIZES = {
    "gpt2": dict(vocab_size="vocab_size", block_size="n_positions", n_layer="n_layer", n_head="n_head",
                 d_model="n_embd", layer_norm_eps="layer_norm_epsilon"),
    "gpt_neo": dict(vocab_size="vocab_size", block_size="max_position_embeddings", n_layer="num_layers",
                    n_head="num_heads", d_model="hidden_size", layer_norm_eps="layer_norm_epsilon"),
}
_HF_INNER = {"gpt2": "n_inner", "gpt_neo": "intermediate_size"}
_HF_DROPOUTS = {"gpt2": ("resid_pdrop", "embd_pdrop", "attn_pdrop"),
                "gpt_neo": ("resid_dropout", "embed_dropout", "attention_dropout")}


def check_hf_sizes(cfg: dict, source: str) -> int:
    """Refuse, before anything is built, a Hugging Face GPT-2 / GPT-Neo config whose sizes are not
    sensible (the limits of our own checkpoints: a corrupt or hostile ``"n_layer": 100000`` would
    otherwise be built until the machine gives up); returns the parameter count it implies."""
    family = cfg.get("model_type")
    names = _HF_SIZES[family]
    sizes = {ours: cfg.get(theirs) for ours, theirs in names.items()}
    inner = cfg.get(_HF_INNER[family])
    d = sizes["d_model"]
    try:
        if inner is not None and (isinstance(inner, bool) or not isinstance(inner, int) or
                                  not isinstance(d, int) or not 1 <= inner <= 64 * max(d, 1)):
            raise LabError(f"{_HF_INNER[family]} must be a whole number between 1 and 64 x the width "
                           f"(got {shorten(repr(inner), 40)}).")
        for name in _HF_DROPOUTS[family]:
            v = cfg.get(name, 0.0)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise LabError(f"{name} must be a probability in [0, 1) (got {shorten(repr(v), 40)}).")
        gpt = GPTConfig(**sizes)
    except LabError as e:
        names_back = {ours: theirs for ours, theirs in names.items()}
        text = str(e)
        for ours, theirs in names_back.items():
            text = text.replace(f"{ours} ", f"{theirs} ").replace(f"{ours}=", f"{theirs}=")
        raise LabError(f"Model '{source}' has an impossible config.json: {text.rstrip('.')}; fix the file or fetch "
                       f"the model again.") from None
    mlp = (inner or 4 * gpt.d_model) * gpt.d_model * 2
    return gpt.n_params - gpt.n_layer * 8 * gpt.d_model * gpt.d_model + gpt.n_layer * mlp


def check_family_sizes(config, source: str) -> int:
    """Refuse, before anything is built, a config of one of the rotary/OPT families whose sizes
    are not sensible (the limits of our own checkpoints, read from transformers' standard config
    names); returns its exact parameter count, counted on a model built on the meta device
    (no memory), tied weights once."""
    from transformers import AutoModelForCausalLM

    from .config import LIMITS

    def whole(name: str, value, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
            raise LabError(f"Model '{source}' has an impossible config.json: {name} must be a whole number between 1 "
                           f"and {high:,} (got {shorten(repr(value), 40)}); fix the file or fetch the model again.")
        return value

    d = whole("hidden_size", getattr(config, "hidden_size", None), LIMITS["d_model"])
    heads = whole("num_attention_heads", getattr(config, "num_attention_heads", None), LIMITS["n_head"])
    whole("num_hidden_layers", getattr(config, "num_hidden_layers", None), LIMITS["n_layer"])
    whole("vocab_size", getattr(config, "vocab_size", None), LIMITS["vocab_size"])
    whole("max_position_embeddings", getattr(config, "max_position_embeddings", None), LIMITS["block_size"])
    kv = getattr(config, "num_key_value_heads", None) or heads
    if whole("num_key_value_heads", kv, heads) and heads % kv:
        raise LabError(f"Model '{source}' has an impossible config.json: num_attention_heads {heads} is not a multiple "
                       f"of num_key_value_heads {kv}; fix the file or fetch the model again.")
    head_dim = getattr(config, "head_dim", None) or d // heads
    whole("head_dim", head_dim, LIMITS["d_model"])
    for name in ("intermediate_size", "ffn_dim", "n_inner"):
        if getattr(config, name, None) is not None:
            whole(name, getattr(config, name), 64 * d)
    with torch.device("meta"):
        try:
            # only supported families get here, so transformers' own class is built; said explicitly, a
            # config naming code of its own (auto_map) never makes transformers ask on a terminal or run it
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
        except Exception as e:  # a value only the model's build refuses
            raise _unreadable_config(source, e) from None
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def _supported(model_type: str | None) -> bool:
    from .families import FAMILIES

    return model_type in ("gpt2", "gpt_neo") or model_type in FAMILIES


def _load_hf(source: str, device: str, dtype: torch.dtype, local: bool, trust_remote_code: bool = False,
             revision: str | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM  # a second of import: only Hugging Face models pay it
    from transformers.utils import logging as hf_logging

    from .families import unsupported_message

    hf_logging.disable_progress_bar()  # our CLI and app show their own progress; keep stderr to one line
    kwargs = dict(local_files_only=True) if local else {}
    if revision:
        kwargs["revision"] = revision
    named = f"{source}@{revision}" if revision else source
    # Always passed, never left to transformers: left out, it asks on a terminal whether to run the code.
    trust = bool(trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True, trust_remote_code=trust,
                                            **({"revision": revision} if revision else {}))
    except ValueError as e:
        raise _remote_code_refused(named, e) from None
    except OSError:
        if local:
            raise LabError(f"{source} is not a readable Hugging Face model folder (config.json missing or bad).")
        if not hub_reachable():
            raise model_error("offline", named, cls=ModelNotAvailableError) from None
        try:
            config = AutoConfig.from_pretrained(source, trust_remote_code=trust, **kwargs)
        except ValueError as e:
            raise _remote_code_refused(named, e) from None
        except OSError as e:
            raise model_error("not_on_hub", named, shorten(first_line(e), 160), ModelNotAvailableError) from None
        except Exception as e:  # a config.json whose values transformers' own checks refuse
            raise _unreadable_config(named, e) from None
    except Exception as e:  # the same, from a local folder or the cache
        raise _unreadable_config(named, e) from None
    else:
        kwargs["local_files_only"] = True
    if not _supported(config.model_type):
        raise LabError(unsupported_message(config.model_type, named))
    if config.model_type in ("gpt2", "gpt_neo"):
        n_params = check_hf_sizes(config.to_dict(), named)
    else:
        n_params = check_family_sizes(config, named)
    need = n_params * (torch.finfo(dtype).bits // 8)
    load_kwargs = dict(dtype=dtype, **kwargs)
    if device == "auto":
        load_kwargs["device_map"] = "auto"
    elif torch.device(device).type == "cuda":
        # straight onto the GPU, one layer at a time: a 7B model in bfloat16 never needs 14 GB of host memory
        require_free(need, device, f"'{named}' needs", "use a 16-bit dtype (--dtype bfloat16), --device auto to "
                     "spread it over several GPUs, or a smaller model.", detail=f" ({n_params:,} parameters)")
        load_kwargs["device_map"] = {"": device}
    if "device_map" not in load_kwargs:
        require_free(need, "cpu", f"'{named}' needs", "load it on a machine with more memory or in a 16-bit dtype.",
                     detail=f" to load ({n_params:,} parameters)")
    try:
        model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=trust, **load_kwargs)
    except OSError as e:
        if "local_files_only" in kwargs and not local:
            raise model_error("offline", named, cls=ModelNotAvailableError) from None
        raise LabError(f"Could not load the weights of '{named}' ({shorten(first_line(e), 160)}); check the folder "
                       f"or fetch the model again.") from e
    except pickle.UnpicklingError as e:  # a .bin holding objects: torch's weights_only refused it
        raise LabError(f"Refused to load the weights of '{source}': its pickle file holds objects other than "
                       f"tensors; only safetensors or plain tensor files are loaded, so convert it to "
                       f"model.safetensors where it came from.") from e
    except Exception as e:  # weights that do not fit the config, a value only the model's build refuses
        if is_out_of_memory(e):
            raise
        raise LabError(f"Could not build '{source}' from its config.json and weights ({type(e).__name__}: "
                       f"{shorten(first_line(e), 160)}); the folder is inconsistent, so fetch the model again.") \
            from None
    check_finite(model.named_parameters(), f"'{named}'")
    if "device_map" not in load_kwargs:
        model = model.to(device)
    return model.eval(), kwargs.get("local_files_only", False)


def _inference_stack(model: torch.nn.Module, device: str, source: str | None = None) -> LayerStack:
    stack = stack_for(model, source)  # first: a model it cannot walk is refused before its weights move
    if device == "cpu":
        use_decode_layout(model)
    return stack


def load_model(spec: str = "default", device: str = "cpu", dtype: str | torch.dtype = "float32",
               tokenizer: str | None = None, trust_remote_code: bool = False) -> LoadedModel:
    """Load a model by spec onto ``device`` (``cpu``, ``cuda:N`` or ``auto``) in ``dtype``.

    ``trust_remote_code`` lets transformers run Python code shipped with a Hugging Face model or
    tokenizer; it stays off unless the user asks (``--trust-remote-code``, the app's checkbox)."""
    spec = (spec or "default").strip()
    torch_dtype = resolve_dtype(dtype)
    dev = "auto" if str(device).lower() == "auto" and torch.cuda.is_available() else resolve_device(device)
    single = resolve_device(dev) if dev == "auto" else dev
    path = shipped_dir(spec) if is_shipped(spec) else Path(spec).expanduser()
    try:
        local = is_shipped(spec) or path.exists()
    except OSError as e:  # e.g. a name longer than the file system allows
        raise LabError(f"Model spec '{shorten(spec, 80)}' is neither a usable path nor a model name "
                       f"({e.strerror or e}); enter a model folder, a hub id such as gpt2, or default.") from None

    if local:
        if not path.exists():
            raise LabError(f"The shipped model '{spec}' is missing from {path}; reinstall GPT Lab.")
        if path.is_file():
            raise model_error("file", str(path))
        check_folder_links(path)
        if is_gptlab_folder(path):
            model, meta = _load_gptlab(path, single, torch_dtype)
            tok = load_tokenizer(tokenizer or path)
            check_tokenizer(tok, model.config.vocab_size, str(path))
            objective = meta.get("objective", "ar")
            if objective == "diffusion":
                check_mask_token(model.config, tok, str(path))
            return LoadedModel(spec=spec, model=model, tokenizer=tok, stack=_inference_stack(model, single),
                               device=single, dtype=torch_dtype, source=str(path), untrained=bool(meta.get("untrained")),
                               objective=objective, card_text=read_text_inside(path, "README.md"), extra=meta)
        if not (path / "config.json").exists():
            raise LabError(f"{path} holds no config.json; pass a Hugging Face model folder or a GPT Lab checkpoint.")
        check_hf_config(path)
        model, _ = _load_hf(str(path), dev, torch_dtype, local=True, trust_remote_code=trust_remote_code)
        tok = load_tokenizer(tokenizer or path, trust_remote_code=trust_remote_code)
        stack = _inference_stack(model, dev, str(path))
        check_tokenizer(tok, stack.vocab_size, str(path))
        return LoadedModel(spec=spec, model=model, tokenizer=tok, stack=stack, device=dev, dtype=torch_dtype,
                           source=str(path))

    if spec.startswith((".", "/", "~")) or spec.endswith((".json", ".pt", ".safetensors")):
        raise model_error("missing_path", spec)
    repo, revision = split_revision(spec)
    model, cached = _load_hf(repo, dev, torch_dtype, local=False, trust_remote_code=trust_remote_code,
                             revision=revision)
    tok = (load_tokenizer(tokenizer, trust_remote_code=trust_remote_code) if tokenizer
           else load_tokenizer(repo, local_files_only=cached, trust_remote_code=trust_remote_code,
                               **({"revision": revision} if revision else {})))
    stack = _inference_stack(model, dev, spec)
    check_tokenizer(tok, stack.vocab_size, f"'{spec}'")
    return LoadedModel(spec=spec, model=model, tokenizer=tok, stack=stack, device=dev, dtype=torch_dtype,
                       source=f"hub:{spec}")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A bare state dict from ``.safetensors`` or ``.pt`` (weights only; never unpickles objects)."""
    p = Path(path)
    if not p.is_file():
        raise LabError(f"Weights file {p} does not exist; check the path.")
    try:
        if p.suffix == ".safetensors":
            sd = load_file(str(p))
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt archives raise many types
        raise LabError(f"Could not read weights from {p} ({type(e).__name__}: {shorten(first_line(e), 200)}); "
                       f"only safetensors or plain tensor state dicts are accepted.") from e
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise LabError(f"{p} is not a state dict of tensors.")
    check_finite(sd.items(), str(p))
    return sd
