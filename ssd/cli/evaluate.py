"""``ssd evaluate``: COCO accuracy of a detector with its published protocol; ``torchrun`` scales it out."""
from __future__ import annotations

import argparse
import pathlib
from typing import Any

from . import common
from .common import fail

__all__ = ["register", "run"]

DESCRIPTION = """Evaluate a detector on a COCO-format set (pycocotools bbox AP) with the protocol its published
accuracy was measured with. Prints COCO's 12-line summary, AP per category and the speed; writes metrics.json and
detections.json (the COCO results list) to --out. Under torchrun every process takes its share of the images."""


def register(subparsers: Any) -> None:
    """Add ``evaluate`` to the ``ssd`` command line."""
    parser = subparsers.add_parser("evaluate", help="COCO accuracy (mAP) on an annotated image set",
                                   description=DESCRIPTION)
    parser.add_argument("--images", required=True, type=pathlib.Path, metavar="DIR",
                        help="folder of the annotation file's images")
    parser.add_argument("--annotations", required=True, type=pathlib.Path, metavar="FILE.json",
                        help="COCO annotation file (e.g. instances_val2017.json)")
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
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
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
        result = evaluate(backend, args.images, args.annotations, batch_size=args.batch_size, workers=args.workers,
                          out_dir=args.out, progress=not args.no_progress, verbose=main,
                          skip_errors=args.skip_errors)
    except (BackendError, distributed.PeerTimeoutError, distributed.PeerLostError) as exc:
        return fail(str(exc), 1)
    except (CheckpointUnavailableError, InvalidCheckpointError, OSError, ValueError, TypeError, ImportError) as exc:
        return fail(str(exc))
    finally:
        distributed.cleanup()
    if main:
        print(f"metrics.json and detections.json in {args.out}")
    # Like detect: a run that left images out says so in its status, for scripts.
    return 1 if result.skipped else 0
