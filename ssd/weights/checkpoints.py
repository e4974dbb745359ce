"""NVIDIA's published SSD300 checkpoints: where they are, how they are cached, and how they are loaded safely.

Checkpoints are untrusted files. Before ``torch.load`` sees one, its zip directory is read to refuse archives that
would unpack to far more than any SSD300 checkpoint (zip bombs); it is then loaded with ``weights_only=True`` onto
the CPU, and every tensor must hold finite floating-point weights (BatchNorm's ``num_batches_tracked`` may be an
integer). Downloads go through :mod:`ssd.io.http`'s one download policy into a temporary file beside their cache
entry that is renamed into place only after it loads and fits the model.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import os
import pathlib
import pickle
import re
import struct
import tempfile
import time
import urllib.parse
import urllib.request
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from ..io import http
from ..io.http import DownloadError, DownloadPolicy

ENV_VAR = "SSD_CHECKPOINT"
# (connect, read) seconds: a dead server fails fast, a slow one may still send a 100+ MB file.
DOWNLOAD_TIMEOUT = (10.0, 60.0)
# Far above any real SSD300 checkpoint (about 90-180 MB); stops an endless body from filling the disk. Counted on
# the raw bytes received and on the decoded bytes written.
MAX_CHECKPOINT_BYTES = 2 * 2**30
# A checkpoint is 100+ MB, so no short deadline fits every link; a download averaging less than this after its
# first 30 s (100 MB would take over half an hour) is taken as a stalled or trickling server, headers included.
MIN_BYTES_PER_SECOND = 50_000
MIN_RATE_GRACE_S = 30.0
# The overall bound on one request; the minimum rate above ends a hopeless download long before it.
DOWNLOAD_DEADLINE_S = 4 * 3600.0
# What a checkpoint may unpack to: about 4x the largest published one (the amp training checkpoint with its
# optimizer state, under 400 MB). torch.load allocates every zip entry's declared size, so this bounds its memory.
MAX_UNPACKED_BYTES = 1536 * 2**20
# torch.save stores its entries uncompressed; a compressed entry is someone else's doing, and float weights barely
# compress, so an entry inflating more than this is refused as a bomb (small entries are exempt).
MAX_COMPRESSION_RATIO = 100
_RATIO_EXEMPT_BYTES = 1 << 20
# An SSD300 training checkpoint has under a thousand entries (one per tensor storage); a directory of millions
# would cost gigabytes just to list, so its size is checked from the end record before it is read.
MAX_ZIP_ENTRIES = 10_000
_DIRECTORY_BYTES_PER_ENTRY = 300  # torch's entry names are short: "archive/data/123"
# A ``.part`` file this old belongs to a download that was killed; it is removed the next time the cache is used.
STALE_PART_S = 3600.0
# Cache names of URL downloads keep this much of the URL's last path segment (for people reading the folder).
_NAME_KEEP = 64
_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
_ZIP_MAGIC = b"PK\x03\x04"
# What torch.load raises on damaged bytes (found by truncating and flipping bytes of real files): a corrupt legacy
# file trips torch's internal asserts and struct unpacking, not only its RuntimeErrors.
_CORRUPT_FILE_ERRORS = (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError,
                        AssertionError, NotImplementedError, struct.error, zipfile.BadZipFile)


@dataclass(frozen=True)
class CheckpointVariant:
    """One published checkpoint: the name users pick it by, its file name in the cache, and where to fetch it."""

    name: str
    file_name: str
    urls: tuple[str, ...]


_NGC = "https://api.ngc.nvidia.com/v2/models/nvidia"
VARIANTS: dict[str, CheckpointVariant] = {
    v.name: v
    for v in (
        CheckpointVariant(
            "fp32",
            "nvidia_ssdpyt_fp32_190826.pt",
            (f"{_NGC}/ssdpyt_fp32/versions/2/files/nvidia_ssdpyt_fp32_190826.pt",),
        ),
        CheckpointVariant(
            "fp16",
            "nvidia_ssdpyt_fp16_190826.pt",
            (f"{_NGC}/ssd_pyt_ckpt_amp/versions/19.09.0/files/nvidia_ssdpyt_fp16_190826.pt",),
        ),
        CheckpointVariant(
            "amp",
            "nvidia_ssdpyt_amp_200703.pt",
            (
                f"{_NGC}/ssd_pyt_ckpt_amp/versions/20.06.0/files/nvidia_ssdpyt_amp_200703.pt",
                f"{_NGC}/dle/ssd__pyt_ckpt/versions/20.06.0_amp/files/nvidia_ssdpyt_amp_200703.pt",
            ),
        ),
    )
}
# NVIDIA has moved its files several times; the newest upload is the one most likely to still answer.
FALLBACK_VARIANT = "amp"


class CheckpointUnavailableError(DownloadError):
    """No checkpoint could be fetched or found (offline, moved files, broken downloads, an unusable cache).

    A :class:`~ssd.io.http.DownloadError` (so an ``OSError``) with ``url``, ``reason`` and ``detail`` attributes.
    Besides the download reasons, ``reason`` may be ``'invalid_checkpoint'`` (what came back is not a checkpoint
    that fits the model), ``'cache'`` (the cache folder cannot be written) or ``'unavailable'`` (every URL of a
    published variant failed: ``failures`` holds one error per URL tried, ``url`` is ``None``).
    """

    def __init__(self, url: str | None, reason: str, detail: str, *, status: int | None = None,
                 message: str | None = None, failures: tuple[DownloadError, ...] = ()) -> None:
        if message is None:
            message = f"could not download checkpoint {url}: {detail}. {_local_file_hint()}"
        super().__init__(url, reason, detail, status=status, message=message)
        self.failures = failures


class InvalidCheckpointError(ValueError):
    """A file was found but is not a loadable SSD300 checkpoint (corrupt, unsafe, or of another model)."""


def cache_dir() -> pathlib.Path:
    """``torch.hub.get_dir()/checkpoints``: where downloaded checkpoints are kept."""
    return pathlib.Path(torch.hub.get_dir()) / "checkpoints"


def is_url(source: str | os.PathLike) -> bool:
    """Whether ``source`` is an http(s) URL (the kind that is downloaded and cached)."""
    return isinstance(source, str) and source.lower().startswith(("http://", "https://"))


def url_cache_name(url: str) -> str:
    """The cache file name of a URL download: ``url-<sha256(url)[:16]>-<last path segment>``.

    Keyed by the whole URL, so two URLs ending in the same file name never share an entry, and a URL can never
    land on a published checkpoint's name (which would stand in for that variant). The readable tail is made safe
    for any file system and shortened, so very long URLs work too.
    """
    segment = urllib.parse.unquote(urllib.parse.urlparse(url).path.rstrip("/").rsplit("/", 1)[-1])
    segment = re.sub(r"[^A-Za-z0-9._-]", "_", segment).lstrip(".")
    if not segment:
        raise ValueError(f"checkpoint URL: expected a URL whose path ends in a file name, got {url!r}")
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
    # Keep the end of the name: that is where the extension is.
    return f"url-{digest}-{segment[-_NAME_KEEP:]}"


def checkpoint_policy() -> DownloadPolicy:
    """The download policy of checkpoints, from this module's constants (read at call time, so they can be tuned)."""
    connect, read = DOWNLOAD_TIMEOUT
    return DownloadPolicy(connect_timeout=connect, read_timeout=read, deadline=DOWNLOAD_DEADLINE_S,
                          max_bytes=MAX_CHECKPOINT_BYTES, min_rate=MIN_BYTES_PER_SECOND,
                          min_rate_grace=MIN_RATE_GRACE_S, refuse_html=True)


def _local_file_hint() -> str:
    return (
        f"To use a checkpoint you already have, pass checkpoint='/path/to/file.pt' or set the environment "
        f"variable {ENV_VAR}=/path/to/file.pt (a file saved by NVIDIA's training or a plain state dict)."
    )


# ---------------------------------------------------------------------------------------------------------------
# Reading a checkpoint file


# torch 2.6 taught the safe loader (object, "old.module.name") aliases; torch 2.5 takes bare objects only.
_ALIASES_SUPPORTED = torch.__version__ >= (2, 6)


def _torch_load(path: pathlib.Path, extra_globals: tuple = ()):
    # NVIDIA's training checkpoints carry a MultiStepLR state whose milestones are a Counter: plain data.
    allow = getattr(torch.serialization, "safe_globals", None)
    if not _ALIASES_SUPPORTED:
        extra_globals = tuple(g for g in extra_globals if not isinstance(g, tuple))
    ctx = allow([collections.Counter, *extra_globals]) if allow is not None else contextlib.nullcontext()
    with ctx:
        return torch.load(path, map_location="cpu", weights_only=True)


def strip_distributed_prefix(key: str) -> str:
    """Drop the ``module.`` (or ``module.1.``) prefix that DistributedDataParallel-wrapped saves carry."""
    for prefix in ("module.1.", "module."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def check_archive(path: pathlib.Path, name: str, max_unpacked_bytes: int) -> None:
    """Refuse a file that would make ``torch.load`` allocate far more than any SSD300 checkpoint.

    ``torch.load`` allocates each zip entry's declared uncompressed size, so those are summed from the zip's
    directory (nothing is decompressed); a legacy (non-zip) file is bounded by its size on disk.
    """
    size = path.stat().st_size
    if size > max_unpacked_bytes:
        raise InvalidCheckpointError(
            f"checkpoint {name!r} was refused: the file is {size} bytes, over the {max_unpacked_bytes}-byte limit "
            f"for a checkpoint (MAX_UNPACKED_BYTES); no SSD300 checkpoint is this large"
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


def read_state_dict(path: str | os.PathLike, *, max_unpacked_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """Load a checkpoint file safely and return the model's state dict.

    Accepts NVIDIA's training checkpoints (a dict with ``model`` beside ``optimizer``, ``epoch`` ...) and bare
    state dicts, with or without DistributedDataParallel prefixes. Nothing in the file is executed: a file
    that needs code to unpickle is refused. ``max_unpacked_bytes`` (default :data:`MAX_UNPACKED_BYTES`) bounds
    what the file may unpack to.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        InvalidCheckpointError: the file is not a safe, readable checkpoint holding a state dict of finite
            floating-point weights.
    """
    path = _existing_file(path)
    return _read_state_dict(path, str(path), max_unpacked_bytes)


def load_checkpoint_object(path: str | os.PathLike, extra_globals: tuple = (), *,
                           max_unpacked_bytes: int | None = None) -> object:
    """The object stored in a checkpoint file, loaded with ``torch.load(weights_only=True)`` onto the CPU, after
    the same size checks as :func:`read_state_dict`.

    ``extra_globals``: more plain-data classes to accept (other families' checkpoints carry their own), or
    ``(class, "module.name")`` pairs for a class that files name otherwise (skipped before torch 2.6, which cannot
    take them); anything else that needs code to unpickle is refused before it runs.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        InvalidCheckpointError: the file is not a safe, readable PyTorch checkpoint.
    """
    path = _existing_file(path)
    return _load_object(path, str(path), max_unpacked_bytes, extra_globals)


def _existing_file(path: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(path)
    if not path.is_file():
        if path.exists():
            raise IsADirectoryError(f"checkpoint {str(path)!r}: expected a file, got a directory")
        raise FileNotFoundError(f"checkpoint {str(path)!r}: no such file")
    return path


def _read_state_dict(path: pathlib.Path, name: str, max_unpacked_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """:func:`read_state_dict` whose messages call the file ``name`` (a URL for a download's temporary file)."""
    return extract_state_dict(_load_object(path, name, max_unpacked_bytes), name)


def _load_object(path: pathlib.Path, name: str, max_unpacked_bytes: int | None = None,
                 extra_globals: tuple = ()) -> object:
    limit = MAX_UNPACKED_BYTES if max_unpacked_bytes is None else max_unpacked_bytes
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise ValueError(f"max_unpacked_bytes: expected a positive number of bytes, got {limit!r}")
    check_archive(path, name, limit)
    try:
        obj = _torch_load(path, tuple(extra_globals))
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
    return obj


def _unpickler_reason(exc: BaseException) -> str:
    # torch's message is long advice about weights_only=False, which is exactly what must not be done here;
    # keep only the line that says what the unpickler met.
    for line in str(exc).splitlines():
        if "WeightsUnpickler error" in line:
            return line.strip().split("Please use", 1)[0].strip() or "unsupported content"
    return "unsupported content"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _check_tensor(key: str, value: torch.Tensor, source: str) -> None:
    """Refuse a tensor that cannot be model weights: no data, the wrong kind of numbers, or NaN/infinity."""
    if value.device.type == "meta":
        raise InvalidCheckpointError(
            f"checkpoint {source!r}: key {key!r} is a meta tensor (a shape without data), not weights"
        )
    if value.layout != torch.strided:
        raise InvalidCheckpointError(f"checkpoint {source!r}: key {key!r}: expected a dense tensor, got {value.layout}")
    # BatchNorm's step counter is the one integer entry; a state dict converted wholesale with .half() turns it
    # into a float, which loads the same, so it is exempt from the dtype rule (not from the finiteness one).
    counter = key.rsplit(".", 1)[-1] == "num_batches_tracked"
    if not value.is_floating_point() and not counter:
        raise InvalidCheckpointError(
            f"checkpoint {source!r}: key {key!r}: expected floating-point weights, got {value.dtype}"
        )
    if not value.is_floating_point():
        return
    finite = torch.isfinite(value)
    if not bool(finite.all()):
        bad = int(finite.numel() - finite.sum())
        raise InvalidCheckpointError(
            f"checkpoint {source!r}: key {key!r}: expected finite weights, got {bad} NaN or infinite value(s)"
        )


def extract_state_dict(obj: object, source: str) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint object: ``obj['model']`` when present, else ``obj`` itself.

    Keys lose their DistributedDataParallel prefix; every tensor is checked (see :func:`read_state_dict`).
    """
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not obj:
        raise InvalidCheckpointError(
            f"checkpoint {source!r}: expected a state dict or a dict with a 'model' state dict, "
            f"got {type(obj).__name__}"
        )
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise InvalidCheckpointError(
            f"checkpoint {source!r}: expected a state dict of tensors, got non-tensor entries such as {bad[:3]!r}"
        )
    state: dict[str, torch.Tensor] = {}
    original: dict[str, str] = {}
    for key, value in obj.items():
        stripped = strip_distributed_prefix(key)
        if stripped in state:
            # Both a wrapped and an unwrapped copy of one weight: loading either would silently drop the other.
            raise InvalidCheckpointError(
                f"checkpoint {source!r}: keys {original[stripped]!r} and {key!r} both name {stripped!r}; "
                f"refusing to guess which one to load"
            )
        _check_tensor(key, value, source)
        state[stripped] = value
        original[stripped] = key
    return state


def check_fits(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise :class:`InvalidCheckpointError` naming ``source`` and the keys unless ``state_dict`` fits ``model``
    exactly (same keys, same shapes). Works on a model built on the ``meta`` device."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [
        f"{k}: expected {tuple(expected[k].shape)}, got {tuple(state_dict[k].shape)}"
        for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shapes", wrong_shape)):
            if items:
                more = f" (+{len(items) - 8} more)" if len(items) > 8 else ""
                parts.append(f"{label}: {', '.join(items[:8])}{more}")
        raise InvalidCheckpointError(
            f"checkpoint {source!r} does not fit SSD300 (ResNet-50): " + "; ".join(parts)
        )


def load_into(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, *,
              assign: bool = False) -> None:
    """``model.load_state_dict(state_dict, strict=True)`` with an error that names the file and the keys.

    ``assign=True`` adopts the tensors instead of copying into the model's (for a model built on ``meta``).
    """
    check_fits(model, state_dict, source)
    model.load_state_dict(state_dict, strict=True, assign=assign)


# ---------------------------------------------------------------------------------------------------------------
# The cache and downloading

Validator = Callable[[Mapping[str, torch.Tensor], str], None]


def _cache_error(folder: pathlib.Path, url: str | None, exc: OSError) -> CheckpointUnavailableError:
    why = exc.strerror or type(exc).__name__
    detail = (f"the checkpoint cache {str(folder)!r} cannot be written ({why}). Point TORCH_HOME at a writable "
              f"folder (or call torch.hub.set_dir), or pass checkpoint='/path/to/file.pt'")
    return CheckpointUnavailableError(url, "cache", detail, message=f"{'checkpoint ' + url + ': ' if url else ''}"
                                                                      f"{detail} or set {ENV_VAR}.")


def _sweep_stale_parts(folder: pathlib.Path) -> None:
    """Remove ``.part`` files left by downloads that were killed (older than :data:`STALE_PART_S`).

    Recent ones are left alone: another process may be writing them right now.
    """
    cutoff = time.time() - STALE_PART_S
    try:
        candidates = list(folder.glob("*.part"))
    except OSError:
        return
    for part in candidates:
        with contextlib.suppress(OSError):  # gone already, or not ours to remove: the download goes on anyway
            if part.is_file() and part.stat().st_mtime < cutoff:
                part.unlink()


def _read_cached(path: pathlib.Path) -> dict[str, torch.Tensor]:
    try:
        return read_state_dict(path)
    except InvalidCheckpointError as exc:
        raise InvalidCheckpointError(
            f"{exc}. The cached file looks damaged: delete {str(path)!r} or pass force_download=True to fetch it "
            f"again"
        ) from None


def download(url: str, destination: str | os.PathLike, *, progress: bool = True, policy: DownloadPolicy | None = None,
             validate: Validator | None = None, timeout: tuple[float, float] | None = None,
             reader: Callable[[pathlib.Path], dict[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
    """Fetch ``url`` into ``destination`` under ``policy`` (default :func:`checkpoint_policy`) and return its state
    dict.

    The body streams into a temporary ``.part`` file in the destination's folder, which becomes ``destination``
    only after it loads as a checkpoint and passes ``validate(state_dict, url)`` (which raises
    :class:`InvalidCheckpointError` for weights that do not fit); on any failure nothing is left behind.
    ``timeout=(connect, read)`` (the former argument) overrides the policy's two timeouts. ``reader`` reads the
    downloaded file instead of :func:`read_state_dict` (other families convert their own formats).

    Raises:
        CheckpointUnavailableError: the download failed, what came back is not a (fitting) checkpoint, or the
            cache folder cannot be written; ``reason`` says which, the message names the URL and says how to use a
            local file instead.
    """
    from tqdm.auto import tqdm

    destination = pathlib.Path(destination)
    folder = destination.parent
    policy = checkpoint_policy() if policy is None else policy
    if timeout is not None:
        if not (isinstance(timeout, tuple) and len(timeout) == 2):
            raise TypeError(f"timeout: expected a (connect, read) tuple of seconds, got {timeout!r}")
        policy = dataclasses.replace(policy, connect_timeout=timeout[0], read_timeout=timeout[1])
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=destination.name + ".", suffix=".part")
    except OSError as exc:
        raise _cache_error(folder, url, exc) from None
    tmp = pathlib.Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            bars: list = []  # made at the first bytes, so a download that never starts shows no bar

            def report(received: int, total: int | None) -> None:
                if not bars:
                    bars.append(tqdm(unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
                                     desc=destination.name, leave=False))
                bar = bars[0]
                if total is not None and bar.total != total:
                    bar.total = total
                bar.update(received - bar.n)

            try:
                http.download(url, out, policy=policy, progress=report)
            except DownloadError as exc:
                raise CheckpointUnavailableError(url, exc.reason, exc.detail, status=exc.status) from None
            except OSError as exc:  # writing the .part file failed (disk full, quota)
                raise _cache_error(folder, url, exc) from None
            finally:
                for bar in bars:
                    bar.close()
            try:
                out.flush()
                os.fsync(out.fileno())  # the rename below must never publish a file whose bytes are not on disk
            except OSError as exc:
                raise _cache_error(folder, url, exc) from None
        try:
            state_dict = reader(tmp) if reader is not None else _read_state_dict(tmp, url)
            if validate is not None:
                validate(state_dict, url)
        except InvalidCheckpointError as exc:
            raise CheckpointUnavailableError(url, "invalid_checkpoint", str(exc)) from None
        try:
            os.replace(tmp, destination)
        except OSError as exc:
            raise _cache_error(folder, url, exc) from None
        return state_dict
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# Choosing where the weights come from


def _from_url(url: str, *, force_download: bool, progress: bool,
              validate: Validator | None) -> tuple[dict[str, torch.Tensor], str]:
    folder = cache_dir()
    destination = folder / url_cache_name(url)
    _sweep_stale_parts(folder)
    if destination.is_file() and not force_download:
        return _read_cached(destination), str(destination)
    return download(url, destination, progress=progress, validate=validate), url


def _from_file_url(url: str, origin: str) -> tuple[dict[str, torch.Tensor], str]:
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(f"{origin}: expected a file:// URL on this machine, got host {parsed.netloc!r} in {url!r}")
    path = pathlib.Path(urllib.request.url2pathname(parsed.path))
    if not path.exists():
        raise FileNotFoundError(f"{origin}: checkpoint file {str(path)!r} (from {url}) does not exist")
    return read_state_dict(path), str(path)


def _from_variant(variant: CheckpointVariant, *, force_download: bool, progress: bool, validate: Validator | None,
                  failures: list[CheckpointUnavailableError]) -> tuple[dict[str, torch.Tensor], str] | None:
    folder = cache_dir()
    destination = folder / variant.file_name
    _sweep_stale_parts(folder)
    if destination.is_file() and not force_download:
        return _read_cached(destination), str(destination)
    for url in variant.urls:
        try:
            return download(url, destination, progress=progress, validate=validate), url
        except CheckpointUnavailableError as exc:
            if exc.reason == "cache":  # the next URL would meet the same folder
                raise
            failures.append(exc)
    return None


def resolve_state_dict(
    variant: str = "fp32",
    checkpoint: str | os.PathLike | None = None,
    *,
    force_download: bool = False,
    progress: bool = True,
    validate: Validator | None = None,
) -> tuple[dict[str, torch.Tensor], str]:
    """Find the weights to load and return ``(state_dict, where_they_came_from)``.

    Order: ``checkpoint`` (a path, an http(s) URL or a ``file://`` URL), else the ``SSD_CHECKPOINT`` environment
    variable, else the published ``variant`` (cache first, then each of its URLs in order, then the ``amp``
    variant with a warning). Downloads are cached only once they pass ``validate(state_dict, url)`` (e.g.
    ``functools.partial(check_fits, model)``), so weights of another model never enter the cache.
    """
    if checkpoint is None:
        checkpoint = os.environ.get(ENV_VAR) or None
        origin = ENV_VAR
    else:
        origin = "checkpoint"
    if checkpoint is not None:
        if not isinstance(checkpoint, str | os.PathLike):
            raise TypeError(f"{origin}: expected a path or URL string, got {type(checkpoint).__name__}")
        if isinstance(checkpoint, str):
            if not checkpoint.strip():
                raise ValueError(f"{origin}: expected a path or URL, got an empty string {checkpoint!r}")
            if match := _URL_SCHEME.match(checkpoint):
                scheme = match.group(1).lower()
                if scheme in ("http", "https"):
                    return _from_url(checkpoint, force_download=force_download, progress=progress,
                                     validate=validate)
                if scheme == "file":
                    return _from_file_url(checkpoint, origin)
                raise ValueError(f"{origin}: unsupported URL scheme {scheme!r} in {checkpoint!r}; expected http, "
                                 f"https, file or a local path")
        path = pathlib.Path(checkpoint).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{origin}: checkpoint file {str(path)!r} does not exist")
        return read_state_dict(path), str(path)

    if variant not in VARIANTS:
        raise ValueError(f"weights: expected one of {sorted(VARIANTS)}, got {variant!r}")
    failures: list[CheckpointUnavailableError] = []
    found = _from_variant(VARIANTS[variant], force_download=force_download, progress=progress, validate=validate,
                          failures=failures)
    if found is None and variant != FALLBACK_VARIANT:
        first_failures = list(failures)
        fallback = VARIANTS[FALLBACK_VARIANT]
        found = _from_variant(fallback, force_download=force_download, progress=progress, validate=validate,
                              failures=failures)
        if found is not None:
            # Said once, and only when it matters: had the fallback failed too, the error below lists every URL.
            warnings.warn(
                f"could not fetch the {variant!r} SSD300 checkpoint ({'; '.join(map(_summary, first_failures))}); "
                f"loaded the {FALLBACK_VARIANT!r} checkpoint instead",
                RuntimeWarning,
                stacklevel=3,
            )
    if found is None:
        tried = "\n".join(f"  - {_summary(f)}" for f in failures)
        detail = f"no SSD300 checkpoint could be downloaded and none is cached in {cache_dir()}"
        raise CheckpointUnavailableError(
            None, "unavailable", detail, failures=tuple(failures),
            message=f"{detail}. URLs tried:\n{tried}\n"
                    f"If you are offline or NVIDIA moved the files, download a checkpoint elsewhere and run with "
                    f"{ENV_VAR}=/path/to/nvidia_ssdpyt_fp32_190826.pt (or pass checkpoint=...), or copy it into "
                    f"{cache_dir()} under its published name.",
        )
    return found


def _summary(error: DownloadError) -> str:
    return f"{error.url}: {error.detail}"
