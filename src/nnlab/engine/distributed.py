"""Multi-process data-parallel helpers for runs launched by ``torchrun``.

``torchrun --nproc_per_node 2 -m nnlab train ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_from_env` reads them and joins the process group
(gloo on CPU, NCCL on GPU). Without those variables everything here is a cheap single-process no-op,
so library code can call these helpers unconditionally.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nnlab.errors import ConfigError


@dataclass
class DistInfo:
    """Where this process sits: rank in [0, world_size), local_rank on its node, its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (the process that writes metrics, checkpoints and summaries)."""
    return rank() == 0


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``auto``: ``cuda:LOCAL_RANK`` if a GPU is present, else ``cpu``. ``cuda`` without a GPU: ConfigError."""
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"unknown device {device!r}; use auto, cpu or cuda")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no GPU is visible; use --device cpu or auto")
    return torch.device(device if device.startswith("cuda:") else f"cuda:{local_rank}")


def init_from_env(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if ``WORLD_SIZE`` > 1 (idempotent) and pick this rank's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if size > 1 and not is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank(), world_size(), local, dev)


def shutdown() -> None:
    """Leave the process group (end of a torchrun job), so that it is torn down while Python is alive.

    A finished ``DistributedDataParallel`` wrapper sits in a reference cycle (its hooks point back at
    it), and its reducer keeps the process group alive after ``destroy_process_group``. Left to
    interpreter shutdown, gloo's threads then die with "terminate called without an active
    exception" (SIGABRT, seen on a loaded CI machine). So: wait for every rank, collect the cycles,
    then destroy the group, whose last reference goes with it.
    """
    if is_initialized():
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` (any shape) over ranks, in place and returned; identity on one process."""
    if is_initialized() and world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` (any shape, floating) over ranks, in place and returned."""
    if is_initialized() and world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= world_size()
    return tensor


def all_reduce_mean_flat(tensors: list[torch.Tensor]) -> None:
    """Mean of each tensor over ranks, in place, through one flat buffer (one collective call
    instead of one per tensor: gloo's latency per call is about that of a small tensor's transfer)."""
    if not tensors or not (is_initialized() and world_size() > 1):
        return
    flat = all_reduce_mean(torch.cat([t.reshape(-1) for t in tensors]))
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def agree_max(value: float) -> float:
    """The largest of every rank's ``value`` (e.g. seconds elapsed), so that decisions made from it
    (a time limit, a time-based learning-rate schedule) are the same on every rank."""
    if not (is_initialized() and world_size() > 1):
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def barrier() -> None:
    if is_initialized() and world_size() > 1:
        dist.barrier()
