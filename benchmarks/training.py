"""Training throughput of SSD300: images per second of one optimisation step (forward, loss, backward, SGD), and of
the whole training loop with and without DataLoader workers.

Step: the batch is built once from a synthetic shapes set through the real data path (augmentation, target
encoding), so the figure is the network's cost, not the JPEG decoding's; channels_last as in the training loop,
fp32 or bf16 autocast. Run: ``OMP_NUM_THREADS=N python -m benchmarks --suite training [--device cpu] [--batch 4]
[--iterations 3]``.

Workers (``--workers-compare``): the real loop (:func:`ssd.training.train`, augmentation on) over a shapes set of
640 x 480 JPEGs, once with ``--workers 0`` and once with the default (:func:`ssd.training.loop.default_workers`),
in the same run, alternating ``--rounds`` times, each also while ``--busy N`` processes spin on the CPU (another job
holding cores); a run's images/s is the median of its per-iteration figures after the first (worker start-up).
Run: ``python -m benchmarks --suite training -- --workers-compare [--busy 0,1] [--iterations 6] [--batch 4]``.

Reporting (``--reporting``): the cost of what a run shows and writes for people (the progress bar, the line per
epoch, ``results.csv``, ``results.png``, and TensorBoard with ``--tensorboard``), timed inside a real run of
:func:`ssd.training.train` on a shapes set with validation (the summary's ``reporting_seconds_per_epoch``), against
the epoch's training time (``seconds`` of its ``epoch`` record, validation excluded: the smaller denominator). The
first epoch also pays the one-time imports (matplotlib, tqdm, TensorBoard) and is reported apart. Run:
``python -m benchmarks --suite training -- --reporting [--model ssdlite320_mobilenet_v2] [--batch 8]
[--iterations 8] [--epochs 4] [--tensorboard]``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks.timing import median_seconds
from ssd.data.coco_format import CocoDetectionDataset
from ssd.data.synthetic import make_shapes_dataset
from ssd.models.spec import ClassSpec, DetectorSpec
from ssd.registry import get_entry
from ssd.training.augment import SSDAugmentation
from ssd.training.loop import EncodingCollate, build_optimizer
from ssd.training.loss import SSDLoss

__all__ = ["main", "measure_reporting", "measure_training", "measure_workers"]

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _batch(size: int, spec: DetectorSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, ClassSpec]:
    """A batch of ``size`` synthetic shapes images at ``spec``'s input size, through the training data path
    (augmentation, target encoding with ``spec``'s anchors and coder), and the set's classes."""
    with tempfile.TemporaryDirectory() as folder:
        annotations = make_shapes_dataset(folder, size, image_size=spec.input.size, seed=0)
        dataset = CocoDetectionDataset(annotations, f"{folder}/images")
        spec = spec.with_classes(dataset.classes)
        dataset.transform = SSDAugmentation(spec.input, augment=True)
        batch = EncodingCollate(spec)([dataset[i] for i in range(size)])
        return batch.images, batch.gloc, batch.glabels, dataset.classes


def measure_training(device: str = "cpu", batch_size: int = 4, precisions: Sequence[str] = ("fp32", "bf16"),
                     iterations: int = 3, warmup: int = 1, channels_last: bool = True,
                     model: str = "nvidia_ssd") -> list[dict[str, Any]]:
    """Median seconds per training step and images/s of registered model ``model`` for each precision; one dict
    per precision. The network is built as the training loop builds it: the family's spec with the set's classes."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size: expected an int >= 2 (BatchNorm), got {batch_size!r}")
    unknown = [p for p in precisions if p not in _DTYPES]
    if unknown:
        raise ValueError(f"precisions: expected names from {sorted(_DTYPES)}, got {unknown}")
    target = torch.device(device)
    entry = get_entry(model)
    images, gloc, glabels, classes = _batch(batch_size, entry.spec)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = images.to(target, memory_format=memory_format)
    gloc, glabels = gloc.to(target), glabels.to(target)
    results = []
    for precision in precisions:
        torch.manual_seed(0)
        # Fresh weights per precision, so that one configuration's updates do not feed the next.
        network = entry.network(entry.spec.with_classes(classes)).to(target, memory_format=memory_format).train()
        loss_fn = SSDLoss(network.spec).to(target)
        optimizer = build_optimizer(network, 1e-3, 0.9, 5e-4)
        dtype = _DTYPES[precision]

        def step(network: torch.nn.Module = network, optimizer: torch.optim.Optimizer = optimizer,
                 dtype: torch.dtype | None = dtype, loss_fn: SSDLoss = loss_fn) -> None:
            context = torch.autocast(target.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
            with context:
                locs, confs = network(images)
            loss = loss_fn(locs, confs, gloc, glabels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        seconds = median_seconds(step, repeats=iterations, warmup=warmup, device=target)
        results.append({"model": model, "device": str(target), "precision": precision, "channels_last": channels_last,
                        "batch_size": batch_size, "seconds_per_iteration": round(seconds, 3),
                        "images_per_second": round(batch_size / seconds, 3),
                        "threads": torch.get_num_threads()})
    return results


def _spinners(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def _loop_rate(annotations: str, images: str, out: str, model: str, batch_size: int, workers: int,
               precision: str, spinning: int) -> float:
    """Median images/s of the loop's iterations after the first (worker start-up), with ``spinning`` busy
    processes beside it."""
    from ssd.training.loop import TrainConfig, train

    spinners = _spinners(spinning)
    try:
        train(TrainConfig(annotations, images, out, model=model, epochs=1, batch_size=batch_size, device="cpu",
                          num_workers=workers, log_every=1, precision=precision, warmup_iters=0, resume=False))
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    with open(f"{out}/metrics.jsonl") as metrics:
        records = [json.loads(line) for line in metrics]
    return statistics.median([r["images_per_second"] for r in records if r["type"] == "iteration"][1:])


def measure_workers(model: str = "nvidia_ssd", batch_size: int = 4, iterations: int = 6, busy: Sequence[int] = (0, 1),
                    precision: str = "fp32", rounds: int = 2) -> list[dict[str, Any]]:
    """Training images/s of the real loop with ``--workers 0`` and with the default, each with ``busy`` spinning
    processes beside it; one dict per configuration. The configurations alternate, ``rounds`` times, so that a
    change in the machine's load (other jobs) hits them alike; each reports the median of its rounds and the
    range."""
    from ssd.training.loop import default_workers

    default = default_workers("cpu")
    configurations = [(spinning, workers) for spinning in busy for workers in (0, default)]
    rates: dict[tuple[int, int], list[float]] = {c: [] for c in configurations}
    with tempfile.TemporaryDirectory() as folder:
        annotations = make_shapes_dataset(f"{folder}/data", batch_size * iterations, image_size=(480, 640), seed=0)
        for round_ in range(rounds):
            for spinning, workers in configurations:
                rates[(spinning, workers)].append(_loop_rate(
                    str(annotations), f"{folder}/data/images", f"{folder}/run-{round_}-{spinning}-{workers}", model,
                    batch_size, workers, precision, spinning))
    return [{"model": model, "workers": workers, "default": workers == default, "busy": spinning,
             "batch_size": batch_size, "precision": precision, "threads": torch.get_num_threads(),
             "images_per_second": round(statistics.median(rates[(spinning, workers)]), 3),
             "range": [round(min(rates[(spinning, workers)]), 3), round(max(rates[(spinning, workers)]), 3)],
             "rounds": rounds} for spinning, workers in configurations]


def measure_reporting(model: str = "ssdlite320_mobilenet_v2", batch_size: int = 8, iterations: int = 8,
                      epochs: int = 4, tensorboard: bool = False) -> dict[str, Any]:
    """Seconds of reporting per epoch (bar, epoch line, results.csv/png, TensorBoard) inside one real run, against
    the epochs' training seconds; the first epoch (one-time imports) apart from the median of the others."""
    from ssd.training.loop import TrainConfig, train

    with tempfile.TemporaryDirectory() as folder:
        annotations = make_shapes_dataset(f"{folder}/data", batch_size * iterations, image_size=320, seed=0)
        validation = make_shapes_dataset(f"{folder}/val", max(2, batch_size), image_size=320, seed=1)
        summary = train(TrainConfig(annotations, f"{folder}/data/images", f"{folder}/out", model=model,
                                    epochs=epochs, batch_size=batch_size, device="cpu", augment="light",
                                    val_annotations=validation, val_images=f"{folder}/val/images",
                                    progress=True, log=lambda message: None, tensorboard=tensorboard))
        with open(f"{folder}/out/metrics.jsonl") as metrics:
            records = [json.loads(line) for line in metrics]
    seconds = [r["seconds"] for r in records if r["type"] == "epoch"]
    reporting = summary["reporting_seconds_per_epoch"]
    later = [r / s for r, s in zip(reporting[1:], seconds[1:])]
    return {"model": model, "batch_size": batch_size, "iterations_per_epoch": iterations, "epochs": epochs,
            "tensorboard": tensorboard, "threads": torch.get_num_threads(),
            "epoch_seconds_median": round(statistics.median(seconds), 3),
            "first_epoch_reporting_seconds": round(reporting[0], 3),
            "reporting_seconds_median": round(statistics.median(reporting[1:]), 3) if later else None,
            "overhead_percent_median": round(100 * statistics.median(later), 2) if later else None,
            "overhead_percent_max": round(100 * max(later), 2) if later else None}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks --suite training --", description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=3, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--workers-compare", action="store_true",
                        help="the whole loop with --workers 0 and the default, on CPU (see the module docstring)")
    parser.add_argument("--busy", default="0,1", help="with --workers-compare: spinning processes beside it")
    parser.add_argument("--model", default="nvidia_ssd", help="the registered model (default nvidia_ssd)")
    parser.add_argument("--rounds", type=int, default=2, help="with --workers-compare: alternating rounds")
    parser.add_argument("--reporting", action="store_true",
                        help="the cost of the progress bar, epoch lines and result files per epoch (see above)")
    parser.add_argument("--epochs", type=int, default=4, help="with --reporting: epochs of the run")
    parser.add_argument("--tensorboard", action="store_true", help="with --reporting: TensorBoard files too")
    args = parser.parse_args(argv)
    if args.reporting:
        model = args.model if args.model != "nvidia_ssd" else "ssdlite320_mobilenet_v2"
        print(json.dumps(measure_reporting(model, args.batch, args.iterations, args.epochs, args.tensorboard),
                         indent=2))
        return
    if args.workers_compare:
        busy = [int(b) for b in args.busy.split(",")]
        rows = measure_workers(args.model, args.batch, args.iterations, busy, args.precisions.split(",")[0],
                               args.rounds)
        if args.json:
            print(json.dumps(rows, indent=2))
            return
        print("| model | precision | batch | threads | busy processes | workers | images / s (median, range) |")
        print("|---|---|---|---|---|---|---|")
        for row in rows:
            workers = f"{row['workers']} (default)" if row["default"] else str(row["workers"])
            print(f"| {row['model']} | {row['precision']} | {row['batch_size']} | {row['threads']} | {row['busy']} | "
                  f"{workers} | {row['images_per_second']} ({row['range'][0]}-{row['range'][1]}) |")
        return
    rows = measure_training(args.device, args.batch, args.precisions.split(","), args.iterations, args.warmup,
                            model=args.model)
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
