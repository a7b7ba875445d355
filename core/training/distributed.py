"""Data-parallel training under torchrun: process group setup and the few collectives we use.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them the run is one process and every
helper here is a no-op, so the trainer has one code path. GPUs use NCCL, the CPU uses gloo
(which is how the tests run two processes on a laptop).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..devices import resolve_device
from ..errors import LabError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce a tensor by sum (gloo has no AVG; divide by ``world`` where a mean is wanted)."""
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def any(self, flag: bool) -> bool:
        """True on every rank when any rank says True (used to stop all ranks at the same step)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1 if flag else 0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast(self, obj):
        """Rank 0's value of a small picklable object on every rank (run folder names)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device: str) -> Dist:
    """Join torchrun's process group when launched by it; else resolve ``device`` for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=resolve_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and str(device).lower() != "cpu"
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise LabError(f"torchrun started {world} processes on this machine but only {torch.cuda.device_count()} "
                           f"GPU(s) are visible; choose at most that many devices.")
        dev = f"cuda:{local_rank}"
        torch.cuda.set_device(dev)
    else:
        dev = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank=rank, world=world, local_rank=local_rank, device=dev)


def torchrun_command(train_args: list[str], nproc: int) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m core train ARGS``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "core", "train", *train_args]
