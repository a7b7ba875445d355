"""SAELens' on-disk format, both ways: a transcoder set written as folders SAELens loads, and
SAELens folders (on disk or in the local Hugging Face cache) read back as a transcoder set.

One folder per layer, named after what it reads (SAELens' own layout; ``SAE.load_from_disk(DIR/<hook>)``
loads it)::

    DIR/blocks.{i}.ln2.hook_normalized/
        cfg.json                  SAELensConfig.to_dict(): architecture, d_in, d_sae, d_out, dtype,
                                  ..., k (topk), and metadata: model_name, hook_name, hook_name_out, ...
        sae_weights.safetensors   W_enc (d_in, d_sae), b_enc (d_sae,), W_dec (d_sae, d_out),
                                  b_dec (d_out,) [, threshold (d_sae,): jumprelu]; the set's own tensors
        sparsity.safetensors      sparsity (d_sae,): log10(feature density + 1e-10) from the set's
                                  feature store, as SAELens' trainer writes it (left out without a store)

Architectures (:data:`ARCHITECTURES`): relu -> ``transcoder``, jumprelu -> ``jumprelu_transcoder``,
topk -> ``topk`` (SAELens has no TopK transcoder class; its TopKSAE with ``apply_b_dec_to_input``
false computes exactly our TopK transcoder when d_in = d_out, and the metadata's ``hook_name_out``
says what it writes).

What ``blocks.{i}.ln2.hook_normalized`` means depends on how TransformerLens loaded the model:
with its default processing (``fold_ln``) the norm's weight and bias are folded into the next
layer, so the hook holds the normalised stream *before* them; GPT Lab's hook is the MLP's real
input, after them. An export says so in ``metadata.model_from_pretrained_kwargs`` (``fold_ln``
false: load the model with ``from_pretrained_no_processing``). An import reads the same keys
(missing ones mean TransformerLens' defaults, as for the published GPT-2 transcoders) and, for a
transcoder that read the stream before the affine, folds ln2's weight ``w`` and bias ``b`` into its
encoder: ``x_TL = (x - b) / w``, so ``W_enc' = W_enc / w[:, None]``, ``b_enc' = b_enc - (b / w) @ W_enc``.
Such a transcoder was also trained on ``hook_mlp_out`` less its mean over d_model
(``center_writing_weights``): the set records it (``TranscoderConfig.target_centered``) and its FVE
is measured against that target. The set's ``origin`` notes (its card on the Features page) say
what was changed; weights nothing needed to change are kept bit for bit.

An export goes to a new or empty folder and appears whole or not at all. Metadata also carries a
``gptlab`` block (the set's transcoder config, training, model info and the layer's quality), so an
export imported again is the same set.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from ..errors import LabError, first_line, shorten
from ..files import atomic_folder
from .config import FOLD_LN, SAVE_DTYPES, TranscoderConfig, transcoder_hooks
from .transcoder import SET_FORMAT, SET_FORMAT_VERSION, Transcoder, TranscoderSet

if TYPE_CHECKING:
    from ..models.loading import LoadedModel
    from .store import FeatureStore

SAE_CFG_FILENAME = "cfg.json"
SAE_WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"
SPARSITY_TENSOR = "sparsity"
SPARSITY_EPS = 1e-10                  # log10(density + eps), SAELens' trainer's floor for a dead feature
SAELENS_CONFIG_VERSION = "6.0.0"      # the cfg.json layout written (metadata nested); SAELens reads older ones
                                      # (flat, pre-6.0) differently
# GPT Lab activation -> SAELens architecture (export); import also takes SAELens' plain SAE kinds
# when their metadata names an output hook.
ARCHITECTURES = {"relu": "transcoder", "jumprelu": "jumprelu_transcoder", "topk": "topk"}
IMPORTED = {"transcoder": "relu", "jumprelu_transcoder": "jumprelu", "topk": "topk", "standard": "relu",
            "jumprelu": "jumprelu"}
# TransformerLens' from_pretrained_no_processing: the hooks hold what GPT Lab's hooks hold.
NO_PROCESSING = {"fold_ln": False, "center_writing_weights": False, "center_unembed": False,
                 "fold_value_biases": False}
# TransformerLens model names -> the hub ids GPT Lab loads (for a folder that names no --model).
TL_MODEL_NAMES = {"gpt2-small": "gpt2", **{f"gpt-neo-{s}": f"EleutherAI/gpt-neo-{s}" for s in ("125M", "1.3B", "2.7B")}}
_OLD_KEYS = {"hook_point": "hook_name", "hook_point_out": "hook_name_out", "hook_point_head_index": "hook_head_index"}
_METADATA_KEYS = ("model_name", "hook_name", "hook_name_out", "hook_head_index", "hook_head_index_out",
                  "model_class_name", "model_from_pretrained_kwargs", "prepend_bos", "context_size",
                  "dataset_path", "sae_lens_version", "sae_lens_training_version", "neuronpedia_id")


def layer_folder(layer: int) -> str:
    """The folder of one layer's SAE inside an export: the hook it reads (``blocks.3.ln2.hook_normalized``)."""
    return transcoder_hooks(layer)[0]


@dataclass
class SAELensConfig:
    """One SAE folder's ``cfg.json``, as SAELens 6 writes it (``SAEConfig.to_dict``)."""

    architecture: str
    d_in: int
    d_sae: int
    d_out: int
    dtype: str = "float32"
    device: str = "cpu"
    apply_b_dec_to_input: bool = False
    normalize_activations: str = "none"
    reshape_activations: str = "none"
    k: int | None = None                          # topk
    rescale_acts_by_decoder_norm: bool = False    # topk: features chosen by activation x decoder-row norm
    metadata: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {"d_in": self.d_in, "d_sae": self.d_sae, "dtype": self.dtype, "device": self.device,
             "apply_b_dec_to_input": self.apply_b_dec_to_input, "normalize_activations": self.normalize_activations,
             "reshape_activations": self.reshape_activations, "metadata": dict(self.metadata),
             "architecture": self.architecture, "d_out": self.d_out}
        if self.architecture == "topk":
            d.update(k=self.k, rescale_acts_by_decoder_norm=self.rescale_acts_by_decoder_norm)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SAELensConfig":
        """A 6.x config (metadata nested), or an older flat one (``hook_point``, ``activation_fn``)."""
        meta = dict(d["metadata"]) if isinstance(d.get("metadata"), dict) else {}
        for key, value in d.items():  # older configs keep the metadata at the top level
            key = _OLD_KEYS.get(key, key)
            if key in _METADATA_KEYS and key not in meta:
                meta[key] = value
        topk = d.get("activation_fn") == "topk" or d.get("activation_fn_str") == "topk"
        arch = d.get("architecture") or ("topk" if topk else "standard")
        k = d.get("k", (d.get("activation_fn_kwargs") or {}).get("k"))
        d_in, d_sae = int(d["d_in"]), int(d["d_sae"])
        norm = d.get("normalize_activations", "none")
        norm = {False: "none", None: "none", True: "expected_average_only_in"}.get(norm, norm)
        return cls(architecture=str(arch), d_in=d_in, d_sae=d_sae, d_out=int(d.get("d_out", d_in)),
                   dtype=str(d.get("dtype", "float32")).removeprefix("torch."), device=str(d.get("device", "cpu")),
                   apply_b_dec_to_input=bool(d.get("apply_b_dec_to_input", "transcoder" not in str(arch))),
                   normalize_activations=str(norm), reshape_activations=str(d.get("reshape_activations", "none")),
                   k=None if k is None else int(k),
                   rescale_acts_by_decoder_norm=bool(d.get("rescale_acts_by_decoder_norm", False)), metadata=meta)


# -- export ---------------------------------------------------------------------------------------

def _densities(store: "FeatureStore", layer: int, n_features: int) -> np.ndarray | None:
    """Feature densities of one layer from the store, or None when the store does not cover it."""
    rows = store.features(layer, order_by="feature", descending=False, include_dead=True)
    if len(rows) != n_features:
        return None
    return np.asarray([r.density for r in rows], dtype=np.float64)


def log_sparsity(density: np.ndarray) -> torch.Tensor:
    """SAELens' ``sparsity`` tensor: ``log10(density + 1e-10)`` in float32."""
    return torch.from_numpy(np.log10(np.asarray(density, dtype=np.float64) + SPARSITY_EPS).astype(np.float32))


def saelens_config(tset: TranscoderSet, layer: int, dtype: str = "float32") -> SAELensConfig:
    """The cfg.json of ``layer``'s transcoder (see the module docstring)."""
    c = tset.config
    hook_in, hook_out = transcoder_hooks(layer)
    training = tset.training or {}
    meta = {
        "sae_lens_version": SAELENS_CONFIG_VERSION, "sae_lens_training_version": None,
        "model_name": tset.model, "hook_name": hook_in, "hook_name_out": hook_out,
        "hook_head_index": None, "hook_head_index_out": None, "model_class_name": "HookedTransformer",
        "model_from_pretrained_kwargs": {**NO_PROCESSING, "center_writing_weights": bool(c.target_centered)},
        "prepend_bos": bool(training.get("prepend_bos", False)), "context_size": training.get("seq_len") or tset.model_info.get("context_length"),
        "dataset_path": training.get("dataset"),
        "gptlab": {"format": SET_FORMAT, "format_version": SET_FORMAT_VERSION, "layer": layer,
                   "transcoder": c.to_dict(), "model_info": tset.model_info, "training": training,
                   "quality": ((tset.metrics or {}).get("layers") or {}).get(str(layer)), "origin": tset.origin},
    }
    return SAELensConfig(architecture=ARCHITECTURES[c.activation], d_in=c.d_model, d_sae=c.n_features,
                         d_out=c.d_model, dtype=dtype, k=c.k if c.activation == "topk" else None, metadata=meta)


def export_saelens(tset: TranscoderSet, out: str | os.PathLike, *, store: "FeatureStore | None" = None,
                   layers: list[int] | None = None, dtype: str = "float32") -> list[Path]:
    """Write ``tset`` (its ``layers``, default all) as SAELens folders under ``out``, a new or empty
    folder that appears whole or not at all (:func:`core.files.atomic_folder`); the densities come
    from ``store`` when given. Returns the layer folders."""
    if dtype not in SAVE_DTYPES:
        raise LabError(f"The export dtype must be one of {', '.join(SAVE_DTYPES)} (got '{dtype}').")
    layers = tset.layers if layers is None else sorted(set(layers))
    missing = [i for i in layers if i not in tset.transcoders]
    if missing or not layers:
        raise LabError(f"--layers must name layers of the set, which covers {tset.layers} (got {layers}).")
    files: dict[Path, bytes] = {}  # relative to out
    out = Path(out)
    for i in layers:
        folder = Path(layer_folder(i))
        tensors = {k: v.detach().to("cpu", getattr(torch, dtype)).contiguous() for k, v in tset[i].state_dict().items()}
        if not all(bool(torch.isfinite(v).all()) for v in tensors.values()):
            raise LabError(f"The transcoder of layer {i} has weights that are not finite in {dtype}, so nothing was "
                           f"exported; export as float32 (--save-dtype float32).")
        files[folder / SAE_WEIGHTS_FILENAME] = save(tensors)
        files[folder / SAE_CFG_FILENAME] = (json.dumps(saelens_config(tset, i, dtype).to_dict(), indent=2)
                                            + "\n").encode()
        density = _densities(store, i, tset[i].n_features) if store is not None else None
        if density is not None:
            files[folder / SPARSITY_FILENAME] = save({SPARSITY_TENSOR: log_sparsity(density)})
    with atomic_folder(out) as tmp:
        for path, blob in files.items():
            (tmp / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp / path).write_bytes(blob)
    return [out / layer_folder(i) for i in layers]


# -- import ---------------------------------------------------------------------------------------

@dataclass
class SAELensFolder:
    """One SAE folder as read: its config, its tensors (as stored) and its log10 densities."""

    path: Path
    config: SAELensConfig
    tensors: dict[str, torch.Tensor]
    log_sparsity: torch.Tensor | None = None

    @property
    def layer(self) -> int:
        hook = str(self.config.metadata.get("hook_name") or "")
        m = re.fullmatch(r"blocks\.(\d+)\.ln2\.hook_normalized", hook)
        if m is None or transcoder_hooks(int(m.group(1)))[0] != hook:
            want = transcoder_hooks(0)[0].replace(".0.", ".{i}.")
            raise LabError(f"The SAE in {self.path} reads {hook or 'an unnamed hook'}; GPT Lab splices transcoders in "
                           f"for the MLP, so it takes only transcoders that read {want}.")
        return int(m.group(1))


def _roots(folder: Path) -> list[Path]:
    """Where the files of a source folder may live: inside it, or for a Hugging Face cache snapshot
    (``.../models--org--name/snapshots/<rev>/...``, whose files link into ``blobs``) that repository."""
    folder = folder.resolve()
    roots = [folder]
    for p in [folder, *folder.parents]:
        if p.parent.name == "snapshots":
            roots.append(p.parent.parent)
            break
    return roots


def _inside(path: Path, roots: list[Path]) -> Path:
    target = path.resolve()
    if not any(target == r or target.is_relative_to(r) for r in roots):
        raise LabError(f"{path} is a link to {shorten(str(target), 80)}, outside the folder being imported; copy the "
                       f"file in instead of linking it.")
    return target


def read_saelens_folder(folder: str | os.PathLike, roots: list[Path] | None = None) -> SAELensFolder:
    """Read one SAE folder (safetensors only; nothing is unpickled)."""
    folder = Path(folder)
    roots = roots or _roots(folder)
    cfg_path = folder / SAE_CFG_FILENAME
    try:
        raw = json.loads(_inside(cfg_path, roots).read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        cfg = SAELensConfig.from_dict(raw)
    except OSError as e:
        raise LabError(f"Cannot read {cfg_path} ({e.strerror or first_line(e)}); pass a SAELens SAE folder.") from None
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:  # JSON nested too deep too
        raise LabError(f"{cfg_path} is not a SAELens config ({type(e).__name__}: {shorten(first_line(e), 120)}); pass "
                       f"a folder written by SAELens or by `transcoders export --format saelens`.") from None
    weights = folder / SAE_WEIGHTS_FILENAME
    if not weights.is_file():
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".pt", ".pth", ".bin", ".pkl"))
        hint = (f"; it holds {', '.join(others)}, which GPT Lab does not unpickle: convert it to safetensors"
                if others else "")
        raise LabError(f"No {SAE_WEIGHTS_FILENAME} in {folder}{hint}.")
    try:
        tensors = load_file(str(_inside(weights, roots)))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LabError(f"The weights {weights} are missing or corrupt ({shorten(first_line(e), 120)}); fetch them "
                       f"again.") from None
    sparsity = None
    if (folder / SPARSITY_FILENAME).is_file():
        try:
            sparsity = load_file(str(_inside(folder / SPARSITY_FILENAME, roots))).get(SPARSITY_TENSOR)
        except (SafetensorError, OSError, ValueError, RuntimeError):
            sparsity = None  # densities are a convenience: a damaged file is only not used
    return SAELensFolder(path=folder, config=cfg, tensors=tensors, log_sparsity=sparsity)


def find_saelens_folders(root: str | os.PathLike, max_depth: int = 3) -> list[Path]:
    """``root`` when it is one SAE folder (holds cfg.json), else the SAE folders below it (a
    release: one per layer), sorted."""
    root = Path(root)
    if (root / SAE_CFG_FILENAME).is_file():
        return [root]
    found: list[Path] = []
    level = [root]
    for _ in range(max_depth):
        level = sorted(p for d in level for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
        found += [p for p in level if (p / SAE_CFG_FILENAME).is_file()]
        level = [p for p in level if not (p / SAE_CFG_FILENAME).is_file()]
    return found


def resolve_source(source: str) -> Path:
    """``source`` as a folder: a local path, or ``ORG/NAME[/PATH][@REVISION]`` in the Hugging Face
    cache (fetched from the hub when it can be reached: only cfg.json and safetensors files)."""
    text = str(source).strip()
    if not text:
        raise LabError("--from needs a folder or a Hugging Face repo id; name one.")
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise LabError(f"--from {shorten(text, 120)} is a file; pass the SAE folder that holds {SAE_CFG_FILENAME} "
                           f"(or a folder of such folders).")
        return path
    m = re.fullmatch(r"([\w.-]+/[\w.-]+)((?:/[^@]+)?)(?:@([\w./-]+))?", text)
    if m is None or text.startswith(("/", ".", "~")):
        raise LabError(f"--from {shorten(text, 120)}: no such folder, and not a Hugging Face repo id "
                       f"(ORG/NAME[/PATH][@REVISION]); check the path.")
    repo, sub, revision = m.group(1), m.group(2).strip("/"), m.group(3)
    from huggingface_hub import snapshot_download
    from ..models.loading import hub_reachable

    prefix = f"{sub}/" if sub else ""
    online = hub_reachable()
    try:
        snap = Path(snapshot_download(repo, revision=revision, local_files_only=not online,
                                      allow_patterns=[f"{prefix}*{SAE_CFG_FILENAME}", f"{prefix}*.safetensors"]))
    except Exception as e:  # the hub's own errors: not cached, not found, no network
        where = "the hub cannot be reached and it is not in the local Hugging Face cache" if not online else \
            f"the hub answered {shorten(first_line(e), 120)}"
        raise LabError(f"--from {shorten(text, 120)} is no folder here, and as a Hugging Face repo "
                       f"({repo}{'@' + revision if revision else ''}) {where}; download it where there is internet "
                       f"(`hf download {repo}`) and copy the cache here, or pass a folder.") from None
    folder = snap / sub if sub else snap
    if not folder.is_dir():
        raise LabError(f"{repo} has no folder {sub} in the local Hugging Face cache ({snap}); check the path.")
    return folder


def source_model_name(source: str | os.PathLike) -> str | None:
    """The model an SAELens source was trained on (its metadata's model_name, as a GPT Lab spec), if it says."""
    for folder in find_saelens_folders(resolve_source(str(source))):
        try:
            raw = json.loads((folder / SAE_CFG_FILENAME).read_text(encoding="utf-8"))
            name = SAELensConfig.from_dict(raw).metadata.get("model_name")
        except (OSError, KeyError, TypeError, ValueError, AttributeError, RecursionError):
            continue
        if isinstance(name, str) and name.strip():
            return TL_MODEL_NAMES.get(name.strip(), name.strip())
    return None


def _lens_processing(meta: dict, fold_ln: str) -> tuple[bool, bool]:
    """``(fold ln2's affine into the encoder, the target was centred)`` for one SAE's metadata."""
    if fold_ln not in FOLD_LN:
        raise LabError(f"--fold-ln must be one of {', '.join(FOLD_LN)} (got '{fold_ln}').")
    kwargs = meta.get("model_from_pretrained_kwargs")
    kwargs = kwargs if isinstance(kwargs, dict) else {}
    lens = str(meta.get("model_class_name") or "HookedTransformer").startswith("Hooked")
    fold = bool(kwargs.get("fold_ln", True)) and lens if fold_ln == "auto" else fold_ln == "yes"
    centred = bool(kwargs.get("center_writing_weights", True)) and lens
    return fold, centred


def _transcoder(sae: SAELensFolder, layer: int, cfg: TranscoderConfig, ln2, fold: bool,
                notes: set[str]) -> tuple[Transcoder, bool]:
    """The GPT Lab transcoder for one SAE folder, and whether its weights had to change (a fold);
    unchanged ones are the folder's tensors exactly."""
    c, t = sae.config, dict(sae.tensors)
    shapes = {"W_enc": (c.d_in, c.d_sae), "b_enc": (c.d_sae,), "W_dec": (c.d_sae, c.d_out), "b_dec": (c.d_out,)}
    if cfg.activation == "jumprelu":
        shapes["threshold"] = (c.d_sae,)
    for name in ("scaling_factor", "finetuning_scaling_factor"):
        if name in t:
            if not bool((t[name].float() == 1).all()):
                raise LabError(f"The SAE in {sae.path} has a fine-tuning scaling factor, which GPT Lab does not apply; "
                               f"fold it into W_dec with SAELens first.")
            del t[name]
    extra = sorted(set(t) - set(shapes))
    if extra:
        raise LabError(f"The SAE in {sae.path} holds {', '.join(extra)} besides a transcoder's weights (a skip "
                       f"connection?); GPT Lab takes transcoders of the kinds {', '.join(IMPORTED)}.")
    for name, shape in shapes.items():
        if name not in t or tuple(t[name].shape) != shape:
            got = tuple(t[name].shape) if name in t else "missing"
            raise LabError(f"{sae.path / SAE_WEIGHTS_FILENAME}: {name} should be {shape} by its cfg.json, got {got}; "
                           f"the folder is inconsistent.")
        if not bool(torch.isfinite(t[name].float()).all()):
            raise LabError(f"{sae.path / SAE_WEIGHTS_FILENAME}: {name} has values that are not finite; fetch it again.")
    W_enc, b_enc = t["W_enc"].float(), t["b_enc"].float()
    W_dec, b_dec = t["W_dec"].float(), t["b_dec"].float()
    changed = False
    if c.apply_b_dec_to_input:  # (x - b_dec) @ W_enc + b_enc
        b_enc = (b_enc.double() - b_dec.double() @ W_enc.double()).float()
        changed = True
        notes.add("It subtracted b_dec from its input (apply_b_dec_to_input): that is folded into b_enc.")
    if c.architecture == "topk" and c.rescale_acts_by_decoder_norm:
        norms = W_dec.double().norm(dim=-1).clamp_min(1e-12)
        W_enc = (W_enc.double() * norms).float()
        b_enc = (b_enc.double() * norms).float()
        W_dec = (W_dec.double() / norms[:, None]).float()
        changed = True
        notes.add("Its TopK ranked features by activation x decoder-row norm (rescale_acts_by_decoder_norm): the "
                  "norms are folded into the encoder, so decoder rows are unit-norm.")
    if fold:
        w = ln2.weight.detach().double().cpu()
        b = ln2.bias.detach().double().cpu() if getattr(ln2, "bias", None) is not None else torch.zeros_like(w)
        if bool((w.abs() < 1e-12).any()):
            zero = int((w.abs() < 1e-12).nonzero()[0])
            raise LabError(f"ln2 of layer {layer} has a weight of zero in channel {zero}, "
                           f"so a transcoder that read the stream before that weight cannot be folded; import with "
                           f"--fold-ln no only if it read the MLP's real input.")
        We = W_enc.double()
        b_enc = (b_enc.double() - (b / w) @ We).float()
        W_enc = (We / w[:, None]).float()
        changed = True
    tc = Transcoder(cfg, layer=layer)
    state = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if cfg.activation == "jumprelu":
        state["threshold"] = t["threshold"].float()
    tc.load_state_dict(state)
    return tc.eval().requires_grad_(False), changed


def import_saelens(source: str | os.PathLike, lm: "LoadedModel", *, layers: list[int] | None = None,
                   fold_ln: str = "auto") -> TranscoderSet:
    """The transcoder set in SAELens folder(s) ``source`` (see :func:`resolve_source`) for ``lm``:
    checked whole (every layer one kind and size, each fitting the model) before it is returned;
    nothing is written (``TranscoderSet.save`` does). The set's ``origin`` says where it came
    from and what was changed."""
    folder = resolve_source(str(source))
    try:
        paths = find_saelens_folders(folder)
    except OSError as e:
        raise LabError(f"Cannot read the folders under {folder} ({e.strerror or first_line(e)}); check their "
                       f"permissions.") from None
    local = Path(str(source)).expanduser()
    label = str(local.resolve()) if local.exists() else str(source)  # a folder by its full path, a repo by its id
    if not paths:
        raise LabError(f"No SAELens SAE in {folder} (no {SAE_CFG_FILENAME} in it or the folders below it); pass the "
                       f"folder `transcoders export --format saelens` or SAELens wrote.")
    roots = _roots(folder)
    saes: dict[int, SAELensFolder] = {}
    for p in paths:
        sae = read_saelens_folder(p, roots)
        i = sae.layer
        if layers is not None and i not in layers:
            continue
        if i in saes:
            raise LabError(f"Two SAEs read layer {i} ({saes[i].path} and {p}); pass the one you want with --from.")
        saes[i] = sae
    if layers is not None and sorted(set(layers)) != sorted(saes):
        found = sorted(saes) or "none of them"
        raise LabError(f"--layers {sorted(set(layers))}: {folder} has SAEs for layers {found}.")
    if not saes:
        raise LabError(f"No transcoder in {folder} reads a layer GPT Lab can splice in.")
    first = saes[min(saes)]
    c0 = first.config
    kind = (c0.architecture, c0.d_in, c0.d_sae, c0.d_out, c0.k)
    for sae in saes.values():
        c = sae.config
        if (c.architecture, c.d_in, c.d_sae, c.d_out, c.k) != kind:
            raise LabError(f"The SAEs in {folder} differ ({first.path.name}: {c0.architecture} {c0.d_sae} features, "
                           f"{sae.path.name}: {c.architecture} {c.d_sae}); a set has one kind and size, so import them "
                           f"separately.")
        want_out = transcoder_hooks(sae.layer)[1]
        if c.metadata.get("hook_name_out") != want_out:
            got = c.metadata.get("hook_name_out")
            raise LabError(f"The SAE in {sae.path} writes {got or 'nothing else (it is an SAE, not a transcoder)'}; "
                           f"GPT Lab splices transcoders in for the MLP, so it takes those that write {want_out}.")
        if c.normalize_activations != "none" or c.reshape_activations != "none":
            raise LabError(f"The SAE in {sae.path} normalises or reshapes its input ({c.normalize_activations}, "
                           f"{c.reshape_activations}); GPT Lab takes transcoders that read the activation as it is.")
    if c0.architecture not in IMPORTED:
        raise LabError(f"The SAEs in {folder} are of the kind '{c0.architecture}'; GPT Lab imports "
                       f"{', '.join(IMPORTED)}.")
    if c0.d_in != c0.d_out:
        raise LabError(f"The transcoders in {folder} read {c0.d_in} and write {c0.d_out} dimensions; an MLP's "
                       f"stand-in reads and writes the same.")
    d = lm.stack.describe()
    if c0.d_in != d["d_model"] or max(saes) >= d["n_layer"]:
        raise LabError(f"The transcoders in {folder} read {c0.d_in} dimensions at layers {sorted(saes)}; {lm.name} has "
                       f"d_model {d['d_model']} and {d['n_layer']} layers: pass the model they were trained on "
                       f"with --model.")
    gl = first.config.metadata.get("gptlab") if isinstance(first.config.metadata.get("gptlab"), dict) else {}
    activation = IMPORTED[c0.architecture]
    fold, centred = _lens_processing(c0.metadata, fold_ln)
    if gl and fold_ln == "auto":  # written by GPT Lab: what it says about itself holds
        fold, centred = False, bool((gl.get("transcoder") or {}).get("target_centered", False))
    if centred and not isinstance(lm.stack.ln_2(min(saes)), torch.nn.LayerNorm):
        centred = False  # TransformerLens centres writing weights only for LayerNorm models
    base = TranscoderConfig(d_model=c0.d_in, n_features=c0.d_sae)
    cfg = TranscoderConfig(d_model=c0.d_in, n_features=c0.d_sae, activation=activation,
                           k=c0.k if activation == "topk" else base.k,
                           l1_coeff=float((gl.get("transcoder") or {}).get("l1_coeff", base.l1_coeff)),
                           target_centered=centred)
    if activation == "topk" and c0.k is None:
        raise LabError(f"The TopK SAEs in {folder} do not say their k; add \"k\" to their cfg.json.")
    cfg.check()
    notes: set[str] = set()
    made = {i: _transcoder(sae, i, cfg, lm.stack.ln_2(i), fold, notes) for i, sae in sorted(saes.items())}
    tcs = {i: tc for i, (tc, _) in made.items()}
    hook = layer_folder(min(saes)).replace(f".{min(saes)}.", ".{i}.")
    if fold:
        notes.add(f"It read {hook} before ln2's weight and bias (a TransformerLens model loaded with fold_ln): that "
                  f"affine is folded into W_enc and b_enc, so it reads GPT Lab's ln2 output.")
    if centred:
        notes.add("It was trained on hook_mlp_out less its mean over d_model (TransformerLens' "
                  "center_writing_weights): FVE is measured against that target; splicing it in is unaffected.")
    unchanged = not any(changed for _, changed in made.values())
    dtypes = {str(sae.tensors["W_enc"].dtype).removeprefix("torch.") for sae in saes.values()}
    src_dtype = dtypes.pop() if len(dtypes) == 1 else "float32"
    metrics = {}
    if gl:
        metrics = {"layers": {str(i): (s.config.metadata.get("gptlab") or {}).get("quality") for i, s in saes.items()
                              if (s.config.metadata.get("gptlab") or {}).get("quality")}}
    origin = {"format": "saelens", "source": label, "architecture": c0.architecture,
              "model_name": c0.metadata.get("model_name"),
              "dtype": src_dtype if unchanged and src_dtype in SAVE_DTYPES else "float32",
              "notes": [f"Imported from SAELens ({c0.architecture}, {c0.d_sae:,} features) from {label}.",
                        *sorted(notes)]}
    if gl.get("origin"):  # imported before, exported, imported again: the first origin's notes still hold
        origin["notes"] += [n for n in gl["origin"].get("notes", []) if n not in origin["notes"]]
    return TranscoderSet(transcoders=tcs, config=cfg, model=lm.spec, model_info=lm.stack.describe(),
                         training=gl.get("training") or {}, metrics=metrics, origin=origin)


def densities_from(source: str | os.PathLike) -> dict[int, np.ndarray]:
    """``{layer: feature densities}`` from the sparsity files of SAELens folder(s) (``10 ** sparsity``)."""
    out = {}
    folder = resolve_source(str(source))
    for p in find_saelens_folders(folder):
        sae = read_saelens_folder(p, _roots(folder))
        if sae.log_sparsity is not None:
            out[sae.layer] = np.power(10.0, sae.log_sparsity.double().numpy())
    return out


__all__ = ["ARCHITECTURES", "IMPORTED", "NO_PROCESSING", "SAE_CFG_FILENAME", "SAE_WEIGHTS_FILENAME",
           "SPARSITY_FILENAME", "SAELensConfig", "SAELensFolder", "export_saelens", "find_saelens_folders",
           "import_saelens", "layer_folder", "log_sparsity", "read_saelens_folder", "resolve_source",
           "saelens_config", "source_model_name", "densities_from"]
