"""Where the weights come from, for every model: one resolution order, one cache, one download policy.

Order: the ``checkpoint=`` argument, else the ``SSD_CHECKPOINT`` environment variable (each a local path, a
``file://`` URL or an http(s) URL), else the model's published weights (the cache first, then each of their URLs
in order, then the family's fallback weights with a warning). Downloads go through :mod:`ssd.io.http`'s one
download policy into a temporary ``.part`` file beside their cache entry (``torch.hub.get_dir()/checkpoints``),
which is renamed into place only after it reads as a checkpoint of the model: nothing else ever enters the cache.
Reading is the caller's ``read(path, name)`` (:func:`ssd.weights.formats.read_checkpoint` for a model).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import re
import tempfile
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from ..copies import error_bases
from ..io import http
from ..io.files import sweep_stale
from ..io.http import DownloadError, DownloadPolicy
from ..models.entry import ModelEntry, Weights
from .loader import InvalidCheckpointError, load_file

__all__ = ["ENV_VAR", "CheckpointUnavailableError", "Resolved", "cache_dir", "download", "resolve",
           "url_cache_name"]

ENV_VAR = "SSD_CHECKPOINT"
# (connect, read) seconds: a dead server fails fast, a slow one may still send a 100+ MB file.
DOWNLOAD_TIMEOUT = (10.0, 60.0)
# Far above any real SSD checkpoint (about 20-400 MB); stops an endless body from filling the disk. Counted on the
# raw bytes received and on the decoded bytes written.
MAX_CHECKPOINT_BYTES = 2 * 2**30
# A checkpoint is 100+ MB, so no short deadline fits every link; a download averaging less than this after its
# first 30 s (100 MB would take over half an hour) is taken as a stalled or trickling server, headers included.
MIN_BYTES_PER_SECOND = 50_000
MIN_RATE_GRACE_S = 30.0
# The overall bound on one request; the minimum rate above ends a hopeless download long before it.
DOWNLOAD_DEADLINE_S = 4 * 3600.0
# A ``.part`` file this old belongs to a download that was killed; it is removed the next time the cache is used.
STALE_PART_S = 3600.0
# Cache names of URL downloads keep this much of the URL's last path segment (for people reading the folder).
_NAME_KEEP = 64
_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")

T = TypeVar("T")
# read(path, name): the file's contents for the caller, or InvalidCheckpointError naming ``name``.
Reader = Callable[[pathlib.Path, str], Any]


class CheckpointUnavailableError(*error_bases("weights.checkpoints.CheckpointUnavailableError", DownloadError)):
    """No checkpoint could be fetched or found (offline, moved files, broken downloads, an unusable cache).

    A :class:`~ssd.io.http.DownloadError` (so an ``OSError``) with ``url``, ``reason`` and ``detail`` attributes.
    Besides the download reasons, ``reason`` may be ``'invalid_checkpoint'`` (what came back is not a checkpoint
    that fits the model), ``'cache'`` (the cache folder cannot be written) or ``'unavailable'`` (every URL of the
    published weights failed: ``failures`` holds one error per URL tried, ``url`` is ``None``).
    """

    def __init__(self, url: str | None, reason: str, detail: str, *, status: int | None = None,
                 message: str | None = None, failures: tuple[DownloadError, ...] = (),
                 hint: str | None = None) -> None:
        if message is None:
            message = f"could not download checkpoint {url}: {detail}. {hint or local_file_hint()}"
        super().__init__(url, reason, detail, status=status, message=message)
        self.failures = failures


@dataclass(frozen=True)
class Resolved(Generic[T]):
    """What :func:`resolve` found: ``value`` (what ``read`` returned), ``source`` (where it came from, as
    ``model.checkpoint_source`` shows it: the path, or the URL of a fresh download), ``path`` (the local file read:
    the cache entry for downloads) and ``weights`` (the published weights, when they are what was read)."""

    value: T
    source: str
    path: pathlib.Path
    weights: Weights | None = None


def cache_dir() -> pathlib.Path:
    """``torch.hub.get_dir()/checkpoints``: where downloaded checkpoints are kept."""
    return pathlib.Path(torch.hub.get_dir()) / "checkpoints"


def is_url(source: str | os.PathLike) -> bool:
    """Whether ``source`` is an http(s) URL (the kind that is downloaded and cached)."""
    return isinstance(source, str) and source.lower().startswith(("http://", "https://"))


def url_cache_name(url: str) -> str:
    """The cache file name of a URL download: ``url-<sha256(url)[:16]>-<last path segment>``.

    Keyed by the whole URL, so two URLs ending in the same file name never share an entry, and a URL can never
    land on a published checkpoint's name (which would stand in for those weights). The readable tail is made safe
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


def local_file_hint(entry: ModelEntry | None = None) -> str:
    """How to use a file one already has, in the words of ``entry``'s family."""
    what = f" ({entry.formats})" if entry is not None else ""
    return (f"To use a checkpoint you already have, pass checkpoint='/path/to/file' or set the environment "
            f"variable {ENV_VAR}=/path/to/file{what}.")


# ---------------------------------------------------------------------------------------------------------------
# The cache and downloading


def _cache_error(folder: pathlib.Path, url: str | None, exc: OSError) -> CheckpointUnavailableError:
    why = exc.strerror or type(exc).__name__
    detail = (f"the checkpoint cache {str(folder)!r} cannot be written ({why}). Point TORCH_HOME at a writable "
              f"folder (or call torch.hub.set_dir), or pass checkpoint='/path/to/file'")
    return CheckpointUnavailableError(url, "cache", detail, message=f"{'checkpoint ' + url + ': ' if url else ''}"
                                                                      f"{detail} or set {ENV_VAR}.")


def _sweep_stale_parts(folder: pathlib.Path) -> None:
    """Remove ``.part`` files left by downloads that were killed (older than :data:`STALE_PART_S`).

    Recent ones are left alone: another process may be writing them right now.
    """
    sweep_stale(folder, ("*.part",), STALE_PART_S)


def _read_cached(path: pathlib.Path, read: Reader) -> Any:
    try:
        return read(path, str(path))
    except InvalidCheckpointError as exc:
        raise InvalidCheckpointError(
            f"{exc}. The cached file looks damaged or is not this model's: delete {str(path)!r} or pass "
            f"force_download=True to fetch it again"
        ) from None


def _load_any(path: pathlib.Path, name: str) -> object:
    return load_file(path, name=name)


def download(url: str, destination: str | os.PathLike, *, progress: bool = True, policy: DownloadPolicy | None = None,
             timeout: tuple[float, float] | None = None, read: Reader | None = None, hint: str | None = None) -> Any:
    """Fetch ``url`` into ``destination`` under ``policy`` (default :func:`checkpoint_policy`) and return what
    ``read(file, url)`` makes of it (default: the object stored, through the safe loader).

    The body streams into a temporary ``.part`` file in the destination's folder, which becomes ``destination``
    only after ``read`` accepts it (it raises :class:`InvalidCheckpointError` for a file that is not a checkpoint of
    the model); on any failure nothing is left behind. ``timeout=(connect, read)`` overrides the policy's two
    timeouts; ``hint`` is what error messages say about using a local file instead.

    Raises:
        CheckpointUnavailableError: the download failed, what came back is not a (fitting) checkpoint, or the
            cache folder cannot be written; ``reason`` says which, the message names the URL.
    """
    from tqdm.auto import tqdm

    destination = pathlib.Path(destination)
    folder = destination.parent
    read = _load_any if read is None else read
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
                raise CheckpointUnavailableError(url, exc.reason, exc.detail, status=exc.status, hint=hint) from None
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
            value = read(tmp, url)
        except InvalidCheckpointError as exc:
            raise CheckpointUnavailableError(url, "invalid_checkpoint", str(exc), hint=hint) from None
        try:
            os.replace(tmp, destination)
        except OSError as exc:
            raise _cache_error(folder, url, exc) from None
        return value
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# Choosing where the weights come from


def resolve(entry: ModelEntry, read: Reader, *, weights: str | None = None,
            checkpoint: str | os.PathLike | None = None, force_download: bool = False,
            progress: bool = True) -> Resolved:
    """Find ``entry``'s weights, in the order of the module docstring, and read them with ``read(path, name)``.

    ``weights`` names the published weights to use (default ``entry.default_weights``). Downloads are cached only
    once ``read`` accepts them, so weights of another model never enter the cache.

    Raises:
        FileNotFoundError: a local checkpoint does not exist. ValueError/TypeError: a malformed checkpoint argument.
        InvalidCheckpointError: what was found is not a checkpoint of this model.
        CheckpointUnavailableError: nothing could be downloaded (every URL tried is listed) or cached.
    """
    hint = local_file_hint(entry)
    if checkpoint is None:
        checkpoint = os.environ.get(ENV_VAR) or None
        origin = ENV_VAR
    else:
        origin = "checkpoint"
    if checkpoint is not None:
        return _from_argument(checkpoint, origin, read, force_download=force_download, progress=progress, hint=hint)
    name = weights or entry.default_weights
    if name is None:
        raise ValueError(f"{entry.name}: no published weights; pass checkpoint=... or set {ENV_VAR}, or build it "
                         f"with pretrained=False")
    if name not in entry.weights:
        raise ValueError(f"weights: expected one of {', '.join(map(repr, entry.weights))}, got {name!r}")
    chosen = entry.weights[name]
    failures: list[CheckpointUnavailableError] = []
    found = _from_published(chosen, read, force_download=force_download, progress=progress, failures=failures,
                            hint=hint)
    fallback = entry.weights.get(entry.fallback_weights or "")
    if found is None and fallback is not None and fallback is not chosen:
        first_failures = list(failures)
        found = _from_published(fallback, read, force_download=force_download, progress=progress,
                                failures=failures, hint=hint)
        if found is not None:
            # Said once, and only when it matters: had the fallback failed too, the error below lists every URL.
            warnings.warn(
                f"could not fetch the {name!r} {entry.name} checkpoint ({'; '.join(map(_summary, first_failures))}); "
                f"loaded the {fallback.name!r} checkpoint instead",
                RuntimeWarning,
                stacklevel=3,
            )
    if found is None:
        tried = "\n".join(f"  - {_summary(f)}" for f in failures)
        detail = f"no {entry.name} checkpoint could be downloaded and none is cached in {cache_dir()}"
        raise CheckpointUnavailableError(
            None, "unavailable", detail, failures=tuple(failures),
            message=f"{detail}. URLs tried:\n{tried}\n"
                    f"If you are offline or the files moved, download {chosen.file_name} elsewhere and run with "
                    f"{ENV_VAR}=/path/to/{chosen.file_name} (or pass checkpoint=...), or copy it into {cache_dir()} "
                    f"under that name.",
        )
    return found


def _from_argument(checkpoint: str | os.PathLike, origin: str, read: Reader, *, force_download: bool,
                   progress: bool, hint: str) -> Resolved:
    if not isinstance(checkpoint, str | os.PathLike):
        raise TypeError(f"{origin}: expected a path or URL string, got {type(checkpoint).__name__}")
    if isinstance(checkpoint, str):
        if not checkpoint.strip():
            raise ValueError(f"{origin}: expected a path or URL, got an empty string {checkpoint!r}")
        if match := _URL_SCHEME.match(checkpoint):
            scheme = match.group(1).lower()
            if scheme in ("http", "https"):
                return _from_url(checkpoint, read, force_download=force_download, progress=progress, hint=hint)
            if scheme == "file":
                return _from_file_url(checkpoint, origin, read)
            raise ValueError(f"{origin}: unsupported URL scheme {scheme!r} in {checkpoint!r}; expected http, "
                             f"https, file or a local path")
    path = pathlib.Path(checkpoint).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{origin}: checkpoint file {str(path)!r} does not exist")
    return Resolved(read(path, str(path)), str(path), path)


def _from_url(url: str, read: Reader, *, force_download: bool, progress: bool, hint: str) -> Resolved:
    folder = cache_dir()
    destination = folder / url_cache_name(url)
    _sweep_stale_parts(folder)
    if destination.is_file() and not force_download:
        return Resolved(_read_cached(destination, read), str(destination), destination)
    return Resolved(download(url, destination, progress=progress, read=read, hint=hint), url, destination)


def _from_file_url(url: str, origin: str, read: Reader) -> Resolved:
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(f"{origin}: expected a file:// URL on this machine, got host {parsed.netloc!r} in {url!r}")
    path = pathlib.Path(urllib.request.url2pathname(parsed.path))
    if not path.exists():
        raise FileNotFoundError(f"{origin}: checkpoint file {str(path)!r} (from {url}) does not exist")
    return Resolved(read(path, str(path)), str(path), path)


def _from_published(weights: Weights, read: Reader, *, force_download: bool, progress: bool,
                    failures: list[CheckpointUnavailableError], hint: str) -> Resolved | None:
    folder = cache_dir()
    destination = folder / weights.file_name
    _sweep_stale_parts(folder)
    if destination.is_file() and not force_download:
        return Resolved(_read_cached(destination, read), str(destination), destination, weights)

    def read_checked(path: pathlib.Path, name: str) -> Any:
        # The hash is checked on the downloaded bytes before anything is unpickled, as torch.hub's check_hash does.
        if weights.sha256 is not None:
            found = _sha256(path)
            if not found.startswith(weights.sha256):
                raise InvalidCheckpointError(f"checkpoint {name!r}: expected sha256 starting {weights.sha256} "
                                             f"({weights.file_name}), got {found[:len(weights.sha256)]}")
        return read(path, name)

    for url in weights.urls:
        try:
            value = download(url, destination, progress=progress, read=read_checked, hint=hint)
            return Resolved(value, url, destination, weights)
        except CheckpointUnavailableError as exc:
            if exc.reason == "cache":  # the next URL would meet the same folder
                raise
            failures.append(exc)
    return None


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _summary(error: DownloadError) -> str:
    return f"{error.url}: {error.detail}"
