"""Training throughput of SSD300: images per second of one optimisation step (forward, loss, backward, SGD).

The batch is built once from a synthetic shapes set through the real data path (augmentation, target encoding),
so the figure is the network's cost, not the JPEG decoding's; channels_last as in the training loop, fp32 or bf16
autocast. Run: ``OMP_NUM_THREADS=N python -m benchmarks --suite training [--device cpu] [--batch 4] [--iterations 3]``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks.timing import median_seconds
from ssd.data.coco_format import CocoDetectionDataset
from ssd.data.synthetic import make_shapes_dataset
from ssd.models.ssd300_resnet50 import NVIDIA_SSD300, SSD300, nvidia_spec
from ssd.training.augment import SSDAugmentation
from ssd.training.loop import EncodingCollate, build_optimizer
from ssd.training.loss import SSDLoss

__all__ = ["main", "measure_training"]

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _batch(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    with tempfile.TemporaryDirectory() as folder:
        annotations = make_shapes_dataset(folder, size, image_size=300, seed=0)
        transform = SSDAugmentation(NVIDIA_SSD300.input, augment=True)
        dataset = CocoDetectionDataset(annotations, f"{folder}/images", transform=transform)
        images, gloc, glabels, _ = EncodingCollate(NVIDIA_SSD300)([dataset[i] for i in range(size)])
        return images, gloc, glabels, dataset.class_names


def measure_training(device: str = "cpu", batch_size: int = 4, precisions: Sequence[str] = ("fp32", "bf16"),
                     iterations: int = 3, warmup: int = 1, channels_last: bool = True) -> list[dict[str, Any]]:
    """Median seconds per training step and images/s for each precision; one dict per precision."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size: expected an int >= 2 (BatchNorm), got {batch_size!r}")
    unknown = [p for p in precisions if p not in _DTYPES]
    if unknown:
        raise ValueError(f"precisions: expected names from {sorted(_DTYPES)}, got {unknown}")
    target = torch.device(device)
    images, gloc, glabels, names = _batch(batch_size)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = images.to(target, memory_format=memory_format)
    gloc, glabels = gloc.to(target), glabels.to(target)
    results = []
    for precision in precisions:
        torch.manual_seed(0)
        # Fresh weights per precision, so that one configuration's updates do not feed the next.
        model = SSD300(nvidia_spec(class_names=tuple(names))).to(target, memory_format=memory_format).train()
        loss_fn = SSDLoss(model.spec).to(target)
        optimizer = build_optimizer(model, 1e-3, 0.9, 5e-4)
        dtype = _DTYPES[precision]

        def step(model: SSD300 = model, optimizer: torch.optim.Optimizer = optimizer,
                 dtype: torch.dtype | None = dtype, loss_fn: SSDLoss = loss_fn) -> None:
            context = torch.autocast(target.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
            with context:
                locs, confs = model(images)
            loss = loss_fn(locs, confs, gloc, glabels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        seconds = median_seconds(step, repeats=iterations, warmup=warmup, device=target)
        results.append({"device": str(target), "precision": precision, "channels_last": channels_last,
                        "batch_size": batch_size, "seconds_per_iteration": round(seconds, 3),
                        "images_per_second": round(batch_size / seconds, 3),
                        "threads": torch.get_num_threads()})
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks --suite training --", description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=3, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    rows = measure_training(args.device, args.batch, args.precisions.split(","), args.iterations, args.warmup)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| device | precision | batch | threads | s / iteration | images / s |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['device']} | {row['precision']} (channels_last) | {row['batch_size']} | {row['threads']} | "
              f"{row['seconds_per_iteration']} | {row['images_per_second']} |")


if __name__ == "__main__":
    main()
