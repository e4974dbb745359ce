"""NVIDIA's published notebook transforms, exactly, and fast: the engine of the seed-compatible ``utils`` facade.

:func:`prepare_input` reproduces NVIDIA's torch.hub ``prepare_input`` (scikit-image resize so that the shorter side
is 300, centre crop 300 x 300, ``(x * 256 - 128) / 128``) to ~1e-15, but much faster: see :func:`seed_preprocess`.
The one-call detection API preprocesses differently (the whole image, ImageNet statistics): see
:mod:`ssd.transforms`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..io.images import ImageSource, load_rgb

if TYPE_CHECKING:
    from scipy import sparse

__all__ = [
    "SEED_SIZE",
    "crop_center",
    "normalize",
    "prepare_input",
    "rescale",
    "seed_preprocess",
]

SEED_SIZE = 300

# scipy.ndimage.gaussian_filter's defaults, which skimage.transform.resize relies on.
_GAUSS_TRUNCATE = 4.0
_GAUSS_MIN_SIGMA = 1e-15
# Source rows converted to float64 per step of seed_preprocess: bounds its memory whatever the image size.
_CHUNK_ELEMENTS = 1 << 20


def _check_image(img: np.ndarray, what: str = "img") -> None:
    if not isinstance(img, np.ndarray):
        raise TypeError(f"{what}: expected a numpy array, got {type(img).__name__}")
    if img.ndim != 3:
        raise ValueError(f"{what}: expected an H x W x C array (ndim 3), got shape {tuple(img.shape)}")
    if img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"{what}: expected a non-empty image, got shape {tuple(img.shape)}")


def _check_positive(**sizes: int) -> None:
    for name, value in sizes.items():
        if not (isinstance(value, (int, np.integer)) and value > 0):
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")


def _seed_resize_shape(height: int, width: int, input_height: int, input_width: int) -> tuple[int, int]:
    """The (rows, cols) NVIDIA's ``rescale`` resizes to; note that it puts ``input_width`` on the rows."""
    aspect = width / float(height)
    if aspect > 1:
        return input_width, int(aspect * input_height)
    if aspect < 1:
        return int(input_width / aspect), input_height
    return input_width, input_height


def rescale(img: np.ndarray, input_height: int, input_width: int) -> np.ndarray:
    """NVIDIA's reference ``rescale``: ``skimage.transform.resize`` so that the shorter side fits the input size.

    Slow (it blurs and resizes the whole image); :func:`seed_preprocess` computes the same numbers much faster.
    """
    from skimage.transform import resize

    _check_image(img)
    _check_positive(input_height=input_height, input_width=input_width)
    return resize(img, _seed_resize_shape(img.shape[0], img.shape[1], input_height, input_width))


def crop_center(img: np.ndarray, cropx: int, cropy: int) -> np.ndarray:
    """NVIDIA's ``crop_center``: the central ``cropy`` rows x ``cropx`` columns (a view of ``img``)."""
    _check_image(img)
    _check_positive(cropx=cropx, cropy=cropy)
    y, x = img.shape[:2]
    if cropx > x or cropy > y:
        # NVIDIA's version silently returned a wrongly placed, smaller crop here.
        raise ValueError(f"crop_center: expected an image of at least {cropy} x {cropx}, got {y} x {x}")
    startx = x // 2 - cropx // 2
    starty = y // 2 - cropy // 2
    return img[starty:starty + cropy, startx:startx + cropx]


def normalize(img: np.ndarray, mean: float = 128, std: float = 128) -> np.ndarray:
    """NVIDIA's ``normalize``: ``(img * 256 - mean) / std``, mapping [0, 1] to [-1, 1] with the defaults."""
    if np.any(np.asarray(std) == 0):
        raise ValueError("normalize: expected a non-zero std, got 0")
    return (img * 256 - mean) / std


def _mirror(index: np.ndarray, length: int) -> np.ndarray:
    """scipy.ndimage's 'mirror' boundary (d c b | a b c d | c b a), i.e. skimage's 'reflect'."""
    if length == 1:
        return np.zeros_like(index)
    period = 2 * length - 2
    index = np.mod(index, period)
    return np.where(index >= length, period - index, index)


def _resize_rows(n_in: int, n_out: int, start: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights of output samples ``start .. start + count - 1`` of skimage's 1-D resize ``n_in -> n_out``.

    skimage.transform.resize (order 1, mode 'reflect', anti-aliasing on when shrinking) is, per axis, a Gaussian
    blur with sigma ``max(0, (n_in / n_out - 1) / 2)`` followed by linear interpolation at
    ``(o + 0.5) * n_in / n_out - 0.5``, both with mirror boundaries. Returns ``(rows, cols, weights)`` of the
    composite, in source coordinates.
    """
    scale = n_in / n_out
    coord = (np.arange(start, start + count, dtype=np.float64) + 0.5) * scale - 0.5
    left = np.floor(coord)
    frac = coord - left
    left = left.astype(np.int64)
    cols = np.stack([_mirror(left, n_in), _mirror(left + 1, n_in)], axis=1)
    weights = np.stack([1.0 - frac, frac], axis=1)
    sigma = max(0.0, (scale - 1.0) / 2.0)
    if sigma > _GAUSS_MIN_SIGMA:
        radius = int(_GAUSS_TRUNCATE * sigma + 0.5)
        taps = np.arange(-radius, radius + 1)
        kernel = np.exp(-0.5 / (sigma * sigma) * taps.astype(np.float64) ** 2)
        kernel /= kernel.sum()
        cols = _mirror(cols[:, :, None] + taps, n_in)
        weights = weights[:, :, None] * kernel
    rows = np.repeat(np.arange(count), cols[0].size)
    return rows, cols.ravel(), weights.ravel()


def _resize_matrix(n_in: int, n_out: int, start: int, count: int) -> tuple[sparse.csr_matrix, int]:
    """The resize of :func:`_resize_rows` as a sparse ``count x window`` matrix and the window's first source index."""
    from scipy import sparse

    rows, cols, weights = _resize_rows(n_in, n_out, start, count)
    first, last = int(cols.min()), int(cols.max())
    matrix = sparse.csr_matrix((weights, (rows, cols - first)), shape=(count, last - first + 1))
    matrix.sum_duplicates()
    return matrix, first


def _resize_crop(img: np.ndarray, out_shape: tuple[int, int], top: int, left: int, crop: tuple[int, int],
                 scale: float = 1.0) -> np.ndarray:
    """``skimage.transform.resize(img * scale, out_shape)[top:top + crop[0], left:left + crop[1]]`` as float64,
    touching only the source pixels the crop depends on."""
    rows_matrix, y0 = _resize_matrix(img.shape[0], out_shape[0], top, crop[0])
    cols_matrix, x0 = _resize_matrix(img.shape[1], out_shape[1], left, crop[1])
    window = img[y0:y0 + rows_matrix.shape[1], x0:x0 + cols_matrix.shape[1]]
    height, width, channels = window.shape
    # Source rows are converted to float64 a slab at a time, so a large photo never gets a full-size float copy.
    step = max(1, _CHUNK_ELEMENTS // width)
    slabs = [(r0, rows_matrix[:, r0:r0 + step] if step < height else rows_matrix) for r0 in range(0, height, step)]
    out = np.empty((crop[0], crop[1], channels))
    # One channel at a time: the temporaries stay small enough for the allocator to recycle them, where fresh
    # multi-megabyte arrays cost more in page faults than the arithmetic itself.
    for c in range(channels):
        partial = None
        for r0, weights in slabs:
            rows = weights @ window[r0:r0 + step, :, c].astype(np.float64)
            partial = rows if partial is None else partial + rows
        out[:, :, c] = (cols_matrix @ np.ascontiguousarray(partial.T)).T
    # skimage clips to the input's range; the weights are convex, so the window's range is the same bound.
    np.clip(out, window.min(), window.max(), out=out)
    if scale != 1.0:
        out *= scale
    return out


def seed_preprocess(img: np.ndarray) -> np.ndarray:
    """Fast exact ``normalize(crop_center(rescale(img, 300, 300), 300, 300))``: float64 300 x 300 x C in [-1, 1].

    ``img`` is H x W x C, uint8 or uint16 (scaled by 1/255 or 1/65535 as ``img_as_float`` does) or float in [0, 1]
    (float32 is computed in float64, a ~1e-7 difference from skimage, which would stay in float32). The crop is taken
    in source coordinates before resizing, so the work is bounded by the output and the source pixels it depends on:
    a 6 x 6000 strip never builds its 300 x 300000 intermediate. Agrees with the reference to ~1e-15.
    """
    _check_image(img)
    if img.dtype == np.uint8:
        scale = 1.0 / 255
    elif img.dtype == np.uint16:
        scale = 1.0 / 65535
    elif img.dtype.kind == "f":
        scale = 1.0
    else:
        raise TypeError(f"seed_preprocess: expected a uint8, uint16 or float image, got {img.dtype}")
    out_shape = _seed_resize_shape(img.shape[0], img.shape[1], SEED_SIZE, SEED_SIZE)
    top = out_shape[0] // 2 - SEED_SIZE // 2
    left = out_shape[1] // 2 - SEED_SIZE // 2
    return normalize(_resize_crop(img, out_shape, top, left, (SEED_SIZE, SEED_SIZE), scale))


def prepare_input(src: ImageSource) -> np.ndarray:
    """NVIDIA's ``prepare_input``: load ``src`` (anything :func:`ssd.images.load_rgb` accepts) and return the
    float64 300 x 300 x 3 array in [-1, 1] of :func:`seed_preprocess`."""
    return seed_preprocess(load_rgb(src))
