"""The detection transform: H x W x 3 pixels in, the network's N x 3 x S x S input out, as the model's spec says.

The whole image (no crop, so boxes cover the full picture) is resized to S x S and normalised with the spec's mean
and std. uint8 images on the CPU are resized as uint8 with antialiasing, which reproduces PIL's bilinear resize (the
protocol NVIDIA evaluated with) to one grey level on ~0.1% of pixels; a float resize does not. A spec whose resize is
``"bilinear"`` (mmdetection, cv2's INTER_LINEAR) gets no antialiasing and uint8 rounding, like cv2.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..models.spec import InputSpec

__all__ = ["preprocess_for_detection", "to_tensor_chw"]


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
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    size: int | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
    input_spec: InputSpec | None = None,
) -> torch.Tensor:
    """Batch 3 x H x W images (uint8 0..255 or float 0..1, any sizes) into the N x 3 x size x size model input.

    ``input_spec`` (``model.spec.input``; NVIDIA's SSD300 by default) gives the size, the interpolation and the
    normalisation; ``size`` overrides its size. Images go to ``device`` (default: that of the first image) before
    conversion, uint8 when they are uint8 (4x less to copy), through pinned memory when the target is CUDA. Images of
    the same size share one resize call. Float inputs are not range-checked here (that would synchronise the device):
    ``detect`` checks them when it loads them. Returns ``dtype`` in ``memory_format``; an N x 3 x H x W tensor may be
    passed instead of a list.
    """
    if input_spec is None:
        from ..models.ssd300_resnet50 import NVIDIA_SSD300

        input_spec = NVIDIA_SSD300.input
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

    # x / 255 * value_range then (x - mean) / std, folded into one multiply-add per channel after the resize.
    std = torch.tensor(input_spec.std, device=target, dtype=torch.float32).view(1, 3, 1, 1)
    mean = torch.tensor(input_spec.mean, device=target, dtype=torch.float32).view(1, 3, 1, 1)
    out = None
    for (_, _, src_dtype), indices in groups.items():
        group = [images[i] for i in indices]
        if target.type == "cpu" and all(t.device.type == "cpu" for t in group):
            batch = _gather_contiguous(group)
        else:
            # Contiguous while still uint8: a quarter of the bytes to shuffle, and the fast layout for resizing.
            batch = _stack_to_device(group, target).contiguous()
        batch = _resize(batch, size, input_spec.resize)
        unit = 1.0 / 255.0 if src_dtype == torch.uint8 else 1.0
        batch = torch.addcmul(-mean / std, batch, unit * input_spec.value_range / std)
        if len(groups) == 1:
            return batch.to(dtype).contiguous(memory_format=memory_format)
        if out is None:
            out = torch.empty(out_shape, device=target, dtype=dtype, memory_format=memory_format)
        out[torch.tensor(indices, device=target)] = batch.to(dtype)
    return out


def _resize(batch: torch.Tensor, size: int, rule: str) -> torch.Tensor:
    """N x 3 x H x W (uint8 or float) to float32 N x 3 x size x size by ``rule`` (see the module docstring)."""
    if tuple(batch.shape[-2:]) == (size, size):
        return batch.float()
    interpolate = torch.nn.functional.interpolate
    if rule == "antialias":
        if batch.dtype == torch.uint8 and batch.device.type == "cpu":
            # torch's uint8 antialiased kernel rounds like PIL's; the result is exact PIL-style uint8 pixels.
            return interpolate(batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False).float()
        return interpolate(batch.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    resized = interpolate(batch.float(), size=(size, size), mode="bilinear", antialias=False, align_corners=False)
    # cv2 resizes uint8 to uint8: round back to whole levels so the network sees what mmdetection's did.
    return resized.round_().clamp_(0, 255) if batch.dtype == torch.uint8 else resized
