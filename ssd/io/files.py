"""Writing result files: atomically (never half a file under the final name) and readable by others."""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

__all__ = ["UniqueNames", "atomic_open", "atomic_path", "file_mode", "sweep_stale", "write_figure", "write_json"]

_umask: int | None = None
_umask_lock = threading.Lock()


def _current_umask() -> int:
    global _umask
    with _umask_lock:
        if _umask is None:
            # Linux shows the umask in /proc; elsewhere os.umask is the only way to read it, and it has to set it
            # to read it, so that briefly changes it for every thread: done once per process, under a lock.
            try:
                with open("/proc/self/status") as status:
                    line = next(x for x in status if x.startswith("Umask:"))
                _umask = int(line.split()[1], 8)
            except (OSError, StopIteration, ValueError, IndexError):
                _umask = os.umask(0o022)
                os.umask(_umask)
        return _umask


def file_mode() -> int:
    """The mode ``open()`` would give a new file (0o666 less the umask): 0o644 under the usual umask 022."""
    return 0o666 & ~_current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[pathlib.Path]:
    """A temporary file name beside ``path``, for writers that want a name (``torch.save``, ``onnx.save``); when the
    block succeeds the file is renamed to ``path``.

    The file gets the mode a plain ``open()`` would have given it: ``mkstemp`` creates it 0600 (private), and a
    writer that truncates an existing file keeps that, which would leave results unreadable to other users. On any
    error, KeyboardInterrupt included, the temporary file is removed and ``path`` is left as it was.
    """
    path = pathlib.Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = pathlib.Path(name)
    try:
        yield tmp
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# Without a lock or a process id to prove that no writer is alive, a temporary file this old is taken for a killed
# run's: an hour, far longer than any one file takes to write (checkpoints, pictures, downloads' .part files).
STALE_TEMPORARY_S = 3600.0


def sweep_stale(folder: str | os.PathLike[str], patterns: Iterable[str], max_age_s: float, *,
                folders: bool = False, dead: Callable[[pathlib.Path], bool] | None = None) -> list[pathlib.Path]:
    """Remove the temporary files that killed writers left in ``folder``: regular files matching one of the glob
    ``patterns`` last modified more than ``max_age_s`` seconds ago (0: all of them, for a caller that knows no
    writer is alive). Younger ones are left alone, since another process may be writing them right now, unless
    ``dead(path)`` says that the writer named in it has gone (a process id in the name). With ``folders``, matching
    folders (temporary directories) are removed the same way, with what they hold; symbolic links never are. An
    entry that cannot be removed is skipped (the caller's work goes on). Returns the paths removed.
    """
    folder = pathlib.Path(folder)
    cutoff = time.time() - max_age_s
    removed = []
    for pattern in patterns:
        try:
            candidates = list(folder.glob(pattern))
        except OSError:
            continue
        for path in candidates:
            with contextlib.suppress(OSError):  # gone already, or not ours to remove
                if path.is_symlink() or not (path.is_file() or (folders and path.is_dir())):
                    continue
                if max_age_s <= 0 or path.stat().st_mtime < cutoff or (dead is not None and dead(path)):
                    if path.is_dir():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
                    removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on success it is renamed to ``path`` (see
    :func:`atomic_path`). ``encoding`` is for text mode ``"w"`` only, as with ``open()``."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode: expected 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding) as out:
        yield out


def write_json(path: str | os.PathLike[str], payload: Any, indent: int | None = 2) -> None:
    """Write ``payload`` as JSON to ``path`` atomically (see :func:`atomic_open`).

    NaN and Infinity are refused with a ValueError: they are not JSON, and other readers of the file would choke.
    """
    with atomic_open(path, "w") as out:
        json.dump(payload, out, indent=indent, allow_nan=False)


def write_figure(figure: Any, path: str | os.PathLike[str], dpi: int = 100) -> None:
    """Save a matplotlib ``Figure`` as PNG to ``path`` atomically (see :func:`atomic_open`): a viewer refreshing the
    file while a run redraws it never sees half a picture."""
    with atomic_open(path, "wb") as out:
        figure.savefig(out, format="png", dpi=dpi)


class UniqueNames:
    """Hands out relative output paths, adding ``-2``, ``-3``... to the stem when a path is already taken.

    Comparison ignores case, so that two results never overwrite each other on case-insensitive file systems
    (macOS, Windows) either. Thread-safe.
    """

    def __init__(self) -> None:
        self._taken: set[str] = set()
        self._lock = threading.Lock()

    def claim(self, relative: pathlib.PurePath) -> pathlib.PurePath:
        with self._lock:
            candidate, n = relative, 1
            while candidate.as_posix().casefold() in self._taken:
                n += 1
                candidate = relative.with_name(f"{relative.stem}-{n}{relative.suffix}")
            self._taken.add(candidate.as_posix().casefold())
            return candidate
