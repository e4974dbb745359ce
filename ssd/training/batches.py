"""How the training data reaches the loop: DataLoader workers (:func:`default_workers`), batches with their targets
encoded in the workers (:class:`EncodingCollate`, :class:`TrainBatch`), and unusable images as markers."""
from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch

from ..data.coco_format import BadImage, CocoDetectionDataset, DetectionCollate
from ..models.spec import DetectorSpec, from_any_copy
from .outputs import RunFolder
from .targets import encode_targets

__all__ = ["EncodingCollate", "TrainBatch", "default_workers", "usable_cores"]


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_workers(device: torch.device | str) -> int:
    """DataLoader workers that feed ``device`` without starving it.

    CUDA: up to 8 per process (NVIDIA's default), within this process's share of the cores (``LOCAL_WORLD_SIZE``
    processes of torchrun share a node). CPU: the network already uses every core, so a few workers (a quarter of
    the cores' share, at least 1, at most 4) keep decoding and augmenting out of the training process. With 0,
    augmentation runs inside the training process on all of torch's threads, and a CPU shared with another job
    slows it many times over (see benchmarks/training.py).
    """
    device = torch.device(device)
    try:
        local_world = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local_world = 1
    share = max(1, usable_cores() // local_world)
    if device.type == "cuda":
        return min(8, share)
    return max(1, min(4, share // 4))


class TrainBatch(NamedTuple):
    """One collated batch: ``images`` N x 3 x S x S (None when no item was usable), ``gloc`` N x 4 x A and
    ``glabels`` N x A encoded against the model's spec, the ``targets`` of the N images, and the ``bad`` images
    (:class:`~ssd.data.coco_format.BadImage`) that were left out."""

    images: torch.Tensor | None
    gloc: torch.Tensor | None
    glabels: torch.Tensor | None
    targets: list[dict[str, Any]]
    bad: list[BadImage]


class EncodingCollate:
    """Collate that also encodes the targets against ``spec`` (the model's), so that the matching runs in the
    DataLoader's workers. Returns a :class:`TrainBatch`; items that are None or :class:`BadImage` are left out of
    the tensors (the latter listed in ``bad``)."""

    def __init__(self, spec: DetectorSpec) -> None:
        spec = from_any_copy(spec)  # another copy's spec (torch.hub's private copy)
        if not isinstance(spec, DetectorSpec):
            raise TypeError(f"spec: expected a DetectorSpec (model.spec), got {type(spec).__name__}")
        self._collate = DetectionCollate()
        self.spec = spec

    def __call__(self, batch: list[tuple[torch.Tensor, dict[str, Any]] | BadImage | None]) -> TrainBatch:
        bad = [item for item in batch if isinstance(item, BadImage)]
        collated = self._collate([item for item in batch if not isinstance(item, BadImage)])
        if collated is None:
            return TrainBatch(None, None, None, [], bad)
        images, targets = collated
        # One image at a time: the batched matcher pads every image to the most crowded one and holds
        # N x T x 8732 IoUs, which for COCO's crowded images is gigabytes per worker; the results are identical.
        encoded = [encode_targets(t["boxes"], t["labels"], self.spec) for t in targets]
        boxes = torch.stack([b for b, _ in encoded])
        labels = torch.stack([lab for _, lab in encoded])
        return TrainBatch(images, boxes.transpose(1, 2).contiguous(), labels, targets, bad)


class ReportedDataset(torch.utils.data.Dataset):
    """The training set as the loop reads it: an unusable image comes out as a :class:`BadImage` marker (from a
    worker process too), never as an exception inside the DataLoader."""

    def __init__(self, dataset: CocoDetectionDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]] | BadImage:
        return self.dataset.load_item(index)


class WorkerInit:
    """DataLoader ``worker_init_fn``: a forked worker lets go of the output folder's lock (see RunFolder)."""

    def __init__(self, folder: RunFolder) -> None:
        self.folder = folder

    def __call__(self, worker_id: int) -> None:
        self.folder.forget_in_child()

