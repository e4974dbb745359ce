"""torch.distributed for scale-out inference: one process per device, started by ``torchrun``.

Nothing here is used unless the environment says ``WORLD_SIZE > 1`` (torchrun sets ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``); a plain ``python -m ssd ...`` never touches a process group.
The process group uses gloo for CPU work and nccl for CUDA devices. Each rank takes every ``world``-th item of a
list that all ranks build in the same order (:func:`shard`), rank 0 collects the results (:func:`gather_to_main`).
"""
from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "all_ok",
    "barrier",
    "broadcast_from_main",
    "cleanup",
    "device_for_rank",
    "env_world_size",
    "gather_to_main",
    "init_from_env",
    "is_distributed",
    "is_main",
    "local_rank",
    "rank",
    "resolve_device",
    "setup",
    "shard",
    "world_size",
]

T = TypeVar("T")

# Collectives wait at most this long for the slowest rank. The final gather or barrier of a long run waits out
# the whole skew between shards, which can exceed the default 30 minutes on millions of images; a crashed peer
# does not make anyone wait this long under torchrun, whose agent stops every process when one fails.
DEFAULT_TIMEOUT = datetime.timedelta(hours=6)

_OWNED = False  # whether this module created the process group (and so should destroy it)


def _env_int(name: str, default: int, low: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}: expected an integer environment variable, got {raw!r}") from None
    if value < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {raw!r}")
    return value


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset), whether or not a process group exists yet."""
    return _env_int("WORLD_SIZE", 1, 1)


def is_distributed() -> bool:
    """Whether a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's index on its node (``LOCAL_RANK``), which picks its GPU."""
    return _env_int("LOCAL_RANK", 0, 0)


def is_main() -> bool:
    return rank() == 0


def device_for_rank(requested: str | torch.device | None = None, name: str = "device") -> torch.device:
    """The device this process should use: ``requested`` as given, except that a bare ``cuda`` (or nothing, with
    CUDA available) means ``cuda:LOCAL_RANK`` when several processes share the node's GPUs. Errors name the
    argument ``name`` (``--device`` for the command line)."""
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{name}: expected cpu, cuda or cuda:N, got {requested!r} ({exc})") from None
    if device.type == "cuda" and device.index is None and env_world_size() > 1:
        device = torch.device("cuda", local_rank())
    return device


def resolve_device(requested: str | torch.device | None = None, name: str = "device") -> torch.device:
    """The device to run on, checked: :func:`device_for_rank` (``None`` or ``"auto"``: CUDA when available), and
    a CUDA device must exist on this machine. Every device argument (``--device``, ``device=``) goes through here,
    so that all of them accept and refuse the same values with the same messages, naming the argument ``name``."""
    device = device_for_rank(None if requested == "auto" else requested, name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{name}: expected a device this machine has, got {str(requested)!r} "
                             "(CUDA is not available here)")
        if device.index is not None and device.index >= count:
            raise ValueError(f"{name}: expected cuda:0 to cuda:{count - 1}, got {str(requested)!r}")
    return device


def init_from_env(device: torch.device | str | None = None, *,
                  timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> bool:
    """Join the process group torchrun described, if ``WORLD_SIZE > 1``; returns whether running distributed.

    The backend is nccl when ``device`` is a CUDA device (whose index is made current, as nccl requires), gloo
    otherwise. A group that already exists (made by the caller) is used as it is.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if env_world_size() <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE: expected 1 on this build of torch (no torch.distributed), got "
                           f"{env_world_size()}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    backend = "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "nccl"
    dist.init_process_group(backend=backend, timeout=timeout)
    global _OWNED
    _OWNED = True
    return True


def cleanup() -> None:
    """Leave the process group if :func:`init_from_env` created it (a caller's own group is left alone)."""
    global _OWNED
    if _OWNED and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED = False


def shard(items: Sequence[T], rank_: int | None = None, world: int | None = None) -> list[T]:
    """This rank's share of ``items``: ``items[rank::world]``, so shards differ in size by at most one and
    interleave (neighbouring items, often similar in cost, spread over all ranks)."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    if not 0 <= rank_ < world:
        raise ValueError(f"rank: expected an integer in [0, {world}), got {rank_}")
    return list(items[rank_::world])


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` (picklable), in rank order, on rank 0; None on the others. ``[obj]`` in one process."""
    if not is_distributed():
        return [obj]
    received: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, received, dst=0)
    return received


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (the others' arguments are ignored)."""
    if not is_distributed():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def setup(device: str | torch.device | None = None, name: str = "device") -> tuple[int, int, torch.device]:
    """Pick this process's device (:func:`resolve_device`) and join the job torchrun described; returns
    ``(rank, world_size, device)``. Errors name the argument ``name``."""
    device = resolve_device(device, name)
    init_from_env(device)
    return rank(), world_size(), device


def all_ok(ok: bool, device: torch.device | None = None) -> bool:
    """True when ``ok`` holds on every process, so that all ranks stop together instead of one waiting forever."""
    if not is_distributed():
        return ok
    flag = torch.tensor([1 if ok else 0], device=device or "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
