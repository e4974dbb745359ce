"""The one image loader of the library: paths, URLs, bytes, file objects, PIL images, arrays and tensors.

Everything is decoded with Pillow and returned as an H x W x 3 RGB numpy array. Pixels keep the orientation in which
they are stored: the EXIF orientation tag is *not* applied, exactly like ``skimage.io.imread``, which NVIDIA's
``prepare_input`` used; applying it would rotate some photos and change the published numbers.
"""
from __future__ import annotations

import errno
import io
import math
import numbers
import os
import pathlib
import re
import struct
import sys
import zlib
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

from .http import DownloadError, DownloadPolicy, fetch

if TYPE_CHECKING:
    import torch
    from PIL import Image

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_TIMEOUT",
    "IMAGE_EXTENSIONS",
    "ImageFetchError",
    "ImageLoadError",
    "ImageSource",
    "ImageTooLargeError",
    "describe_source",
    "fetch_bytes",
    "image_policy",
    "is_image_file",
    "load_image",
    "load_rgb",
    "load_uint8",
]

ImageSource: TypeAlias = (
    "str | os.PathLike[str] | bytes | bytearray | memoryview | io.IOBase | Image.Image | np.ndarray | torch.Tensor"
)

DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_BYTES = 50 * 2**20
# A whole download may take this many read timeouts: generous for a slow link, finite for a trickling server.
_TOTAL_TIMEOUTS = 6

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)

_ACCEPTED = (
    "a path (str or pathlib.Path), an http(s) URL, bytes/bytearray/memoryview, a binary file object, "
    "a PIL.Image.Image, a numpy array (H x W, H x W x 1, H x W x 3 or H x W x 4) "
    "or a torch tensor (3 x H x W or 1 x H x W)"
)
_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
# Pillow raises a zoo of exception types on corrupt data; these are the ones that mean "bad bytes", not a bug.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, struct.error, zlib.error)
# Float inputs computed in float32 may overshoot [0, 1] by rounding; anything beyond this is a real range error.
_FLOAT_SLACK = 1e-4


class ImageLoadError(ValueError):
    """The input was reached but is not a readable image (empty, not an image format, corrupt, truncated)."""


class ImageTooLargeError(ImageLoadError):
    """The image header claims more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` (a possible decompression bomb)."""


class ImageFetchError(DownloadError):
    """An http(s) URL could not be downloaded: connection error, timeout, non-2xx status or over the size cap.

    A :class:`~ssd.io.http.DownloadError` (so an ``OSError``): ``url``, ``reason`` and ``detail`` are attributes.
    """


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` has one of the :data:`IMAGE_EXTENSIONS` (case-insensitive); the file is not opened."""
    return pathlib.PurePath(os.fspath(path)).suffix.lower() in IMAGE_EXTENSIONS


def _shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_tensor(src: object) -> bool:
    # torch is only consulted when the caller already imported it, so loading images never pays for torch.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(src, torch.Tensor)


def _is_pil(src: object) -> bool:
    pil = sys.modules.get("PIL.Image")
    return pil is not None and isinstance(src, pil.Image)


def describe_source(src: object) -> str:
    """A short human-readable name for ``src``, used in error messages (a path, a URL, ``<bytes of length 12>``...)."""
    if isinstance(src, str):
        return _shorten(src)
    if isinstance(src, os.PathLike):
        return _shorten(os.fsdecode(src))
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{type(src).__name__} of length {len(src)}>"
    if isinstance(src, np.ndarray):
        shape = "x".join(str(n) for n in src.shape) or "scalar"
        return f"<numpy array {shape} {src.dtype}>"
    if _is_tensor(src):
        shape = "x".join(str(n) for n in src.shape) or "scalar"
        return f"<torch.Tensor {shape} {str(src.dtype).removeprefix('torch.')}>"
    if _is_pil(src):
        return f"<PIL.Image {src.width}x{src.height} {src.mode}>"
    if hasattr(src, "read"):
        name = getattr(src, "name", None)
        if isinstance(name, str):
            return _shorten(name)
        return f"<{type(src).__name__} object>"
    return f"<{type(src).__module__}.{type(src).__qualname__} object>"


def _sniff(head: bytes) -> str:
    """Why undecodable data is not an image, from its first bytes: a hint for the error message."""
    if not head:
        return "there is no data (empty input)"
    stripped = head.lstrip()
    if stripped[:1] in (b"<", b"{", b"["):
        return "the data looks like HTML, XML or JSON text, not an image"
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "the data looks like text, not an image"
    return "Pillow does not recognise the data as any image format"


def image_policy(timeout: float = DEFAULT_TIMEOUT, max_bytes: int = DEFAULT_MAX_BYTES) -> DownloadPolicy:
    """The download policy of image URLs: ``timeout`` for the connection and each read, ``_TOTAL_TIMEOUTS`` times
    that for the whole request (headers included), and ``max_bytes`` for the body."""
    return DownloadPolicy(connect_timeout=timeout, read_timeout=timeout, deadline=_TOTAL_TIMEOUTS * timeout,
                          max_bytes=max_bytes)


def fetch_bytes(url: str, *, timeout: float = DEFAULT_TIMEOUT, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Download ``url`` (http or https) and return its body, under :func:`image_policy`.

    ``timeout`` bounds the connection and every read (seconds), and the whole request, headers included, may take
    at most ``_TOTAL_TIMEOUTS`` times that, so a server trickling bytes cannot hold it forever; the body may not
    exceed ``max_bytes``, checked on the Content-Length header before reading, on the bytes received and on the
    decoded bytes. Raises :class:`ImageFetchError` (a :class:`~ssd.io.http.DownloadError`, so an ``OSError``)
    naming the URL, with the failure's ``reason`` as an attribute.
    """
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"timeout: expected a number of seconds, got {type(timeout).__name__}")
    if not (timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"timeout: expected a positive number of seconds, got {timeout!r}")
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, numbers.Integral):
        raise TypeError(f"max_bytes: expected an int number of bytes, got {type(max_bytes).__name__}")
    if max_bytes <= 0:
        raise ValueError(f"max_bytes: expected a positive number of bytes, got {max_bytes!r}")
    try:
        return fetch(url, image_policy(float(timeout), int(max_bytes)))
    except DownloadError as exc:
        raise ImageFetchError(exc.url, exc.reason, exc.detail, status=exc.status) from None


def _check_pixel_budget(width: int, height: int, name: str) -> None:
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise ImageTooLargeError(
            f"{name} claims {width} x {height} = {width * height} pixels, more than the limit of {limit} "
            "(PIL.Image.MAX_IMAGE_PIXELS); refusing to decode a possible decompression bomb"
        )


def _pil_pixels(im: Image.Image) -> np.ndarray:
    """Decode ``im`` into an H x W (gray) or H x W x 3 array of its natural dtype; may raise any Pillow error."""
    mode = im.mode
    if mode in ("RGB", "L", "F", "I") or mode in _SIXTEEN_BIT_MODES:
        return np.array(im)
    if mode == "1":
        return np.array(im.convert("L"))
    if mode in ("LA", "La"):
        return np.array(im)[..., 0]
    # P, PA, RGBA, RGBa, RGBX, CMYK, YCbCr, HSV, LAB...: Pillow's own conversion; alpha and transparency are dropped.
    return np.array(im.convert("RGB"))


def _to_rgb_array(pixels: np.ndarray, name: str) -> np.ndarray:
    """Normalise decoded pixels to H x W x 3: uint8 stays uint8, everything else becomes float64 in [0, 1]."""
    if pixels.dtype == np.uint8:
        out = pixels
    elif pixels.dtype == np.bool_:
        out = pixels.astype(np.uint8) * np.uint8(255)
    elif pixels.dtype.kind == "u" and pixels.dtype.itemsize == 2:
        out = np.multiply(pixels, 1.0 / 65535, dtype=np.float64)  # img_as_float's exact arithmetic
    elif pixels.dtype.kind == "i":
        # Pillow's 32-bit "I" mode also carries 16-bit PGM/PNG data; keep the 16-bit scale whenever it fits.
        lo, hi = int(pixels.min()), int(pixels.max())
        scale = 65535.0 if lo >= 0 and hi <= 65535 else float(2**31 - 1)
        out = np.clip(pixels.astype(np.float64) / scale, 0.0, 1.0)
    elif pixels.dtype.kind == "f":
        out = pixels.astype(np.float64)
        lo, hi = float(out.min()), float(out.max())
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -_FLOAT_SLACK or hi > 1.0 + _FLOAT_SLACK:
            raise ValueError(f"{name}: expected float pixel values in [0, 1], got values in [{lo:g}, {hi:g}]")
        out = np.clip(out, 0.0, 1.0)
    else:
        raise TypeError(f"{name}: expected pixels of dtype uint8, uint16, bool or float, got {pixels.dtype}")
    if out.ndim == 2:
        out = np.stack([out, out, out], axis=-1)
    return np.ascontiguousarray(out)


def _from_pil(im: Image.Image, name: str) -> np.ndarray:
    # Only images whose pixels are still undecoded can be bombs; an already loaded image has paid its price.
    if getattr(im, "tile", None):
        _check_pixel_budget(im.width, im.height, name)
    if im.width == 0 or im.height == 0:
        raise ImageLoadError(f"{name} is not a readable image: it has no pixels ({im.width} x {im.height})")
    try:
        pixels = _pil_pixels(im)
    except _DECODE_ERRORS as exc:
        raise ImageLoadError(f"{name} is not a readable image: {exc}") from exc
    return _to_rgb_array(pixels, name)


def _decode_stream(fp: Any, name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        # Pillow only warns between 1x and 2x MAX_IMAGE_PIXELS; _from_pil turns that range into an error. The
        # warning is not silenced: catch_warnings changes process-wide state, and images load in threads.
        im = Image.open(fp)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(
            f"{name} is too large to decode safely: {exc} (PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS})"
        ) from exc
    except UnidentifiedImageError as exc:
        try:
            fp.seek(0)
            head = fp.read(64)
        except (OSError, AttributeError, ValueError):
            head = b"?"
        raise ImageLoadError(f"{name} is not a readable image: {_sniff(head)}") from exc
    except _DECODE_ERRORS as exc:
        raise ImageLoadError(f"{name} is not a readable image: {exc}") from exc
    with im:
        return _from_pil(im, name)


def _from_array(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[2] in (1, 3, 4):
        arr = arr[..., 0] if arr.shape[2] == 1 else arr[..., :3]
    elif arr.ndim != 2:
        raise ValueError(f"{name}: expected an array of shape H x W, H x W x 1, H x W x 3 or H x W x 4, "
                         f"got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise ValueError(f"{name}: expected a non-empty image, got shape {tuple(arr.shape)}")
    # By kind and size rather than equality, so that big-endian uint16 (FITS, some TIFF readers) is accepted too.
    if not ((arr.dtype.kind == "u" and arr.dtype.itemsize <= 2) or arr.dtype.kind in "bf"):
        raise TypeError(f"{name}: expected an array of dtype uint8, uint16, bool or float in [0, 1], got {arr.dtype} "
                        "(convert integer data with .astype(np.uint8) first)")
    return _to_rgb_array(arr, name)


def _from_tensor(tensor: torch.Tensor, name: str) -> np.ndarray:
    import torch

    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3):
        raise ValueError(f"{name}: expected a tensor of shape 3 x H x W or 1 x H x W, got {tuple(tensor.shape)}")
    if tensor.dtype != torch.uint8 and not tensor.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a uint8 tensor or a float tensor in [0, 1], got {tensor.dtype}")
    tensor = tensor.detach()
    if tensor.dtype in (torch.float16, torch.bfloat16):
        tensor = tensor.float()  # numpy has no bfloat16
    return _from_array(tensor.cpu().numpy().transpose(1, 2, 0), name)


def load_rgb(src: ImageSource, *, timeout: float = DEFAULT_TIMEOUT, max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Load ``src`` as an H x W x 3 RGB array: uint8 for 8-bit sources, float64 in [0, 1] for 16-bit, 32-bit and
    float sources.

    ``src`` may be a path, an http(s) URL (downloaded with :func:`fetch_bytes` using ``timeout`` and ``max_bytes``),
    bytes, a binary file object, a ``PIL.Image.Image``, a numpy array (H x W, H x W x 1/3/4 of uint8, uint16, bool or
    float in [0, 1]) or a torch tensor (3 x H x W or 1 x H x W, uint8 or float in [0, 1]). Grayscale becomes three
    equal channels, alpha is dropped, palette/CMYK/YCbCr/16-bit modes are converted. The EXIF orientation is not
    applied (pixels stay as stored, like ``skimage.io.imread``). Multi-frame files give their first frame. Arrays that
    need no conversion may be returned without a copy.

    Raises:
        FileNotFoundError / IsADirectoryError: the path does not exist / is a directory.
        ImageLoadError (ValueError): the data is empty, not an image, corrupt or truncated.
        ImageTooLargeError (ImageLoadError): the header claims more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels.
        ImageFetchError (OSError): a URL could not be downloaded (connection, timeout, status, size cap).
        ValueError / TypeError: an array or tensor of the wrong shape / dtype, or an unsupported ``src`` type.
    Every message names the input (see :func:`describe_source`).
    """
    name = describe_source(src)
    if isinstance(src, str) and (match := _URL_SCHEME.match(src)):
        scheme = match.group(1).lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"{name}: unsupported URL scheme {scheme!r}; expected http, https or a local path")
        return _decode_stream(io.BytesIO(fetch_bytes(src, timeout=timeout, max_bytes=max_bytes)), name)
    if isinstance(src, (str, os.PathLike)):
        path = pathlib.Path(os.fsdecode(src))
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "expected an image file, got a directory", str(path))
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, "image file not found", str(path))
        with open(path, "rb") as fp:
            return _decode_stream(fp, name)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return _decode_stream(io.BytesIO(src), name)
    if isinstance(src, np.ndarray):
        return _from_array(src, name)
    if _is_tensor(src):
        return _from_tensor(src, name)
    if _is_pil(src):
        return _from_pil(src, name)
    if isinstance(src, io.TextIOBase):
        raise TypeError(f"{name}: expected a binary file object, got a text-mode file (open it with 'rb')")
    if hasattr(src, "read"):
        return _decode_stream(src, name)
    raise TypeError(f"cannot load an image from {name} (type {type(src).__name__}); expected {_ACCEPTED}")


def load_image(src: ImageSource, **kwargs: Any) -> np.ndarray:
    """NVIDIA's ``load_image``: float64 H x W x 3 in [0, 1] (uint8 / 255, 16-bit / 65535, as ``img_as_float``).

    Keyword arguments (``timeout``, ``max_bytes``) are passed to :func:`load_rgb`.
    """
    img = load_rgb(src, **kwargs)
    if img.dtype == np.uint8:
        # The exact operation of skimage.img_as_float, so results match the seed bit for bit.
        return np.multiply(img, 1.0 / 255, dtype=np.float64)
    return img


def load_uint8(src: ImageSource, **kwargs: Any) -> tuple[np.ndarray, str]:
    """The one form ``detect`` works in: ``src`` as H x W x 3 uint8 RGB, and the name that describes it.

    16-bit and float sources are rounded to the nearest of 256 levels (what every picture of them shows).
    Keyword arguments (``timeout``, ``max_bytes``) are passed to :func:`load_rgb`.
    """
    pixels = load_rgb(src, **kwargs)
    if pixels.dtype != np.uint8:
        pixels = np.multiply(pixels, 255.0).round().astype(np.uint8)
    return pixels, describe_source(src)
