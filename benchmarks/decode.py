"""Time the batched decoder against an NVIDIA-style per-class loop on realistic synthetic predictions.

Part of ``python -m benchmarks`` (``--suite decode`` runs it alone).
"""
from __future__ import annotations

import numpy as np
import torch

from benchmarks.timing import median_seconds
from ssd.anchors import default_boxes as spec_default_boxes
from ssd.box_coder import BoxCoder
from ssd.boxes import box_iou
from ssd.models import NVIDIA_SSD300
from ssd.postprocess import postprocess, split_detections

NUM_BOXES = NVIDIA_SSD300.anchors.num_anchors
NUM_CLASSES = NVIDIA_SSD300.num_classes

THRESHOLD = 0.05
CRITERIA = 0.5
MAX_OUTPUT = 20


def synthetic_predictions(
    batch: int = 8, seed: int = 0, objects: int = 4, scattered: int = 260
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (locs, confs) that look like a trained model's: mostly confident background, a few objects
    whose default boxes form clusters of overlapping detections, and weak scores scattered over most classes."""
    gen = torch.Generator().manual_seed(seed)
    anchors = spec_default_boxes(NVIDIA_SSD300.anchors, "cxcywh")
    anchors_xyxy = spec_default_boxes(NVIDIA_SSD300.anchors, "xyxy")
    locs = torch.randn(batch, 4, NUM_BOXES, generator=gen) * 0.3
    confs = torch.randn(batch, NUM_CLASSES, NUM_BOXES, generator=gen) * 0.7 - 1.0
    confs[:, 0] = 7.0 + 0.3 * torch.randn(batch, NUM_BOXES, generator=gen)
    popularity = 1.0 / torch.arange(4, NUM_CLASSES + 3, dtype=torch.float32)
    for image in range(batch):
        for _ in range(objects):
            centre = 0.2 + 0.6 * torch.rand(2, generator=gen)
            size = 0.1 + 0.4 * torch.rand(2, generator=gen)
            target = torch.cat([centre - size / 2, centre + size / 2])
            members = torch.nonzero(box_iou(anchors_xyxy, target[None])[:, 0] > 0.35).flatten()
            count = members.numel()
            d = anchors[members]
            # Offsets that move each member onto the object, plus noise: overlapping boxes for NMS to sort out.
            offsets = torch.cat([(centre - d[:, :2]) / (0.1 * d[:, 2:]), torch.log(size / d[:, 2:]) / 0.2], dim=1)
            locs[image, :, members] = offsets.t() + 0.5 * torch.randn(4, count, generator=gen)
            label, lookalike = torch.randint(1, NUM_CLASSES, (2,), generator=gen).tolist()
            confs[image, 0, members] = 1.0
            confs[image, label, members] = 4.0 + 0.5 * torch.randn(count, generator=gen)
            confs[image, lookalike, members] = 1.5 + 0.5 * torch.randn(count, generator=gen)
        # Weak, scattered scores: two classes on a few hundred boxes, common classes more often than rare ones.
        boxes = torch.randperm(NUM_BOXES, generator=gen)[:scattered]
        confs[image, 0, boxes] = 2.0
        for _ in range(2):
            labels = 1 + torch.multinomial(popularity, scattered, replacement=True, generator=gen)
            confs[image, labels, boxes] = 1.0 + 0.6 * torch.randn(scattered, generator=gen)
    return locs, confs


def nvidia_style_decode(locs: torch.Tensor, confs: torch.Tensor) -> list[tuple[np.ndarray, ...]]:
    """The straightforward baseline: per image, per class, threshold, sort and a greedy loop (as NVIDIA does)."""
    all_boxes = BoxCoder.from_spec(NVIDIA_SSD300).decode(locs)
    all_probs = confs.float().permute(0, 2, 1).softmax(dim=-1)
    results = []
    for boxes_in, probs in zip(all_boxes, all_probs):
        boxes_out, labels_out, scores_out = [], [], []
        for label in range(1, NUM_CLASSES):
            mask = probs[:, label] > THRESHOLD
            boxes, scores = boxes_in[mask], probs[mask, label]
            if scores.numel() == 0:
                continue
            remaining = torch.sort(scores, stable=True).indices[-200:]
            picked = []
            while remaining.numel() > 0:
                best = remaining[-1]
                picked.append(best)
                remaining = remaining[box_iou(boxes[remaining], boxes[best][None])[:, 0] < CRITERIA]
            picked = torch.stack(picked)
            boxes_out.append(boxes[picked])
            scores_out.append(scores[picked])
            labels_out += [label] * picked.numel()
        if not scores_out:
            results.append((np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32)))
            continue
        scores = torch.cat(scores_out)
        best = torch.sort(scores, stable=True).indices[-MAX_OUTPUT:].cpu()
        labels = torch.tensor(labels_out, dtype=torch.int64)
        results.append((torch.cat(boxes_out)[best].cpu().numpy(), labels[best].numpy(), scores[best].cpu().numpy()))
    return results



def measure_decode(batch: int = 8, repeats: int = 50, device: str = "cpu", baseline_repeats: int = 5) -> dict:
    """Per-image decode time (decode_batch + split_detections) and that of the per-class loop, on one batch.

    Both produce host numpy detections, so the timings include the device-to-host copy and synchronisation.
    """
    locs, confs = synthetic_predictions(batch)
    locs, confs = locs.to(device), confs.to(device)
    probs = confs.permute(0, 2, 1).softmax(dim=-1)[:, :, 1:]
    above = probs > THRESHOLD
    candidates = above.sum(dim=(1, 2)).float()
    classes = above.any(dim=1).sum(dim=1).float()

    recipe = NVIDIA_SSD300.postprocess.updated(iou_threshold=CRITERIA, max_detections=MAX_OUTPUT)

    def fast() -> list:
        return split_detections(postprocess((locs, confs), NVIDIA_SSD300, recipe), ascending=True)

    fast_s = median_seconds(fast, repeats, device=device)
    slow_s = median_seconds(lambda: nvidia_style_decode(locs, confs), baseline_repeats, warmup=1)
    ours, theirs = fast(), nvidia_style_decode(locs, confs)
    identical = all(
        np.array_equal(a, b) for mine, ref in zip(ours, theirs) for a, b in zip(mine, ref)
    )
    return {
        "device": str(locs.device),
        "batch": batch,
        "candidates_per_image": candidates.mean().item(),
        "candidates_min_max": (int(candidates.min().item()), int(candidates.max().item())),
        "classes_per_image": classes.mean().item(),
        "detections_per_image": float(np.mean([len(d[1]) for d in ours])),
        "decode_ms_per_image": fast_s * 1e3 / batch,
        "baseline_ms_per_image": slow_s * 1e3 / batch,
        "speedup": slow_s / fast_s,
        "identical_to_baseline": identical,
        "threads": torch.get_num_threads(),
    }
