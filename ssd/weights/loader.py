"""The one safe loader: every ``torch.load`` of the library happens here, on untrusted files.

Before ``torch.load`` sees a file, it must be a regular file (not a FIFO or a device, which would block or never
end), and its zip directory is read to refuse archives that would unpack to far more than any checkpoint (zip
bombs); a legacy (non-zip) file is bounded by its size. It is then loaded with ``weights_only=True`` onto the CPU,
so nothing in it runs: a file that needs code to unpickle is refused. Every failure is one
:class:`InvalidCheckpointError` line naming the file.
"""
from __future__ import annotations

import collections.abc
import os
import pathlib
import pickle
import stat
import struct
import zipfile

import torch

from ..copies import error_bases

__all__ = ["MAX_COMPRESSION_RATIO", "MAX_UNPACKED_BYTES", "MAX_ZIP_ENTRIES", "InvalidCheckpointError", "load_file"]

# What a checkpoint may unpack to: about 4x the largest published one (NVIDIA's amp training checkpoint with its
# optimizer state, under 400 MB). torch.load allocates every zip entry's declared size, so this bounds its memory.
MAX_UNPACKED_BYTES = 1536 * 2**20
# torch.save stores its entries uncompressed; a compressed entry is someone else's doing, and float weights barely
# compress, so an entry inflating more than this is refused as a bomb (small entries are exempt).
MAX_COMPRESSION_RATIO = 100
_RATIO_EXEMPT_BYTES = 1 << 20
# A training checkpoint has a few thousand entries at most (one per tensor storage); a directory of millions would
# cost gigabytes just to list, so its size is checked from the end record before it is read.
MAX_ZIP_ENTRIES = 10_000
_DIRECTORY_BYTES_PER_ENTRY = 300  # torch's entry names are short: "archive/data/123"
_ZIP_MAGIC = b"PK\x03\x04"
# What torch.load raises on damaged bytes (found by truncating and flipping bytes of real files): a corrupt legacy
# file trips torch's internal asserts and struct unpacking, not only its RuntimeErrors.
_CORRUPT_FILE_ERRORS = (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError,
                        AssertionError, NotImplementedError, MemoryError, struct.error, zipfile.BadZipFile)
# torch 2.6 taught the safe loader (object, "old.module.name") aliases; torch 2.5 (the floor) takes bare objects.
_ALIASES_SUPPORTED = torch.__version__ >= (2, 6)


class InvalidCheckpointError(*error_bases("weights.loader.InvalidCheckpointError", ValueError)):
    """A file was found but is not a loadable checkpoint (corrupt, unsafe, of another model, or inconsistent)."""


def load_file(path: str | os.PathLike[str], *, extra_globals: collections.abc.Iterable = (),
              max_unpacked_bytes: int | None = None, name: str | None = None) -> object:
    """The object stored in a checkpoint file, loaded with ``torch.load(weights_only=True)`` onto the CPU.

    Args:
        path: the file.
        extra_globals: plain-data classes to accept beyond tensors, Python's containers and ``Counter`` (in
            NVIDIA's training files), such as the numpy scalars of mmdetection's meta; or ``(class, "module.name")``
            pairs for a class that files name otherwise (skipped on torch 2.5, which cannot take them).
        max_unpacked_bytes: what the file may unpack to (default :data:`MAX_UNPACKED_BYTES`).
        name: what to call the file in errors (a URL for a download's temporary file); default ``path``.

    Raises:
        FileNotFoundError, IsADirectoryError: ``path`` is missing or a folder.
        InvalidCheckpointError: not a regular file, too large, damaged, or needing code to unpickle.
    """
    limit = MAX_UNPACKED_BYTES if max_unpacked_bytes is None else max_unpacked_bytes
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise ValueError(f"max_unpacked_bytes: expected a positive number of bytes, got {limit!r}")
    path = pathlib.Path(path)
    name = str(path) if name is None else name
    _check_regular_file(path, name)
    check_archive(path, name, limit)
    allowed = [collections.Counter, *extra_globals]
    if not _ALIASES_SUPPORTED:
        allowed = [g for g in allowed if not isinstance(g, tuple)]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        details = _unpickler_reason(exc)
        if "global" in details.lower():
            raise InvalidCheckpointError(
                f"checkpoint {name!r} was refused: it needs code to unpickle (not only tensors and plain "
                f"data), so it was not loaded and nothing in it ran ({details})"
            ) from None
        raise InvalidCheckpointError(
            f"checkpoint {name!r} is not a readable PyTorch checkpoint: the safe loader rejected it ({details})"
        ) from None
    except _CORRUPT_FILE_ERRORS as exc:
        raise InvalidCheckpointError(
            f"checkpoint {name!r} is not a readable PyTorch checkpoint ({type(exc).__name__}: {_first_line(exc)})"
        ) from None


def _check_regular_file(path: pathlib.Path, name: str) -> None:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {name!r}: no such file") from None
    except OSError as exc:
        raise InvalidCheckpointError(f"checkpoint {name!r} cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"checkpoint {name!r}: expected a file, got a directory")
    if not stat.S_ISREG(mode):
        # A FIFO would block the read forever and a device (/dev/zero) never end: neither is opened.
        raise InvalidCheckpointError(f"checkpoint {name!r}: expected a regular file, got a FIFO, socket or device")


def check_archive(path: pathlib.Path, name: str, max_unpacked_bytes: int) -> None:
    """Refuse a file that would make ``torch.load`` allocate far more than any checkpoint.

    ``torch.load`` allocates each zip entry's declared uncompressed size, so those are summed from the zip's
    directory (nothing is decompressed); a legacy (non-zip) file is bounded by its size on disk.
    """
    size = path.stat().st_size
    if size > max_unpacked_bytes:
        raise InvalidCheckpointError(
            f"checkpoint {name!r} was refused: the file is {size} bytes, over the {max_unpacked_bytes}-byte limit "
            f"for a checkpoint (MAX_UNPACKED_BYTES); no SSD checkpoint is this large"
        )
    with open(path, "rb") as fp:
        magic = fp.read(4)
    if magic != _ZIP_MAGIC:  # torch.load's own test for its zip format: anything else is read as a legacy file
        return
    declared = _declared_directory(path)
    if declared is not None:
        count, directory_bytes = declared
        if count > MAX_ZIP_ENTRIES or directory_bytes > MAX_ZIP_ENTRIES * _DIRECTORY_BYTES_PER_ENTRY:
            raise InvalidCheckpointError(
                f"checkpoint {name!r} was refused: its zip directory declares {count} entries in {directory_bytes} "
                f"bytes, over the limit of {MAX_ZIP_ENTRIES} entries (MAX_ZIP_ENTRIES); it was not read"
            )
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, struct.error) as exc:
        raise InvalidCheckpointError(
            f"checkpoint {name!r} is not a readable PyTorch checkpoint: its zip directory is damaged ({exc})"
        ) from None
    if len(entries) > MAX_ZIP_ENTRIES:
        raise InvalidCheckpointError(
            f"checkpoint {name!r} was refused: it has {len(entries)} zip entries, over the limit of {MAX_ZIP_ENTRIES}"
        )
    total = sum(entry.file_size for entry in entries)
    if total > max_unpacked_bytes:
        raise InvalidCheckpointError(
            f"checkpoint {name!r} was refused: its zip entries would unpack to {total} bytes, over the "
            f"{max_unpacked_bytes}-byte limit (MAX_UNPACKED_BYTES); it was not loaded (a possible zip bomb)"
        )
    for entry in entries:
        if (entry.compress_type != zipfile.ZIP_STORED and entry.file_size > _RATIO_EXEMPT_BYTES
                and entry.file_size > MAX_COMPRESSION_RATIO * max(entry.compress_size, 1)):
            raise InvalidCheckpointError(
                f"checkpoint {name!r} was refused: zip entry {entry.filename!r} inflates {entry.compress_size} "
                f"bytes to {entry.file_size}, a ratio over {MAX_COMPRESSION_RATIO} that no weights reach "
                f"(a possible zip bomb); it was not loaded"
            )


def _declared_directory(path: pathlib.Path) -> tuple[int, int] | None:
    """``(entry count, directory bytes)`` from the zip's end record, read without reading the directory itself.

    zipfile's own end-record reader (it handles zip64) is private API; without it, the count is checked after
    the directory is read instead.
    """
    end_record = getattr(zipfile, "_EndRecData", None)
    if end_record is None:
        return None
    try:
        with open(path, "rb") as fp:
            record = end_record(fp)
        if not record:
            return None
        return int(record[zipfile._ECD_ENTRIES_TOTAL]), int(record[zipfile._ECD_SIZE])
    except (OSError, ValueError, TypeError, IndexError, AttributeError, EOFError, struct.error, zipfile.BadZipFile):
        return None


def _unpickler_reason(exc: BaseException) -> str:
    # torch's message is long advice about weights_only=False, which is exactly what must not be done here;
    # keep only the line that says what the unpickler met.
    for line in str(exc).splitlines():
        if "WeightsUnpickler error" in line:
            return line.strip().split("Please use", 1)[0].strip() or "unsupported content"
    return "unsupported content"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ("the file ends early" if isinstance(exc, EOFError) else "no details")
    # Whatever torch says, never pass on its advice to load with weights_only=False.
    return "unsupported content" if "weights_only" in line else line
