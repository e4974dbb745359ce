"""``ssd export``: write a model as ONNX or OpenVINO IR (optionally INT8), saying each stage (trace, check,
optimise for OpenVINO, quantize for INT8, then run: the written file once with its runtime), and the file's size
and the time taken.

Such files are run by the backends of :mod:`ssd.backends` (``detect``/``evaluate --model FILE``).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from typing import Any

from . import common
from .common import fail

__all__ = ["register", "run"]

FORMATS = {"onnx": ".onnx", "openvino": ".xml"}


def register(subparsers: Any) -> None:
    """Add ``export`` to the ``ssd`` command line."""
    parser = subparsers.add_parser(
        "export", help="export a model to ONNX or OpenVINO IR",
        description="Export a detector with box decoding (and optionally NMS) in the graph, its classes, input "
                    "spec and post-processing recipe in the file's metadata. Needs the export extras: "
                    "pip install -r requirements-export.txt")
    parser.add_argument("--format", choices=sorted(FORMATS), default="onnx", help="onnx (default) or openvino")
    parser.add_argument("--out", required=True, type=pathlib.Path,
                        help="file to write: .onnx, or .xml for OpenVINO (its .bin is written beside it); missing "
                             "folders are created")
    common.add_model(parser, files=False)
    common.add_checkpoint(parser)
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset, 11 or newer (default 17)")
    parser.add_argument("--nms", action="store_true",
                        help="post-processing in the graph: padded det_boxes/det_scores/det_labels/num_detections")
    # --batch: this command's name for it before --batch-size was shared by every command; still accepted.
    parser.add_argument("--batch-size", "--batch", dest="batch_size", type=int, default=1, metavar="N",
                        help="batch size of the example input (default 1)")
    parser.add_argument("--static-batch", action="store_true", help="fix the batch size to --batch-size")
    parser.add_argument("--half", action="store_true",
                        help="with --format openvino: store the weights in fp16 (half the file; OpenVINO still "
                             "computes in the device's own precision)")
    parser.add_argument("--int8", action="store_true",
                        help="with --format openvino: INT8 weights and activations (NNCF post-training quantization, "
                             "calibrated on --calibration)")
    parser.add_argument("--calibration", type=pathlib.Path, default=None, metavar="DIR",
                        help="with --int8: a folder of representative images (searched recursively; at least 100)")
    parser.add_argument("--calibration-images", type=int, default=300, metavar="N",
                        help="with --int8: use N of the calibration images, spread over the folder (default 300)")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip the last stage: running the written file once with its runtime")
    parser.set_defaults(run=run)


def _missing_folders(folder: pathlib.Path) -> list[pathlib.Path]:
    """The folders to create for ``folder`` to exist, outermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing[::-1]


def _check_out(out: pathlib.Path, suffix: str, fmt: str) -> str | None:
    """Why ``out`` cannot be written, before minutes are spent building and exporting; None when it can."""
    if out.suffix.lower() != suffix:
        return f"--out: expected a {suffix} file for --format {fmt}, got {str(out)!r}"
    if out.is_dir():
        return f"--out: expected a file, got the folder {str(out)!r}"
    missing = _missing_folders(out.parent)
    existing = missing[0].parent if missing else out.parent
    if not existing.is_dir():
        return f"--out: expected a folder (or a path to create one) for {out.name}, got the file {str(existing)!r}"
    if not os.access(existing, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        return f"--out: expected a writable location, got {str(out)!r} (permission denied)"
    return None


def _int8_problem(args: argparse.Namespace) -> str | None:
    """Why --int8 and its options do not go together with the rest, if so (checked before anything loads)."""
    if not args.int8:
        if args.calibration is not None:
            return f"--calibration: expected it only with --int8, got --calibration {args.calibration}"
        return None
    if args.format != "openvino":
        return f"--int8: expected --format openvino (NNCF quantizes the OpenVINO IR), got --format {args.format}"
    if args.calibration is None:
        return "--calibration: expected a folder of images with --int8, got none"
    from ..export.int8 import MIN_CALIBRATION_IMAGES

    if args.calibration_images < MIN_CALIBRATION_IMAGES:
        return (f"--calibration-images: expected at least {MIN_CALIBRATION_IMAGES} (statistics from fewer images are "
                f"dominated by outliers), got {args.calibration_images}")
    return None


def _build(name: str, checkpoint: str | None) -> Any:
    from ..registry import build_model
    from ..weights import CheckpointUnavailableError, InvalidCheckpointError

    try:
        return build_model(name, checkpoint=checkpoint)
    except (CheckpointUnavailableError, InvalidCheckpointError) as exc:
        raise ValueError(str(exc)) from None


def _size(path: pathlib.Path) -> str:
    files = [path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]
    total = sum(file.stat().st_size for file in files if file.exists())
    return f"{total / 1e6:.1f} MB" + (" with its .bin" if len(files) > 1 else "")


def _check_file(path: pathlib.Path, batch: int) -> str:
    """Run the written file once with its runtime, on a zero batch; returns the stage's line."""
    import torch

    from ..backends import load

    started = time.perf_counter()
    backend = load(path)
    size = backend.spec.input.size
    outputs = backend(torch.zeros(batch, 3, size, size))
    shapes = ", ".join(" x ".join(map(str, output.shape)) for output in outputs)
    return (f"run: {getattr(backend, 'runtime', 'its runtime')} loads {path.name} and runs a {batch} x 3 x {size} "
            f"x {size} batch: {shapes} ({time.perf_counter() - started:.1f} s)")


def run(args: argparse.Namespace) -> int:
    """Run ``export``; returns the exit status (2 for bad arguments, files or missing packages; 1 when the written
    file fails its check)."""
    suffix = FORMATS[args.format]
    problem = _check_out(args.out, suffix, args.format)
    if problem:
        return fail(problem)
    if args.batch_size < 1:
        return fail(f"--batch-size: expected an integer >= 1, got {args.batch_size}")
    if args.half and args.format != "openvino":
        return fail(f"--half: expected --format openvino (ONNX files are written in fp32), got --format {args.format}")
    problem = _int8_problem(args)
    if problem:
        return fail(problem)
    from ..export.metadata import require
    from ..export.onnx import MIN_OPSET, export_onnx, export_openvino

    if args.opset < MIN_OPSET:
        return fail(f"--opset: expected {MIN_OPSET} or newer, got {args.opset}")
    started = time.perf_counter()
    created: list[pathlib.Path] = []
    try:
        require("onnx", "export")
        if args.format == "openvino":
            require("openvino", "--format openvino")
        if args.int8:
            require("nncf", "--int8")
            from ..export.int8 import calibration_files

            calibration_files(args.calibration, args.calibration_images)  # refused before minutes of export
        model = _build(args.model, args.checkpoint)
        print(f"export: {args.model} ({len(model.spec.classes.names)} classes) to {args.out}", flush=True)
        created = _missing_folders(args.out.parent)
        for folder in created:
            folder.mkdir()
        options = {"opset": args.opset, "nms": args.nms, "batch": args.batch_size,
                   "dynamic_batch": not args.static_batch, "log": lambda line: print(line, flush=True)}
        if args.int8:
            from ..export.int8 import export_openvino_int8

            path = export_openvino_int8(model, args.out, args.calibration, images=args.calibration_images, **options)
        else:
            if args.half:
                options["compress_to_fp16"] = True
            write = export_openvino if args.format == "openvino" else export_onnx
            path = write(model, args.out, **options)
    except (ImportError, OSError, ValueError, TypeError, KeyboardInterrupt) as exc:
        for folder in reversed(created):  # leave no empty folders behind a failed export
            try:
                folder.rmdir()
            except OSError:
                break
        if isinstance(exc, KeyboardInterrupt):
            # The temporary files are gone (the writers remove theirs on any exception) and --out is as it was.
            print(f"interrupted: {args.out} was left as it was", file=sys.stderr)
            return 130
        return fail(str(exc))
    if args.check:
        try:
            print(_check_file(path, args.batch_size), flush=True)
        except ImportError as exc:
            print(f"run: skipped ({exc})")
        except Exception as exc:  # noqa: BLE001 - whatever the runtime raises, the file is not usable: say so
            return fail(f"{path} was written but its runtime cannot run it: {exc}", 1)
    outputs = "det_boxes, det_scores, det_labels, num_detections" if args.nms else "boxes, scores"
    int8 = ", INT8" if args.int8 else ""
    print(f"wrote {path} ({_size(path)}; {args.model}, {len(model.spec.classes.names)} classes, opset {args.opset}"
          f"{int8}, outputs: {outputs}) in {time.perf_counter() - started:.1f} s")
    return 0
