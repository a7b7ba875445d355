"""Training under torchrun: process group setup, the few collectives we use, and the launch command.

torchrun (or Slurm's srun running torchrun) sets RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE;
without them the run is one process and every helper here is a no-op, so the trainer has one code
path. GPUs use NCCL, the CPU uses gloo (which is how the tests run two processes on a laptop). An
FSDP run in a single process still gets a process group of one (FSDP shards over a device mesh).

Several machines: ``python -m core train --nnodes N --node-rank R --rdzv-endpoint HOST:PORT`` on
each machine becomes torchrun with a static rendezvous at HOST:PORT (node R of N, the endpoint
being node 0), so every node runs the same command but its rank.
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
    local_world: int = 1            # processes on this machine
    own_group: bool = False         # a one-process group made here (FSDP alone), destroyed on close

    @property
    def nodes(self) -> int:
        return max(1, self.world // max(1, self.local_world))

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

    def close(self, ended_together: bool = False) -> None:
        """Leave the process group. After a run every rank ended (``ended_together``), first wait
        for the others: a rank that tore its gloo connections down while a peer was still finishing
        its last collective now and then killed that peer with SIGABRT ("terminate called without
        an active exception") although the run had succeeded. After a failure nobody waits: a
        barrier with a dead or stuck peer would hang until the group's timeout."""
        if not ((self.enabled or self.own_group) and dist.is_initialized()):
            return
        if ended_together and self.enabled:
            try:
                dist.barrier()
            except Exception:  # a peer gone at the very end: leaving the group is all that is left to do
                pass
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
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return Dist(rank=rank, world=world, local_rank=local_rank, device=dev, local_world=local_world)


def ensure_group(d: Dist) -> None:
    """A process group for FSDP in a single process (torchrun's workers have one already)."""
    if dist.is_initialized():
        return
    if d.device.startswith("cuda:"):
        torch.cuda.set_device(d.device)
    dist.init_process_group("nccl" if d.device.startswith("cuda") else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1)
    d.own_group = True


def torchrun_command(train_args: list[str], nproc: int, *, nnodes: int = 1, node_rank: int = 0,
                     endpoint: str | None = None) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m core train ARGS`` on one
    machine; across ``nnodes`` machines a static rendezvous at ``endpoint`` (node 0's HOST:PORT)."""
    if nnodes <= 1:
        where = ["--standalone"]
    else:
        host, port = split_endpoint(endpoint)
        where = [f"--nnodes={nnodes}", f"--node-rank={node_rank}", f"--master-addr={host}", f"--master-port={port}"]
    return [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc-per-node={nproc}",
            "-m", "core", "train", *train_args]


def split_endpoint(endpoint: str | None) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for an IPv6 address) as ``(host, port)``, or one sentence."""
    text = (endpoint or "").strip()
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LabError(f"--rdzv-endpoint must be HOST:PORT of node 0, reachable from every node, such as "
                       f"node0.cluster:29500 (got {text or 'nothing'}).")
    return host, int(port)
