"""NVIDIA's published SSD300 checkpoints: where they are, how they are cached, and how they are loaded safely.

Checkpoints are untrusted files. They are loaded with ``torch.load(weights_only=True)`` onto the CPU, and a
download goes to a temporary file beside its cache entry that is renamed into place only after it loads.
"""
from __future__ import annotations

import collections
import contextlib
import os
import pathlib
import pickle
import re
import tempfile
import urllib.parse
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from ..io.http import iter_body

ENV_VAR = "SSD_CHECKPOINT"
# (connect, read) seconds: a dead server fails fast, a slow one may still send a 100+ MB file.
DOWNLOAD_TIMEOUT = (10.0, 60.0)
# Far above any real SSD300 checkpoint (about 90-180 MB); stops an endless body from filling the disk.
MAX_CHECKPOINT_BYTES = 2 * 2**30
# A checkpoint is 100+ MB, so no fixed deadline fits every link; a download averaging less than this after its
# first 30 s (100 MB would take over half an hour) is taken as a stalled or trickling server.
MIN_BYTES_PER_SECOND = 50_000
MIN_RATE_GRACE_S = 30.0
_CHUNK = 1 << 20


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


class CheckpointUnavailableError(OSError):
    """No checkpoint could be fetched or found (offline, moved files, broken downloads)."""


class InvalidCheckpointError(ValueError):
    """A file was found but is not a loadable SSD300 checkpoint (corrupt, unsafe, or of another model)."""


def cache_dir() -> pathlib.Path:
    """``torch.hub.get_dir()/checkpoints``: where downloaded checkpoints are kept."""
    return pathlib.Path(torch.hub.get_dir()) / "checkpoints"


def is_url(source: str | os.PathLike) -> bool:
    return isinstance(source, str) and source.lower().startswith(("http://", "https://"))


def url_file_name(url: str) -> str:
    """The cache file name of a URL: its last path segment, made safe for a file system."""
    segment = urllib.parse.unquote(urllib.parse.urlparse(url).path.rstrip("/").rsplit("/", 1)[-1])
    segment = re.sub(r"[^A-Za-z0-9._-]", "_", segment).lstrip(".")
    if not segment:
        raise ValueError(f"checkpoint URL: expected a URL whose path ends in a file name, got {url!r}")
    return segment


def _local_file_hint() -> str:
    return (
        f"To use a checkpoint you already have, pass checkpoint='/path/to/file.pt' or set the environment "
        f"variable {ENV_VAR}=/path/to/file.pt (a file saved by NVIDIA's training or a plain state dict)."
    )


# ---------------------------------------------------------------------------------------------------------------
# Reading a checkpoint file


def _torch_load(path: pathlib.Path, extra_globals: tuple = ()):
    # NVIDIA's training checkpoints carry a MultiStepLR state whose milestones are a Counter: plain data.
    allow = getattr(torch.serialization, "safe_globals", None)
    ctx = allow([collections.Counter, *extra_globals]) if allow is not None else contextlib.nullcontext()
    with ctx:
        return torch.load(path, map_location="cpu", weights_only=True)


def strip_distributed_prefix(key: str) -> str:
    """Drop the ``module.`` (or ``module.1.``) prefix that DistributedDataParallel-wrapped saves carry."""
    for prefix in ("module.1.", "module."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a checkpoint file safely and return the model's state dict.

    Accepts NVIDIA's training checkpoints (a dict with ``model`` beside ``optimizer``, ``epoch`` ...) and bare
    state dicts, with or without DistributedDataParallel prefixes. Nothing in the file is executed: a file
    that needs code to unpickle is refused.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        InvalidCheckpointError: the file is not a safe, readable checkpoint holding a state dict.
    """
    return extract_state_dict(load_checkpoint_object(path), str(path))


def load_checkpoint_object(path: str | os.PathLike, extra_globals: tuple = ()) -> object:
    """The object stored in a checkpoint file, loaded with ``torch.load(weights_only=True)`` onto the CPU.

    ``extra_globals``: more plain-data classes to accept (other families' checkpoints carry their own);
    anything else that needs code to unpickle is refused before it runs.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        InvalidCheckpointError: the file is not a safe, readable PyTorch checkpoint.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        if path.exists():
            raise IsADirectoryError(f"checkpoint {str(path)!r}: expected a file, got a directory")
        raise FileNotFoundError(f"checkpoint {str(path)!r}: no such file")
    try:
        obj = _torch_load(path, tuple(extra_globals))
    except pickle.UnpicklingError as exc:
        details = _unpickler_reason(exc)
        if "global" in details.lower():
            raise InvalidCheckpointError(
                f"checkpoint {str(path)!r} was refused: it needs code to unpickle (not only tensors and plain "
                f"data), so it was not loaded and nothing in it ran ({details})"
            ) from None
        raise InvalidCheckpointError(
            f"checkpoint {str(path)!r} is not a readable PyTorch checkpoint: the safe loader rejected it ({details})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise InvalidCheckpointError(
            f"checkpoint {str(path)!r} is not a readable PyTorch checkpoint ({type(exc).__name__}: "
            f"{_first_line(exc)})"
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


def extract_state_dict(obj: object, source: str) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint object: ``obj['model']`` when present, else ``obj`` itself."""
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
    return {strip_distributed_prefix(k): v for k, v in obj.items()}


def load_into(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, *,
              assign: bool = False) -> None:
    """``model.load_state_dict(state_dict, strict=True)`` with an error that names the file and the keys.

    ``assign=True`` adopts the tensors instead of copying into the model's (for a model built on ``meta``).
    """
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
    model.load_state_dict(state_dict, strict=True, assign=assign)


# ---------------------------------------------------------------------------------------------------------------
# Downloading


class _DownloadFailed(Exception):
    """One URL failed; the message says why, in a few words."""


def download(url: str, destination: str | os.PathLike, *, progress: bool = True,
             timeout: tuple[float, float] = DOWNLOAD_TIMEOUT,
             reader: Callable[[pathlib.Path], dict[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
    """Fetch ``url`` into ``destination`` and return its state dict.

    The body streams into a temporary file in the destination's folder, which becomes ``destination`` only
    after it loads as a checkpoint (``reader``, default :func:`read_state_dict`: other families pass their own);
    on any failure nothing is left behind.

    Raises:
        CheckpointUnavailableError: the download failed or what came back is not a checkpoint; the message
            names the URL and says how to use a local file instead.
    """
    try:
        return _download(url, pathlib.Path(destination), progress, timeout, reader or read_state_dict)
    except _DownloadFailed as exc:
        raise CheckpointUnavailableError(f"could not download checkpoint {url}: {exc}. {_local_file_hint()}") from None


def _download(url: str, destination: pathlib.Path, progress: bool, timeout: tuple[float, float],
              reader: Callable[[pathlib.Path], dict[str, torch.Tensor]]):
    import requests
    from tqdm.auto import tqdm

    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=destination.parent, prefix=destination.name + ".", suffix=".part")
    tmp = pathlib.Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                response = requests.get(url, stream=True, timeout=timeout, allow_redirects=True)
            except requests.RequestException as exc:
                raise _DownloadFailed(f"{type(exc).__name__}: {_first_line(exc)}") from None
            with response:
                if not response.ok:
                    raise _DownloadFailed(f"HTTP {response.status_code} {response.reason}")
                content_type = response.headers.get("Content-Type", "")
                if "html" in content_type.lower():
                    raise _DownloadFailed(f"the server sent a web page ({content_type}), not a checkpoint")
                declared = response.headers.get("Content-Length")
                total = int(declared) if declared and declared.isdigit() else None
                if total is not None and total > MAX_CHECKPOINT_BYTES:
                    raise _DownloadFailed(f"the server announced {total} bytes, over the {MAX_CHECKPOINT_BYTES} cap")
                received = 0
                bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
                           desc=destination.name, leave=False)
                with bar:
                    try:
                        for chunk in iter_body(response, _CHUNK, min_rate=MIN_BYTES_PER_SECOND, grace=MIN_RATE_GRACE_S):
                            received += len(chunk)
                            if received > MAX_CHECKPOINT_BYTES:
                                raise _DownloadFailed(f"the body went past the {MAX_CHECKPOINT_BYTES}-byte cap")
                            out.write(chunk)
                            bar.update(len(chunk))
                    except (ConnectionError, TimeoutError) as exc:
                        raise _DownloadFailed(str(exc)) from None
                if total is not None and received != total:
                    raise _DownloadFailed(f"received {received} of the {total} bytes announced")
        with open(tmp, "rb") as check:
            head = check.read(256).lstrip().lower()
        if head.startswith((b"<!doctype", b"<html", b"<?xml", b"{")):
            raise _DownloadFailed("the server sent a web page or a JSON message, not a checkpoint")
        try:
            state_dict = reader(tmp)
        except InvalidCheckpointError as exc:
            raise _DownloadFailed(str(exc).replace(f"checkpoint {str(tmp)!r}", "the downloaded file")) from None
        os.replace(tmp, destination)
        return state_dict
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# Choosing where the weights come from


def _from_url(url: str, *, force_download: bool, progress: bool) -> tuple[dict[str, torch.Tensor], str]:
    destination = cache_dir() / url_file_name(url)
    if destination.is_file() and not force_download:
        return read_state_dict(destination), str(destination)
    return download(url, destination, progress=progress), url


def _from_variant(variant: CheckpointVariant, *, force_download: bool, progress: bool,
                  failures: list[str]) -> tuple[dict[str, torch.Tensor], str] | None:
    destination = cache_dir() / variant.file_name
    if destination.is_file() and not force_download:
        return read_state_dict(destination), str(destination)
    for url in variant.urls:
        try:
            return download(url, destination, progress=progress), url
        except CheckpointUnavailableError as exc:
            failures.append(f"{url}: {str(exc).split(': ', 1)[-1].split('. To use', 1)[0]}")
    return None


def resolve_state_dict(
    variant: str = "fp32",
    checkpoint: str | os.PathLike | None = None,
    *,
    force_download: bool = False,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], str]:
    """Find the weights to load and return ``(state_dict, where_they_came_from)``.

    Order: ``checkpoint`` (a path or URL), else the ``SSD_CHECKPOINT`` environment variable, else the published
    ``variant`` (cache first, then each of its URLs in order, then the ``amp`` variant with a warning).
    """
    if checkpoint is None:
        checkpoint = os.environ.get(ENV_VAR) or None
        origin = ENV_VAR
    else:
        origin = "checkpoint"
    if checkpoint is not None:
        if not isinstance(checkpoint, str | os.PathLike):
            raise TypeError(f"{origin}: expected a path or URL string, got {type(checkpoint).__name__}")
        if is_url(checkpoint):
            return _from_url(checkpoint, force_download=force_download, progress=progress)
        path = pathlib.Path(checkpoint).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{origin}: checkpoint file {str(path)!r} does not exist")
        return read_state_dict(path), str(path)

    if variant not in VARIANTS:
        raise ValueError(f"weights: expected one of {sorted(VARIANTS)}, got {variant!r}")
    failures: list[str] = []
    found = _from_variant(VARIANTS[variant], force_download=force_download, progress=progress, failures=failures)
    if found is None and variant != FALLBACK_VARIANT:
        warnings.warn(
            f"could not fetch the {variant!r} SSD300 checkpoint ({'; '.join(failures)}); "
            f"trying the {FALLBACK_VARIANT!r} checkpoint instead",
            RuntimeWarning,
            stacklevel=3,
        )
        fallback = VARIANTS[FALLBACK_VARIANT]
        found = _from_variant(fallback, force_download=force_download, progress=progress, failures=failures)
    if found is None:
        tried = "\n".join(f"  - {line}" for line in failures)
        raise CheckpointUnavailableError(
            f"no SSD300 checkpoint could be downloaded and none is cached in {cache_dir()}. URLs tried:\n{tried}\n"
            f"If you are offline or NVIDIA moved the files, download a checkpoint elsewhere and run with "
            f"{ENV_VAR}=/path/to/nvidia_ssdpyt_fp32_190826.pt (or pass checkpoint=...), or copy it into "
            f"{cache_dir()} under its published name."
        )
    return found
