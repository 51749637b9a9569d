"""Ranks under ``torchrun``: which process this is, the process group, barriers. Outside torchrun there is one
rank and every call here is a no-op, so single-process code paths need no special case.

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (and the rendezvous); ``init`` joins the group with
gloo on CPUs and NCCL on CUDA devices.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Ranks", "barrier", "broadcast", "current", "init", "launched"]


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
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
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
