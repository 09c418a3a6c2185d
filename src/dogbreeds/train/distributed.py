"""More than one process: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; we join the group.

gloo on CPU, nccl on GPUs. Rank 0 alone writes metrics, logs and checkpoints; every rank
reads resume.pt, so with several machines the run directory must be on a shared disk.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import DogbreedsError


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    if preference == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(preference)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DogbreedsError(f"device={preference!r} but this machine has no usable CUDA GPU; use --device cpu")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


def init_distributed(device_preference: str) -> DistContext:
    """Join the torchrun process group when WORLD_SIZE > 1; a plain single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank, world_size, local_rank, device)


def shutdown_distributed(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


class ShardedSampler(torch.utils.data.DistributedSampler):
    """torch's DistributedSampler that can start part-way through an epoch (resume after Ctrl-C).

    Used for one process too (num_replicas=1): the shuffled order is then the same permutation
    the ranks of a multi-process run split between them (rank r takes positions r, r+W, ...),
    so W processes with batch B/W see, step by step, the same images as one with batch B.
    """

    def __init__(self, num_samples: int, ctx: DistContext, seed: int):
        super().__init__(range(num_samples), num_replicas=ctx.world_size, rank=ctx.rank,
                         shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start
