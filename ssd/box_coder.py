"""Box offsets to boxes and back, with the variances (and the optional log-size clamp) of a :class:`BoxCoderSpec`."""
from __future__ import annotations

import torch
from torch import Tensor

from .anchors import default_boxes
from .models.spec import AnchorSpec, BoxCoderSpec

__all__ = ["anchor_centres_sizes", "decode_boxes", "encode_boxes"]

_CACHE: dict[tuple[AnchorSpec, torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}


def anchor_centres_sizes(spec: AnchorSpec, device: torch.device, dtype: torch.dtype = torch.float32
                         ) -> tuple[Tensor, Tensor]:
    """Default-box centres and sizes, each 2 x A, cached per device so GPU calls do not upload them every time."""
    key = (spec, torch.device(device), dtype)
    cached = _CACHE.get(key)
    if cached is None:
        xywh = default_boxes(spec, "xywh").to(device=device, dtype=dtype).t().contiguous()
        cached = (xywh[:2], xywh[2:])
        _CACHE[key] = cached
    return cached


def decode_boxes(locs: Tensor, anchors: AnchorSpec, coder: BoxCoderSpec) -> Tensor:
    """Decode N x 4 x A offsets into N x A x 4 float32 (left, top, right, bottom), relative, unclipped.

    The input is not modified and gradients flow through.
    """
    if not isinstance(locs, Tensor) or locs.dim() != 3 or tuple(locs.shape[1:]) != (4, anchors.num_anchors):
        got = tuple(locs.shape) if isinstance(locs, Tensor) else type(locs).__name__
        raise ValueError(f"locs: expected a tensor of shape N x 4 x {anchors.num_anchors}, got {got}")
    if not locs.is_floating_point():
        raise ValueError(f"locs: expected a floating-point tensor, got {locs.dtype}")
    locs = locs.float()
    centres, sizes = anchor_centres_sizes(anchors, locs.device)
    # NVIDIA scales by the variances first and rounds every step separately; the exp runs on a strided view of the
    # scaled N x 4 x A tensor, as NVIDIA's does, so even its vectorised/scalar split over elements matches.
    scaled = torch.cat([locs[:, :2] * coder.center_variance, locs[:, 2:] * coder.size_variance], dim=1)
    log_size = scaled[:, 2:]
    if coder.max_log_size is not None:
        log_size = log_size.clamp(-coder.max_log_size, coder.max_log_size)
    xy = scaled[:, :2] * sizes + centres
    half = 0.5 * (log_size.exp() * sizes)
    return torch.cat([xy - half, xy + half], dim=1).transpose(1, 2).contiguous()


def encode_boxes(boxes_xywh: Tensor, anchors: AnchorSpec, coder: BoxCoderSpec) -> Tensor:
    """The offsets N x 4 x A that :func:`decode_boxes` turns back into ``boxes_xywh`` (N x A x 4, relative)."""
    centres, sizes = anchor_centres_sizes(anchors, boxes_xywh.device)
    boxes = boxes_xywh.float().transpose(1, 2)
    xy = (boxes[:, :2] - centres) / sizes / coder.center_variance
    wh = (boxes[:, 2:] / sizes).log() / coder.size_variance
    return torch.cat([xy, wh], dim=1)
