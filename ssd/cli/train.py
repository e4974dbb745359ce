"""``ssd train`` (fine-tune any registered model on a COCO-format dataset) and ``ssd make-shapes`` (a synthetic
COCO-format demo set).

``torchrun --nproc-per-node K -m ssd train ...`` trains with K processes (see :mod:`ssd.training.loop`); every rank
runs the same checks, and all stop together when one fails, so no process is left waiting for the others.

Exit status: 0 done; 2 a bad argument or input (one line on stderr), found before training where possible; 1 the
run failed after it started (a full disk, a non-finite loss); 130 interrupted (Ctrl-C), after the files being
written were finished.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
from collections.abc import Callable
from typing import Any

from . import common
from .common import UsageError as _UsageError

__all__ = ["register", "run"]

_PREVIOUS_RUN = ("last.pt", "metrics.jsonl")
# make-shapes: sides of at most this many pixels (a 4096 x 4096 RGB image is 48 MB in memory).
MAX_SHAPES_SIDE = 4096
DEFAULT_TIMEOUT_MINUTES = 30


class _RunError(Exception):
    """The run failed after it started: printed as one line, exit status 1."""


def register(subparsers: Any) -> None:
    """Add ``train`` and ``make-shapes`` to the ``ssd`` command line."""
    train = subparsers.add_parser(
        "train", help="fine-tune a model on a COCO-format dataset",
        description="Fine-tune a detector (NVIDIA's training recipe, for every model) on a COCO-format dataset (or a "
                    "YOLO-format one, --data DATA.yaml). By "
                    "default training starts from the model's published COCO weights; classes other than COCO's get "
                    "new classification heads.",
    )
    train.add_argument("--images", type=pathlib.Path, help="folder of the training images")
    train.add_argument("--annotations", type=pathlib.Path, help="COCO-format annotation JSON")
    train.add_argument("--data", type=pathlib.Path, metavar="DATA.yaml",
                       help="a YOLO-format dataset (Ultralytics' data file: path, train, val, names) instead of "
                            "--images/--annotations (and --val-*): its train split trains, its val split validates")
    train.add_argument("--out", required=True, type=pathlib.Path,
                       help="output folder: last.pt, best.pt (with validation), metrics.jsonl, results.csv, "
                            "results.png")
    common.add_model(train, files=False)
    train.add_argument("--val-images", type=pathlib.Path, help="folder of the validation images")
    train.add_argument("--val-annotations", type=pathlib.Path, help="COCO-format validation annotations")
    train.add_argument("--val-every", type=int, default=1, metavar="N",
                       help="validate after every N epochs, and after the last (default 1)")
    train.add_argument("--eval-batch-size", type=int, default=None,
                       help="images per forward pass in validation (default: --batch-size)")
    common.add_checkpoint(train, "weights to start from; 'none' for random weights (needs far longer training)")
    train.add_argument("--epochs", type=int, default=65, help="total epochs (default 65, NVIDIA's)")
    common.add_batch_size(train, 32, "per iteration and process")
    train.add_argument("--lr", type=float, default=None,
                       help="base learning rate (default 2.6e-3 x global batch / 32, NVIDIA's scaling)")
    train.add_argument("--warmup-iterations", type=int, default=None,
                       help="linear warmup length (default: NVIDIA's 300, or 10%% of all iterations when fewer)")
    train.add_argument("--schedule", choices=("step", "cosine"), default="step",
                       help="step: the rate x0.1 at each milestone (default, NVIDIA's); cosine: down to 0 over the run")
    train.add_argument("--milestones", default=None, metavar="F1,F2",
                       help="step milestones as fractions of the run, e.g. 0.66,0.83 (default NVIDIA's 43/65,54/65)")
    common.add_precision(train, "fp16 trains with loss scaling")
    common.add_workers(train, None, "per training process; default: up to 8 on CUDA within the process's share of "
                                    "the cores, on CPU a quarter of them, 1 to 4")
    train.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    train.add_argument("--augment", choices=("nvidia", "light", "none"), default=None,
                       help="augmentation: nvidia (default: NVIDIA's crop, flip and colour jitter), light (flip and "
                            "colour jitter, no crop) or none (only resize and normalise)")
    train.add_argument("--no-augment", action="store_true", help="the same as --augment none")
    train.add_argument("--zoom-out", action="store_true",
                       help="add SSD's zoom-out: half of the time, the image on a canvas up to 4x its sides")
    train.add_argument("--scale-jitter", action="store_true",
                       help="add scale jitter: the image scaled to 0.5-1.5x the input size, cropped or padded to it")
    train.add_argument("--patience", type=int, default=None, metavar="N",
                       help="stop after N validations without a better mAP (best.pt keeps the best); needs "
                            "--val-images and --val-annotations")
    train.add_argument("--skip-bad-images", action="store_true",
                       help="skip missing or unreadable training images (reported at the end) instead of stopping")
    train.add_argument("--resume", type=pathlib.Path, default=None, metavar="OUT/last.pt",
                       help="continue a run from its last.pt (epoch, iteration, schedule and metrics continue; the "
                            "schedule stays the one planned when the run started, --epochs only moves the end)")
    train.add_argument("--force", action="store_true", help="start afresh in an --out that holds a previous run")
    common.add_device(train, default="auto")
    train.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across torchrun processes (CUDA)")
    train.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_MINUTES, metavar="MINUTES",
                       help=f"under torchrun, how long a process waits for the others before giving up (default "
                            f"{DEFAULT_TIMEOUT_MINUTES})")
    train.add_argument("--log-every", type=int, default=20, help="metrics line every N iterations (default 20)")
    train.add_argument("--quiet", action="store_true",
                       help="no progress bar and no lines per epoch (errors still print)")
    train.add_argument("--tensorboard", action="store_true",
                       help="also write TensorBoard event files to OUT/tensorboard (pip install "
                            "'ssd-hub[tensorboard]')")
    # For smoke tests and quick checks only: cut every epoch short.
    train.add_argument("--max-iterations-per-epoch", type=int, default=None, help=argparse.SUPPRESS)
    train.set_defaults(run=run)

    shapes = subparsers.add_parser(
        "make-shapes", help="write a synthetic COCO-format dataset of coloured shapes",
        description="Write OUT/images/*.jpg and OUT/annotations.json: circles, squares and triangles on noisy "
                    "backgrounds, a set a detector learns quickly (for demos and tests).",
    )
    shapes.add_argument("--out", required=True, type=pathlib.Path, help="output folder")
    shapes.add_argument("--images", required=True, type=int, help="how many images")
    shapes.add_argument("--size", default="300x300",
                        help=f"WxH in pixels, or one number, 32 to {MAX_SHAPES_SIDE} (default 300x300)")
    shapes.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    shapes.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the subcommand ``args.command``; returns the exit status (2 for bad arguments or inputs)."""
    handler: Callable[[argparse.Namespace], int] = _run_train if args.command == "train" else _run_make_shapes
    try:
        return handler(args)
    except _UsageError as exc:
        _error(str(exc))
        return 2
    except _RunError as exc:
        _error(str(exc))
        return 1


def _error(message: str) -> None:
    from .. import distributed

    if distributed.is_main():  # every rank fails alike; one says so
        common.fail(message)


def _parse_size(text: str) -> tuple[int, int]:
    """'WxH' or 'N' -> (H, W)."""
    parts = text.lower().split("x")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) not in (1, 2) or not all(32 <= n <= MAX_SHAPES_SIDE for n in numbers):
        raise _UsageError(f"--size: expected WxH or N with sides of 32 to {MAX_SHAPES_SIDE} pixels, got {text!r}")
    width, height = numbers[0], numbers[-1]
    return height, width


def _run_make_shapes(args: argparse.Namespace) -> int:
    from ..data.synthetic import make_shapes_dataset

    common.check_int("--images", args.images, 1)
    common.check_int("--seed", args.seed, 0)
    size = _parse_size(args.size)
    try:
        annotations = make_shapes_dataset(args.out, args.images, image_size=size, seed=args.seed)
    except OSError as exc:
        raise _UsageError(f"--out: cannot write {str(args.out)!r}: {exc}") from None
    print(f"wrote {args.images} images to {args.out / 'images'} and their annotations to {annotations}")
    return 0


def _parse_milestones(text: str | None, epochs: int) -> tuple[int, ...] | None:
    """``--milestones 0.66,0.83`` -> milestone epochs of this run (None: NVIDIA's, scaled)."""
    if text is None:
        return None
    from ..training.schedule import milestones_from_fractions

    try:
        fractions = [float(part) for part in text.split(",")]
        return milestones_from_fractions(fractions, epochs, "--milestones")
    except (TypeError, ValueError) as exc:
        detail = str(exc) if str(exc).startswith("--milestones") else ""
        raise _UsageError(detail or f"--milestones: expected increasing fractions of the run in (0, 1) separated "
                                    f"by commas, such as 0.66,0.83, got {text!r}") from None


def _check_train_args(args: argparse.Namespace) -> None:
    # --out first: a file there is found before anything is read, built or downloaded.
    if args.out.exists() and not args.out.is_dir():
        raise _UsageError(f"--out: expected a folder (created if missing), got the file {str(args.out)!r}")
    _check_data_options(args)
    if args.data is not None:
        # Before the checks of --images/--annotations, which the converted files stand for; after the checks that
        # protect --out, since they are written there.
        if args.resume is not None and args.force:
            raise _UsageError("--resume/--force: expected one of them, got both")
        _check_previous_run(args)
        _convert_yolo_data(args)
    common.check_int("--epochs", args.epochs, 1)
    common.check_int("--batch-size", args.batch_size, 2)  # BatchNorm on the 1 x 1 map needs two
    common.check_int("--warmup-iterations", args.warmup_iterations, 0)
    common.check_int("--workers", args.workers, 0)
    common.check_int("--seed", args.seed, 0)
    common.check_int("--log-every", args.log_every, 1)
    common.check_int("--val-every", args.val_every, 1)
    common.check_int("--eval-batch-size", args.eval_batch_size, 1)
    common.check_int("--max-iterations-per-epoch", args.max_iterations_per_epoch, 1)
    common.check_int("--patience", args.patience, 1)
    if args.no_augment and args.augment not in (None, "none"):
        raise _UsageError(f"--no-augment/--augment: expected one of them, got both (--augment {args.augment})")
    if args.tensorboard:
        from ..training.reporting import check_tensorboard

        try:
            check_tensorboard()
        except ImportError as exc:
            raise _UsageError(str(exc)) from None
    if args.lr is not None and not (args.lr > 0 and args.lr < float("inf")):
        raise _UsageError(f"--lr: expected a positive number, got {args.lr}")
    if args.milestones is not None and args.schedule != "step":
        raise _UsageError(f"--milestones: expected only with --schedule step, got --schedule {args.schedule}")
    args.milestone_epochs = _parse_milestones(args.milestones, args.epochs)
    if (args.val_images is None) != (args.val_annotations is None):
        raise _UsageError("--val-images/--val-annotations: expected both or neither, got only one")
    if args.val_images is None and (args.val_every != 1 or args.eval_batch_size is not None):
        raise _UsageError("--val-every/--eval-batch-size: expected with --val-images and --val-annotations, got "
                          "no validation set")
    if args.val_images is None and args.patience is not None:
        raise _UsageError("--patience: expected with --val-images and --val-annotations (it judges the validation "
                          "mAP), got no validation set")
    if args.resume is not None and args.force:
        raise _UsageError("--resume/--force: expected one of them, got both")
    if not args.images.is_dir():
        raise _UsageError(f"--images: expected a folder, got {str(args.images)!r}")
    if not args.annotations.is_file():
        raise _UsageError(f"--annotations: expected a file, got {str(args.annotations)!r}")
    if args.val_images is not None:
        if not args.val_images.is_dir():
            raise _UsageError(f"--val-images: expected a folder, got {str(args.val_images)!r}")
        if not args.val_annotations.is_file():
            raise _UsageError(f"--val-annotations: expected a file, got {str(args.val_annotations)!r}")
        try:
            from .. import evaluation  # noqa: F401 - only whether it is there
        except ImportError:
            raise _UsageError("--val-images: validation needs the ssd.evaluation package, which this installation "
                              "lacks") from None
    if args.resume is not None and not args.resume.is_file():
        raise _UsageError(f"--resume: expected an existing last.pt, got {str(args.resume)!r}")
    _check_previous_run(args)


def _check_previous_run(args: argparse.Namespace) -> None:
    previous = [name for name in _PREVIOUS_RUN if (args.out / name).exists()]
    if previous and args.resume is None and not args.force:
        raise _UsageError(
            f"--out: {str(args.out)!r} holds a previous run ({', '.join(previous)}); pass --resume "
            f"{args.out / 'last.pt'} to continue it or --force to start afresh (overwriting it)"
        )


def _check_data_options(args: argparse.Namespace) -> None:
    """Either --data, or --images and --annotations (each with its own --val-* pair)."""
    given = [name for name, value in (("--images", args.images), ("--annotations", args.annotations),
                                      ("--val-images", args.val_images), ("--val-annotations", args.val_annotations))
             if value is not None]
    if args.data is not None:
        if given:
            raise _UsageError(f"--data: expected alone (it names the images, labels and validation split), got "
                              f"{', '.join(given)} too")
        if not args.data.is_file():
            raise _UsageError(f"--data: expected a YOLO data file (DATA.yaml), got {str(args.data)!r}")
        return
    if args.images is None or args.annotations is None:
        raise _UsageError("--images/--annotations: expected both (or --data DATA.yaml), got "
                          + ("neither" if args.images is None and args.annotations is None else "only one"))


def _convert_yolo_data(args: argparse.Namespace) -> None:
    """--data: the YOLO train (and val, when the file has one) splits converted, validated by the one COCO parser
    and written to OUT/data/train.json and OUT/data/val.json (what this run trained and validated on, and a file
    evaluate takes later); they then stand for --images/--annotations and --val-images/--val-annotations."""
    from .. import distributed
    from ..data.yolo import YoloDataError, convert_yolo_to_coco, read_data_yaml

    folder = args.out / "data"
    try:
        data = read_data_yaml(args.data)
        if "train" not in data.splits:
            raise _UsageError(f"--data: expected a 'train' entry in {str(args.data)!r}, got only "
                              f"{', '.join(data.splits)}")
        folder.mkdir(parents=True, exist_ok=True)
        # Every process converts (the same files, each written atomically): no process waits on another here.
        train = convert_yolo_to_coco(data, "train", folder / "train.json")
        val = convert_yolo_to_coco(data, "val", folder / "val.json") if "val" in data.splits else None
    except (YoloDataError, OSError, ValueError, ImportError) as exc:
        raise _UsageError(f"--data: {exc}") from None
    args.images, args.annotations = train.images_dir, folder / "train.json"
    if val is not None:
        args.val_images, args.val_annotations = val.images_dir, folder / "val.json"
    if distributed.is_main():
        for split in (train, val):
            if split is not None:
                print(f"YOLO data {split.summary()}; as COCO in {folder / (split.split + '.json')}", flush=True)

def _starting_weights(args: argparse.Namespace) -> tuple[Any, str | None]:
    """``(init_checkpoint, label)`` for TrainConfig: None, or the local file of the weights to start from (a path,
    the cache entry of a URL, or of the model's published weights) and where it came from: the one weights path
    (``--checkpoint``, then ``SSD_CHECKPOINT``, then the published weights)."""
    from ..registry import get_entry
    from ..weights.checkpoints import ENV_VAR, CheckpointUnavailableError, is_url, resolve
    from ..weights.formats import read_checkpoint

    if args.resume is not None:
        return None, None  # the resumed checkpoint holds the weights
    choice = args.checkpoint if args.checkpoint is not None else (os.environ.get(ENV_VAR) or None)
    if choice is not None and choice.lower() == "none":
        return None, None
    if choice is not None and not is_url(choice):
        path = pathlib.Path(choice).expanduser()
        if not path.is_file():
            raise _UsageError(f"--checkpoint: expected a checkpoint file, a URL or 'none', got {choice!r}")
        return path, None  # a local file: the loop reads it, with its class names if it has them
    entry = get_entry(args.model)
    try:
        # Read (and checked) here, so that a download enters the cache only if it is a checkpoint of the model.
        found = resolve(entry, lambda path, name: read_checkpoint(path, entry, name=name), checkpoint=choice)
    except CheckpointUnavailableError as exc:
        raise _UsageError(f"{exc} Or pass --checkpoint none to train from random weights (this needs far longer "
                          "training) or --checkpoint /path/to/checkpoint.pt.") from None
    except (OSError, ValueError) as exc:
        raise _UsageError(f"--checkpoint: {exc}") from None
    return found.path, found.source


def _setup(args: argparse.Namespace) -> tuple[int, int, Any]:
    """Join the torchrun job (if any) with ``--timeout``: how long any collective (the rendezvous included) waits for
    the other processes before it fails."""
    import datetime

    from .. import distributed

    if not (args.timeout > 0 and args.timeout < float("inf")):
        raise _UsageError(f"--timeout: expected a positive number of minutes, got {args.timeout}")
    device = distributed.resolve_device(args.device, "--device")
    try:
        distributed.init_from_env(device, timeout=datetime.timedelta(minutes=args.timeout))
    except RuntimeError as exc:
        raise _peer_error(exc, args.timeout) or exc from None
    return distributed.setup(device, "--device")


def _peer_error(exc: BaseException, minutes: float) -> _RunError | None:
    """The one line for a collective that timed out waiting for another process (None for other errors)."""
    text = " ".join(str(exc).split())
    if "timed out" not in text.lower() and "timeout" not in text.lower():
        return None
    return _RunError(f"another torchrun process did not answer within --timeout {minutes:g} minutes (it may have "
                     f"stopped, frozen or never started; raise --timeout for long waits): {text[:200]}")


def _interrupted(message: str) -> int:
    from .. import distributed

    if distributed.is_main():
        print(message, file=sys.stderr, flush=True)
    return 130


def _run_train(args: argparse.Namespace) -> int:
    from .. import distributed
    from ..data.coco_format import AnnotationFileError
    from ..training.loop import NonFiniteLossError, TrainConfig, TrainingInterrupted, train
    from ..training.outputs import RunOutputError
    from ..weights.checkpoints import InvalidCheckpointError

    try:
        rank, world, device = _setup(args)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    except KeyboardInterrupt:
        return _interrupted("interrupted before training started; nothing to resume")
    try:
        # Every rank checks; all stop when any fails (a lone failing rank would leave the others waiting).
        problem = None
        try:
            _check_train_args(args)
            if args.precision == "fp16" and device.type != "cuda":
                raise _UsageError(f"--precision: fp16 needs a CUDA device, got {device.type!r}; use bf16 or fp32")
            if args.sync_bn and world > 1 and device.type != "cuda":
                raise _UsageError(f"--sync-bn: expected CUDA devices, got {device.type!r}")
            if rank == 0:
                init, label = _starting_weights(args)  # rank 0 first, so only it downloads
        except _UsageError as exc:
            problem = exc
        if not distributed.all_ok(problem is None, device if device.type == "cuda" else None):
            raise problem or _UsageError("another process stopped (see its message)")
        if rank != 0:
            init, label = _starting_weights(args)  # from the cache rank 0 filled
        if args.force and rank == 0:
            for name in (*_PREVIOUS_RUN, "best.pt"):
                (args.out / name).unlink(missing_ok=True)
        distributed.barrier()
        if rank == 0 and init is None and args.resume is None and not args.quiet:
            print("starting from random weights (--checkpoint none): expect to need far more epochs than a "
                  "fine-tuning")
        config = TrainConfig(
            annotations=args.annotations, images=args.images, out_dir=args.out, model=args.model, epochs=args.epochs,
            batch_size=args.batch_size, lr=args.lr, warmup_iters=args.warmup_iterations, schedule=args.schedule,
            milestones=args.milestone_epochs, precision=args.precision, device=str(device), num_workers=args.workers,
            seed=args.seed, augment="none" if args.no_augment else (args.augment or "nvidia"),
            zoom_out=args.zoom_out, scale_jitter=args.scale_jitter, patience=args.patience,
            resume=args.resume if args.resume is not None else False,
            init_checkpoint=init, init_source=label, max_iters_per_epoch=args.max_iterations_per_epoch,
            skip_bad_images=args.skip_bad_images, log_every=args.log_every, val_annotations=args.val_annotations,
            val_images=args.val_images, val_every=args.val_every, eval_batch_size=args.eval_batch_size,
            sync_bn=args.sync_bn, log=None if args.quiet else (lambda message: print(message, flush=True)),
            # A bar on a terminal; in a log file (no terminal) the iteration lines of --log-every instead.
            progress=not args.quiet and sys.stderr.isatty(), tensorboard=args.tensorboard,
        )
        try:
            summary = train(config)
        except (RunOutputError, NonFiniteLossError) as exc:
            raise _RunError(str(exc)) from None
        except RuntimeError as exc:
            problem = _peer_error(exc, args.timeout) if world > 1 else None
            if problem is None:
                raise
            raise problem from None
        except (AnnotationFileError, InvalidCheckpointError, OSError, ValueError, TypeError, ImportError) as exc:
            raise _UsageError(str(exc)) from None
        except TrainingInterrupted as exc:
            if exc.checkpoint is None:
                return _interrupted("interrupted before an epoch was saved; nothing to resume")
            return _interrupted(f"interrupted: {exc.checkpoint} holds epoch {exc.epoch}; continue with --resume "
                                f"{exc.checkpoint}")
        if rank == 0 and not args.quiet:
            if summary["epochs_run"] == 0:
                print(f"nothing to do: the run already has {args.epochs} epochs; raise --epochs to train longer "
                      "(the schedule continues as it was planned), or start a new run from it with --checkpoint")
            best = "" if summary["best_map"] is None else f", best mAP {summary['best_map']:.4f} in best.pt"
            print(f"done: epoch {summary['epoch']}, iteration {summary['iterations']}, last.pt, metrics.jsonl, "
                  f"results.csv and results.png in {args.out}{best}")
        return 0
    except KeyboardInterrupt:
        return _interrupted("interrupted before training started; nothing to resume")
    finally:
        distributed.cleanup()
