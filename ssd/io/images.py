"""The one image loader of the library: paths, URLs, bytes, file objects, PIL images, arrays and tensors.

Everything is decoded with Pillow and returned as an H x W x 3 RGB numpy array. :func:`load_rgb` (and so NVIDIA's
``load_image`` / ``prepare_input``) keeps the orientation in which pixels are stored: the EXIF orientation tag is *not*
applied, exactly like ``skimage.io.imread``, which NVIDIA's ``prepare_input`` used; applying it there would rotate some
photos and change the published numbers. :func:`load_uint8`, the loader of ``detect`` and the command line, applies
it, so that boxes land on the picture as every viewer shows it.

Whatever goes wrong while decoding (Pillow raises OSError, SyntaxError, RuntimeError, NotImplementedError,
MemoryError... on hostile data) surfaces as :class:`ImageLoadError` naming the input, and paths that are not regular
files (FIFOs, devices, sockets) are refused before a byte is read, since reading them may never end.
"""
from __future__ import annotations

import contextlib
import errno
import io
import math
import numbers
import os
import pathlib
import re
import stat
import sys
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

from ..copies import error_bases
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
    "open_regular_file",
    "readable_extensions",
    "upright_size",
]

ImageSource: TypeAlias = (
    "str | os.PathLike[str] | bytes | bytearray | memoryview | io.IOBase | Image.Image | np.ndarray | torch.Tensor"
)

DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_BYTES = 50 * 2**20
# A whole download may take this many read timeouts: generous for a slow link, finite for a trickling server.
_TOTAL_TIMEOUTS = 6

# The extensions a folder scan picks up; .avif/.heic/.heif join at run time where Pillow (or its optional plugins
# pillow-avif-plugin / pillow-heif) can decode them, see readable_extensions().
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
_OPTIONAL_EXTENSIONS = (".avif", ".heic", ".heif")
_readable_extensions: frozenset[str] | None = None

_ACCEPTED = (
    "a path (str or pathlib.Path), an http(s) URL, bytes/bytearray/memoryview, a binary file object, "
    "a PIL.Image.Image, a numpy array (H x W, H x W x 1, H x W x 3 or H x W x 4) "
    "or a torch tensor (3 x H x W or 1 x H x W)"
)
_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
# Pillow raises a zoo of exception types on corrupt data (OSError, SyntaxError, struct.error, zlib.error, but also
# RuntimeError, NotImplementedError, MemoryError on lying headers): every Exception while decoding is "bad bytes".
_EXIF_ORIENTATION = 0x0112
# Pillow renders EPS by running Ghostscript on the file: a program from an untrusted file is no picture to open.
_REFUSED_FORMATS = frozenset({"EPS"})
# Float inputs computed in float32 may overshoot [0, 1] by rounding; anything beyond this is a real range error.
_FLOAT_SLACK = 1e-4


class ImageLoadError(*error_bases("io.images.ImageLoadError", ValueError)):
    """The input was reached but is not a readable image (empty, not an image format, corrupt, truncated)."""


class ImageTooLargeError(ImageLoadError):
    """The image header claims more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` (a possible decompression bomb)."""


class ImageFetchError(*error_bases("io.images.ImageFetchError", DownloadError)):
    """An http(s) URL could not be downloaded: connection error, timeout, non-2xx status or over the size cap.

    A :class:`~ssd.io.http.DownloadError` (so an ``OSError``): ``url``, ``reason`` and ``detail`` are attributes.
    """


def _register_optional_plugins() -> None:
    """Let Pillow read AVIF / HEIC through the optional plugins when they are installed (never required)."""
    # Not installed, or a broken install: those formats then simply stay unreadable (and unscanned).
    with contextlib.suppress(Exception):
        import pillow_heif  # type: ignore[import-not-found]

        pillow_heif.register_heif_opener()
    with contextlib.suppress(Exception):
        import pillow_avif  # type: ignore[import-not-found]  # noqa: F401 - registers itself on import


def readable_extensions() -> frozenset[str]:
    """:data:`IMAGE_EXTENSIONS` plus those of .avif / .heic / .heif that this Pillow can decode."""
    global _readable_extensions
    if _readable_extensions is None:
        from PIL import Image

        _register_optional_plugins()
        registered = Image.registered_extensions()  # also loads every built-in plugin
        extra = {ext for ext in _OPTIONAL_EXTENSIONS if ext in registered and registered[ext] in Image.OPEN}
        _readable_extensions = IMAGE_EXTENSIONS | extra
    return _readable_extensions


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` has an image extension (case-insensitive) that can be decoded here (see
    :func:`readable_extensions`); the file is not opened."""
    suffix = pathlib.PurePath(os.fspath(path)).suffix.lower()
    return suffix in IMAGE_EXTENSIONS or suffix in readable_extensions()


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
    if head.startswith((b"%!PS", b"\xc5\xd0\xd3\xc6")):
        return "PostScript/EPS is not decoded here (Pillow would run Ghostscript on it); convert it to PNG first"
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
        if not (np.isfinite(lo) and np.isfinite(hi)):
            # min/max propagate NaN; say which non-finite value it is rather than print "[nan, nan]".
            bad = "NaN" if np.isnan(out).any() else "infinite"
            raise ValueError(f"{name}: expected float pixel values in [0, 1], got {bad} values")
        if lo < -_FLOAT_SLACK or hi > 1.0 + _FLOAT_SLACK:
            hint = " (0..255 data stored as floats: divide by 255 or convert to uint8)" if hi <= 255.0 + 1e-3 else ""
            raise ValueError(f"{name}: expected float pixel values in [0, 1], got values in [{lo:g}, {hi:g}]{hint}")
        out = np.clip(out, 0.0, 1.0)
    else:
        raise TypeError(f"{name}: expected pixels of dtype uint8, uint16, bool or float, got {pixels.dtype}")
    if out.ndim == 2:
        out = np.stack([out, out, out], axis=-1)
    return np.ascontiguousarray(out)


def _oriented(im: Image.Image) -> Image.Image:
    """``im`` turned as its EXIF orientation tag says (a new image), or ``im`` itself when there is nothing to do."""
    from PIL import ImageOps

    # Read the tag first: exif_transpose copies even an upright image, which would double the memory for nothing.
    if im.getexif().get(_EXIF_ORIENTATION, 1) in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(im)
    return im


def _decode_failure(exc: BaseException, name: str, im: Image.Image | None = None) -> ImageLoadError:
    """The ImageLoadError for anything Pillow raised while decoding ``name``."""
    from PIL import Image

    if isinstance(exc, Image.DecompressionBombError):
        return ImageTooLargeError(
            f"{name} is too large to decode safely: {exc} (PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS})"
        )
    lazy_and_closed = im is not None and getattr(im, "tile", None) and getattr(im, "fp", True) is None
    if lazy_and_closed or "closed image" in str(exc):
        # im.close() (or the end of a ``with Image.open(...)`` block) drops the pixels and the file handle.
        return ImageLoadError(f"{name}: the PIL image was closed (im.close() or the end of its with-block) before "
                              "its pixels were read; pass it while open, pass im.copy(), or pass the path")
    if isinstance(exc, MemoryError):
        claimed = f" ({im.width} x {im.height} {im.mode} claimed)" if im is not None else ""
        return ImageLoadError(f"{name} is not a readable image: not enough memory to decode it{claimed}")
    detail = str(exc) or "no detail given"
    kind = "" if isinstance(exc, (OSError, ValueError, SyntaxError)) else f"{type(exc).__name__}: "
    return ImageLoadError(f"{name} is not a readable image: {kind}{detail}")


def _from_pil(im: Image.Image, name: str, orient: bool = False) -> np.ndarray:
    # Only images whose pixels are still undecoded can be bombs; an already loaded image has paid its price.
    if getattr(im, "tile", None):
        _check_pixel_budget(im.width, im.height, name)
    if im.width == 0 or im.height == 0:
        raise ImageLoadError(f"{name} is not a readable image: it has no pixels ({im.width} x {im.height})")
    try:
        pixels = _pil_pixels(_oriented(im) if orient else im)
    except ImageLoadError:
        raise
    except Exception as exc:  # any decoder failure on hostile bytes means "not readable"
        raise _decode_failure(exc, name, im) from exc
    if pixels.dtype == object:
        # Older Pillow (10.1) hands numpy a closed image's empty core as an object, where newer ones raise.
        raise _decode_failure(ValueError("Operation on closed image"), name, im)
    try:
        return _to_rgb_array(pixels, name)
    except (ValueError, TypeError) as exc:
        # Decoded but unusable (a float TIFF holding 0..255, NaN pixels): still a file we cannot read as a picture.
        raise ImageLoadError(str(exc)) from exc


def _decode_stream(fp: Any, name: str, orient: bool = False) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        # Pillow only warns between 1x and 2x MAX_IMAGE_PIXELS; _from_pil turns that range into an error. The
        # warning is not silenced: catch_warnings changes process-wide state, and images load in threads.
        im = Image.open(fp, formats=_safe_formats())
    except UnidentifiedImageError as exc:
        try:
            fp.seek(0)
            head = fp.read(64)
        except (OSError, AttributeError, ValueError):
            head = b"?"
        raise ImageLoadError(f"{name} is not a readable image: {_sniff(head)}") from exc
    except Exception as exc:  # header parsers raise anything on hostile bytes
        raise _decode_failure(exc, name) from exc
    with im:
        return _from_pil(im, name, orient)


def upright_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(width, height)`` of the image file at ``path`` as :func:`load_uint8` would return it (EXIF orientation
    applied: a 90-degree turn swaps the two), read from its header without decoding the pixels. The same guards as
    loading: regular files only, Pillow's safe formats; ImageLoadError naming the file otherwise."""
    from PIL import Image

    name = os.fspath(path)
    with _open_regular_file(pathlib.Path(path), name) as fp:
        try:
            with Image.open(fp, formats=_safe_formats()) as im:
                width, height = im.size
                # Orientations 5 to 8 turn the picture by 90 degrees (EXIF's numbering, which exif_transpose follows).
                turned = im.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
        except Exception as exc:  # header parsers raise anything on hostile bytes
            raise _decode_failure(exc, name) from exc
    return (height, width) if turned else (width, height)


def _safe_formats() -> list[str]:
    """Every format Pillow can open (optional plugins included), less :data:`_REFUSED_FORMATS`."""
    from PIL import Image

    Image.init()  # registers every plugin once; Image.ID is empty before
    return [name for name in Image.ID if name not in _REFUSED_FORMATS]


def _open_regular_file(path: pathlib.Path, name: str) -> Any:
    """Open ``path`` for reading if it is a regular file; FIFOs, devices and sockets are refused unread."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "image file not found", str(path)) from None
    if stat.S_ISDIR(info.st_mode):
        raise IsADirectoryError(errno.EISDIR, "expected an image file, got a directory", str(path))
    return open_regular_file(path, name)


def open_regular_file(path: str | os.PathLike[str], name: str, *, kind: str = "image file",
                      error: type[ValueError] = ImageLoadError) -> io.BufferedReader:
    """``path`` opened for binary reading if it is a regular file, else ``error`` ("``name``: expected a regular
    ``kind``, got a FIFO (named pipe)"...): FIFOs, devices and sockets are refused before a byte is read, since
    reading them may never end (or never stop growing, as ``/dev/zero``). Every file the library reads as data
    (images, annotation files) is opened here."""
    _require_regular(os.stat(path).st_mode, name, kind, error)
    # O_NONBLOCK: should the path turn into a FIFO between stat and open, opening it cannot block, and the fstat
    # below refuses it. It changes nothing for regular files.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        _require_regular(os.fstat(fd).st_mode, name, kind, error)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_capped_file(path: str | os.PathLike[str], name: str, *, kind: str, limit: int,
                     error: type[ValueError], hint: str = "") -> bytes:
    """The bytes of the data file ``path`` (annotations, dataset lists), under the guards of every file the library
    reads: it exists (FileNotFoundError) and is no folder (IsADirectoryError), a regular file
    (:func:`open_regular_file`), at most ``limit`` bytes, and unchanged while read; else ``error`` naming ``name``
    and ``kind`` (``hint``, e.g. where the cap is set, ends the size message)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{name}: expected a {kind}, got a path that does not exist") from None
    if stat.S_ISDIR(info.st_mode):
        raise IsADirectoryError(f"{name}: expected a {kind}, got a directory")
    with open_regular_file(path, name, kind=kind, error=error) as fp:
        size = os.fstat(fp.fileno()).st_size
        if size > limit:
            raise error(f"{name}: expected a {kind} of at most {limit:,} bytes, got {size:,} bytes{hint}")
        # Its size, and one byte more to notice growth: read(n) allocates n bytes before reading anything.
        data = fp.read(size + 1)
    if len(data) != size:
        raise error(f"{name}: expected a file that stays the same while it is read, got {len(data):,} bytes where "
                    f"it had {size:,} (is something writing it?)")
    return data


def _require_regular(mode: int, name: str, kind: str = "image file", error: type[ValueError] = ImageLoadError) -> None:
    if stat.S_ISREG(mode):
        return
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    got = next((label for test, label in kinds if test(mode)), "not a regular file")
    # Reading a pipe or /dev/zero may never end (or never stop growing): refuse before the first byte.
    raise error(f"{name}: expected a regular {kind}, got {got}")


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


def load_rgb(src: ImageSource, *, timeout: float = DEFAULT_TIMEOUT, max_bytes: int = DEFAULT_MAX_BYTES,
             exif_orientation: bool = False) -> np.ndarray:
    """Load ``src`` as an H x W x 3 RGB array: uint8 for 8-bit sources, float64 in [0, 1] for 16-bit, 32-bit and
    float sources.

    ``src`` may be a path, an http(s) URL (downloaded with :func:`fetch_bytes` using ``timeout`` and ``max_bytes``),
    bytes, a binary file object, a ``PIL.Image.Image``, a numpy array (H x W, H x W x 1/3/4 of uint8, uint16, bool or
    float in [0, 1]) or a torch tensor (3 x H x W or 1 x H x W, uint8 or float in [0, 1]). Grayscale becomes three
    equal channels, alpha is dropped, palette/CMYK/YCbCr/16-bit modes are converted. The EXIF orientation of files,
    bytes, file objects and PIL images is applied only with ``exif_orientation=True`` (by default pixels stay as
    stored, like ``skimage.io.imread``). Multi-frame files give their first frame. Arrays that need no conversion may
    be returned without a copy.

    Raises:
        FileNotFoundError / IsADirectoryError: the path does not exist / is a directory.
        ImageLoadError (ValueError): the path is not a regular file (FIFO, device, socket), or the data is empty, not
            an image, corrupt or truncated, whatever Pillow raised; a PIL image whose file was closed unloaded; a
            float image outside [0, 1].
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
        body = fetch_bytes(src, timeout=timeout, max_bytes=max_bytes)
        return _decode_stream(io.BytesIO(body), name, exif_orientation)
    if isinstance(src, (str, os.PathLike)):
        with _open_regular_file(pathlib.Path(os.fsdecode(src)), name) as fp:
            return _decode_stream(fp, name, exif_orientation)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return _decode_stream(io.BytesIO(src), name, exif_orientation)
    if isinstance(src, np.ndarray):
        return _from_array(src, name)
    if _is_tensor(src):
        return _from_tensor(src, name)
    if _is_pil(src):
        return _from_pil(src, name, exif_orientation)
    if isinstance(src, io.TextIOBase):
        raise TypeError(f"{name}: expected a binary file object, got a text-mode file (open it with 'rb')")
    if hasattr(src, "read"):
        return _decode_stream(src, name, exif_orientation)
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

    16-bit and float sources are rounded to the nearest of 256 levels (what every picture of them shows). The EXIF
    orientation is applied (``exif_orientation=True`` by default): users expect boxes on the picture as they see it.
    Keyword arguments (``timeout``, ``max_bytes``, ``exif_orientation``) are passed to :func:`load_rgb`.
    """
    kwargs.setdefault("exif_orientation", True)
    pixels = load_rgb(src, **kwargs)
    if pixels.dtype != np.uint8:
        pixels = np.multiply(pixels, 255.0).round().astype(np.uint8)
    return pixels, describe_source(src)
