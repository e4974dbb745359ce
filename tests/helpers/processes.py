"""Real subprocesses for the tests: ``torchrun`` jobs on CPU (gloo), on a free loopback port, bounded in time."""
from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

from . import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ssd_env(checkpoint: pathlib.Path | None = None, **extra: str) -> dict[str, str]:
    """The environment of a child ``python -m ssd``: one intra-op thread, this checkout first on the path, no
    torchrun variables inherited, and ``SSD_CHECKPOINT`` when given."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    if checkpoint is not None:
        env["SSD_CHECKPOINT"] = str(checkpoint)
    env.update(extra)
    return env


def torchrun(*args: str, checkpoint: pathlib.Path | None, timeout: float = 400, env: dict[str, str] | None = None,
             launcher: tuple[str, ...] = ("-m", "ssd")) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 <launcher> <args>`` on 127.0.0.1, within ``timeout`` seconds. ``launcher`` is
    what each rank runs (``("--no-python", "sh", "-c", ...)`` for a shell command)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), *launcher, *args]
    return subprocess.run(command, cwd=REPO, env=env if env is not None else ssd_env(checkpoint),
                          capture_output=True, text=True, timeout=timeout)
