"""The Training page's launch form: every TrainConfig knob as a widget, and the mapping from the
widgets' values to a :class:`~core.training.config.TrainConfig`.

The mapping (:func:`config_from_values`) is plain Python so it can be checked without Streamlit;
it raises LabError for anything the engine would refuse, before a process is started. Defaults,
choice lists and the widgets' limits are TrainConfig's own (core.training.config), never restated.

An uploaded dataset (:data:`UPLOAD_CHOICE`) is checked here (a file chosen, within the upload
limit, text training can read) and named by its content, but written only by the page, right
before the launch (:func:`save_uploaded`), so a refused form leaves nothing on disk.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import streamlit as st
import torch

from core.devices import available_devices
from core.errors import LabError
from core.models.config import PRESETS
from core.training.config import (AMP_DTYPES, DEFAULT_EPOCHS, DEFAULT_PRESET, LIMITS, MODEL_VERSIONS,
                                  NAMED_TOKENIZERS, OBJECTIVES, OPTIMIZERS, PARALLEL_MODES, TRACKERS, TrainConfig)
from core.training.data import check_upload_text, resolve_source, save_upload, upload_name, uploads_dir
from core.training.optim import RECIPES
from core.training.runs import check_run_id

FORM_KEY = "tr_form"
SUBMIT_KEY = "tr_launch"
PATH_CHOICE = "path"
UPLOAD_CHOICE = "upload"
DATASETS = ["shakespeare", "fineweb-edu", "openwebtext", "wikitext-103", PATH_CHOICE, UPLOAD_CHOICE]
DATASET_LABELS = {
    "shakespeare": "Shakespeare (built in, offline)",
    "fineweb-edu": "FineWeb-Edu (Hugging Face)",
    "openwebtext": "OpenWebText (Hugging Face)",
    "wikitext-103": "WikiText-103 (Hugging Face)",
    PATH_CHOICE: "Local file / folder or hub id…",
    UPLOAD_CHOICE: "Upload a .txt/.jsonl file…",
}
UPLOAD_TYPES = ["txt", "jsonl"]
RUN_NAME_MAX = 100
DEFAULTS = TrainConfig()
TOKENIZER_LABELS = {"bpe": "Train our byte-level BPE", "gpt2": "GPT-2 BPE (50,257 tokens)"}
OBJECTIVE_LABELS = {"ar": "Autoregressive (next token)", "diffusion": "Masked diffusion (bidirectional)"}
# precision choice -> (TrainConfig.amp, TrainConfig.amp_dtype): full precision, or autocast to one of AMP_DTYPES
PRECISIONS = {"float32": (False, DEFAULTS.amp_dtype), **{dt: (True, dt) for dt in AMP_DTYPES}}
PRECISION_LABELS = {"float32": "float32", "bfloat16": "bfloat16 autocast", "float16": "float16 autocast + GradScaler"}
TRACKER_LABELS = {"tensorboard": "TensorBoard", "wandb": "Weights & Biases", "mlflow": "MLflow"}


def limits(name: str) -> tuple:
    """``(min_value, max_value)`` of a number widget: TrainConfig's range for that field."""
    return LIMITS[name].low, LIMITS[name].high


def key(name: str) -> str:
    """Widget key of the form field ``name`` (the TrainConfig field it fills, where there is one)."""
    return f"tr_{name}"


def preset_label(name: str) -> str:
    p = PRESETS[name]
    return f"{name} ({p['n_layer']} layers, {p['n_head']} heads, d {p['d_model']})"


def recipe_help() -> str:
    lines = [f"**{v}**: lr {r.lr:g}, betas {r.betas[0]}/{r.betas[1]}, weight decay {r.weight_decay:g}, "
             f"clip {r.grad_clip:g}, cosine to {r.min_lr_ratio:.0%} of the peak" for v, r in RECIPES.items()]
    return ("The paper recipe that fills every optimiser setting left empty (weight decay, betas, warmup, "
            "clipping, cosine floor).\n\n" + "\n\n".join(lines))


def device_options() -> list[str]:
    return [d for d in available_devices() if d != "auto"]


def device_label(device: str) -> str:
    if device == "cpu":
        return "CPU"
    try:
        return f"GPU {device.split(':')[1]} · {torch.cuda.get_device_name(device)}"
    except Exception:  # a name is decoration; the index is what matters
        return device


# -- values -> config ---------------------------------------------------------------------------

def devices_config(chosen: list[str]) -> tuple[str, list[int] | None]:
    """(TrainConfig.device, TrainConfig.devices) for the devices picked in the form."""
    if not chosen:
        raise LabError("Choose a device to train on: the CPU or one or more GPUs.")
    if "cpu" in chosen:
        if len(chosen) > 1:
            raise LabError("Choose either the CPU or GPUs, not both.")
        return "cpu", None
    idx = sorted({int(d.split(":", 1)[1]) for d in chosen})
    if len(idx) == 1:
        return f"cuda:{idx[0]}", None
    return "cuda", idx  # several GPUs: the engine runs itself under torchrun (DDP)


def upload_limit_bytes() -> int:
    """The upload limit: Streamlit's ``server.maxUploadSize`` (MB, set in .streamlit/config.toml),
    which the browser enforces, checked again here because a client need not be a browser."""
    return int(st.get_option("server.maxUploadSize")) * 2**20


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB" if n < 10 * 2**20 else f"{n / 2**20:,.0f} MB"


def upload_target(upload: Any, folder: Path) -> Path:
    """Where ``upload`` (Streamlit's UploadedFile) will be saved, after checking it is there, within
    the limit and readable as training text; writes nothing."""
    if upload is None:
        raise LabError("Choose a .txt or .jsonl file under 'Upload a dataset file', or pick another dataset.")
    limit = upload_limit_bytes()
    if int(upload.size) > limit:
        raise LabError(f"The file is {_mb(int(upload.size))}, over the {_mb(limit)} upload limit; to train on a "
                       f"bigger file, copy it to this machine, choose '{DATASET_LABELS[PATH_CHOICE]}' and enter "
                       f"its path under 'Path or dataset id'.")
    data = upload.getvalue()
    name = upload_name(upload.name, data)
    check_upload_text(name, data)
    return Path(folder) / name


def save_uploaded(upload: Any, folder: Path) -> Path:
    """Write the upload (atomically, named by its content) and return its path: the run's dataset."""
    return save_upload(upload.name, upload.getvalue(), folder, upload_limit_bytes())


def dataset_spec(choice: str, path: str) -> str:
    path = (path or "").strip()
    if choice == PATH_CHOICE:
        if not path:
            raise LabError("Enter a local .txt/.jsonl file or folder, or a Hugging Face dataset id, under "
                           "'Path or dataset id'.")
        return path
    return choice


def run_name(text: str | None) -> str | None:
    """The run name typed, checked as the engine will (None: the engine names the run)."""
    name = (text or "").strip() or None
    if name is not None:
        if len(name) > RUN_NAME_MAX:
            raise LabError(f"The run name is {len(name):,} characters long; use at most {RUN_NAME_MAX} letters, "
                           f"digits, '.', '_' and '-'.")
        check_run_id(name)
    return name


def config_from_values(v: dict[str, Any], uploads: Path | None = None) -> tuple[TrainConfig, str | None]:
    """The run the form describes and its name (None: the engine names it).

    ``v`` maps form field names (:func:`key` without the prefix) to widget values; empty optional
    fields are None and leave the preset or recipe value in place. With the upload choice the
    dataset is the path the upload will be saved to under ``uploads`` (default: the runs root's
    data folder); :func:`save_uploaded` writes it.
    """
    def opt_int(name: str) -> int | None:
        return None if v.get(name) is None else int(v[name])

    def opt_float(name: str) -> float | None:
        return None if v.get(name) is None else float(v[name])

    upload = v["dataset"] == UPLOAD_CHOICE
    if upload:
        dataset = str(upload_target(v.get("upload"), uploads_dir() if uploads is None else uploads))
    else:
        dataset = dataset_spec(v["dataset"], v.get("dataset_path", ""))
    device, devices = devices_config(list(v["devices"]))
    amp, amp_dtype = PRECISIONS[v["precision"]]
    cfg = TrainConfig(
        dataset=dataset, tokenizer=v["tokenizer"], vocab_size=int(v["vocab_size"]),
        objective=v["objective"], preset=v["preset"], n_layer=opt_int("n_layer"), n_head=opt_int("n_head"),
        d_model=opt_int("d_model"), block_size=int(v["block_size"]),
        model_version=v["model_version"], optimizer=v["optimizer"], lr=opt_float("lr"),
        weight_decay=opt_float("weight_decay"), warmup_steps=opt_int("warmup_steps"),
        batch_size=int(v["batch_size"]), grad_acc_steps=int(v["grad_acc_steps"]),
        max_steps=opt_int("max_steps"), epochs=opt_float("epochs"),
        amp=amp, amp_dtype=amp_dtype, compile=bool(v["compile"]), device=device, devices=devices,
        parallel=v.get("parallel", DEFAULTS.parallel),
        activation_checkpointing=bool(v.get("activation_checkpointing", DEFAULTS.activation_checkpointing)),
        seed=int(v["seed"]), val_every=int(v["val_every"]), preview_every=int(v["preview_every"]),
        save_every=int(v["save_every"]), keep_last=int(v["keep_last"]), log_every=int(v["log_every"]),
        log_to=list(v.get("log_to") or []))
    cfg.check()
    name = run_name(v.get("run_name"))
    if not upload:  # an upload was checked above and is written only at launch
        resolve_source(cfg.dataset)  # a missing local file fails here, not in a background process
    return cfg, name


# -- several GPUs ---------------------------------------------------------------------------------

PARALLEL_LABELS = {"auto": "auto: DDP if a replica fits", "ddp": "DDP (replicas)", "fsdp": "FSDP (sharded)"}


def preset_memory_markdown(table: dict, measured: bool) -> str:
    """:func:`core.training.memory.fits_table` as a Markdown table, with the assumptions above it."""
    gpu = f"{table['gpu_gb']:g} GB GPUs" + (" (this machine's)" if measured else " (none visible here)")
    lines = [f"For {gpu}, micro-batch {table['batch']} x {table['context']} tokens, "
             f"{'bf16 autocast' if table['amp'] else 'float32'}, AdamW:", "",
             "| preset | parameters | DDP: memory per GPU | FSDP with activation checkpointing |",
             "|---|---:|---:|---|"]
    for r in table["rows"]:
        ddp = f"{r['ddp_gb_per_gpu']:,.1f} GB" + ("" if r["ddp_fits"] else " (does not fit)")
        fsdp = "no number of GPUs" if r["fsdp_gpus"] is None else \
            f"{r['fsdp_gpus']} GPU{'s' if r['fsdp_gpus'] > 1 else ''} x {r['fsdp_gb_per_gpu']:,.1f} GB"
        lines.append(f"| {r['preset']} | {r['parameters'] / 1e6:,.0f} M | {ddp} | {fsdp} |")
    return "\n".join(lines)


def parallel_widgets(v: dict[str, Any], keep: dict) -> None:
    """Several GPUs: DDP or FSDP, activation checkpointing, and what each preset needs under both."""
    from core.training.memory import fits_table, visible_gpu_bytes

    c = st.columns([2, 2, 2])
    v["parallel"] = c[0].selectbox("Parallel", PARALLEL_MODES, index=PARALLEL_MODES.index(DEFAULTS.parallel),
                                   format_func=PARALLEL_LABELS.get, key=key("parallel"), **keep,
                                   help="With several GPUs: DDP keeps a whole replica on each; FSDP shards weights, "
                                        "gradients and optimizer state over them (sharded checkpoints). auto picks "
                                        "DDP when a replica fits a GPU, else FSDP.")
    v["activation_checkpointing"] = c[1].toggle(
        "Activation checkpointing", DEFAULTS.activation_checkpointing, key=key("activation_checkpointing"), **keep,
        help="Recompute each block's activations in the backward pass: much less memory, about a third more compute.")
    gpu = visible_gpu_bytes()
    with st.expander("Memory per preset under DDP and FSDP", icon=":material/memory:"):
        st.markdown(preset_memory_markdown(fits_table(gpu), gpu is not None))


# -- the form -----------------------------------------------------------------------------------

def launch_form() -> dict[str, Any] | None:
    """Draw the form; return its values when Launch was pressed, else None."""
    keep = dict(persist_state="session")  # values survive a visit to another page
    d = DEFAULTS
    v: dict[str, Any] = {}
    with st.form(FORM_KEY, border=False):
        st.markdown("**Model**")
        c = st.columns([3, 1, 1, 1, 1])
        v["preset"] = c[0].selectbox(
            "Preset", list(PRESETS), index=list(PRESETS).index(DEFAULT_PRESET), format_func=preset_label,
            key=key("preset"), **keep,
            help="GPT-2 and GPT-3 size tiers (gpt-training-suite.md); fill layers / heads / d_model to make "
                 f"a custom size on top of one ({DEFAULT_PRESET} is the usual start).")
        v["n_layer"] = c[1].number_input("Layers", *limits("n_layer"), None, step=1, key=key("n_layer"),
                                         placeholder="from preset", **keep)
        v["n_head"] = c[2].number_input("Heads", *limits("n_head"), None, step=1, key=key("n_head"),
                                        placeholder="from preset", **keep,
                                        help="Must divide d_model.")
        v["d_model"] = c[3].number_input("d_model", *limits("d_model"), None, step=1, key=key("d_model"),
                                         placeholder="from preset", **keep, help="Width of the residual stream.")
        v["block_size"] = c[4].number_input("Block size", *limits("block_size"), d.block_size,
                                            step=1, key=key("block_size"),
                                            **keep, help="Context length in tokens.")
        c = st.columns([2, 3])
        v["objective"] = c[0].radio("Objective", OBJECTIVES, format_func=OBJECTIVE_LABELS.get, key=key("objective"),
                                    horizontal=True, **keep,
                                    help="Masked diffusion trains a bidirectional model (MDLM-style absorbing "
                                         "masks); its validation loss is an NLL bound comparable with the "
                                         "autoregressive loss.")
        v["run_name"] = c[1].text_input("Run name", "", key=key("run_name"), placeholder="automatic", **keep,
                                        help="Folder name under the runs folder; letters, digits, '.', '_', '-'.")

        st.markdown("**Data**")
        c = st.columns([2, 3, 2, 1])
        v["dataset"] = c[0].selectbox("Dataset", DATASETS, format_func=DATASET_LABELS.get, key=key("dataset"), **keep,
                                      help="Hugging Face datasets need the hub (or its local cache); offline the "
                                           "run stops at once with a message saying so.")
        v["dataset_path"] = c[1].text_input(
            "Path or dataset id", "", key=key("dataset_path"), placeholder="/data/corpus.txt, a folder, owner/name",
            **keep, help="Used when the dataset is 'Local file / folder or hub id': a .txt/.md/.jsonl file, a folder "
                         "of them, or a hub dataset id (owner/name or owner/name:config).")
        v["tokenizer"] = c[2].selectbox("Tokenizer", NAMED_TOKENIZERS, format_func=TOKENIZER_LABELS.get,
                                        key=key("tokenizer"), **keep)
        v["vocab_size"] = c[3].number_input("Vocab size", *limits("vocab_size"), d.vocab_size,
                                            step=1, key=key("vocab_size"),
                                            **keep, help="For our BPE only.")
        limit_mb = max(1, -(-upload_limit_bytes() // 2**20))  # whole MB, rounded up, as the widget takes it
        v["upload"] = st.file_uploader(
            "Upload a dataset file", type=UPLOAD_TYPES, key=key("upload"), max_upload_size=limit_mb,
            help=f"Used when the dataset is '{DATASET_LABELS[UPLOAD_CHOICE]}': UTF-8 text, or JSON lines with a "
                 f"'text' field, up to {limit_mb} MB. Launch saves it under "
                 f"`{uploads_dir().expanduser().resolve()}` and the run trains on that copy. For a bigger file, "
                 f"enter its path on this machine as a local file instead.")

        st.markdown("**Optimisation**")
        c = st.columns(6)
        v["model_version"] = c[0].selectbox("Recipe", MODEL_VERSIONS, index=MODEL_VERSIONS.index(d.model_version),
                                            key=key("model_version"), **keep, help=recipe_help())
        v["optimizer"] = c[1].selectbox("Optimizer", OPTIMIZERS, index=OPTIMIZERS.index(d.optimizer),
                                        key=key("optimizer"), **keep,
                                        help="muon: Muon for the blocks' 2-D weights, AdamW for the rest.")
        v["lr"] = c[2].number_input("Learning rate", *limits("lr"), None, step=1e-4, format="%.2e", key=key("lr"),
                                    placeholder="from recipe", **keep, help="Peak learning rate.")
        v["weight_decay"] = c[3].number_input("Weight decay", *limits("weight_decay"), None,
                                              step=0.01, key=key("weight_decay"),
                                              placeholder="from recipe", **keep)
        v["warmup_steps"] = c[4].number_input("Warmup steps", *limits("warmup_steps"), None,
                                              step=1, key=key("warmup_steps"),
                                              placeholder="from recipe", **keep)
        v["seed"] = c[5].number_input("Seed", *limits("seed"), d.seed, step=1, key=key("seed"), **keep)
        c = st.columns(6)
        v["batch_size"] = c[0].number_input("Batch size", *limits("batch_size"), d.batch_size,
                                            step=1, key=key("batch_size"),
                                            **keep, help="Sequences per micro-batch per device.")
        v["grad_acc_steps"] = c[1].number_input("Grad accumulation", *limits("grad_acc_steps"), d.grad_acc_steps,
                                                step=1,
                                                key=key("grad_acc_steps"), **keep,
                                                help="Micro-batches per optimizer step.")
        v["max_steps"] = c[2].number_input("Max steps", *limits("max_steps"), None, step=1, key=key("max_steps"),
                                           placeholder="from epochs", **keep,
                                           help="Optimizer steps; empty: as many as the epochs need.")
        v["epochs"] = c[3].number_input("Epochs", *limits("epochs"), None, step=0.5, key=key("epochs"),
                                        placeholder=f"{DEFAULT_EPOCHS:g}", **keep, help="Used when max steps is empty.")
        v["val_every"] = c[4].number_input("Validate every", *limits("val_every"), d.val_every, step=1,
                                           key=key("val_every"), **keep, help="Steps; 0 = only at the end.")
        v["log_every"] = c[5].number_input("Log every", *limits("log_every"), d.log_every, step=1, key=key("log_every"),
                                           **keep, help="Steps between metric lines (the charts' resolution).")
        c = st.columns([1, 1, 1, 3])
        v["preview_every"] = c[0].number_input("Preview every", *limits("preview_every"), d.preview_every, step=1,
                                               key=key("preview_every"), **keep,
                                               help="Steps between sample texts; 0 = off.")
        v["save_every"] = c[1].number_input("Save every", *limits("save_every"), d.save_every,
                                            step=1, key=key("save_every"),
                                            **keep, help="Steps between checkpoints; 0 = only at the end or on stop.")
        v["keep_last"] = c[2].number_input("Keep last", *limits("keep_last"), d.keep_last,
                                           step=1, key=key("keep_last"), **keep,
                                           help="Checkpoints kept; older ones are deleted.")
        v["log_to"] = c[3].multiselect(
            "Log to", list(TRACKERS), default=d.log_to, format_func=lambda n: TRACKER_LABELS.get(n, n),
            key=key("log_to"), placeholder="metrics.jsonl only", **keep,
            help="Also send the metrics, the settings and the sample texts to these experiment trackers (files "
                 "under the run's tracking/ folder; Weights & Biases runs offline unless you have logged in "
                 "with `wandb login`). The charts here read metrics.jsonl either way.")

        st.markdown("**Hardware**")
        c = st.columns([3, 2, 1])
        options = device_options()
        v["devices"] = c[0].multiselect(
            "Devices", options, default=[options[1] if len(options) > 1 else "cpu"], format_func=device_label,
            key=key("devices"), **keep,
            help="The CPU, or GPUs by index; more than one GPU trains data-parallel under torchrun.")
        v["precision"] = c[1].selectbox("Precision", list(PRECISIONS), format_func=PRECISION_LABELS.get,
                                        key=key("precision"), **keep)
        v["compile"] = c[2].toggle("Compile", d.compile, key=key("compile"), **keep, help="torch.compile the model.")
        parallel_widgets(v, keep)
        submitted = st.form_submit_button("Launch", type="primary", key=SUBMIT_KEY, icon=":material/play_arrow:")
    return v if submitted else None
