"""Rank, world size, barrier, broadcast: the collective helpers any layer may use.

Plain `torch.distributed`, no DeepSpeed: the data pipeline and the monitors run the same with
or without a process group (single process: rank 0 of 1, collectives are identities). Creating
and tearing down the process group is the trainer's business (`ava.train.distributed`).
"""

from __future__ import annotations

import os
from typing import Any, List

import torch
import torch.distributed as torch_dist


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    """This process's rank on its node (the launcher's LOCAL_RANK): the device index, and who
    prepares node-local files."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def env_rank() -> int:
    """The global rank the launcher assigned (readable before any process group exists)."""
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def barrier() -> None:
    if world_size() > 1:
        torch_dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` from rank `src` on every rank (identity without a process group)."""
    if world_size() == 1:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> List[Any]:
    """`obj` of every rank, in rank order, on every rank (`[obj]` without a process group)."""
    if world_size() == 1:
        return [obj]
    out: List[Any] = [None] * world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place SUM across ranks (gloo has no AVG); returns `tensor`."""
    if world_size() > 1:
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor
