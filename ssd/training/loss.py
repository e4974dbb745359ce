"""SSD's multibox loss with hard negative mining, equal in value and gradients to NVIDIA's ``Loss``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..box_coder import BoxCoder
from ..models.spec import DetectorSpec, from_any_copy

__all__ = ["SSDLoss"]


class SSDLoss(nn.Module):
    """Localisation (smooth L1 on positives) plus confidence (cross-entropy, hard negatives) loss.

    Per image: ``(loc_loss + conf_loss) / num_positives``, where the confidence loss covers the positives and the
    ``neg_pos_ratio * num_positives`` negatives with the highest cross-entropy; an image without positives adds 0.
    The result is the mean over the batch (images without positives still count in the denominator, as in NVIDIA's
    training). The regression targets are the spec's :class:`~ssd.box_coder.BoxCoder` encoding of the truths.

    Args:
        spec: the model's spec (``model.spec``; ``NVIDIA_SSD300`` for NVIDIA's): default boxes and variances.
        neg_pos_ratio: negatives kept per positive.
    """

    def __init__(self, spec: DetectorSpec, neg_pos_ratio: int = 3) -> None:
        super().__init__()
        spec = from_any_copy(spec)  # another copy's spec (torch.hub's private copy)
        if not isinstance(spec, DetectorSpec):
            raise TypeError(f"spec: expected a DetectorSpec (model.spec, or NVIDIA_SSD300 for NVIDIA's), "
                            f"got {type(spec).__name__}")
        if isinstance(neg_pos_ratio, bool) or not isinstance(neg_pos_ratio, int) or neg_pos_ratio < 0:
            raise ValueError(f"neg_pos_ratio: expected a non-negative int, got {neg_pos_ratio!r}")
        self.neg_pos_ratio = neg_pos_ratio
        # The default boxes come from the coder's per-device cache, so the module holds no state to move or save.
        self.box_coder = BoxCoder.from_spec(spec)

    def _check(self, ploc: torch.Tensor, plabel: torch.Tensor, gloc: torch.Tensor, glabel: torch.Tensor) -> None:
        for name, value in (("ploc", ploc), ("plabel", plabel), ("gloc", gloc), ("glabel", glabel)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
        num_anchors = self.box_coder.num_anchors
        n = ploc.shape[0] if ploc.ndim else -1
        if ploc.ndim != 3 or ploc.shape[1:] != (4, num_anchors):
            raise ValueError(f"ploc: expected shape (N, 4, {num_anchors}), got {tuple(ploc.shape)}")
        if plabel.ndim != 3 or plabel.shape[0] != n or plabel.shape[2] != num_anchors or plabel.shape[1] < 2:
            raise ValueError(f"plabel: expected shape ({n}, C >= 2, {num_anchors}), got {tuple(plabel.shape)}")
        if gloc.shape != ploc.shape:
            raise ValueError(f"gloc: expected shape {tuple(ploc.shape)}, got {tuple(gloc.shape)}")
        if glabel.shape != (n, num_anchors):
            raise ValueError(f"glabel: expected shape ({n}, {num_anchors}), got {tuple(glabel.shape)}")
        if glabel.dtype != torch.int64:
            raise TypeError(f"glabel: expected dtype torch.int64, got {glabel.dtype}")

    def forward(
        self, ploc: torch.Tensor, plabel: torch.Tensor, gloc: torch.Tensor, glabel: torch.Tensor
    ) -> torch.Tensor:
        """The batch loss (a scalar).

        Args:
            ploc: N x 4 x A predicted offsets (the model's ``locs``).
            plabel: N x C x A class logits (the model's ``confs``).
            gloc: N x 4 x A cxcywh truth boxes per default box (``encode_batch``'s boxes, transposed).
            glabel: N x A int64 labels per default box, 0 for background.
        """
        self._check(ploc, plabel, gloc, glabel)
        # Under autocast the head outputs may be half precision; the reductions below need float32.
        ploc = ploc.float()
        plabel = plabel.float()
        positive = glabel > 0
        num_pos = positive.sum(dim=1)

        target = self.box_coder.encode(gloc)
        loc_loss = F.smooth_l1_loss(ploc, target, reduction="none").sum(dim=1)
        # where, not multiply: a negative's target may be non-finite and inf * 0 would poison the sum.
        loc_loss = torch.where(positive, loc_loss, 0.0).sum(dim=1)

        con = F.cross_entropy(plabel, glabel, reduction="none")
        # Hard negative mining: rank the negatives by their loss (positives zeroed so they rank last) and keep the
        # top neg_pos_ratio * num_pos; the rank comes from the sort of the sort indices, as in NVIDIA's code.
        con_neg = con.detach().masked_fill(positive, 0.0)
        _, order = con_neg.sort(dim=1, descending=True)
        _, rank = order.sort(dim=1)
        num_neg = torch.clamp(self.neg_pos_ratio * num_pos, max=positive.shape[1]).unsqueeze(-1)
        selected = positive | (rank < num_neg)
        con_loss = (con * selected.float()).sum(dim=1)

        total = loc_loss + con_loss
        has_pos = (num_pos > 0).float()
        return (total * has_pos / num_pos.float().clamp(min=1e-6)).mean(dim=0)
