"""Ranks under ``torchrun``: which process this is, the process group, barriers, sums, and the command channel
by which rank 0 leads the others. Outside torchrun there is one rank and every call here is a no-op, so
single-process code paths need no special case.

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (and the rendezvous); ``init`` joins the group with
gloo on CPUs and NCCL on CUDA devices.

Pipeline commands (``run``, ``finetune``, ``tune``, ``evaluate``) run on rank 0; the other ranks wait in
``receive`` for what rank 0 ``announce``s (an extraction, a training job, the end) and join only those
collective parts. Their wait can span rank 0's single-process stages (tuning heads, evaluation, the report),
hence the group's long ``TIMEOUT``; a rank that dies still ends the job at once, because torchrun stops every
rank when one fails.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["TIMEOUT", "Ranks", "all_sum", "announce", "barrier", "broadcast", "current", "gather", "init",
           "launched", "receive"]

TIMEOUT = timedelta(hours=24)  # how long a collective (a follower's wait for rank 0 included) may take


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def __str__(self) -> str:
        return f"rank {self.rank}/{self.world}"


def launched() -> bool:
    """Whether this process was started by torchrun with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> Ranks:
    """Join torchrun's process group (once): gloo for the CPU, NCCL for CUDA."""
    if launched() and not dist.is_initialized():
        if device.type == "cuda":  # one GPU per rank on each machine (not tested here: no GPU)
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # torchrun's agent keeps one store across elastic restarts (``--max-restarts``), and the dead attempt's
        # keys (its ranks' addresses) stay in it: a restarted group that read them would dial dead sockets
        # ("Gloo connectFullMesh failed ... Connection refused", seen here). Each start of the group keys under
        # its own prefix: the how-many-th start of this rank, counted in that store. Every rank of a start counts
        # the same (all ranks restart together); TORCHELASTIC_RESTART_COUNT would not do, as each node's agent
        # counts only its own failures.
        store, rank, world = next(dist.rendezvous("env://", timeout=TIMEOUT))
        start = store.add(f"dogbench.starts.rank{rank}", 1)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT,
                                store=dist.PrefixStore(f"dogbench.start{start}", store), rank=rank,
                                world_size=world)
    return current()


def current() -> Ranks:
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return Ranks()


def broadcast(values: list) -> list:
    """Rank 0's ``values`` (picklable) on every rank; ``values`` itself with one rank."""
    if current().world > 1:
        dist.broadcast_object_list(values, src=0)
    return values


def barrier() -> None:
    if current().world > 1:
        dist.barrier()


def gather(value: Any) -> list:
    """Every rank's ``value`` (picklable), in rank order, on every rank; ``[value]`` with one rank."""
    if current().world == 1:
        return [value]
    out: list = [None] * current().world
    dist.all_gather_object(out, value)
    return out


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over the ranks (in place, returned); on the tensor's device (CUDA under NCCL)."""
    if current().world > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def announce(kind: str, payload: Any = None) -> None:
    """Rank 0 tells the waiting ranks what comes next (``kind`` and a picklable payload); no-op with one rank."""
    if current().world > 1:
        dist.broadcast_object_list([kind, payload], src=0)


def receive() -> tuple[str, Any]:
    """On a rank other than 0: the next ``announce`` of rank 0."""
    message: list = [None, None]
    dist.broadcast_object_list(message, src=0)
    return message[0], message[1]
