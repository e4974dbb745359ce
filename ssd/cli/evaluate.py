"""``ssd evaluate``: COCO accuracy of a detector with its published protocol; ``torchrun`` scales it out."""
from __future__ import annotations

import argparse
import pathlib
from typing import Any

from . import common
from .common import fail

__all__ = ["register", "run"]

DESCRIPTION = """Evaluate a detector on a COCO-format set (pycocotools bbox AP) with the protocol its published
accuracy was measured with. Prints COCO's 12-line summary, AP per category and the speed; writes metrics.json,
detections.json (the COCO results list), pr_curve.png, confusion_matrix.png and confusion_matrix.json to --out.
A YOLO-format set is read with --data DATA.yaml. Under torchrun every process takes its share of the images."""


def register(subparsers: Any) -> None:
    """Add ``evaluate`` to the ``ssd`` command line."""
    parser = subparsers.add_parser("evaluate", help="COCO accuracy (mAP) on an annotated image set",
                                   description=DESCRIPTION)
    parser.add_argument("--images", type=pathlib.Path, metavar="DIR",
                        help="folder of the annotation file's images")
    parser.add_argument("--annotations", type=pathlib.Path, metavar="FILE.json",
                        help="COCO annotation file (e.g. instances_val2017.json)")
    parser.add_argument("--data", type=pathlib.Path, metavar="DATA.yaml",
                        help="a YOLO-format set (Ultralytics' data file) instead of --images and --annotations")
    parser.add_argument("--split", default=None, choices=("train", "val", "test"),
                        help="with --data: the split to evaluate (default val)")
    common.add_model(parser)
    common.add_checkpoint(parser)
    common.add_device(parser)
    common.add_precision(parser, "fp32 is the published protocol; an exported file: fp32, or bf16 with OpenVINO")
    common.add_half(parser)
    common.add_batch_size(parser, 8)
    common.add_workers(parser, 0, "default 0: in the main process")
    common.add_timeout(parser)
    parser.add_argument("--out", default=pathlib.Path("ssd-eval"), type=pathlib.Path, metavar="DIR",
                        help="output folder for metrics.json and detections.json (default ./ssd-eval)")
    parser.add_argument("--skip-errors", action="store_true",
                        help="leave out (and report) images missing or unreadable instead of failing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar and no stage lines")
    parser.add_argument("--quiet", action="store_true",
                        help="print nothing but errors (no progress, stages, summary or table)")
    parser.add_argument("--no-plots", action="store_true",
                        help="do not write pr_curve.png, confusion_matrix.png and confusion_matrix.json")
    # The defaults live in ssd.evaluation.metrics, read in run(): --help imports neither torch nor numpy.
    parser.add_argument("--confusion-iou", type=float, default=None, metavar="IOU",
                        help="confusion matrix: IoU above which a detection matches an object (default: "
                             "Ultralytics' 0.45)")
    parser.add_argument("--confusion-score", type=float, default=None, metavar="SCORE",
                        help="confusion matrix: score above which a detection counts (default: Ultralytics' 0.25)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``evaluate`` from parsed arguments; 0 on success, 1 when images were skipped or the run failed (a
    runtime's failure, a peer that stopped answering), 2 (and one line on stderr) on bad input."""
    from .. import distributed
    from ..backends import BackendError
    from ..backends.loading import check_command_options, command_device, load_for_command
    from ..evaluation.coco import evaluate
    from ..weights import CheckpointUnavailableError, InvalidCheckpointError

    try:
        common.check_int("--batch-size", args.batch_size, 1)
        common.check_int("--workers", args.workers, 0)
        _check_data_options(args)
        if args.out.exists() and not args.out.is_dir():
            raise common.UsageError(f"--out: expected a folder (created if missing), got the file {str(args.out)!r}")
        timeout = distributed.check_timeout(args.timeout, "--timeout")
        device = command_device(args.model, args.device)
        check_command_options(args.model, backend=args.backend, checkpoint=args.checkpoint, precision=args.precision,
                              half=args.half)
    except (TypeError, ValueError, common.UsageError) as exc:
        return fail(str(exc))
    try:
        distributed.init_from_env(device, timeout=timeout, timeout_name="--timeout")
        backend = load_for_command(args.model, backend=args.backend, checkpoint=args.checkpoint, device=device,
                                   precision=common.autocast(args.precision), half=args.half)
        main = distributed.is_main()
        images, annotations = args.images, args.annotations
        if args.data is not None:
            from ..data.yolo import load_yolo_split

            converted = load_yolo_split(args.data, args.split or "val")
            images, annotations = converted.images_dir, converted.annotations
            if main and not args.quiet:
                print(f"evaluate: YOLO data {converted.summary()}")
        result = evaluate(backend, images, annotations, batch_size=args.batch_size, workers=args.workers,
                          out_dir=args.out, progress=not (args.no_progress or args.quiet),
                          verbose=main and not args.quiet, skip_errors=args.skip_errors, plots=not args.no_plots,
                          confusion_iou=args.confusion_iou, confusion_score=args.confusion_score)
    except (BackendError, distributed.PeerTimeoutError, distributed.PeerLostError) as exc:
        return fail(str(exc), 1)
    except (CheckpointUnavailableError, InvalidCheckpointError, OSError, ValueError, TypeError, ImportError) as exc:
        return fail(str(exc))
    finally:
        distributed.cleanup()
    if main and not args.quiet:
        written = ["metrics.json", "detections.json", *(pathlib.Path(p).name for p in result.plots)]
        print(f"{', '.join(written)} in {args.out}")
    # Like detect: a run that left images out says so in its status, for scripts.
    return 1 if result.skipped else 0


def _check_data_options(args: argparse.Namespace) -> None:
    """--data or --images with --annotations; the confusion matrix's thresholds (defaults filled in) in [0, 1)."""
    if args.data is not None and (args.images is not None or args.annotations is not None):
        raise common.UsageError("--data/--images/--annotations: expected --data or --images and --annotations, "
                                "got both")
    if args.split is not None and args.data is None:
        raise common.UsageError(f"--split: expected with --data DATA.yaml, got --split {args.split} alone")
    if args.data is None and (args.images is None or args.annotations is None):
        raise common.UsageError("--images/--annotations: expected both (or --data DATA.yaml), got "
                                + ("neither" if args.images is None and args.annotations is None else "only one"))
    from ..evaluation.metrics import CONFUSION_IOU, CONFUSION_SCORE

    if args.confusion_iou is None:
        args.confusion_iou = CONFUSION_IOU
    if args.confusion_score is None:
        args.confusion_score = CONFUSION_SCORE
    for option, value in (("--confusion-iou", args.confusion_iou), ("--confusion-score", args.confusion_score)):
        if not 0 <= value < 1:
            raise common.UsageError(f"{option}: expected a number in [0, 1), got {value}")
