"""SSD's box coding: truths to regression targets (training) and predicted offsets to boxes (inference, export).

One :class:`BoxCoder` per detector, from its spec's default boxes and variances. Both directions work in the
network's layout, N x 4 x A (A default boxes), and in float32, each with the operation order of NVIDIA's reference
(its ``Loss`` for encoding, its ``scale_back_batch`` for decoding), so training targets, losses and detections
match it bit for bit on the same machine.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .anchors import default_boxes
from .models.spec import AnchorSpec, BoxCoderSpec, DetectorSpec, from_any_copy

__all__ = ["BoxCoder"]

# Default-box centres and sizes per (anchors, device, dtype): GPU calls would otherwise upload them every time.
_CACHE: dict[tuple[AnchorSpec, torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}


def _shape(x: object) -> str:
    return str(tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__


@dataclass(frozen=True)
class BoxCoder:
    """Offsets relative to the default boxes of ``anchors``, scaled by the variances of ``coder``.

    ``offset_xy = (box_xy - anchor_xy) / anchor_wh / center_variance`` and
    ``offset_wh = log(box_wh / anchor_wh) / size_variance``; decoding inverts this, with the scaled log-size
    clamped to ``+-coder.max_log_size`` first where the family sets it (mmdetection's ``wh_ratio_clip``).
    """

    anchors: AnchorSpec
    coder: BoxCoderSpec

    def __post_init__(self) -> None:
        if not isinstance(self.anchors, AnchorSpec):
            raise TypeError(f"anchors: expected an AnchorSpec (spec.anchors), got {type(self.anchors).__name__}")
        if not isinstance(self.coder, BoxCoderSpec):
            raise TypeError(f"coder: expected a BoxCoderSpec (spec.box_coder), got {type(self.coder).__name__}")

    @classmethod
    def from_spec(cls, spec: DetectorSpec) -> BoxCoder:
        """The coder of a detector: ``BoxCoder.from_spec(model.spec)``."""
        spec = from_any_copy(spec)  # another copy's spec (torch.hub's private copy)
        if not isinstance(spec, DetectorSpec):
            raise TypeError(f"spec: expected a DetectorSpec (model.spec), got {type(spec).__name__}")
        return cls(spec.anchors, spec.box_coder)

    @property
    def num_anchors(self) -> int:
        return self.anchors.num_anchors

    def default_boxes(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
                      ) -> tuple[Tensor, Tensor]:
        """The default boxes' centres and sizes, each 2 x A, on ``device`` (CPU when None); cached, do not modify."""
        key = (self.anchors, torch.device("cpu" if device is None else device), dtype)
        cached = _CACHE.get(key)
        if cached is None:
            cxcywh = default_boxes(self.anchors, "cxcywh").to(device=key[1], dtype=dtype).t().contiguous()
            cached = (cxcywh[:2], cxcywh[2:])
            _CACHE[key] = cached
        return cached

    def _check(self, value: object, name: str, what: str) -> Tensor:
        if not isinstance(value, Tensor) or value.dim() != 3 or tuple(value.shape[1:]) != (4, self.num_anchors):
            raise ValueError(f"{name}: expected {what} of shape N x 4 x {self.num_anchors}, got {_shape(value)}")
        if not value.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got {value.dtype}")
        return value

    def _anchor_tensors(self, given: tuple[Tensor, Tensor] | None, device: torch.device) -> tuple[Tensor, Tensor]:
        if given is None:
            return self.default_boxes(device)
        expected = (2, self.num_anchors)
        if (not isinstance(given, (tuple, list)) or len(given) != 2
                or any(not isinstance(t, Tensor) or tuple(t.shape) != expected for t in given)):
            got = tuple(_shape(t) for t in given) if isinstance(given, (tuple, list)) else type(given).__name__
            raise ValueError(f"default_boxes: expected (centres, sizes), each of shape 2 x {self.num_anchors}, "
                             f"got {got}")
        return given[0], given[1]

    def encode(self, boxes: Tensor) -> Tensor:
        """Regression targets: ``boxes`` N x 4 x A, one cxcywh box per default box (relative to the input, as
        ``encode_batch(...)[0].transpose(1, 2)``), to the N x 4 x A float32 offsets that decode back to them.

        NVIDIA's ``Loss`` arithmetic: ``(1 / center_variance) * (g_xy - a_xy) / a_wh`` and
        ``(1 / size_variance) * log(g_wh / a_wh)``. A box with zero width or height gives a -inf size target.
        """
        boxes = self._check(boxes, "boxes", "cxcywh boxes").float()
        centres, sizes = self.default_boxes(boxes.device)
        # NVIDIA's scale_xy = 1 / 0.1 and scale_wh = 1 / 0.2, Python floats as there, so the products round alike.
        scale_xy = 1.0 / self.coder.center_variance
        scale_wh = 1.0 / self.coder.size_variance
        xy = scale_xy * (boxes[:, :2] - centres) / sizes
        wh = scale_wh * (boxes[:, 2:] / sizes).log()
        return torch.cat([xy, wh], dim=1)

    def decode(self, offsets: Tensor, default_boxes: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Boxes from offsets: ``offsets`` N x 4 x A (the model's ``locs``, any floating dtype) to N x A x 4 float32
        xyxy boxes relative to the input, unclipped. The input is not modified and gradients flow through.

        Args:
            offsets: the predicted offsets.
            default_boxes: ``(centres, sizes)``, each 2 x A float32, to decode against instead of the cached ones
                (:meth:`default_boxes`); an exported graph passes its own buffers so that they become constants.
        """
        offsets = self._check(offsets, "offsets", "a tensor").float()
        centres, sizes = self._anchor_tensors(default_boxes, offsets.device)
        coder = self.coder
        # NVIDIA scales by the variances first and rounds every step separately; the exp runs on a strided view of
        # the scaled N x 4 x A tensor, as NVIDIA's does, so even its vectorised/scalar split over elements matches.
        scaled = torch.cat([offsets[:, :2] * coder.center_variance, offsets[:, 2:] * coder.size_variance], dim=1)
        log_size = scaled[:, 2:]
        if coder.max_log_size is not None:
            log_size = log_size.clamp(-coder.max_log_size, coder.max_log_size)
        xy = scaled[:, :2] * sizes + centres
        half = 0.5 * (log_size.exp() * sizes)
        return torch.cat([xy - half, xy + half], dim=1).transpose(1, 2).contiguous()
