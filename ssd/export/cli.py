"""``python -m ssd export``: write a model as ONNX or OpenVINO IR.

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
    from .metadata import require
    from .onnx import MIN_OPSET, export_onnx, export_openvino

    if args.opset < MIN_OPSET:
        return _error(f"--opset: expected {MIN_OPSET} or newer, got {args.opset}")
    try:
        require("onnx", "export")
        if args.format == "openvino":
            require("openvino", "--format openvino")
        model = _build(args.model, args.checkpoint)
        write = export_openvino if args.format == "openvino" else export_onnx
        path = write(model, args.out, opset=args.opset, nms=args.nms, batch=args.batch,
                     dynamic_batch=not args.static_batch)
    except (ImportError, OSError, ValueError, TypeError) as exc:
        return _error(str(exc))
    except KeyboardInterrupt:
        # The temporary files are gone (the writers remove theirs on any exception) and --out is as it was.
        print(f"interrupted: {args.out} was left as it was", file=sys.stderr)
        return 130
    outputs = "det_boxes, det_scores, det_labels, num_detections" if args.nms else "boxes, scores"
    print(f"wrote {path} ({args.model}, {len(model.spec.classes.names)} classes, opset {args.opset}, "
          f"outputs: {outputs})")
    return 0
