"""Minimal torch.distributed helpers shared by training and evaluation.

A process started by ``torchrun`` finds ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in its environment; a plain
``python`` process has none of them and runs as rank 0 of 1 without any process group, so single-process code
pays nothing for distributed support.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["all_ok", "barrier", "cleanup", "init_from_env", "is_main", "rank", "world_size"]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}: expected an integer in the environment, got {value!r}") from None


def world_size() -> int:
    """Processes in the job: the process group's size when one is initialised, else ``WORLD_SIZE`` (or 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return _env_int("WORLD_SIZE", 1)


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0)


def is_main() -> bool:
    """True on the process that writes files and logs (rank 0)."""
    return rank() == 0


def init_from_env(device: str | torch.device | None = None) -> tuple[int, int, torch.device]:
    """Join the job described by torchrun's environment; returns ``(rank, world_size, device)``.

    A process group is created only when ``WORLD_SIZE`` > 1 (nccl when the device is CUDA, gloo otherwise), and
    only once: calling this again returns the same answer. ``device`` None means CUDA when available. With CUDA
    and several processes, each takes the GPU of its ``LOCAL_RANK``.
    """
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: expected an available device, got {str(device)!r} (CUDA is not available)")
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return 0, 1, device
    if device.type == "cuda":
        # One GPU per process: an explicit index would put every rank on the same GPU.
        device = torch.device("cuda", _env_int("LOCAL_RANK", 0))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def barrier() -> None:
    """Wait for every process (a no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_ok(ok: bool, device: torch.device | None = None) -> bool:
    """True when ``ok`` holds on every process, so that all ranks stop together instead of one waiting forever."""
    if not (dist.is_available() and dist.is_initialized()):
        return ok
    flag = torch.tensor([1 if ok else 0], device=device or "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def cleanup() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
