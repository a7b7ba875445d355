"""The training loop, as a generator of progress events that also writes the run folder.

``train(cfg)`` yields :class:`RunStarted`, then :class:`StepLogged` every ``log_every`` steps
(and at validation steps, whose record carries ``val_loss``), :class:`Validated`,
:class:`Previewed`, :class:`CheckpointSaved`, and finally :class:`RunEnded`. The CLI draws a
progress bar from these; the run folder gets the same facts as files (see
:mod:`core.training.runs`).

Exact resume. Everything random in step ``s`` (dropout, diffusion masks) is drawn after
seeding from ``(seed, s, rank)``, the learning rate is a function of ``s``, and the data order
is a function of ``(seed, epoch)`` with the position saved as two integers. A checkpoint
therefore holds the weights, the optimiser (and GradScaler) state and a handful of integers,
and a resumed run retraces an uninterrupted one step for step.

Several processes. Under torchrun the model is replicated (DDP) or sharded (FSDP2, see
:mod:`core.training.parallel`); an FSDP run writes sharded checkpoints (:mod:`core.training.checkpoint`)
that resume on any number of processes, with the per-process batch set so the sequences per step,
and so the run, stay the same. A process that dies ends the others with one sentence.

Stopping. SIGTERM, SIGINT, a STOP file in the run folder, or the consumer closing the
generator all end the run at a step boundary with a checkpoint and status ``stopped``. Under
torchrun the ranks agree on the stop step (an all-reduce of the flag), so no rank is left
waiting in a collective.
"""
from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel as DDP

from ..devices import free_bytes
from ..errors import LabError, first_line, fmt_bytes, is_out_of_memory
from ..files import atomic_write, parse_json
from ..generation.autoregressive import SamplingConfig, generate
from ..generation.diffusion import DiffusionConfig, denoise, render
from ..jobs.process import process_start, this_host
from ..models.gpt import GPT
from ..models.loading import LoadedModel, save_checkpoint
from ..models.stack import stack_for
from . import runs as runs_mod
from .allocator import keep_freed_memory
from .checkpoint import SHARDS_DIR, is_sharded, load_full_into, load_sharded, save_sharded, write_model_files
from .config import DEFAULT_EPOCHS, TrainConfig
from .data import BatchSampler, TrainingData, default_cache_dir, prepare_data, validation_windows
from .distributed import Dist, ensure_group, init_distributed
from .memory import training_bytes
from .metrics import flops_per_token, gpu_memory_gb, mfu, peak_flops
from .parallel import build_sharded_gpt, check_fsdp_options, checkpoint_blocks, choose_parallel, full_value
from .objective import diffusion_loss, validation_loss_sum, validation_masks
from .optim import Hyper, build_optimizers, resolve_hyper, set_lr
from .schedules import lr_at
from .trackers import TRACKING_DIR, Trackers, open_trackers

STATE_FILE = "trainer_state.pt"
STATE_FORMAT = 1
SHARED_CACHE_PROBE = ".gptlab-shared-probe-"


# -- events -------------------------------------------------------------------------------------

@dataclass
class RunStarted:
    run_dir: str
    step: int                  # first step to run (0, or the resumed checkpoint's step)
    max_steps: int
    resumed: bool
    n_params: int
    tokens_per_step: int
    train_tokens: int
    val_tokens: int
    device: str
    world_size: int


@dataclass
class StepLogged:
    step: int
    metrics: dict              # the metrics.jsonl record


@dataclass
class Validated:
    step: int
    val_loss: float


@dataclass
class Previewed:
    step: int
    prompt: str
    text: str


@dataclass
class CheckpointSaved:
    step: int
    path: str


@dataclass
class RunEnded:
    state: str                 # finished | stopped
    step: int
    run_dir: str
    checkpoint: str | None
    reason: str | None = None
    val_loss: float | None = None


TrainEvent = Union[RunStarted, StepLogged, Validated, Previewed, CheckpointSaved, RunEnded]


def train(cfg: TrainConfig, run_dir: str | os.PathLike | None = None, *, resume: bool = False,
          root: str | os.PathLike | None = None) -> Iterator[TrainEvent]:
    """Train ``cfg`` into ``run_dir`` (default: a new folder under ``runs/``); ``resume=True``
    continues ``run_dir`` from its newest checkpoint."""
    return Trainer(cfg, run_dir, resume=resume, root=root).events()


def resume_config(run_dir: str | os.PathLike, **overrides) -> TrainConfig:
    """The run's saved config with ``overrides`` (fields left ``None`` are kept)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise LabError(f"{run_dir} holds no config.json; pass the folder of a run to resume.")
    try:
        saved = parse_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LabError(f"{path} cannot be read as JSON ({first_line(e)}); restore it to resume the run.") from None
    cfg = TrainConfig.from_dict(saved)
    for k, v in overrides.items():
        if v is not None:
            setattr(cfg, k, v)
    return cfg


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63 - 1)


def _collective_failure(e: BaseException) -> bool:
    """Whether ``e`` is a collective that failed because a peer process went away."""
    if isinstance(e, getattr(torch.distributed, "DistError", ())):
        return True
    text = str(e).lower()
    return any(w in text for w in ("gloo", "nccl", "connection closed", "connection reset", "broken pipe",
                                   "peer", "timed out", "socket"))


def _disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno == errno.ENOSPC


def free_space(folder: Path) -> int | None:
    """Bytes free on the disk holding ``folder`` (or its nearest existing parent)."""
    for p in (folder, *folder.parents):
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return None


def disk_full_error(folder: Path, run_dir: Path | None) -> LabError:
    """The one sentence for a full disk: where, how much is free, and how to go on."""
    free = free_space(folder)
    left = f" ({fmt_bytes(free)} free)" if free is not None else ""
    resume = f", then resume with `python -m core train --resume {run_dir}`" if run_dir is not None else ""
    return LabError(f"The disk is full while writing {folder}{left}; free space on that disk{resume} (checkpoints "
                    f"already saved are intact).")


def load_trainer_state(folder: str | os.PathLike, device: str | torch.device = "cpu") -> dict:
    """A checkpoint's optimiser state and counters, as resume reads them.

    ``weights_only=True`` refuses any pickled object other than tensors and plain containers, so
    a tampered or foreign file is rejected instead of run; the message names the folder to drop
    so that the checkpoint before it is used.
    """
    folder = Path(folder)
    path = folder / STATE_FILE
    fix = f"delete the folder {folder} to resume from the checkpoint before it"
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise LabError(f"Checkpoint {folder} has no {STATE_FILE} (it holds weights only); "
                       f"resume from a checkpoint under a run's checkpoints/ folder.") from None
    except Exception as e:  # UnpicklingError (a forbidden object), RuntimeError (a truncated archive), ...
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise LabError(f"Refused to read the trainer state {path}: it is not a plain tensor file "
                       f"({type(e).__name__}: {first}); {fix}.") from e
    keys = {"step", "epoch", "cursor", "tokens", "optimizers"}
    if not isinstance(state, dict) or not keys <= set(state):
        raise LabError(f"{path} is not a GPT Lab trainer state (it needs {', '.join(sorted(keys))}); {fix}.")
    return state


# -- the trainer --------------------------------------------------------------------------------

class Trainer:
    """One run: set up by :meth:`events` (distributed group, data, model, optimisers, resume), then
    the loop. State lives on the object, so benchmarks and tests can drive it step by step."""

    def __init__(self, cfg: TrainConfig, run_dir: str | os.PathLike | None, *, resume: bool = False,
                 root: str | os.PathLike | None = None):
        cfg.check()
        self.cfg = cfg
        self.resume = resume
        self.root = Path(root) if root is not None else runs_mod.runs_root()
        self.run_dir = Path(run_dir) if run_dir is not None else None
        if resume and (self.run_dir is None or not self.run_dir.is_dir()):
            raise LabError(f"Cannot resume: run folder {run_dir} does not exist.")
        if resume and self.run_dir.is_symlink():
            raise LabError(f"{self.run_dir} is a symbolic link; resume the run folder itself.")
        if not resume and self.run_dir is not None and int(os.environ.get("RANK", "0")) == 0:
            runs_mod.check_output_folder(self.run_dir)  # a fresh run never writes over a model or another run
        self.stop_reason: str | None = None
        self.step = 0
        self.tokens = 0
        self.elapsed = 0.0
        self.last_val: float | None = None
        self.last_ckpt: Path | None = None
        self.held_logged: set[int] = set()  # old checkpoints rotation keeps for their transcoder sets, logged once
        self.lock = None
        self._loss_text: str | None = None
        self.trackers = Trackers()  # --log-to: opened on rank 0 once the run is set up

    # -- setup --------------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg = self.cfg
        if self.device.type == "cpu":
            keep_freed_memory()  # activations are reused each step instead of page-faulted in anew
        self.data: TrainingData = self._data()
        tok = self.data.tokenizer
        self.mask_id = tok.mask_id if cfg.objective == "diffusion" else None
        if cfg.objective == "diffusion" and self.mask_id is None:
            raise LabError("The tokenizer has no <|mask|> token, which the diffusion objective needs.")
        gpt_config = cfg.gpt_config(tok.vocab_size, self.mask_id)
        self._choose_parallel(gpt_config)
        amp_dtype = torch.bfloat16 if cfg.amp_dtype == "bfloat16" else torch.float16
        if self.parallel == "fsdp":
            check_fsdp_options(cfg.optimizer)
            ensure_group(self.dist)
            self.raw = build_sharded_gpt(gpt_config, seed=cfg.seed, device=self.device, world=self.dist.world,
                                         param_dtype=amp_dtype if cfg.amp else None,
                                         activation_checkpointing=cfg.activation_checkpointing)
        else:
            torch.manual_seed(cfg.seed)  # same initial weights on every rank and every rerun
            self.raw = GPT(gpt_config).to(self.device)
            if cfg.activation_checkpointing:
                checkpoint_blocks(self.raw)
        self.n_params = self.raw.num_params(non_embedding=True)
        gc = self.raw.config
        self.flops_token = flops_per_token(self.n_params, gc.n_layer, gc.d_model, gc.block_size)
        self.peak = peak_flops(self.device)
        if self.resume:
            self._keep_sequences_per_step()
        self.sampler = BatchSampler(self.data.train, cfg.block_size, cfg.batch_size, seed=cfg.seed,
                                    world=self.dist.world, rank=self.dist.rank)
        self.tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_acc_steps * self.dist.world
        steps_per_epoch = max(1, self.sampler.windows_per_epoch // (self.sampler.global_batch * cfg.grad_acc_steps))
        self.max_steps = cfg.max_steps if cfg.max_steps is not None else \
            max(1, int(round((cfg.epochs or DEFAULT_EPOCHS) * steps_per_epoch)))
        self.hp: Hyper = resolve_hyper(cfg, self.max_steps, self.tokens_per_step)
        self._check_memory()
        self.optimizers = build_optimizers(self.raw, cfg.optimizer, self.hp)
        # under FSDP --amp is the mixed-precision policy the model was sharded with
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=amp_dtype)) \
            if cfg.amp and self.parallel != "fsdp" else contextlib.nullcontext
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.amp and amp_dtype == torch.float16 else None
        if self.resume:
            self._load_latest()
        self.fwd: nn.Module = torch.compile(self.raw) if cfg.compile else self.raw
        if self.dist.enabled and self.parallel == "ddp":
            self.model: nn.Module = DDP(self.fwd, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        else:
            self.model = self.fwd  # FSDP's hooks live on the sharded modules themselves
        self.params = [p for p in self.raw.parameters() if p.requires_grad]
        self._setup_validation()

    def _data(self) -> TrainingData:
        """Rank 0 builds the token cache; on other machines the first process of each machine builds
        its own copy, unless the cache folder is one every machine sees. Everyone else waits for the
        cache to appear (with a timeout that says what it waited for) and reads it."""
        cfg = self.cfg
        kw = dict(val_fraction=cfg.val_fraction, need_mask=cfg.objective == "diffusion",
                  max_tokens=cfg.max_data_tokens, cache_dir=cfg.data_cache, log=self.log)
        shared = self.dist.nodes == 1 or self._cache_shared()
        build = self.dist.main or (self.dist.local_rank == 0 and not shared)
        if self.dist.nodes > 1 and self.dist.local_rank == 0:
            self.log(f"token cache: {'shared by the nodes, built by rank 0' if shared else 'built on each node'}")
        data = prepare_data(cfg.dataset, cfg.tokenizer, cfg.vocab_size, build=build, **kw)
        m = data.meta
        self.log(f"data: {data.source_label}: {m['train_tokens']:,} train / {m['val_tokens']:,} validation tokens "
                 f"({data.tokenizer.name}; cache {data.folder})")
        return data

    def _cache_shared(self) -> bool:
        """Whether every machine sees the same token cache folder: rank 0 leaves a uniquely named
        file there and every rank looks for it (a few small collectives, once per run)."""
        cache = Path(self.cfg.data_cache).expanduser() if self.cfg.data_cache else default_cache_dir()
        name = self.dist.broadcast(f"{SHARED_CACHE_PROBE}{this_host()}-{os.getpid()}" if self.dist.main else None)
        probe = cache / name
        if self.dist.main:
            cache.mkdir(parents=True, exist_ok=True)
            probe.write_text("")
        self.dist.barrier()
        shared = not self.dist.any(not probe.exists())
        self.dist.barrier()
        if self.dist.main:
            probe.unlink(missing_ok=True)
        return shared

    def _replica_bytes(self, gpt_config, parallel: str) -> int:
        cfg = self.cfg
        return training_bytes(gpt_config.n_params, n_layer=gpt_config.n_layer, d_model=gpt_config.d_model,
                              vocab_size=gpt_config.vocab_size, batch_size=cfg.batch_size, context=cfg.block_size,
                              amp=cfg.amp, parallel=parallel, world=self.dist.world,
                              activation_checkpointing=cfg.activation_checkpointing)

    def _choose_parallel(self, gpt_config) -> None:
        """``--parallel``: as asked, or (auto) DDP when a whole replica fits a device, FSDP otherwise
        (with one process FSDP could not help, so auto stays unsharded); said in the log."""
        free = free_bytes(self.device)
        asked = self.cfg.parallel
        if asked == "auto" and self.dist.world == 1:
            self.parallel, why = "ddp", "auto: one process"
        else:
            self.parallel, why = choose_parallel(asked, self._replica_bytes(gpt_config, "ddp"), free)
        over = f" over {self.dist.world} process(es)"
        name = {"ddp": f"DDP{over}" if self.dist.enabled else "one process, unsharded",
                "fsdp": f"FSDP2, sharded{over}"}[self.parallel]
        self.log(f"parallel: {name} ({why})"
                 + (", activation checkpointing" if self.cfg.activation_checkpointing else ""))

    def _check_memory(self) -> None:
        """On a GPU, refuse a batch that cannot fit before spending minutes finding out."""
        if self.device.type != "cuda":
            return
        cfg, gc = self.cfg, self.raw.config
        need = self._replica_bytes(gc, self.parallel)
        free, _ = torch.cuda.mem_get_info(self.device)
        if need > free:
            fits = max(1, int(cfg.batch_size * free / need))
            shard = "" if self.parallel == "fsdp" else ", or --parallel fsdp over several GPUs"
            raise LabError(f"A batch of {cfg.batch_size} x {gc.block_size} tokens needs about {need / 1e9:.1f} GB on "
                           f"{self.device} but {free / 1e9:.1f} GB is free; use --batch-size {fits} with "
                           f"--grad-acc-steps {math.ceil(cfg.batch_size * cfg.grad_acc_steps / fits)}, a shorter "
                           f"--block-size, --amp, --activation-checkpointing{shard}.")

    def _setup_validation(self) -> None:
        cfg = self.cfg
        n = cfg.val_batches * cfg.batch_size * self.dist.world
        windows = validation_windows(self.data.val, cfg.block_size, n)                 # (N, T + 1), all ranks
        self.val_windows = windows[self.dist.rank::self.dist.world]
        self.val_rows = math.ceil(len(windows) / self.dist.world)  # the most any rank holds
        self.val_pad = windows[:1]  # what a rank with fewer windows runs (and does not count) under FSDP
        if cfg.objective == "diffusion" and len(windows):
            rates, masks = validation_masks(len(windows), cfg.block_size, cfg.seed)       # (N,), (N, T)
            self.val_rates = rates[self.dist.rank::self.dist.world]
            self.val_masks = masks[self.dist.rank::self.dist.world]

    # -- checkpoints --------------------------------------------------------------------------
    def _trainer_state(self) -> dict:
        """Tensors and plain containers only, so torch.load(weights_only=True) reads it back."""
        epoch, cursor = self.sampler.position
        return {"format": STATE_FORMAT, "step": self.step, "epoch": epoch, "cursor": cursor, "tokens": self.tokens,
                "elapsed": self.elapsed, "val_loss": self.last_val, "world_size": self.dist.world,
                "batch_size": self.cfg.batch_size, "grad_acc_steps": self.cfg.grad_acc_steps,
                "sequences_per_step": self.cfg.batch_size * self.cfg.grad_acc_steps * self.dist.world,
                "optimizers": [] if self.parallel == "fsdp" else [o.state_dict() for o in self.optimizers],
                "scaler": self.scaler.state_dict() if self.scaler is not None else {}}

    def save(self) -> Path | None:
        """Write checkpoints/<step>/ atomically (temp folder, then rename) and keep the last k.
        A full disk (torch reports it as a RuntimeError of its zip writer) ends the run with one
        sentence naming the folder and the free space."""
        sharded = self.parallel == "fsdp"  # every rank writes its shard; rank 0 the rest, and renames
        if not sharded and not self.dist.main:
            return None
        root = self.run_dir / "checkpoints"
        final = root / str(self.step)
        again = final == self.last_ckpt and (final.is_dir() or not self.dist.main)
        if self.dist.broadcast(again) if sharded else again:
            return final if self.dist.main else None
        tmp = root / f".tmp-{self.step}-{self.pid0}"  # the same temporary folder on every rank
        if sharded and not self.dist.main:
            self.dist.barrier()  # rank 0 has made the folder
            save_sharded(tmp, self.raw, self.optimizers)
            self.last_ckpt = final
            return None
        shutil.rmtree(tmp, ignore_errors=True)
        meta = {"training": {"run": str(self.run_dir), "step": self.step, "tokens": self.tokens,
                             "val_loss": self.last_val, "config": self.cfg.to_dict()}}
        try:
            try:
                if sharded:
                    tmp.mkdir(parents=True)
                    self.dist.barrier()
                    save_sharded(tmp, self.raw, self.optimizers)
                    write_model_files(tmp, self.raw.config, str(self.data.tokenizer_path), objective=self.cfg.objective,
                                      extra={**meta, "sharded": {"world_size": self.dist.world,
                                                                 "folder": SHARDS_DIR}})
                else:
                    save_checkpoint(tmp, self.raw, str(self.data.tokenizer_path), objective=self.cfg.objective,
                                    extra=meta)
                state = self._trainer_state()
                atomic_write(tmp / STATE_FILE, lambda p: torch.save(state, p))
            except (OSError, RuntimeError, SafetensorError) as e:
                if self._out_of_disk(e, root):
                    raise disk_full_error(root, self.run_dir) from None
                raise
            if final.exists():  # the same step saved twice (stop right after a scheduled save)
                for kept in runs_mod.checkpoint_sets(final):  # a transcoder set made meanwhile moves along
                    os.rename(kept, tmp / kept.name)
                old = root / f".old-{self.step}-{os.getpid()}"
                os.rename(final, old)
                os.rename(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # a failed save leaves no half-written folder
        self.last_ckpt = final
        doomed_steps, held = runs_mod.rotation(self.run_dir, self.cfg.keep_last)
        for s in doomed_steps:
            doomed = root / f".del-{s}-{os.getpid()}"  # hidden first: a kill mid-delete leaves no half checkpoint
            os.rename(root / str(s), doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        for s in sorted(set(held) - self.held_logged):
            self.held_logged.add(s)
            self.log(f"checkpoint {s} kept beyond --keep-last {self.cfg.keep_last}: it holds a transcoder set "
                     f"({', '.join(d.name for d in runs_mod.checkpoint_sets(root / str(s)))})")
        self.files.status(checkpoint=str(final), step=self.step)
        self.log(f"checkpoint saved: {final}")
        return final

    def _out_of_disk(self, e: BaseException, folder: Path) -> bool:
        """Whether a failed write failed for want of space: ENOSPC, or torch's and safetensors'
        own write errors while less than a checkpoint's size is free."""
        if _disk_full(e):
            return True
        free = free_space(folder)
        need = 3 * 4 * self.raw.num_params()  # float32 weights plus AdamW's two moments
        return free is not None and free < need

    def _load_latest(self) -> None:
        steps = [s for s in runs_mod.checkpoint_steps(self.run_dir)
                 if (self.run_dir / "checkpoints" / str(s) / STATE_FILE).is_file()]
        if not steps:
            self.log("no checkpoint to resume from: starting from step 0")
            self.files.truncate_after(0)
            return
        folder = self.run_dir / "checkpoints" / str(steps[-1])
        state = load_trainer_state(folder, self.device)
        if is_sharded(folder):  # any number of ranks, sharded or not, reads DCP's shards
            load_sharded(folder, self.raw, self.optimizers)
        else:
            try:
                sd = load_file(str(folder / "model.safetensors"), device=str(self.device))
            except (SafetensorError, OSError, ValueError) as e:
                raise LabError(f"The weights of checkpoint {folder} are corrupt or unreadable ({e}); delete that "
                               f"folder to resume from the checkpoint before it.") from e
            if self.raw.config.tie_weights:
                sd.setdefault("lm_head.weight", sd["transformer.wte.weight"])
            try:
                if self.parallel == "fsdp":  # a DDP or one-process checkpoint continued sharded
                    load_full_into(self.raw, self.optimizers, sd, state["optimizers"])
                else:
                    self.raw.load_state_dict(sd)
            except (RuntimeError, KeyError, ValueError) as e:
                raise LabError(f"Checkpoint {folder} does not match the run's config ({first_line(e)}); "
                               f"resume with the config it was trained with.") from None
            if self.parallel != "fsdp":
                for opt, sd_opt in zip(self.optimizers, state["optimizers"]):
                    opt.load_state_dict(sd_opt)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.elapsed, self.last_val = float(state.get("elapsed", 0.0)), state.get("val_loss")
        self.sampler.epoch, self.sampler.cursor = int(state["epoch"]), int(state["cursor"])
        self.last_ckpt = folder
        self.files.truncate_after(self.step)
        self.log(f"resumed from {folder} (step {self.step})")

    def _keep_sequences_per_step(self) -> None:
        """A run resumed on another number of processes keeps its sequences per step (and so its
        data order, schedule and loss curve): the per-process batch is set to fit."""
        steps = [s for s in runs_mod.checkpoint_steps(self.run_dir)
                 if (self.run_dir / "checkpoints" / str(s) / STATE_FILE).is_file()]
        if not steps:
            return
        state = load_trainer_state(self.run_dir / "checkpoints" / str(steps[-1]))
        cfg, world = self.cfg, self.dist.world
        saved = int(state.get("sequences_per_step") or
                    int(state.get("batch_size", cfg.batch_size)) * int(state.get("grad_acc_steps", cfg.grad_acc_steps))
                    * int(state.get("world_size", 1)))
        if saved == cfg.batch_size * cfg.grad_acc_steps * world:
            return
        if saved % (cfg.grad_acc_steps * world):
            raise LabError(f"The run took {saved} sequences per step; on {world} process(es) with --grad-acc-steps "
                           f"{cfg.grad_acc_steps} that is not a whole batch per process, so resume with a process "
                           f"count and --grad-acc-steps whose product divides {saved}.")
        cfg.batch_size = saved // (cfg.grad_acc_steps * world)
        self.files.write_config(cfg)
        self.log(f"resumed on {world} process(es): batch size {cfg.batch_size} per process keeps {saved} sequences "
                 f"per step")

    # -- one step -----------------------------------------------------------------------------
    def _seed(self, seed: int) -> None:
        """Seed this device's default generator only (torch.manual_seed visits every backend and
        costs ~20x more, which shows on small CPU models)."""
        torch.random.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.default_generators[self.device.index or 0].manual_seed(seed)

    def _loss(self, batch: torch.Tensor, model: nn.Module) -> torch.Tensor:
        if self.cfg.objective == "diffusion":
            return diffusion_loss(model, batch[:, :-1], self.mask_id, antithetic=self.cfg.antithetic_t)
        _, loss = model(batch[:, :-1], batch[:, 1:])
        return loss

    def _train_step(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        cfg = self.cfg
        lr = lr_at(self.step, base_lr=self.hp.lr, total_steps=self.max_steps, warmup_steps=self.hp.warmup_steps,
                   min_ratio=self.hp.min_lr_ratio)
        set_lr(self.optimizers, lr)
        self._seed(step_seed(cfg.seed, self.step, self.dist.rank))
        total = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_acc_steps):
            batch = self.sampler.next()
            if self.device.type == "cuda":  # pinned + async: the CPU queues the next step while the GPU works
                batch = batch.pin_memory()
            batch = batch.to(self.device, non_blocking=True)
            sync = not self.dist.enabled or micro == cfg.grad_acc_steps - 1 or self.parallel == "fsdp"
            with (contextlib.nullcontext() if sync else self.model.no_sync()), self.autocast():
                loss = self._loss(batch, self.model)
            scaled = loss / cfg.grad_acc_steps
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            total += loss.detach()
        if self.scaler is not None:
            for opt in self.optimizers:
                self.scaler.unscale_(opt)
        clip = self.hp.grad_clip if self.hp.grad_clip > 0 else float("inf")
        grad_norm = full_value(torch.nn.utils.clip_grad_norm_(self.params, clip))  # FSDP: a DTensor
        for opt in self.optimizers:
            if self.scaler is not None:
                self.scaler.step(opt)
            else:
                opt.step()
        if self.scaler is not None:
            self.scaler.update()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        return total / cfg.grad_acc_steps, grad_norm, lr

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean validation loss per token (AR: cross-entropy; diffusion: the NLL bound)."""
        if not len(self.val_windows) and not self.dist.enabled:
            return None
        self.raw.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)   # (loss sum, rows)
        B = self.cfg.batch_size
        # under FSDP every rank runs the same number of forward passes (each gathers weights with
        # the others); a rank with fewer windows runs its last batch again and does not count it
        rows = self.val_rows if self.parallel == "fsdp" else len(self.val_windows)
        diffusion = self.cfg.objective == "diffusion"
        try:
            for i in range(0, rows, B):
                if i >= len(self.val_windows):
                    with self.autocast():
                        self.fwd(self.val_pad[:, :-1].to(self.device))
                    continue
                batch = self.val_windows[i:i + B].to(self.device)
                with self.autocast():
                    total[0] += validation_loss_sum(
                        self.fwd, batch, self.cfg.objective, self.mask_id,
                        self.val_rates[i:i + B].to(self.device) if diffusion else None,
                        self.val_masks[i:i + B].to(self.device) if diffusion else None)
                total[1] += len(batch)
        finally:
            self.raw.train()
        self.dist.sum(total)
        if total[1] == 0:
            return None
        return float(total[0] / total[1])

    def preview(self) -> tuple[str, str] | None:
        """A short sample from the fixed prompt (top-k 40, fixed seed), for watching progress. Under
        FSDP every rank samples the same text (each forward gathers weights from all of them)."""
        if not self.dist.main and self.parallel != "fsdp":
            return None
        tok = self.data.tokenizer
        prompt = self.cfg.preview_prompt or self.data.default_prompt
        ids = tok.encode(prompt)[: self.cfg.block_size - 1]
        n = min(self.cfg.preview_tokens, self.cfg.block_size - len(ids))
        if not ids or n < 1:
            return None
        self.raw.eval()
        try:
            if self.cfg.objective == "diffusion":
                dcfg = DiffusionConfig(gen_length=n, steps=min(n, 32), temperature=1.0, top_k=40)
                last = None
                for last in denoise(self.raw, ids, self.mask_id, dcfg, None, seed=self.cfg.seed):
                    pass
                text = render(tok, last.ids[len(ids):], last.masked[len(ids):])
            elif self.parallel == "fsdp":
                text = tok.decode(self._sample_sharded(ids, n))
            else:
                lm = LoadedModel(spec=self.run_dir.name, model=self.raw, tokenizer=tok, stack=stack_for(self.raw),
                                 device=str(self.device), dtype=torch.float32, source=str(self.run_dir))
                res = generate(lm, prompt, SamplingConfig(max_new_tokens=n, top_k=40, seed=self.cfg.seed,
                                                           n_alternatives=0))
                text = res.completion
        finally:
            self.raw.train()
        return (prompt, text) if self.dist.main else None

    @torch.no_grad()
    def _sample_sharded(self, ids: list[int], n: int) -> list[int]:
        """Top-k 40 sampling through the sharded model's own forward (its hooks gather each block
        in turn; the layer-stack walk of :func:`generate` would bypass them), without a KV cache.
        Every rank draws the same tokens: same logits, same seeded generator."""
        g = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        x = torch.tensor([ids], device=self.device)
        out: list[int] = []
        for _ in range(n):
            with self.autocast():
                logits = self.raw(x[:, -self.cfg.block_size:])[0, -1].float()   # (V,)
            top = torch.topk(logits, min(40, logits.numel()))
            pick = top.indices[torch.multinomial(torch.softmax(top.values, -1), 1, generator=g)]
            out.append(int(pick))
            if self.data.tokenizer.eos_id is not None and out[-1] == self.data.tokenizer.eos_id:
                break
            x = torch.cat([x, pick.view(1, 1)], dim=1)
        return out

    # -- logging ------------------------------------------------------------------------------
    def log(self, line: str) -> None:
        if self.dist.main and getattr(self, "files", None) is not None:
            self.files.log(line)

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.stop_reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.stop_reason = f"{name} received"

    def _install_signals(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}
        old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            old[sig] = signal.signal(sig, self._on_signal)
        return old

    def _stop_wanted(self) -> bool:
        local = self.stop_reason is not None
        if not local and self.dist.main and self.files.stop_requested():
            self.stop_reason = "stop requested"
            local = True
        wanted = self.dist.any(local) if self.dist.enabled else local
        if wanted and self.stop_reason is None:
            self.stop_reason = "stop requested"
        return wanted

    # -- the loop -----------------------------------------------------------------------------
    def events(self) -> Iterator[TrainEvent]:
        cfg = self.cfg
        self.dist: Dist = init_distributed(cfg.device)
        self.device = torch.device(self.dist.device)
        try:
            if self.run_dir is None:
                rid = runs_mod.new_run_id(cfg, self.root) if self.dist.main else None
                self.run_dir = (self.root / self.dist.broadcast(rid)).resolve()
            self.lock = self._take_lock()
            self.pid0 = self.dist.broadcast(os.getpid())  # names the temporary checkpoint folder on every rank
        except BaseException:
            self.dist.close()
            raise
        self.files = runs_mod.RunFiles(self.run_dir, enabled=self.dist.main)
        old_handlers = self._install_signals()
        ended_together = False  # every rank got to the end of the run (see Dist.close)
        try:
            self.files.write_config(cfg)
            self.files.clear_stop()
            self.files.status("running", pid=os.getpid(), pid_start=process_start(os.getpid()),
                              host=this_host(), step=0, reason=None, fix=None,
                              last_log=[], started=runs_mod.now(), distributed=self.dist.enabled,
                              world_size=self.dist.world, objective=cfg.objective)
            self.files.events.state("running", pid=os.getpid())
            self.log(f"{'resuming' if self.resume else 'starting'} run {self.run_dir.name} on {self.device} "
                     f"(world size {self.dist.world})")
            if self.dist.main:
                for name in runs_mod.sweep_partial_checkpoints(self.run_dir):
                    self.log(f"removed a partial checkpoint left by an interrupted save: {name}")
            self._setup()
            if self.dist.main and cfg.log_to:
                self.trackers = open_trackers(cfg.log_to, self.run_dir / TRACKING_DIR, run_name=self.run_dir.name,
                                              config=cfg.to_dict(), resume_step=self.step if self.resume else None,
                                              log=self.log)
            self.files.status(max_steps=self.max_steps, step=self.step)
            self.files.events.progress("train", self.step, self.max_steps, force=True)
            self.log(f"model: {self.raw.num_params():,} parameters ({self.n_params:,} without position embeddings), "
                     f"{self.raw.config.n_layer} layers, d_model {self.raw.config.d_model}, "
                     f"context {self.raw.config.block_size}, {cfg.objective}")
            self.log(f"optimisation: {cfg.optimizer}, {self.hp}, {self.tokens_per_step:,} tokens per step, "
                     f"{self.max_steps} steps")
            yield RunStarted(run_dir=str(self.run_dir), step=self.step, max_steps=self.max_steps, resumed=self.resume,
                             n_params=self.raw.num_params(), tokens_per_step=self.tokens_per_step,
                             train_tokens=self.data.train.n_tokens, val_tokens=self.data.val.n_tokens,
                             device=str(self.device), world_size=self.dist.world)
            yield from self._loop()
            state = "stopped" if self.stop_reason else "finished"
            if state == "finished" and cfg.ckpt_name and (self.dist.main or self.parallel == "fsdp"):
                self._export(cfg.ckpt_name)
            self.files.status(state, step=self.step, reason=self.stop_reason, val_loss=self.last_val)
            self.files.events.state(state, step=self.step)
            self.log(f"run {state} at step {self.step}" + (f" ({self.stop_reason})" if self.stop_reason else ""))
            ended_together = True
            yield RunEnded(state=state, step=self.step, run_dir=str(self.run_dir),
                           checkpoint=str(self.last_ckpt) if self.last_ckpt else None, reason=self.stop_reason,
                           val_loss=self.last_val)
        except (torch.OutOfMemoryError, RuntimeError) as e:  # a step, validation, a preview or the model itself
            if not is_out_of_memory(e) and self.dist.enabled and _collective_failure(e):
                err = self._peer_lost_error(e)
                self._fail(err)
                raise err from None
            if not is_out_of_memory(e):
                self._fail(e)
                raise
            err = self._oom_error()
            self._fail(err)
            raise err from None
        except GeneratorExit:  # the consumer stopped iterating: keep the work done so far
            if getattr(self, "optimizers", None) is not None and self.step > 0:
                self.save()
            self.files.status("stopped", step=self.step, reason="stopped by its consumer")
            self.files.events.state("stopped", step=self.step)
            self.log(f"run stopped at step {self.step} (stopped by its consumer)")
            raise
        except OSError as e:
            if not _disk_full(e):
                self._fail(e)
                raise
            err = disk_full_error(Path(e.filename).parent if e.filename else self.run_dir, self.run_dir)
            self._fail(err)
            raise err from None
        except BaseException as e:
            self._fail(e)
            raise
        finally:
            self.trackers.close(self.files.fields.get("state") or "failed")
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            self.dist.close(ended_together)
            if self.lock is not None:
                self.lock.release()

    def _take_lock(self):
        """Become the run's one writer (see :mod:`core.training.runs`). Under torchrun the ranks
        do not lock: the ``train`` command that started torchrun holds the lock for all of them."""
        if not self.dist.main or self.dist.enabled:
            return None
        lock = runs_mod.lock_run(self.run_dir)
        if not self.resume:
            try:  # again, now that no one else can write it: another run may have just finished there
                runs_mod.check_output_folder(self.run_dir)
            except LabError:
                lock.release()
                raise
        return lock

    def _oom_error(self) -> LabError:
        """What to change after running out of memory: halve the micro-batch and raise the
        accumulation (about the same sequences per optimizer step), shorten the context, or autocast.
        The first of these also travels as data (``fix``), for a page to offer it as one click."""
        cfg = self.cfg
        B, G, T = cfg.batch_size, cfg.grad_acc_steps, cfg.block_size
        fixes = []
        fix: dict = {} if cfg.amp else {"amp": True}
        if B > 1:
            b, g = B // 2, math.ceil(B * G / (B // 2))
            fix = {"batch_size": b, "grad_acc_steps": g}
            same = "the same" if b * g == B * G else f"{b * g} instead of"
            fixes.append(f"--batch-size {b} with --grad-acc-steps {g} ({same} {B * G} sequences per step)")
        fixes.append(f"a shorter --block-size (now {T})")
        if not cfg.amp:
            fixes.append("--amp")
        choices = ", ".join(fixes[:-1]) + (", or " if len(fixes) > 1 else "") + fixes[-1]
        saved = runs_mod.checkpoint_steps(self.run_dir) if self.dist.main else []
        kept = f"; the checkpoints saved so far are kept (last: step {saved[-1]})" if saved else ""
        return LabError(f"{self.device} ran out of memory after {self.step} steps with micro-batches of {B} x {T} "
                        f"tokens; use {choices}{kept}.", fix=fix)

    def _peer_lost_error(self, e: BaseException) -> LabError:
        """One sentence for a collective that failed because another process of the run is gone
        (killed, crashed, or its machine lost): what happened, what is kept, how to go on."""
        saved = runs_mod.checkpoint_steps(self.run_dir) if self.dist.main else []
        kept = f"its last checkpoint (step {saved[-1]}) is kept" if saved else "no checkpoint had been saved yet"
        self.log(f"a collective failed: {first_line(e)}")
        return LabError(f"Another process of this {self.dist.world}-process run stopped (killed, crashed or "
                        f"unreachable) at step {self.step}, so this one cannot go on; {kept}: resume with "
                        f"`python -m core train --resume {self.run_dir}` on the same or another number of "
                        f"processes.")

    def _fail(self, e: BaseException) -> None:
        """Record a failure in status.json (reason, and a LabError's fix as data) and events.jsonl."""
        if isinstance(e, KeyboardInterrupt):
            reason = "Interrupted (a second Ctrl-C) before a checkpoint could be written."
        elif isinstance(e, LabError):
            reason = str(e)
        else:
            reason = f"{type(e).__name__}: {first_line(e)}"
        fix = e.fix if isinstance(e, LabError) and e.fix else None
        try:
            if not isinstance(e, (LabError, KeyboardInterrupt)):
                self.log("".join(traceback.format_exception(type(e), e, e.__traceback__)))
            self.log(f"run failed: {reason}")
            if not isinstance(e, KeyboardInterrupt):
                self.files.events.error(e)
            self.files.events.state("failed", step=self.step)
            self.files.status("failed", step=self.step, reason=reason, fix=fix,
                              last_log=runs_mod.log_tail(self.run_dir, 20))
        except OSError:
            pass  # the disk may be full: the exception itself still reaches the caller

    def _loop(self) -> Iterator[TrainEvent]:
        cfg = self.cfg
        pending: list[torch.Tensor] = []
        t_last, paused, tokens_last = time.perf_counter(), 0.0, self.tokens
        self.raw.train()
        while self.step < self.max_steps:
            if self._stop_wanted():
                break
            loss, grad_norm, lr = self._train_step()
            self.step += 1
            self.tokens += self.tokens_per_step
            self.files.events.progress("train", self.step, self.max_steps, text=self._loss_text)
            pending.append(loss)
            last = self.step == self.max_steps
            do_val = (cfg.val_every and self.step % cfg.val_every == 0) or last
            if self.step % cfg.log_every == 0 or do_val or last:
                train_loss = float(self.dist.sum(torch.stack(pending).mean().detach().clone()) / self.dist.world)
                pending.clear()
                if not math.isfinite(train_loss):
                    raise LabError(f"The training loss became {train_loss} at step {self.step}; lower --lr"
                                   + (", or use --amp-dtype bfloat16" if self.scaler is not None else "")
                                   + " and start again (earlier checkpoints are kept).")
                now = time.perf_counter()
                span = max(1e-9, now - t_last - paused)  # training wall time of this interval (after the sync)
                self.elapsed += span
                tps = (self.tokens - tokens_last) / span
                gn = float(grad_norm)  # inf on a float16 step the GradScaler skips: written as null
                record = {"step": self.step, "tokens": self.tokens, "epoch": round(self.sampler.epoch_progress, 4),
                          "train_loss": train_loss, "lr": lr, "grad_norm": gn if math.isfinite(gn) else None,
                          "tokens_per_s": tps,
                          "mfu": mfu(tps, self.flops_token, self.peak, self.dist.world),
                          "gpu_mem_gb": gpu_memory_gb(self.device), "time": round(self.elapsed, 3)}
                t_last, paused, tokens_last = now, 0.0, self.tokens
                val_event = None
                if do_val:
                    t0 = time.perf_counter()
                    v = self.validate()
                    paused += time.perf_counter() - t0
                    if v is not None:
                        self.last_val = record["val_loss"] = v
                        val_event = Validated(step=self.step, val_loss=v)
                        self.log(f"step {self.step}: validation loss {v:.4f}")
                self.files.metric(record)
                self.trackers.metrics(record)
                self._loss_text = f"loss {train_loss:.4f}"
                self.log(f"step {self.step}/{self.max_steps} | loss {train_loss:.4f} | lr {lr:.2e} | "
                         f"grad {gn:.3f} | {tps:,.0f} tok/s")
                self.files.status(step=self.step, train_loss=train_loss, val_loss=self.last_val, tokens=self.tokens,
                                  force=do_val)
                yield StepLogged(step=self.step, metrics=record)
                if val_event is not None:
                    yield val_event
            if cfg.preview_every and self.step % cfg.preview_every == 0:
                t0 = time.perf_counter()
                out = self.preview()
                paused += time.perf_counter() - t0
                if out is not None:
                    self.files.preview({"step": self.step, "prompt": out[0], "text": out[1]})
                    self.trackers.preview(self.step, out[0], out[1])
                    self.log(f"step {self.step}: sample: {out[0]}{out[1]}")
                    yield Previewed(step=self.step, prompt=out[0], text=out[1])
            if (cfg.save_every and self.step % cfg.save_every == 0) or last:
                t0 = time.perf_counter()
                path = self.save()
                paused += time.perf_counter() - t0
                if path is not None:
                    yield CheckpointSaved(step=self.step, path=str(path))
        if self.stop_reason and self.step > 0:
            path = self.save()
            if path is not None:
                yield CheckpointSaved(step=self.step, path=str(path))

    def _export(self, name: str) -> None:
        """``--ckpt-name``: the final model, weights only, as ``<run>/<name>/`` (a model spec)."""
        stem = Path(name).stem
        folder = self.run_dir / stem
        tmp = self.run_dir / f".tmp-{stem}-{os.getpid()}"
        model = self.raw
        if self.parallel == "fsdp":  # gathered whole on rank 0's CPU: a one-file model is what was asked for
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(self.raw, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if not self.dist.main:
                return
            with torch.device("meta"):
                model = GPT(self.raw.config)
            model.load_state_dict(full, assign=True)
        shutil.rmtree(tmp, ignore_errors=True)
        save_checkpoint(tmp, model, str(self.data.tokenizer_path), objective=self.cfg.objective,
                        extra={"training": {"run": str(self.run_dir), "step": self.step, "val_loss": self.last_val}})
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(tmp, folder)
        self.log(f"final model exported: {folder}")
