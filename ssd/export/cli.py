"""``python -m ssd export``: write a model as ONNX or OpenVINO IR (optionally INT8).

Kept apart from ``ssd/cli.py``, which only calls :func:`add_parser` and :func:`run`. Such files are run by the
backends of :mod:`ssd.backends` (``detect``/``evaluate --model FILE``).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
from typing import Any

__all__ = ["add_parser", "run"]

FORMATS = {"onnx": ".onnx", "openvino": ".xml"}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``export`` subcommand to ``subparsers`` (``parser.add_subparsers(...)``)."""
    parser = subparsers.add_parser(
        "export", help="export a model to ONNX or OpenVINO IR",
        description="Export a detector with box decoding (and optionally NMS) in the graph, its classes, input "
                    "spec and post-processing recipe in the file's metadata. Needs the export extras: "
                    "pip install -r requirements-export.txt")
    parser.add_argument("--format", choices=sorted(FORMATS), default="onnx", help="onnx (default) or openvino")
    parser.add_argument("--out", required=True, type=pathlib.Path,
                        help="file to write: .onnx, or .xml for OpenVINO (its .bin is written beside it)")
    parser.add_argument("--model", default="nvidia_ssd", help="model name (default nvidia_ssd)")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint file or URL (default: SSD_CHECKPOINT, else the published weights)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset, 11 or newer (default 17)")
    parser.add_argument("--nms", action="store_true",
                        help="post-processing in the graph: padded det_boxes/det_scores/det_labels/num_detections")
    parser.add_argument("--batch", type=int, default=1, help="batch size of the example input (default 1)")
    parser.add_argument("--static-batch", action="store_true", help="fix the batch size to --batch")
    parser.add_argument("--int8", action="store_true",
                        help="with --format openvino: INT8 weights and activations (NNCF post-training quantization, "
                             "calibrated on --calibration)")
    parser.add_argument("--calibration", type=pathlib.Path, default=None, metavar="DIR",
                        help="with --int8: a folder of representative images (searched recursively; at least 100)")
    parser.add_argument("--calibration-images", type=int, default=300, metavar="N",
                        help="with --int8: use N of the calibration images, spread over the folder (default 300)")
    return parser


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _check_out(out: pathlib.Path, suffix: str, fmt: str) -> str | None:
    """Why ``out`` cannot be written, before minutes are spent building and exporting; None when it can."""
    if out.suffix.lower() != suffix:
        return f"--out: expected a {suffix} file for --format {fmt}, got {str(out)!r}"
    if out.is_dir():
        return f"--out: expected a file, got the folder {str(out)!r}"
    parent = out.parent
    if not parent.is_dir():
        return f"--out: expected an existing folder for {out.name}, got {str(parent)!r} (no such folder)"
    if not os.access(parent, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
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
    from .int8 import MIN_CALIBRATION_IMAGES

    if args.calibration_images < MIN_CALIBRATION_IMAGES:
        return (f"--calibration-images: expected at least {MIN_CALIBRATION_IMAGES} (statistics from fewer images are "
                f"dominated by outliers), got {args.calibration_images}")
    return None


def _build(name: str, checkpoint: str | None) -> Any:
    from ..registry import build_model, list_models
    from ..weights import CheckpointUnavailableError, InvalidCheckpointError

    if name not in list_models():
        raise ValueError(f"--model: expected one of {', '.join(list_models())}, got {name!r}")
    try:
        return build_model(name, checkpoint=checkpoint)
    except (CheckpointUnavailableError, InvalidCheckpointError) as exc:
        raise ValueError(str(exc)) from exc


def run(args: argparse.Namespace) -> int:
    """Run ``export``; returns the exit status (2 for bad arguments, files or missing packages)."""
    suffix = FORMATS[args.format]
    problem = _check_out(args.out, suffix, args.format)
    if problem:
        return _error(problem)
    if args.batch < 1:
        return _error(f"--batch: expected a positive integer, got {args.batch}")
    problem = _int8_problem(args)
    if problem:
        return _error(problem)
    from .metadata import require
    from .onnx import MIN_OPSET, export_onnx, export_openvino

    if args.opset < MIN_OPSET:
        return _error(f"--opset: expected {MIN_OPSET} or newer, got {args.opset}")
    try:
        require("onnx", "export")
        if args.format == "openvino":
            require("openvino", "--format openvino")
        if args.int8:
            require("nncf", "--int8")
            from .int8 import calibration_files

            calibration_files(args.calibration, args.calibration_images)  # refused before minutes of export
        model = _build(args.model, args.checkpoint)
        options = {"opset": args.opset, "nms": args.nms, "batch": args.batch, "dynamic_batch": not args.static_batch}
        if args.int8:
            from .int8 import export_openvino_int8

            path = export_openvino_int8(model, args.out, args.calibration, images=args.calibration_images, **options)
        else:
            write = export_openvino if args.format == "openvino" else export_onnx
            path = write(model, args.out, **options)
    except (ImportError, OSError, ValueError, TypeError) as exc:
        return _error(str(exc))
    outputs = "det_boxes, det_scores, det_labels, num_detections" if args.nms else "boxes, scores"
    int8 = ", INT8" if args.int8 else ""
    print(f"wrote {path} ({args.model}, {len(model.spec.classes.names)} classes, opset {args.opset}{int8}, "
          f"outputs: {outputs})")
    return 0
