"""Every registered model, side by side: training images/s on CPU with bf16 autocast, and ``evaluate`` images/s
with the PyTorch backend (fp32) and with the ONNX backend (onnxruntime) on the same images.

    OMP_NUM_THREADS=1 python -m benchmarks --suite families -- --steps 2 --images 8 --batch 4
    python -m benchmarks --suite families -- --models ssdlite320_mobilenet_v2 tv_ssdlite320_mobilenet_v3_large

Training: one optimisation step (forward under bf16 autocast, the SSD loss with the model's spec, backward, SGD)
on a batch of synthetic shapes images at the model's input size, built once through the training data path
(:func:`benchmarks.training.measure_training`); the median of ``--steps`` steps after one warm-up.

Evaluation: :func:`ssd.evaluation.evaluate` on the minicoco photographs repeated to ``--images`` files
(:func:`benchmarks.evaluate.make_set`), batch ``--batch``, 0 workers, once with the network (fp32) and once with
the ONNX file :func:`ssd.export.export_onnx` wrote, loaded by :func:`ssd.load` with as many threads as torch
uses. The figure is the evaluation's own
images/s (reading, resizing, inference and post-processing; COCOeval excluded), after one untimed batch per
backend. The networks keep their random initialisation (``pretrained=False``): speed does not depend on the
weights' values, except for post-processing, whose cost follows the number of candidate boxes; both backends
of a model decode the same outputs, so their ratio is not affected.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pathlib
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks.evaluate import cpu_name, make_set
from benchmarks.training import measure_training
from ssd.backends import load
from ssd.evaluation import evaluate
from ssd.export import export_onnx
from ssd.inference.detect import detect
from ssd.registry import build_model, list_models

__all__ = ["main", "measure_evaluation", "measure_families"]


def measure_evaluation(name: str, images_dir: pathlib.Path, annotations: pathlib.Path, batch_size: int,
                       folder: pathlib.Path) -> dict[str, Any]:
    """``evaluate`` images/s of model ``name`` (random weights) with the PyTorch backend in fp32 and with its ONNX
    export through onnxruntime, on the same set and batch size; and the export's seconds."""
    torch.manual_seed(0)
    network = build_model(name, pretrained=False).eval()
    start = time.perf_counter()
    onnx_path = export_onnx(network, folder / f"{name}.onnx")
    export_seconds = time.perf_counter() - start
    # onnxruntime gets the threads torch has (OMP_NUM_THREADS), so the two backends compare on the same cores.
    backends = {"pytorch": network, "onnx": load(onnx_path, threads=torch.get_num_threads())}
    warm = sorted(images_dir.iterdir())[:batch_size]
    row: dict[str, Any] = {"export_seconds": export_seconds}
    for label, backend in backends.items():
        # One untimed batch: first-call allocations, oneDNN kernel choice and onnxruntime's session warm-up.
        detect(backend, warm, batch_size=batch_size, keep_images=False)
        with contextlib.redirect_stdout(io.StringIO()):
            result = evaluate(backend, images_dir, annotations, batch_size=batch_size, workers=0, progress=False,
                              verbose=False)
        row[f"{label}_images_per_second"] = result.images_per_second
        row["images"] = result.images
    return row


def measure_families(names: Sequence[str], steps: int, images: int, batch_size: int,
                     log: Any = print) -> list[dict[str, Any]]:
    """One row per model: training images/s (bf16 autocast, CPU) and evaluation images/s (PyTorch, ONNX)."""
    unknown = [name for name in names if name not in list_models()]
    if unknown:
        raise ValueError(f"models: expected names from {list_models()}, got {unknown}")
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise ValueError(f"images: expected an int >= 1, got {images!r}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        images_dir, annotations = make_set(root, images)
        for name in names:
            started = time.perf_counter()
            train = measure_training("cpu", batch_size, ("bf16",), iterations=steps, warmup=1, model=name)[0]
            row = {"model": name, "input": build_model(name, pretrained=False).spec.input.size,
                   "train_bf16_images_per_second": train["images_per_second"],
                   **measure_evaluation(name, images_dir, annotations, batch_size, root)}
            row["onnx_over_pytorch"] = row["onnx_images_per_second"] / row["pytorch_images_per_second"]
            row["wall_seconds"] = time.perf_counter() - started
            rows.append(row)
            log(f"{name:34s} train bf16 {row['train_bf16_images_per_second']:6.2f} img/s  "
                f"evaluate pytorch {row['pytorch_images_per_second']:6.2f} img/s  "
                f"onnx {row['onnx_images_per_second']:6.2f} img/s  ({row['wall_seconds']:.0f} s)")
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | input | train images/s (bf16 autocast) | evaluate images/s (PyTorch, fp32) "
             "| evaluate images/s (ONNX, onnxruntime) | ONNX / PyTorch |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['model']} | {r['input']} | {r['train_bf16_images_per_second']:.2f} | "
              f"{r['pytorch_images_per_second']:.2f} | {r['onnx_images_per_second']:.2f} | "
              f"{r['onnx_over_pytorch']:.2f}x |" for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks --suite families --", description=__doc__)
    parser.add_argument("--models", nargs="+", default=list_models(), choices=list_models(),
                        help="registered models (default: every one)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per model (median reported)")
    parser.add_argument("--images", type=int, default=8, help="images in the evaluation set (minicoco repeated)")
    parser.add_argument("--batch", type=int, default=4, help="training and evaluation batch size (>= 2)")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="also write the numbers here")
    options = parser.parse_args(argv)
    threads = os.environ.get("OMP_NUM_THREADS")
    load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    header = (f"{cpu_name()}, {os.cpu_count()} logical cores, torch {torch.__version__}, "
              f"{torch.get_num_threads()} torch thread(s) (OMP_NUM_THREADS={threads}); batch {options.batch}, "
              f"median of {options.steps} training steps, {options.images} evaluation images; "
              f"load average {load_average:.1f} at the start")
    print(header, flush=True)
    rows = measure_families(options.models, options.steps, options.images, options.batch,
                            log=lambda line: print(line, flush=True))
    print()
    print(table(rows))
    if options.json is not None:
        options.json.write_text(json.dumps({"machine": header, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
