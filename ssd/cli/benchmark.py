"""``ssd benchmark``: a model timed in every installed format (PyTorch, bf16, ONNX, OpenVINO, INT8), and with
annotations its COCO mAP in each, as ``yolo benchmark`` does."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from . import common
from .common import fail

__all__ = ["register", "run"]

DESCRIPTION = """Per format: file size, ms per image and images/s of the whole detect call at --batch-size; with
--images and --annotations also the COCO mAP of evaluate. Exported files go to a temporary folder."""


def register(subparsers: Any) -> None:
    """Add ``benchmark`` to the ``ssd`` command line."""
    parser = subparsers.add_parser(
        "benchmark", help="time a model in every installed format (PyTorch, ONNX, OpenVINO, INT8)",
        description=DESCRIPTION)
    common.add_model(parser, files=False)
    common.add_checkpoint(parser)
    # Not the shared --device: its default here is the CPU (the exported formats run there too).
    parser.add_argument("--device", default="cpu",
                        help="where the PyTorch formats run: cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--formats", default=None, metavar="F1,F2",
                        help="comma-separated: pytorch, bf16, onnx, openvino, openvino-bf16, int8 (default: pytorch "
                             "and the installed exported runtimes)")
    parser.add_argument("--images", default=None, metavar="DIR",
                        help="images to time (default: scikit-image's photographs) and, with --annotations, to score")
    parser.add_argument("--annotations", default=None, metavar="FILE", help="COCO annotation file: also print mAP")
    parser.add_argument("--calibration", default=None, metavar="DIR",
                        help="INT8 calibration images, at least 100 (default: --images)")
    common.add_batch_size(parser, 8)
    parser.add_argument("--batches", type=int, default=2, help="batches timed per format (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per backend (default: the thread plan)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``benchmark``: 0 when at least one format ran, 1 when none could, 2 on bad arguments."""
    from ..benchmark import format_table, run_benchmark
    from ..weights import CheckpointUnavailableError, InvalidCheckpointError

    try:
        rows = run_benchmark(args.model, checkpoint=args.checkpoint, device=args.device, formats=args.formats,
                             images=args.images, annotations=args.annotations, calibration=args.calibration,
                             batch_size=args.batch_size, batches=args.batches, threads=args.threads,
                             log=lambda line: print(line, file=sys.stderr))
    except (CheckpointUnavailableError, InvalidCheckpointError, OSError, ValueError, TypeError) as exc:
        return fail(exc)
    print(format_table(rows, args.batch_size))
    return 1 if all(row.error is not None for row in rows) else 0
