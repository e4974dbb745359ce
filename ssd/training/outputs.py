"""The output folder of a training run: held by one run at a time, swept of what killed runs left, written so that
a full disk, Ctrl-C or a kill never leaves a damaged ``last.pt``, and a ``metrics.jsonl`` without repeats.

* :class:`RunFolder` takes an exclusive lock on the folder (``flock`` on the folder itself, released by the kernel
  when the process dies), so a second run into the same folder is refused while the first lives. Holding it, the
  temporary files of earlier runs (``.last.pt.*.tmp``, ``.best.pt.*.tmp``: a run killed while saving) cannot
  belong to a live writer and are removed at once; where the file system has no locks, only those older than
  :data:`STALE_TEMPORARY_S` are, as the download cache sweeps its ``.part`` files (:func:`ssd.io.files.sweep_stale`).
* :func:`save_checkpoint` writes through a temporary file renamed into place (:func:`ssd.io.files.atomic_path`): a
  failed write (a full disk) raises :class:`RunOutputError`, one line saying the disk may be full, and leaves the
  previous file as it was.
* :func:`deferred_interrupt` holds Ctrl-C (SIGINT) back while the end-of-epoch files are written, then raises it:
  the files on disk always describe one finished epoch.
* :func:`trim_metrics` drops the lines a killed run wrote after its last saved epoch, so that a resumed run's
  ``metrics.jsonl`` never repeats an iteration or an epoch.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import pathlib
import shutil
import signal
import threading
from collections.abc import Iterator
from typing import Any

import torch

from ..io.files import STALE_TEMPORARY_S, atomic_open, atomic_path, sweep_stale

__all__ = ["STALE_TEMPORARY_S", "TEMPORARY_PATTERNS", "RunFolder", "RunOutputError", "deferred_interrupt",
           "save_checkpoint", "trim_metrics", "write_metrics"]

# What atomic_path names the temporaries of last.pt and best.pt.
TEMPORARY_PATTERNS = (".last.pt.*.tmp", ".best.pt.*.tmp")


class RunOutputError(OSError):
    """An output file of the run could not be written; the message is one line naming it."""


class RunFolder:
    """The output folder of one run, created and held (see the module docstring) between :meth:`open` and
    :meth:`close`. ``locked`` says whether the lock could be taken (False on file systems without locks)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = pathlib.Path(path)
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None
        self.locked = False

    def open(self) -> list[pathlib.Path]:
        """Create the folder, lock it, and remove the temporaries of killed runs; returns the paths removed.

        Raises:
            RunOutputError: the folder cannot be created, or another live run holds it.
        """
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunOutputError(f"out_dir {str(self.path)!r}: cannot create the folder ({exc.strerror or exc})") \
                from None
        self._lock()
        return sweep_stale(self.path, TEMPORARY_PATTERNS, 0.0 if self.locked else STALE_TEMPORARY_S)

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, the age rule alone decides what is stale
            return
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunOutputError(f"out_dir {str(self.path)!r}: another ssd train is writing to this folder; "
                                     "wait for it to finish or use another folder") from None
            return  # a file system without flock (some network mounts)
        info = os.fstat(fd)
        self._fd, self._identity, self.locked = fd, (info.st_dev, info.st_ino), True

    def forget_in_child(self) -> None:
        """For a forked DataLoader worker: close the inherited descriptor, so that only this process holds the lock
        (a lock shared with workers would outlive a killed run by as long as they take to notice). A worker started
        otherwise (spawn) inherited nothing: a descriptor of that number there is another file, and stays open."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            info = os.fstat(self._fd)
            if (info.st_dev, info.st_ino) == self._identity:
                os.close(self._fd)
        self._fd = None

    def close(self) -> None:
        if self._fd is None:
            return
        import fcntl

        with contextlib.suppress(OSError):
            fcntl.flock(self._fd, fcntl.LOCK_UN)  # released for every copy of the descriptor, workers' included
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd, self.locked = None, False


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return " ".join(str(exc).split())[:160] or type(exc).__name__


def _free_space(folder: pathlib.Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "free space unknown"
    return f"{free / 2**20:,.1f} MiB free there"


def save_checkpoint(obj: object, path: pathlib.Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically; a failed write raises :class:`RunOutputError` (one line: the
    file, the reason, that the disk may be full, and that the previous file is unchanged)."""
    try:
        with atomic_path(path) as tmp:
            torch.save(obj, tmp)
    except OSError as exc:
        raise _write_error(path, exc) from None
    except RuntimeError as exc:
        # torch's zip writer reports a failed write as a C++ error ("PytorchStreamWriter failed writing file ...:
        # file write failed"); anything else is not about the disk.
        if "write" not in str(exc).lower():
            raise
        raise _write_error(path, exc) from None


def _write_error(path: pathlib.Path, exc: BaseException) -> RunOutputError:
    disk = ("the disk is full" if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
            else "the disk may be full")
    kept = (f"the previous {path.name} is unchanged" if path.exists() else f"no {path.name} was written")
    return RunOutputError(f"{path}: could not write the checkpoint ({_why(exc)}): {disk} "
                          f"({_free_space(path.parent)}); {kept}")


def write_metrics(path: pathlib.Path, record: dict[str, Any]) -> None:
    """Append ``record`` to ``metrics.jsonl`` as one line of strict JSON (non-finite numbers become null), synced
    to disk; a failed write raises :class:`RunOutputError`."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    line = json.dumps(clean, allow_nan=False) + "\n"
    try:
        with open(path, "a", encoding="utf-8") as fp:
            fp.write(line)
            fp.flush()
            os.fsync(fp.fileno())
    except OSError as exc:
        raise RunOutputError(f"{path}: could not append to the metrics ({_why(exc)}); the disk may be full "
                             f"({_free_space(path.parent)})") from None


def trim_metrics(path: pathlib.Path, last_epoch: int) -> int:
    """Drop the records of epochs after ``last_epoch`` (what a killed run wrote after its last ``last.pt``: its
    iterations, and its start if it was itself a resumed run), so that the resumed run continues the file without
    repeating an iteration; returns how many lines were dropped. Lines that are not JSON records (a torn last line)
    go too."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return 0
    except (OSError, UnicodeDecodeError) as exc:
        raise RunOutputError(f"{path}: cannot read the metrics of the run to resume ({_why(exc)})") from None
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        epoch = record.get("epoch")
        # Every record names its epoch; a "start" after the last saved epoch is a killed attempt's, whose place the
        # resumed run's own start takes.
        if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch > last_epoch:
            continue
        kept.append(line)
    if len(kept) == len(lines):
        return 0
    try:
        with atomic_open(path, "w", encoding="utf-8") as out:
            out.write("".join(line + "\n" for line in kept))
    except OSError as exc:
        raise RunOutputError(f"{path}: could not rewrite the metrics ({_why(exc)})") from None
    return len(lines) - len(kept)


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold SIGINT (Ctrl-C) back inside the block and deliver it when the block ends, so that a checkpoint being
    written is finished first. Only in the main thread (signal handlers live there); elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def remember(signum: int, frame: Any) -> None:
        received.append(signum)

    previous = signal.signal(signal.SIGINT, remember)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        if callable(previous):
            previous(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt here
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), signal.SIGINT)
