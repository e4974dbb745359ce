"""``python -m ssd evaluate``: COCO accuracy of a detector with its published protocol; ``torchrun`` scales it out."""
from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any

from ..registry import list_models
from .metrics import CONFUSION_IOU, CONFUSION_SCORE

__all__ = ["add_parser", "fail", "run"]

DESCRIPTION = """Evaluate a detector on a COCO-format set (pycocotools bbox AP) with the protocol its published
accuracy was measured with. Prints COCO's 12-line summary, AP per category and the speed; writes metrics.json,
detections.json (the COCO results list), pr_curve.png, confusion_matrix.png and confusion_matrix.json to --out.
A YOLO-format set is read with --data DATA.yaml. Under torchrun every process takes its share of the images."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``evaluate`` subcommand on an argparse ``add_subparsers()`` object; returns its parser."""
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
    parser.add_argument("--checkpoint", default=None, metavar="PATH_OR_URL",
                        help="checkpoint file or URL (default: SSD_CHECKPOINT, else the published weights)")
    parser.add_argument("--model", default="nvidia_ssd", metavar="NAME_OR_FILE",
                        help=f"{', '.join(list_models())} (default nvidia_ssd), or an exported .onnx / OpenVINO .xml "
                             "file")
    parser.add_argument("--backend", choices=("onnxruntime", "openvino"), default=None,
                        help="runtime for --model FILE (default: onnxruntime for .onnx, openvino for .xml)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="images per forward pass (default 8)")
    parser.add_argument("--workers", type=int, default=0, metavar="N",
                        help="data-loader processes decoding and resizing images (default 0: in the main process)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:1, ... (default: cuda when available; under torchrun cuda:LOCAL_RANK)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="fp32 (default, the published protocol); bf16 or fp16 autocast (an exported file: fp32, "
                             "or bf16 with OpenVINO)")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="MINUTES",
                        help="under torchrun: how long a process waits for the others at each exchange before it "
                             "stops with an error (default 30)")
    parser.add_argument("--out", default=pathlib.Path("ssd-eval"), type=pathlib.Path, metavar="DIR",
                        help="output folder for metrics.json and detections.json (default ./ssd-eval)")
    parser.add_argument("--skip-errors", action="store_true",
                        help="leave out (and report) images missing or unreadable instead of failing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar and no stage lines")
    parser.add_argument("--quiet", action="store_true",
                        help="print nothing but errors (no progress, stages, summary or table)")
    parser.add_argument("--no-plots", action="store_true",
                        help="do not write pr_curve.png, confusion_matrix.png and confusion_matrix.json")
    parser.add_argument("--confusion-iou", type=float, default=CONFUSION_IOU, metavar="IOU",
                        help=f"confusion matrix: IoU above which a detection matches an object (default "
                             f"{CONFUSION_IOU}, as Ultralytics)")
    parser.add_argument("--confusion-score", type=float, default=CONFUSION_SCORE, metavar="SCORE",
                        help=f"confusion matrix: score above which a detection counts (default {CONFUSION_SCORE}, as "
                             "Ultralytics)")
    return parser


def fail(message: str, status: int = 2) -> int:
    """Print ``message`` as the one error line of a command (with ``[rank R] `` under torchrun); returns ``status``."""
    from ..distributed import rank_label

    try:
        prefix = rank_label()
    except ValueError:  # a WORLD_SIZE that is not a number: reported by the command itself
        prefix = ""
    # One line, whatever the exception carried: the command's contract with scripts reading stderr.
    print(f"error: {prefix}{' '.join(message.split())}", file=sys.stderr)
    return status


def run(args: argparse.Namespace) -> int:
    """Run ``evaluate`` from parsed arguments; 0 on success, 1 when images were skipped or the run failed (a
    runtime's failure, a peer that stopped answering), 2 (and one line on stderr) on bad input."""
    from .. import distributed
    from ..backends import BackendError
    from ..backends.loading import check_command_options, command_device, load_for_command
    from ..weights import CheckpointUnavailableError, InvalidCheckpointError
    from .coco import evaluate

    if args.batch_size < 1:
        return fail(f"--batch-size: expected a positive integer, got {args.batch_size}")
    if args.workers < 0:
        return fail(f"--workers: expected an integer >= 0, got {args.workers}")
    if args.data is not None and (args.images is not None or args.annotations is not None):
        return fail("--data/--images/--annotations: expected --data or --images and --annotations, got both")
    if args.split is not None and args.data is None:
        return fail(f"--split: expected with --data DATA.yaml, got --split {args.split} alone")
    if args.data is None and (args.images is None or args.annotations is None):
        return fail("--images/--annotations: expected both (or --data DATA.yaml), got "
                    + ("neither" if args.images is None and args.annotations is None else "only one"))
    for option, value in (("--confusion-iou", args.confusion_iou), ("--confusion-score", args.confusion_score)):
        if not 0 <= value < 1:
            return fail(f"{option}: expected a number in [0, 1), got {value}")
    try:
        timeout = distributed.check_timeout(args.timeout, "--timeout")
        device = command_device(args.model, args.device)
        check_command_options(args.model, backend=args.backend, checkpoint=args.checkpoint, precision=args.precision)
    except (TypeError, ValueError) as exc:
        return fail(str(exc))
    try:
        distributed.init_from_env(device, timeout=timeout, timeout_name="--timeout")
        backend = load_for_command(args.model, backend=args.backend, checkpoint=args.checkpoint, device=device,
                                   precision=args.precision)
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
