"""Lists the model specs --model accepts here: the shipped `default` (with its card), the known
hub ids of every supported family (core/models/known.py) marked cached or not (read from the local
Hugging Face cache, never the network), GPT
Lab checkpoints under runs/*/checkpoints/*, and the architecture presets for training.
Any other hub id, local Hugging Face folder or checkpoint folder works as a spec too.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import LabError, fmt_count
from ..files import parse_json, read_text_inside
from ..models.config import PRESETS, GPTConfig, preset_config
from .cli import path_arg

NAME = "models"
HELP = "List usable model specs: default, known hub ids (cached or not), local checkpoints, presets."

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
PRESET_VOCAB, PRESET_CONTEXT = 50257, 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", metavar="DIR", type=path_arg,
                        help="folder of training runs to search for checkpoints (default: runs)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")


def checkpoint_summary(folder: Path) -> dict:
    """What a GPT Lab model folder's config.json says, without loading any weights (files are read
    only from inside the folder: a card linking elsewhere is refused, not shown)."""
    meta = parse_json(read_text_inside(folder, "config.json") or "{}")
    cfg = GPTConfig.from_dict(meta.get("model") if isinstance(meta, dict) else None)
    card = read_text_inside(folder, "README.md")
    title = next((ln.lstrip("# ").strip() for ln in card.splitlines() if ln.strip()), None) if card else None
    return {"spec": str(folder), "objective": meta.get("objective", "ar"), "untrained": bool(meta.get("untrained")),
            "layers": cfg.n_layer, "heads": cfg.n_head, "width": cfg.d_model, "context": cfg.block_size,
            "vocab": cfg.vocab_size, "causal": cfg.causal, "parameters": cfg.n_params, "card_title": title}


def hub_cache_status(repo_id: str) -> bool:
    """True when config and weights of ``repo_id`` are in the local Hugging Face cache (no network)."""
    from huggingface_hub import try_to_load_from_cache  # a third of a second: only `models` itself pays it

    def cached(name: str) -> bool:
        return isinstance(try_to_load_from_cache(repo_id, name), str)

    return cached("config.json") and any(cached(f) for f in WEIGHT_FILES)


def find_checkpoints(runs: Path) -> list[dict]:
    from ..models.loading import is_gptlab_folder  # torch: loaded only to run, not for --help

    found = []
    for folder in sorted(runs.glob("*/checkpoints/*")):
        if folder.is_dir() and is_gptlab_folder(folder):
            try:
                info = checkpoint_summary(folder)
            except (json.JSONDecodeError, LabError):
                continue  # a checkpoint being written right now, or one that is not fit to list
            info.update(run=folder.parent.parent.name, step=int(folder.name) if folder.name.isdigit() else None)
            found.append(info)
    return sorted(found, key=lambda c: (c["run"], c["step"] if c["step"] is not None else -1))


def presets() -> list[dict]:
    rows = []
    for name in PRESETS:
        cfg = preset_config(name, vocab_size=PRESET_VOCAB, block_size=PRESET_CONTEXT)
        rows.append({"name": name, "layers": cfg.n_layer, "heads": cfg.n_head, "width": cfg.d_model,
                     "parameters": cfg.n_params})
    return rows


def _preset_memory() -> dict:
    """Per preset, the memory per GPU under DDP and the GPUs FSDP needs (core.training.memory)."""
    from ..training.memory import fits_table, visible_gpu_bytes

    gpu = visible_gpu_bytes()
    return {**fits_table(gpu), "measured": gpu is not None}


def collect(runs: str | Path = "runs") -> dict:
    """Everything ``models`` shows, as plain data."""
    from huggingface_hub import constants  # a third of a second: only `models` itself pays it

    from ..models.known import FAMILY_MODELS, is_gated
    from ..models.shipped import shipped_dir, shipped_names

    shipped = {}
    for name in shipped_names():
        folder = shipped_dir(name)
        shipped[name] = checkpoint_summary(folder) if (folder / "config.json").exists() else None
        if shipped[name] is not None:
            shipped[name]["spec"] = name
    return {"default": shipped["default"], "shipped": shipped,
            "hub_cache": str(constants.HF_HUB_CACHE),
            "hub": [{"id": m, "family": family, "cached": hub_cache_status(m), "gated": is_gated(m)}
                    for family, (_, ids) in FAMILY_MODELS.items() for m in ids],
            "checkpoints": find_checkpoints(Path(runs)),
            "presets": presets(),
            "preset_memory": _preset_memory(),
            "preset_vocab": PRESET_VOCAB, "preset_context": PRESET_CONTEXT}


def _shape(c: dict) -> str:
    return (f"{c['layers']} layers, width {c['width']}, {c['heads']} heads, context {c['context']}, "
            f"vocab {c['vocab']}, {fmt_count(c['parameters'])} parameters")


def format_models(info: dict, runs: str) -> str:
    lines = ["Model specs for --model (any other hub id, Hugging Face folder or checkpoint folder works too)", ""]
    for name, d in info["shipped"].items():
        lines.append(f"{name}  (shipped)")
        if d is None:
            lines.append(f"  missing from assets/{name}: reinstall GPT Lab")
            continue
        state = "untrained (random weights: its text is noise)" if d["untrained"] else "trained"
        lines += [f"  card: {d['card_title'] or 'none'}", f"  state: {state}",
                  f"  {d['objective']} objective, {_shape(d)}"]
    from ..models.known import FAMILY_MODELS

    lines += ["", f"Hugging Face hub, by family (cache {info['hub_cache']}; only cached ones load without "
                  f"internet; MODEL@REVISION loads a revision, e.g. EleutherAI/pythia-160m@step3000)"]
    width = max(len(h["id"]) for h in info["hub"])
    family = None
    for h in info["hub"]:
        if h.get("family") != family:
            family = h.get("family")
            lines.append(f"  {FAMILY_MODELS[family][0] if family in FAMILY_MODELS else family} ({family})")
        gated = "; gated: accept its licence on the hub, then `hf auth login`" if h.get("gated") else ""
        lines.append(f"    {h['id']:<{width}}  " + ("cached" if h["cached"] else
                                                   f"not cached (`hf download {h['id']}` where there is internet"
                                                   f"{gated})"))
    lines += ["", f"GPT Lab checkpoints under {runs}/"]
    if not info["checkpoints"]:
        lines.append("  none yet (train one with the Training page or `python -m core train`)")
    for c in info["checkpoints"]:
        flag = ", untrained" if c["untrained"] else ""
        lines.append(f"  {c['spec']}  ({c['objective']}{flag}; {_shape(c)})")
    lines += ["", f"Presets for training (parameters at vocab {info['preset_vocab']}, context {info['preset_context']})",
              f"  {'name':<14}{'layers':>7}{'heads':>7}{'width':>7}{'parameters':>16}"]
    for p in info["presets"]:
        lines.append(f"  {p['name']:<14}{p['layers']:>7}{p['heads']:>7}{p['width']:>7}"
                     f"{p['parameters']:>16,}")
    if info.get("preset_memory"):
        from ..training.memory import fit_lines

        lines += [""] + fit_lines(info["preset_memory"], info["preset_memory"].get("measured", False))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    runs = args.runs or "runs"  # the default may not exist yet; a folder the user names must
    if args.runs is not None and not Path(args.runs).expanduser().is_dir():
        raise LabError(f"--runs {args.runs} is not a folder; pass the folder holding training runs (default runs).")
    info = collect(Path(runs).expanduser())
    print(json.dumps(info, indent=2) if args.json else format_models(info, runs))
    return 0
