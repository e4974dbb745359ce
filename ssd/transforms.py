"""Every input transform of the library: the resize rules of an :class:`~ssd.models.spec.InputSpec`, the
normalisation, and the detection preprocessing. detect, the evaluation datasets and training augmentation all call
this module, and all take the model's ``InputSpec`` (``model.spec.input``): nothing here defaults to one model.

The whole image (no crop, so boxes cover the full picture) is resized to S x S by the spec's ``resize`` rule:

* ``"antialias"`` (NVIDIA): bilinear with antialiasing, as PIL's ``Image.resize(BILINEAR)``. Two implementations:
  torch's uint8 antialiased kernel (fast; detect and training), which reproduces PIL to one grey level on ~0.1% of
  pixels, and PIL itself (``exact=True``; evaluation, which reproduces published numbers).
* ``"bilinear"`` (mmdetection): cv2's INTER_LINEAR without antialiasing, reproduced bit for bit on uint8 images with
  cv2's fixed-point arithmetic (a plain bilinear resize on float images).
* ``"torch_bilinear"`` (torchvision's detection models): ``F.interpolate(mode="bilinear", antialias=False,
  align_corners=False)`` on float pixels in [0, 1], after the normalisation, in the order and arithmetic of
  torchvision's ``GeneralizedRCNNTransform`` with a fixed size (uint8 becomes float as ``convert_image_dtype`` does).

The normalisation is ``(x / 255 * value_range - mean) / std`` per channel for 0..255 pixels (``x * value_range``
for float pixels in [0, 1]).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch

from .models.spec import InputSpec

__all__ = [
    "RESIZE_RULES",
    "has_uint8_resize",
    "normalize",
    "preprocess_for_detection",
    "resize",
    "resize_uint8",
    "to_tensor_chw",
]

RESIZE_RULES: tuple[str, ...] = InputSpec.RESIZE_RULES
# Rules whose uint8 result on the CPU is whole grey levels: images can be resized as uint8 without loss.
_UINT8_RULES = ("antialias", "bilinear")


def to_tensor_chw(img: np.ndarray) -> torch.Tensor:
    """An H x W x 3 (or H x W, H x W x 1) numpy image as a 3 x H x W tensor, sharing memory where possible.

    uint8 stays uint8; float64 becomes float32 (the detection transform works in float32 anyway); other float types
    are kept. Grayscale is expanded to three channels without a copy.
    """
    if not isinstance(img, np.ndarray):
        raise TypeError(f"to_tensor_chw: expected a numpy array, got {type(img).__name__}")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3):
        raise ValueError(f"to_tensor_chw: expected an H x W x 3, H x W x 1 or H x W array, got shape {img.shape}")
    if img.dtype == np.float64:
        img = img.astype(np.float32)
    elif img.dtype != np.uint8 and img.dtype.kind != "f":
        raise TypeError(f"to_tensor_chw: expected a uint8 or float array, got {img.dtype}")
    # torch refuses negative strides and warns on read-only arrays (np.asarray of a PIL image is read-only).
    if not img.flags.writeable or any(s < 0 for s in img.strides):
        img = np.array(img)
    tensor = torch.from_numpy(img).permute(2, 0, 1)
    return tensor.expand(3, -1, -1) if tensor.shape[0] == 1 else tensor


def _check_tensor(image: object, index: int) -> torch.Tensor:
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"images[{index}]: expected a 3 x H x W tensor, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[0] != 3 or image.shape[1] < 1 or image.shape[2] < 1:
        raise ValueError(f"images[{index}]: expected a tensor of shape 3 x H x W, got {tuple(image.shape)}")
    if image.dtype != torch.uint8 and not image.dtype.is_floating_point:
        raise TypeError(f"images[{index}]: expected a uint8 (0..255) or float (0..1) tensor, got {image.dtype}")
    return image


def _stack_to_device(group: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Stack same-size images into N x 3 x H x W on ``device``, pinning host memory for an asynchronous CUDA copy."""
    # Tensors from to_tensor_chw are views of H x W x 3 arrays: stacking them as H x W x 3 is a plain copy, where
    # stacking into 3 x H x W would be a slow strided gather. The result then has channels-last strides.
    hwc = all(t.permute(1, 2, 0).is_contiguous() for t in group)
    parts = [t.permute(1, 2, 0) for t in group] if hwc else list(group)
    if device.type == "cuda" and all(t.device.type == "cpu" for t in parts):
        batch = torch.empty((len(parts), *parts[0].shape), dtype=parts[0].dtype, pin_memory=True)
        torch.stack(parts, out=batch)
        batch = batch.to(device, non_blocking=True)
    else:
        batch = torch.stack([t.to(device) for t in parts])
    return batch.permute(0, 3, 1, 2) if hwc else batch


def _gather_contiguous(group: list[torch.Tensor]) -> torch.Tensor:
    """Same-size CPU images copied straight into one contiguous N x 3 x H x W tensor (still uint8 when uint8).

    One copy per image: stacking H x W x 3 views and then making the stack contiguous holds two copies of the batch
    at once (3x the decoded input at the peak instead of 2x), and measured slower too (0.29 s against 0.23 s for
    four 1500 x 2000 photos on one core).
    """
    first = group[0]
    batch = torch.empty((len(group), *first.shape), dtype=first.dtype)
    for slot, image in zip(batch, group):
        slot.copy_(image)
    return batch


def preprocess_for_detection(
    images: Sequence[torch.Tensor] | torch.Tensor,
    input_spec: InputSpec,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    size: int | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """Batch 3 x H x W images (uint8 0..255 or float 0..1, any sizes) into the N x 3 x size x size model input.

    ``input_spec`` (``model.spec.input``) gives the size, the resize rule and the normalisation; ``size`` overrides
    its size. Images go to ``device`` (default: that of the first image) before conversion, uint8 when they are
    uint8 (4x less to copy), through pinned memory when the target is CUDA. Images of the same size share one resize
    call. Float inputs are not range-checked here (that would synchronise the device): ``detect`` checks them when
    it loads them. Returns ``dtype`` in ``memory_format``; an N x 3 x H x W tensor may be passed instead of a list.
    """
    if not isinstance(input_spec, InputSpec):
        raise TypeError(f"input_spec: expected an InputSpec (model.spec.input), got {type(input_spec).__name__}")
    if size is None:
        size = input_spec.size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size: expected a positive integer, got {size!r}")
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"images: expected a list of 3 x H x W tensors or an N x 3 x H x W tensor, "
                             f"got a tensor of shape {tuple(images.shape)}")
        images = list(images.unbind(0))
    images = [_check_tensor(image, i) for i, image in enumerate(images)]
    if device is not None:
        target = torch.device(device)
    elif images:
        target = images[0].device
    else:
        target = torch.device("cpu")
    out_shape = (len(images), 3, size, size)
    if not images:
        return torch.empty(out_shape, device=target, dtype=dtype, memory_format=memory_format)

    groups: dict[tuple[int, int, torch.dtype], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault((image.shape[1], image.shape[2], image.dtype), []).append(i)

    out = None
    for indices in groups.values():
        group = [images[i] for i in indices]
        if target.type == "cpu" and all(t.device.type == "cpu" for t in group):
            batch = _gather_contiguous(group)
        else:
            # Contiguous while still uint8: a quarter of the bytes to shuffle, and the fast layout for resizing.
            batch = _stack_to_device(group, target).contiguous()
        if input_spec.resize == "torch_bilinear":
            # torchvision's order: normalise the float image, then resize it.
            batch = resize(normalize(batch, input_spec), size, "torch_bilinear")
        else:
            batch = _normalize_folded(resize(batch, size, input_spec.resize).float(), batch.dtype, input_spec)
        if len(groups) == 1:
            return batch.to(dtype).contiguous(memory_format=memory_format)
        if out is None:
            out = torch.empty(out_shape, device=target, dtype=dtype, memory_format=memory_format)
        out[torch.tensor(indices, device=target)] = batch.to(dtype)
    return out


def _per_channel(values: tuple[float, float, float], like: torch.Tensor) -> torch.Tensor:
    """Three per-channel numbers shaped to broadcast over C x H x W or N x C x H x W."""
    return torch.tensor(values, device=like.device, dtype=torch.float32).view(3, 1, 1)


def normalize(images: torch.Tensor, input_spec: InputSpec) -> torch.Tensor:
    """``(x / 255 * value_range - mean) / std`` per channel, as float32: ``images`` are 3 x H x W or N x 3 x H x W,
    uint8 in 0..255 or float in [0, 1] (then ``x * value_range``).

    Computed as torchvision computes it (uint8 divided by 255 as ``convert_image_dtype`` does, then
    ``(x - mean) / std``), which is also NVIDIA's training arithmetic.
    """
    if not isinstance(images, torch.Tensor) or images.ndim not in (3, 4) or images.shape[-3] != 3:
        got = f"shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: expected a 3 x H x W or N x 3 x H x W tensor, got {got}")
    value_range = input_spec.value_range
    if images.dtype == torch.uint8:
        # 0..255 pixels wanted as 0..255 (mmdetection) need no arithmetic at all, so none that could round.
        x = images.float() if value_range == 255 else images.float() / 255
        scale = 1.0 if value_range == 255 else value_range
    elif images.dtype.is_floating_point:
        x, scale = images.float(), value_range
    else:
        raise TypeError(f"images: expected a uint8 (0..255) or float (0..1) tensor, got {images.dtype}")
    if scale != 1:
        x = x * scale
    return (x - _per_channel(input_spec.mean, x)) / _per_channel(input_spec.std, x)


def _normalize_folded(batch: torch.Tensor, source_dtype: torch.dtype, input_spec: InputSpec) -> torch.Tensor:
    """:func:`normalize` of an already float N x 3 x H x W batch (0..255 values when ``source_dtype`` is uint8),
    folded into one multiply-add per channel: the detection path's arithmetic, which its golden data was made
    with; it differs from :func:`normalize` by float rounding only."""
    std = _per_channel(input_spec.std, batch)
    mean = _per_channel(input_spec.mean, batch)
    unit = 1.0 / 255.0 if source_dtype == torch.uint8 else 1.0
    return torch.addcmul(-mean / std, batch, unit * input_spec.value_range / std)


def resize(images: torch.Tensor, size: int, rule: str, *, exact: bool = False) -> torch.Tensor:
    """``images`` (C x H x W or N x C x H x W) resized to ``size`` x ``size`` by ``rule`` (see the module docstring).

    Values keep their scale. uint8 comes back uint8 where the rule gives whole grey levels: ``"bilinear"`` on any
    device, ``"antialias"`` on the CPU; everything else comes back float32 (uint8 as 0..255). ``exact=True``
    resizes uint8 CPU images under ``"antialias"`` with PIL's own filter (the published protocol); the other rules
    are exact by construction, and float or CUDA images have no PIL twin (refused).
    """
    if not isinstance(images, torch.Tensor) or images.ndim not in (3, 4):
        got = f"shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: expected a C x H x W or N x C x H x W tensor, got {got}")
    if rule not in RESIZE_RULES:
        raise ValueError(f"rule: expected one of {', '.join(map(repr, RESIZE_RULES))}, got {rule!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size: expected a positive integer, got {size!r}")
    batch = images if images.ndim == 4 else images[None]
    if tuple(batch.shape[-2:]) == (size, size):
        out = batch if batch.dtype == torch.uint8 and rule in _UINT8_RULES else batch.float()
    elif exact and rule == "antialias":
        if batch.dtype != torch.uint8 or batch.device.type != "cpu" or batch.shape[1] != 3:
            raise ValueError(f"exact: PIL's filter resizes 3-channel uint8 CPU images, got a {batch.dtype} tensor "
                             f"of shape {tuple(images.shape)} on {batch.device}")
        out = _resize_like_pil(batch, size)
    else:
        out = _resize(batch.contiguous(), size, rule)
    return out if images.ndim == 4 else out[0]


def _resize(batch: torch.Tensor, size: int, rule: str) -> torch.Tensor:
    """N x C x H x W (uint8 or float) to N x C x size x size by ``rule``, uint8 where :func:`resize` says."""
    interpolate = torch.nn.functional.interpolate
    if rule == "antialias":
        if batch.dtype == torch.uint8 and batch.device.type == "cpu":
            # torch's uint8 antialiased kernel rounds like PIL's; the result is exact PIL-style uint8 pixels.
            return interpolate(batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return interpolate(batch.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    if rule == "bilinear" and batch.dtype == torch.uint8:
        return _resize_like_cv2(batch, size)
    # "torch_bilinear", and "bilinear" on float pixels: one plain bilinear interpolation.
    return interpolate(batch.float(), size=(size, size), mode="bilinear", antialias=False, align_corners=False)


def _resize_like_pil(batch: torch.Tensor, size: int) -> torch.Tensor:
    """PIL's ``Image.resize((size, size), BILINEAR)`` of each N x 3 x H x W uint8 image: NVIDIA's evaluation
    protocol (torchvision's ``Resize`` on a PIL image), which torch's kernel misses by a grey level on ~0.1% of
    pixels. Harmless for pictures, but evaluation reproduces published numbers, and with PIL they match exactly."""
    from PIL import Image

    out = torch.empty((batch.shape[0], 3, size, size), dtype=torch.uint8)
    for slot, image in zip(out, batch):
        # An H x W x 3 view: a tensor made from an H x W x 3 array goes back to PIL without a copy.
        pixels = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
        resized = Image.fromarray(pixels).resize((size, size), Image.BILINEAR)
        slot.permute(1, 2, 0).numpy()[...] = np.asarray(resized)
    return out


# cv2's INTER_LINEAR on uint8 works in fixed point: 11-bit coefficients (INTER_RESIZE_COEF_BITS).
_COEF_SCALE = 2048


@functools.lru_cache(maxsize=32)
def _cv2_linear_table(src: int, dst: int, clamp_weights: bool) -> tuple[np.ndarray, ...]:
    """cv2's source indices and 11-bit weights along one axis: (i0, i1, w0, w1), int64 arrays of length ``dst``.

    Half-pixel centres computed in double and rounded to float, as cv2 does; the fraction and the weights are
    float32 arithmetic, rounded half to even. Along x a centre left of the first or right of the last pixel takes
    that pixel with weight 1 (``clamp_weights``); along y cv2 keeps the weights and clamps the row indices only.
    """
    scale = 1.0 / (dst / src)
    pos = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    first = np.floor(pos).astype(np.int64)
    frac = (pos - first.astype(np.float32)).astype(np.float32)
    if clamp_weights:
        low, high = first < 0, first >= src - 1
        frac[low | high] = 0.0
        first[low] = 0
        first[high] = src - 1
    w0 = np.rint((np.float32(1.0) - frac) * np.float32(_COEF_SCALE)).astype(np.int64)
    w1 = np.rint(frac * np.float32(_COEF_SCALE)).astype(np.int64)
    return np.clip(first, 0, src - 1), np.clip(first + 1, 0, src - 1), w0, w1


@functools.lru_cache(maxsize=32)
def _used_rows(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The source rows cv2's vertical pass reads, and its two rows per output row as positions among them."""
    i0, i1, _, _ = _cv2_linear_table(src, dst, False)
    needed, inverse = np.unique(np.concatenate([i0, i1]), return_inverse=True)
    return needed, inverse[:dst], inverse[dst:]


def _resize_like_cv2(batch: torch.Tensor, size: int) -> torch.Tensor:
    """``cv2.resize(img, (size, size), interpolation=INTER_LINEAR)`` for N x C x H x W uint8, bit for bit.

    Rows first: x weights times pixels, exact in int32; then the two rows are combined as cv2's vectorised
    vertical pass does (each row >> 4, times its 11-bit weight, >> 16, summed, then rounded >> 2), which is not
    quite a rounded >> 22. Checked against cv2 (opencv 5.0, x86-64) on the golden images at 300, 320 and 512.
    """
    device = batch.device

    def table(src: int, clamp: bool) -> list[torch.Tensor]:
        return [torch.from_numpy(t).to(device) for t in _cv2_linear_table(src, size, clamp)]

    x0, x1, a0, a1 = table(batch.shape[-1], True)
    y0, y1, b0, b1 = table(batch.shape[-2], False)
    a0, a1 = a0.to(torch.int32), a1.to(torch.int32)

    # Each source row that is used, once (cv2 computes each needed row once too); the vertical pass then picks
    # its two rows. A large image shrunk to S rows uses at most 2 S of them.
    needed, y0, y1 = [torch.from_numpy(t).to(device) for t in _used_rows(batch.shape[-2], size)]
    batch = batch.index_select(-2, needed)
    # The vectorised vertical pass drops the low 4 bits of every row value first: do it before the gather.
    rows = (batch.index_select(-1, x0).to(torch.int32) * a0).add_(batch.index_select(-1, x1).to(torch.int32) * a1)
    rows >>= 4
    b0 = b0.to(torch.int32)[:, None]
    b1 = b1.to(torch.int32)[:, None]
    total = ((rows.index_select(-2, y0) * b0) >> 16).add_((rows.index_select(-2, y1) * b1) >> 16)
    return ((total + 2) >> 2).clamp_(0, 255).to(torch.uint8)


def resize_uint8(image: torch.Tensor, input_spec: InputSpec, *, exact: bool = False) -> torch.Tensor:
    """A 3 x H x W (or N x 3 x H x W) uint8 CPU image resized to the spec's S x S as uint8, exactly the pixels
    :func:`preprocess_for_detection` would normalise (with ``exact=False``; ``exact=True`` gives PIL's, see
    :func:`resize`): lossless, so data-loader workers can resize (in parallel) and ship S x S bytes instead of
    photos. Rules without whole grey levels (``"torch_bilinear"``) are refused: resize their images as floats."""
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.ndim not in (3, 4) \
            or image.shape[-3] != 3 or image.device.type != "cpu":
        got = f"a {image.dtype} tensor of shape {tuple(image.shape)} on {image.device}" \
            if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image: expected a 3 x H x W uint8 CPU tensor, got {got}")
    if input_spec.resize not in _UINT8_RULES:
        raise ValueError(f"input_spec.resize: expected a rule with a lossless uint8 result "
                         f"({', '.join(map(repr, _UINT8_RULES))}), got {input_spec.resize!r}")
    return resize(image, input_spec.size, input_spec.resize, exact=exact)


def has_uint8_resize(input_spec: InputSpec) -> bool:
    """Whether :func:`resize_uint8` can resize for ``input_spec`` (its rule gives whole grey levels)."""
    return input_spec.resize in _UINT8_RULES
