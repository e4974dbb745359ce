"""torch.distributed for scale-out inference: one process per device, started by ``torchrun``.

Nothing here is used unless the environment says ``WORLD_SIZE > 1`` (torchrun sets ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``); a plain ``python -m ssd ...`` never touches a process group.
The process group uses gloo for CPU work and nccl for CUDA devices. Each rank takes every ``world``-th item of a
list that all ranks build in the same order (:func:`shard`), rank 0 collects the results (:func:`gather_to_main`).

Every collective waits at most the group's timeout (:data:`DEFAULT_TIMEOUT`, 30 minutes, or ``timeout=`` of
:func:`setup`; the commands' ``--timeout MINUTES``) for the other ranks: a peer that froze, or a rank started by
hand that quit, ends the wait with a :class:`PeerTimeoutError` (or :class:`PeerLostError`) that says so, instead
of holding the others for hours. With gloo (CPU) the error is raised; NCCL's watchdog ends a process whose
collective timed out with its own message.
"""
from __future__ import annotations

import contextlib
import datetime
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "DEFAULT_TIMEOUT",
    "PeerLostError",
    "PeerTimeoutError",
    "all_gather",
    "all_ok",
    "barrier",
    "broadcast_from_main",
    "check_same",
    "check_timeout",
    "cleanup",
    "device_for_rank",
    "env_world_size",
    "gather_to_main",
    "init_from_env",
    "is_distributed",
    "is_main",
    "local_rank",
    "rank_label",
    "rank",
    "resolve_device",
    "setup",
    "shard",
    "world_size",
]

T = TypeVar("T")

# Collectives wait at most this long for the slowest rank. Long enough for the skew between shards at the final
# gather or barrier of a big run (shards differ by at most one image each); short enough that a frozen peer, or a
# rank started by hand that quit, is reported within the half hour rather than after torch's default of hours.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)
MAX_TIMEOUT = datetime.timedelta(days=7)

_OWNED = False  # whether this module created the process group (and so should destroy it)
_TIMEOUT = DEFAULT_TIMEOUT  # the group's, for messages
_TIMEOUT_NAME = "timeout"  # what the caller calls it (--timeout on the command line)


class PeerTimeoutError(TimeoutError, RuntimeError):
    """Another process did not reach a collective (or the start) within the group's timeout: it froze, quit, or is
    far slower. An ``OSError`` (so that the commands report it in one line) and a ``RuntimeError`` (what torch raises
    there, so that callers catching that still do)."""


class PeerLostError(ConnectionError, RuntimeError):
    """Another process of the job went away during a collective (it crashed or was stopped); an ``OSError`` and a
    ``RuntimeError`` as :class:`PeerTimeoutError`."""


def check_timeout(minutes: Any, name: str = "timeout") -> datetime.timedelta:
    """``minutes`` (a positive number, fractions allowed, at most a week) as a timedelta; a timedelta is checked
    the same way. Errors name the argument ``name`` (``--timeout`` for the command line)."""
    if isinstance(minutes, datetime.timedelta):
        minutes = minutes.total_seconds() / 60
    if isinstance(minutes, bool) or not isinstance(minutes, (int, float)):
        raise TypeError(f"{name}: expected a number of minutes, got {minutes!r}")
    limit = MAX_TIMEOUT.total_seconds() / 60
    if not math.isfinite(minutes) or not 0 < minutes <= limit:
        raise ValueError(f"{name}: expected minutes in (0, {limit:g}] (a week at most), got {minutes!r}")
    return datetime.timedelta(minutes=minutes)


def _describe(timeout: datetime.timedelta) -> str:
    seconds = timeout.total_seconds()
    if seconds < 120:
        return f"{seconds:g} s"
    return f"{seconds / 60:g} min"


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    """Torch's errors from a collective (gloo's "Timed out waiting ...", a closed connection) as one line that says
    what happened and what to do."""
    try:
        yield
    except RuntimeError as exc:  # DistBackendError, DistNetworkError and gloo's plain RuntimeErrors among them
        text = " ".join(str(exc).split())
        if "timed out" in text.lower() or "timeout" in text.lower():
            raise PeerTimeoutError(
                f"the other processes did not reach {what} within the timeout of {_describe(_TIMEOUT)} "
                f"({_TIMEOUT_NAME}): a peer froze or quit, or some ranks are that much slower; raise "
                f"{_TIMEOUT_NAME} if they legitimately need longer") from exc
        raise PeerLostError(f"{what} failed (another process stopped or cannot be reached): {text[:300]}") from exc


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


def rank_label() -> str:
    """``"[rank R] "`` when torchrun started several processes (from the environment, so that it works before and
    after the process group), else ``""``: the prefix of the commands' error lines."""
    if env_world_size() <= 1:
        return ""
    return f"[rank {os.environ.get('RANK', '?')}] "


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


def local_world_size() -> int | None:
    """How many processes of the job run on this node (``LOCAL_WORLD_SIZE``, which torchrun sets), if known."""
    raw = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
    return _env_int("LOCAL_WORLD_SIZE", 1, 1) if raw else None


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
    requested = None if requested == "auto" else requested
    device = device_for_rank(requested, name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{name}: expected a device this machine has, got {str(requested)!r} "
                             "(CUDA is not available here)")
        _check_gpu_share(requested, device, count, name)
        if device.index is not None and device.index >= count:
            raise ValueError(f"{name}: expected cuda:0 to cuda:{count - 1}, got {str(requested)!r}")
    return device


def _check_gpu_share(requested: Any, device: torch.device, count: int, name: str) -> None:
    """Under torchrun every process of a node needs a GPU of its own (NCCL refuses two on one): say so when there
    are more processes than GPUs, or when one explicit GPU would be shared, rather than blame the argument."""
    if env_world_size() <= 1:
        return
    local = local_world_size()
    processes = f"{local} processes" if local is not None else "several processes"
    explicit = requested is not None and torch.device(requested).index is not None
    if not explicit and local_rank() >= count:
        plural = "GPU" if count == 1 else "GPUs"
        raise ValueError(f"{name}: {processes} on this machine want a GPU each, but it has {count} {plural} "
                         f"(this process is LOCAL_RANK {local_rank()}); start at most {count} per machine "
                         f"(torchrun --nproc-per-node {count}) or use {name} cpu")
    if explicit and (local is None or local > 1):
        raise ValueError(f"{name}: {processes} on this machine would all use {device}, and NCCL needs a GPU per "
                         f"process; pass {name} cuda (each process takes cuda:LOCAL_RANK) or {name} cpu")


def init_from_env(device: torch.device | str | None = None, *,
                  timeout: datetime.timedelta | float = DEFAULT_TIMEOUT, timeout_name: str = "timeout") -> bool:
    """Join the process group torchrun described, if ``WORLD_SIZE > 1``; returns whether running distributed.

    The backend is nccl when ``device`` is a CUDA device (whose index is made current, as nccl requires), gloo
    otherwise. Every collective, the start included, waits at most ``timeout`` for the other processes (see
    :func:`check_timeout`); ``timeout_name`` is how messages name it. A group that already exists (made by the
    caller) is used as it is.
    """
    global _TIMEOUT, _TIMEOUT_NAME
    timeout = check_timeout(timeout, timeout_name)
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
    _TIMEOUT, _TIMEOUT_NAME = timeout, timeout_name
    with _collective("the start of the job"):
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
    if not is_distributed():
        return
    with _collective("a barrier"):
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` (picklable), in rank order, on rank 0; None on the others. ``[obj]`` in one process."""
    if not is_distributed():
        return [obj]
    received: list[Any] | None = [None] * world_size() if is_main() else None
    with _collective("the gathering of results"):
        dist.gather_object(obj, received, dst=0)
    return received


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank. ``[obj]`` in one process."""
    if not is_distributed():
        return [obj]
    received: list[Any] = [None] * world_size()
    with _collective("the exchange between ranks"):
        dist.all_gather_object(received, obj)
    return received


def check_same(values: Mapping[str, Any], what: str) -> None:
    """Every rank must have the same ``values`` (each picklable, compared with ==): a ValueError on every rank
    naming the first that differs and which ranks have what, so that ranks given different arguments stop before
    any work instead of losing it. Nothing happens in one process."""
    if not is_distributed():
        return
    gathered = all_gather(dict(values))
    for key in values:
        seen = [g.get(key) for g in gathered]
        if any(v != seen[0] for v in seen):
            groups: dict[str, list[int]] = {}
            for r, v in enumerate(seen):
                groups.setdefault(repr(v)[:200], []).append(r)
            shown = "; ".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}: {v}"
                              for v, rs in groups.items())
            raise ValueError(f"{what}: expected every rank to have the same {key}, got {shown}")


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (the others' arguments are ignored)."""
    if not is_distributed():
        return obj
    box = [obj if is_main() else None]
    with _collective("the sharing of results"):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def setup(device: str | torch.device | None = None, name: str = "device", *,
          timeout: datetime.timedelta | float = DEFAULT_TIMEOUT, timeout_name: str = "timeout"
          ) -> tuple[int, int, torch.device]:
    """Pick this process's device (:func:`resolve_device`) and join the job torchrun described, its collectives
    waiting at most ``timeout`` for the other processes; returns ``(rank, world_size, device)``. Errors name the
    arguments ``name`` and ``timeout_name`` (``--device`` and ``--timeout`` for the command line)."""
    device = resolve_device(device, name)
    init_from_env(device, timeout=timeout, timeout_name=timeout_name)
    return rank(), world_size(), device


def all_ok(ok: bool, device: torch.device | None = None) -> bool:
    """True when ``ok`` holds on every process, so that all ranks stop together instead of one waiting forever."""
    if not is_distributed():
        return ok
    flag = torch.tensor([1 if ok else 0], device=device or "cpu")
    with _collective("the check that every rank is ready"):
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
