"""Export our GPT checkpoints in the ecosystem's formats (``python -m core export``).

``hf``: a folder that transformers loads as ``GPT2LMHeadModel`` with a ``PreTrainedTokenizerFast``
(``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained(folder)``), so lm-eval-harness,
TransformerLens, nnsight and vLLM read every model trained here. The weights go through
:func:`core.models.convert.hf_gpt2_from_gpt` (the Conv1D transposes ``validate`` undoes), and
before anything is saved both models' float32 logits on a fixed sequence must agree within 1e-4.
The folder holds config.json, generation_config.json, model.safetensors, tokenizer.json,
tokenizer_config.json and a README.md card: safetensors and JSON, never a pickle.

Only our causal GPTs are exported. A masked-diffusion checkpoint is refused: its attention is
bidirectional, and a GPT2LMHeadModel would run the same weights causally, that is, as another
model that writes nonsense. A Hugging Face model is refused too: it is in transformers' format
already, so use it directly.

The output folder is new or empty (checked before the model loads) and appears whole or not at
all (:func:`core.files.atomic_folder`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .config import DEFAULT_DTYPE, DTYPE_NAMES, EXPORT_FORMATS, LOGITS_TOLERANCE
from .convert import hf_gpt2_from_gpt
from .gpt import GPT
from .shipped import is_shipped, shipped_dir
from .loading import LoadedModel, is_gptlab_folder, load_model, read_checkpoint_meta
from .tokenizer import EOS, BPETokenizer, HFTokenizer
from ..devices import resolve_dtype
from ..errors import LabError, fmt_count, shorten
from ..files import atomic_folder, atomic_write_json, atomic_write_text, check_output_dir, read_text_inside

# transformers 5 writes its own tokenizer class name (TokenizersBackend), which transformers 4 does
# not know; PreTrainedTokenizerFast loads in both, so the tools pinned to either read the folder.
TOKENIZER_CLASS = "PreTrainedTokenizerFast"
WRITTEN_SUFFIXES = (".json", ".safetensors", ".md")  # what an export may hold: no pickles, no code
PARITY_TOKENS = 16


@dataclass
class ExportResult:
    folder: Path
    source: Path
    format: str
    dtype: str
    parameters: int
    files: list[str]
    logits_max_abs_diff: float   # ours against the exported model, float32, before saving


def export_source(spec: str) -> Path:
    """The checkpoint folder of our causal GPT that ``spec`` names (``default`` or a checkpoint
    folder; a run folder is resolved to its latest checkpoint by the CLI first), or a
    :class:`LabError` saying why it cannot be exported and what to do instead."""
    spec = (spec or "default").strip()
    if is_shipped(spec):
        folder = shipped_dir(spec)
    else:
        folder = Path(spec).expanduser()
        try:
            exists = folder.exists()
        except OSError as e:
            raise LabError(f"Model spec '{shorten(spec, 80)}' is not a usable path ({e.strerror or e}); pass a GPT "
                           f"Lab checkpoint or run folder, or default.") from None
        if not exists:
            if spec.startswith((".", "/", "~")) or spec.endswith((".json", ".pt", ".safetensors")):
                raise LabError(f"Model path {spec} does not exist; check the path, or export --model default.")
            raise LabError(f"'{shorten(spec, 80)}' names a Hugging Face model, which is in transformers' format "
                           f"already; use it directly (AutoModelForCausalLM.from_pretrained('{shorten(spec, 80)}')), "
                           f"export is for GPT Lab checkpoints.")
    if folder.is_file():
        raise LabError(f"{folder} is a file; pass a GPT Lab checkpoint folder (with config.json) or a run folder.")
    if not is_gptlab_folder(folder):
        if (folder / "config.json").is_file():
            raise LabError(f"{folder} is a Hugging Face model folder, which transformers loads as it is; use it "
                           f"directly (AutoModelForCausalLM.from_pretrained('{shorten(str(folder), 80)}')), export "
                           f"is for GPT Lab checkpoints.")
        raise LabError(f"{folder} holds no GPT Lab checkpoint (a config.json saying \"format\": \"gptlab\"); pass a "
                       f"checkpoint folder (runs/<run>/checkpoints/<step>), a run folder, or default.")
    meta, cfg = read_checkpoint_meta(folder)
    if meta.get("objective", "ar") != "ar" or not cfg.causal:
        raise LabError(f"{folder} is a masked-diffusion model, whose attention is bidirectional, and a "
                       f"GPT2LMHeadModel attends causally only, so it cannot be exported as one; export an "
                       f"autoregressive checkpoint.")
    return folder


def export_model(spec: str, to: str | Path, format: str = EXPORT_FORMATS[0], dtype: str = DEFAULT_DTYPE,
                 log: Callable[[str], None] | None = None) -> ExportResult:
    """Write our causal GPT ``spec`` to the new or empty folder ``to`` in ``format`` with its weights
    in ``dtype``. Everything that can be checked is checked before the model loads."""
    if format not in EXPORT_FORMATS:
        raise LabError(f"Unknown export format '{shorten(format, 40)}'; choose one of {', '.join(EXPORT_FORMATS)}.")
    if dtype not in DTYPE_NAMES:
        raise LabError(f"Unknown dtype '{shorten(dtype, 40)}'; choose one of {', '.join(DTYPE_NAMES)}.")
    out = check_output_dir(to, "--to")
    source = export_source(spec)
    log = log or (lambda msg: None)
    log(f"loading {source}")
    lm = load_model(str(source), device="cpu", dtype="float32")
    return _export_hf(lm, source, out, dtype, log)


def _export_hf(lm: LoadedModel, source: Path, out: Path, dtype: str, log: Callable[[str], None]) -> ExportResult:
    model = lm.model
    if not isinstance(model, GPT):  # export_source only passes our checkpoints; a guard, not a path
        raise LabError(f"{lm.name} is not a GPT Lab model; export writes GPT Lab checkpoints.")
    tok = lm.tokenizer
    log("converting to GPT2LMHeadModel")
    hf = hf_gpt2_from_gpt(model, eos_token_id=tok.eos_id)
    diff = _logits_diff(model, hf)
    if not diff < LOGITS_TOLERANCE:
        raise LabError(f"The converted model's logits differ from ours by {diff:.2e} (over {LOGITS_TOLERANCE:g}); "
                       f"nothing was written (a bug in the conversion: please report it).")
    hf = hf.to(resolve_dtype(dtype))
    fast = _hf_tokenizer(lm)
    log(f"writing {out}")
    from transformers.utils import logging as hf_logging  # loaded already by the conversion

    hf_logging.disable_progress_bar()  # our CLI shows its own progress; keep stderr to our lines
    with atomic_folder(out) as tmp:
        hf.save_pretrained(tmp)
        fast.save_pretrained(tmp)
        _retag_tokenizer(tmp / "tokenizer_config.json")
        atomic_write_text(tmp / "README.md", _card(lm, source, dtype))
        files = sorted(p.name for p in tmp.iterdir())
        foreign = [f for f in files if not f.endswith(WRITTEN_SUFFIXES)]
        if foreign:  # e.g. a transformers release that writes a pickle or code beside the weights
            raise LabError(f"The export would hold {', '.join(foreign)}, which is not safetensors or JSON; nothing "
                           f"was written (please report it).")
    return ExportResult(folder=out, source=source, format="hf", dtype=dtype, parameters=model.num_params(),
                        files=files, logits_max_abs_diff=diff)


@torch.no_grad()
def _logits_diff(model: GPT, hf) -> float:
    """Max |logit difference| of ours against ``hf`` on a fixed spread of token ids (float32)."""
    cfg = model.config
    ids = (torch.arange(min(PARITY_TOKENS, cfg.block_size)) * 7919 % cfg.vocab_size)[None]  # (1, T)
    ours = model(ids.to(next(model.parameters()).device)).float().cpu()
    theirs = hf(input_ids=ids).logits.float()
    return float((ours - theirs).abs().max())


def _hf_tokenizer(lm: LoadedModel):
    """The model's tokenizer as a transformers fast tokenizer, ``<|endoftext|>`` as eos, bos and unk
    (as GPT-2's), ids and text unchanged."""
    tok = lm.tokenizer
    if isinstance(tok, HFTokenizer):  # a checkpoint that carries a Hugging Face tokenizer: as it is
        return tok._tok
    if not isinstance(tok, BPETokenizer):
        raise LabError(f"The tokenizer of {lm.name} ({tok.name}) has no tokenizer.json to export; save the model "
                       f"with its tokenizer.json.")
    from tokenizers import Tokenizer as _Tok
    from transformers import PreTrainedTokenizerFast  # a second of import: only an export pays it

    special = EOS if tok.eos_id is not None else None
    backend = _Tok.from_file(tok.path)
    # our models read raw ids (the trainer never adds special tokens), so transformers must not either: a
    # tokenizer.json taken from a hub tokenizer (Llama's) carries a post-processor that would add its BOS
    backend.post_processor = None
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=special, bos_token=special, unk_token=special,
                                   clean_up_tokenization_spaces=False,
                                   model_max_length=lm.model.config.block_size)


def _retag_tokenizer(path: Path) -> None:
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = TOKENIZER_CLASS
    atomic_write_json(path, cfg)


def _card(lm: LoadedModel, source: Path, dtype: str) -> str:
    """The exported folder's README.md: Hugging Face card metadata, where it came from, how to load
    it, then the checkpoint's own card when it has one."""
    c = lm.card()
    spec = source.name if source == shipped_dir(source.name) else str(source)
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- gpt2", "- gpt-lab",
             "---", "", f"# {source.name} (GPT Lab, exported)", "",
             f"A GPT Lab checkpoint exported with `python -m core export --model {spec} --format hf --dtype {dtype}`: "
             f"a GPT-2 architecture ({c['layers']} layers, width {c['width']}, {c['heads']} heads, context "
             f"{c['context']}, {fmt_count(c['parameters'])} parameters) with its own byte-level BPE tokenizer "
             f"({c['vocab']:,} tokens), weights in {dtype}.", "",
             "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             "model = AutoModelForCausalLM.from_pretrained(FOLDER)    # GPT2LMHeadModel",
             "tokenizer = AutoTokenizer.from_pretrained(FOLDER)", "```", ""]
    own = read_text_inside(source, "README.md")
    if own:
        lines += ["## The checkpoint's own card", "", own.strip(), ""]
    return "\n".join(lines)
