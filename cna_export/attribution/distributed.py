"""Data-parallel attribution with torch.distributed: each rank takes a slice of the prompts, sums are all-reduced.

Launch any discover/run command with `torchrun --nproc_per_node N -m cna_export ...` (or across nodes with
`--nnodes`/`--rdzv-endpoint`). The process group uses NCCL when CUDA is available and gloo otherwise. Only rank
0 writes files. Without torchrun's environment everything here is a no-op.
"""

from __future__ import annotations

import logging
import os
from typing import TypeVar

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
T = TypeVar("T")


def local_rank() -> int:
    """This process's GPU index on its node under torchrun (`LOCAL_RANK`); 0 outside torchrun."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_env() -> bool:
    """Join the process group described by torchrun's environment; return whether running distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend)
        log.info("rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return True


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def shard(items: list[T]) -> list[T]:
    """This rank's strided slice of `items` (all of them when not distributed)."""
    return items[rank() :: dist.get_world_size()] if active() else items


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a CPU tensor over ranks (through the GPU for NCCL); returns it unchanged when not distributed."""
    if not active():
        return tensor
    work = tensor.cuda() if dist.get_backend() == "nccl" else tensor
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.cpu()


def shutdown() -> None:
    if active():
        dist.destroy_process_group()
