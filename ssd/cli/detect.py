"""``ssd detect``: find objects in photos, write annotated pictures and a COCO-style JSON file."""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from . import common
from .common import UsageError, fail

if TYPE_CHECKING:
    from ..inference.runs import Job

__all__ = ["collect_inputs", "register", "run"]

SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")  # scikit-image's bundled photographs
REPORT_NAME = "detections.json"

EXAMPLES = """\
examples:
  ssd detect                                   the bundled sample photos, into ./ssd-out
  ssd detect photos/ street.jpg --out results  a folder (recursively) and a file
  ssd detect https://example.com/cat.jpg --threshold 0.5
  ssd detect photos/ --classes person,dog --save-crop --save-txt
  ssd detect photos/ --precision bf16 --batch-size 16
  ssd detect clip.mp4 --vid-stride 2            a video: clip.mp4 annotated, and clip.jsonl per frame
  ssd detect rtsp://camera.local/stream 0       a stream and webcam 0 (Ctrl-C ends them, keeping the files)
  SSD_CHECKPOINT=/path/to/nvidia_ssdpyt_fp32_190826.pt ssd detect photos/   offline weights

`python -m ssd ...` is the same command.
"""

EPILOG = """\
output:
  --out gets one annotated picture per input, in the input's format (JPEG stays JPEG, PNG stays PNG,
  others become PNG), in the input folder's own subfolders, and detections.json (per image: file, size,
  picture, and each detection's name, COCO category id, score and bbox [x, y, width, height] in pixels).
  Unreadable inputs are reported and skipped; the exit code is then 1. An input given twice is detected once.
  --jsonl (and torchrun) writes detections.jsonl instead, one line per image as results come.
  --save-crop: OUT/crops/CLASS/PICTURE-K.EXT, the K-th object of a picture (0 = best score), at full resolution.
  --save-txt: OUT/labels/PICTURE.txt, one line per object "class cx cy w h score" (YOLO format: class is the
  0-based index into the model's class list, that is label - 1; the box centre and size divided by the image's
  width and height); OUT/labels/classes.txt lists the classes, one per line, in index order.
  --save-csv: OUT/detections.csv, one row per detection: file, name, category_id, score, x1, y1, x2, y2.
  A video, stream or webcam gives OUT/<name>.mp4 (annotated, the input's size, its frame rate divided by
  --vid-stride) and OUT/<name>.jsonl (per frame: frame, time in s, width, height, detections), written as
  frames come; Ctrl-C finalises both (exit 130). Needs PyAV: pip install 'ssd-hub[video]'.

classes:
  Labels are 1-based (1..K, 0 is the background); names are the model's (COCO: person, bicycle, ...). With
  --classes-by coco-id the numbers are COCO category ids (1..90 with gaps: id 18 is dog, which is label 17).

""" + EXAMPLES


def register(subparsers: Any) -> None:
    """Add ``detect`` to the ``ssd`` command line."""
    parser = subparsers.add_parser("detect", help="detect objects in images, folders or URLs",
                                   description="Detect objects (COCO's classes by default). With no INPUT, runs on "
                                               "sample photos.",
                                   epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="image files, folders (searched recursively) or URLs; video files (mp4, avi, mkv, mov, "
                             "webm), stream URLs (rtsp://, rtmp://, http(s) .mjpg/.m3u8) or a webcam index (0)")
    parser.add_argument("--out", default="ssd-out", type=pathlib.Path, help="output folder (default: ./ssd-out)")
    common.add_model(parser)
    common.add_checkpoint(parser)
    common.add_device(parser)
    common.add_precision(parser, "an exported file: fp32, or bf16 with OpenVINO")
    common.add_half(parser)
    common.add_batch_size(parser, 8)
    parser.add_argument("--threshold", type=float, default=0.4, help="minimum score, 0..1 (default 0.4)")
    parser.add_argument("--iou", type=float, default=None,
                        help="NMS IoU threshold in (0, 1] (default the model's: 0.5 for nvidia_ssd, 0.45 for "
                             "mmdetection's)")
    parser.add_argument("--max-det", type=int, default=None, metavar="N",
                        help="at most N detections per image (default the model's: 100 for nvidia_ssd)")
    parser.add_argument("--classes", action="append", default=None, metavar="C1,C2",
                        help="keep only these classes: names or labels (1-based), separated by commas; may be "
                             "repeated (e.g. --classes person,dog or --classes 1,17, the same by label)")
    parser.add_argument("--classes-by", choices=("label", "coco-id"), default="label",
                        help="what the numbers of --classes are: label (default, 1..K, the model's order) or "
                             "coco-id (COCO category ids, 1..90 with gaps)")
    parser.add_argument("--agnostic-nms", action="store_true",
                        help="also suppress overlapping boxes of different classes (one box per object)")
    parser.add_argument("--save-crop", action="store_true",
                        help="write each object as its own picture, in OUT/crops/CLASS/")
    parser.add_argument("--save-txt", action="store_true",
                        help="write YOLO-format label files OUT/labels/PICTURE.txt: class cx cy w h score, "
                             "normalised; class = label - 1")
    parser.add_argument("--save-csv", action="store_true", help="write OUT/detections.csv, one row per detection")
    parser.add_argument("--show", action="store_true",
                        help="show each annotated picture in a window as results come (needs a display)")
    parser.add_argument("--jsonl", action="store_true",
                        help="stream results to OUT/detections.jsonl, one line per image (always so under torchrun)")
    parser.add_argument("--no-pictures", dest="pictures", action="store_false",
                        help="write no annotated pictures")
    parser.add_argument("--resume", action="store_true",
                        help="with JSON Lines: skip inputs an earlier (interrupted) run into OUT already did")
    parser.add_argument("--vid-stride", type=int, default=1, metavar="N",
                        help="videos and streams: detect every Nth frame (default 1)")
    common.add_timeout(parser)
    parser.set_defaults(run=run)


def collect_inputs(inputs: Sequence[str], out: pathlib.Path | None = None, ignored: list[str] | None = None,
                   duplicates: list[str] | None = None) -> tuple[list[Job], list[tuple[str, str]]]:
    """Expand folders; returns the jobs to run and ``(name, error)`` pairs already failed.

    A picture's place under --out mirrors the input: files found in a folder keep their path below that folder, a
    file or URL given by itself is placed at the top, under its own name. Folder scans never enter ``out`` (the
    output folder, when it lies inside a scanned folder: ``detect .`` must not read its own ./ssd-out); files
    without a readable image extension are appended to ``ignored``. An input met again under the same name (given
    twice, or named and also found in a folder) is one job, in JSON and JSON Lines alike; its name is appended to
    ``duplicates``.
    """
    found, problems = _expand(inputs, out, ignored)
    seen: set[str] = set()
    jobs = []
    for job in found:
        if job.name in seen:
            if duplicates is not None:
                duplicates.append(job.name)
            continue
        seen.add(job.name)
        jobs.append(job)
    return jobs, problems


def _expand(inputs: Sequence[str], out: pathlib.Path | None,
            ignored: list[str] | None) -> tuple[list[Job], list[tuple[str, str]]]:
    from ..inference.detections import picture_name
    from ..inference.runs import Job
    from ..io.images import readable_extensions

    found: list[Job] = []
    problems: list[tuple[str, str]] = []
    if not inputs:
        from skimage import data

        return [Job(f"{name}.png", getattr(data, name)(), pathlib.PurePosixPath(f"{name}.png"))
                for name in SAMPLE_PHOTOS], problems
    out_resolved = out.resolve() if out is not None else None
    for item in inputs:
        if item.lower().startswith(("http://", "https://")):
            found.append(Job(item, item, picture_name(item, "image")))
            continue
        path = pathlib.Path(item)
        if path.is_dir():
            files, others = _scan_folder(path, out_resolved)
            if ignored is not None:
                ignored += others
            if not files:
                problems.append((item, f"folder has no images ({', '.join(sorted(readable_extensions()))})"))
            for file in files:
                relative = pathlib.PurePosixPath(file.relative_to(path).as_posix())
                found.append(Job(str(file), file, relative.parent / picture_name(relative.name, "image")))
        elif path.exists():
            found.append(Job(item, path, picture_name(item, "image")))
        else:
            problems.append((item, "no such file or folder"))
    return found, problems


def _scan_folder(folder: pathlib.Path, out: pathlib.Path | None) -> tuple[list[pathlib.Path], list[str]]:
    """Image files under ``folder`` (sorted) and the other files seen; the subtree of ``out`` is skipped."""
    from ..io.images import is_image_file

    images: list[pathlib.Path] = []
    others: list[str] = []
    skip = out if out is not None and out != folder.resolve() else None
    for root, dirs, files in os.walk(folder):
        if skip is not None:
            # Pruned in place, so os.walk never descends into the output folder.
            dirs[:] = [d for d in dirs if pathlib.Path(root, d).resolve() != skip]
        for file_name in files:
            path = pathlib.Path(root, file_name)
            if path.is_file() and is_image_file(path):
                images.append(path)
            else:
                others.append(str(path))  # FIFOs, sockets, devices, broken links and non-images: never opened
    return sorted(images), others


def _out_conflict(out: pathlib.Path, inputs: Sequence[str]) -> str | None:
    """Why ``out`` cannot take the pictures of ``inputs`` (it is an input folder, or holds an input file), if so.

    Pictures and detections.json go into ``out``; refusing these cases is what guarantees that an input is never
    overwritten. An ``out`` inside an input folder is fine: the scan skips it.
    """
    if out.exists() and not out.is_dir():
        return f"--out: expected a folder, got the existing file {str(out)!r}"
    resolved = out.resolve()
    for item in inputs:
        if item.lower().startswith(("http://", "https://")):
            continue
        path = pathlib.Path(item)
        if path.is_dir() and path.resolve() == resolved:
            return (f"--out: expected a folder apart from the input folders, got {str(out)!r}, which is the input "
                    f"folder {item!r} (its pictures could overwrite the images); choose another --out")
        if path.is_file() and path.resolve().parent == resolved:
            return (f"--out: expected a folder that holds no input file, got {str(out)!r}, which holds the input "
                    f"{item!r} (a picture could overwrite it); choose another --out")
    return None


def _parse_classes(values: list[str] | None) -> tuple[str | int, ...] | None:
    """``--classes person,dog --classes 3`` -> ("person", "dog", 3): names stay text, whole numbers become ints."""
    if values is None:
        return None
    items: list[str | int] = []
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if not part:
                raise UsageError(f"--classes: expected class names or numbers separated by commas, got {value!r}")
            items.append(int(part) if part.isdigit() else part)
    return tuple(items)


def _options(args: argparse.Namespace) -> Any:
    """The run's RunOptions, every value checked before the model loads (UsageError naming the option)."""
    from .. import distributed
    from ..backends.loading import check_command_options
    from ..inference.runs import RunOptions, display_problem
    from ..models.spec import PostProcessSpec, check_int, check_real

    try:
        # The spec's own validators: the command line accepts exactly what detect accepts (threshold in [0, 1)).
        threshold = check_real("--threshold", args.threshold, 0.0, 1.0, open_high=True)
        batch_size = check_int("--batch-size", args.batch_size, 1)
        check_int("--vid-stride", args.vid_stride, 1)
        timeout = distributed.check_timeout(args.timeout, "--timeout")
        PostProcessSpec().updated({"iou_threshold": "--iou", "max_detections": "--max-det"},
                                  iou_threshold=args.iou, max_detections=args.max_det)
        check_command_options(args.model, backend=args.backend, checkpoint=args.checkpoint,
                              precision=args.precision, half=args.half)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    problem = _out_conflict(args.out, args.inputs)
    if problem is None and args.show:
        problem = display_problem()
    if problem is not None:
        raise UsageError(problem)
    return RunOptions(out=args.out, threshold=threshold, batch_size=batch_size, pictures=args.pictures,
                      resume=args.resume, timeout=timeout, iou_threshold=args.iou, max_detections=args.max_det,
                      classes=_parse_classes(args.classes), classes_by=args.classes_by, agnostic=args.agnostic_nms,
                      crops=args.save_crop, labels=args.save_txt, csv=args.save_csv, show=args.show)


def run(args: argparse.Namespace) -> int:
    """Run ``ssd detect`` from its parsed arguments; returns the exit status."""
    from .. import distributed
    from ..backends.loading import command_device, load_for_command
    from ..inference.detect import resolve_classes
    from ..io.video import is_video_source
    from ..weights import CheckpointUnavailableError, InvalidCheckpointError

    try:
        options = _options(args)
        device = command_device(args.model, args.device)
        videos = [item for item in args.inputs if is_video_source(item)]
        if videos:
            _check_videos(videos)
    except (UsageError, ValueError) as exc:
        return fail(exc)
    images = [item for item in args.inputs if item not in videos]
    ignored: list[str] = []
    duplicates: list[str] = []
    # No input at all means the sample photos; videos alone mean no images.
    jobs, skipped = ([], []) if videos and not images else collect_inputs(images, out=args.out, ignored=ignored,
                                                                          duplicates=duplicates)
    streaming = args.jsonl or args.resume or distributed.env_world_size() > 1
    try:
        backend = load_for_command(args.model, backend=args.backend, checkpoint=args.checkpoint, device=device,
                                   precision=common.autocast(args.precision), half=args.half, announce=print)
        resolve_classes(options.classes, backend.spec, options.classes_by)  # the model's classes are known now
    except (CheckpointUnavailableError, InvalidCheckpointError, OSError, ValueError, TypeError, ImportError) as exc:
        return fail(str(exc).replace("classes: ", "--classes: ", 1) if str(exc).startswith("classes: ") else exc)
    except KeyboardInterrupt:
        print("interrupted while loading the model; nothing was done", file=sys.stderr)
        return 130
    if videos:
        status = _detect_videos(backend, videos, options, args.vid_stride)
        if status == 130 or not images:
            return status
        return max(status, _detect_images(backend, jobs, skipped, ignored, duplicates, options, streaming))
    return _detect_images(backend, jobs, skipped, ignored, duplicates, options, streaming)


def _check_videos(videos: list[str]) -> None:
    """Why the video inputs cannot run, found before the model loads (UsageError): PyAV missing, or torchrun."""
    from .. import distributed
    from ..io.video import require_av

    if distributed.env_world_size() > 1:
        raise UsageError(f"{videos[0]}: expected image inputs under torchrun, got a video (run videos in one process)")
    try:
        require_av(f"video input {videos[0]!r}")
    except ImportError as exc:
        raise UsageError(str(exc)) from None


def _detect_videos(backend: Any, videos: list[str], options: Any, vid_stride: int) -> int:
    """Each video, stream or webcam into OUT/<name>.mp4 and OUT/<name>.jsonl; 1 if one failed, 130 on Ctrl-C."""
    from ..backends import BackendError
    from ..inference.video import run_video, video_stem
    from ..io.files import UniqueNames

    names = UniqueNames()
    names.claim(pathlib.PurePosixPath(REPORT_NAME))
    status = 0
    for source in dict.fromkeys(videos):  # a video given twice is done once
        stem = names.claim(pathlib.PurePosixPath(video_stem(source) + ".mp4")).stem
        names.claim(pathlib.PurePosixPath(stem + ".jsonl"))
        try:
            done = run_video(backend, source, options.out, stem=stem, vid_stride=vid_stride, video=options.pictures,
                             **options.detect_arguments())
        except KeyboardInterrupt:
            print(f"interrupted: {source}: the frames done are in {options.out / stem}.jsonl"
                  + ("" if not options.pictures else f" and {options.out / stem}.mp4 (finalised)"), file=sys.stderr)
            return 130
        except (OSError, ValueError, BackendError) as exc:  # VideoError (a bad file, a stalled stream, no webcam)
            fail(exc, 1)
            status = 1
            continue
        written = f"{done.video.name} and {done.jsonl.name}" if done.video is not None else done.jsonl.name
        rate = done.frames / done.seconds if done.seconds > 0 else 0.0
        print(f"{source}: {done.frames} frame(s) in {done.seconds:.1f} s ({rate:.1f} frames/s); {written} in "
              f"{options.out}")
    return status


def _detect_images(backend: Any, jobs: list[Any], skipped: list[tuple[str, str]], ignored: list[str],
                   duplicates: list[str], options: Any, streaming: bool) -> int:
    from .. import distributed
    from ..backends import BackendError
    from ..inference.jsonl import run_streaming_detect
    from ..inference.runs import DisplayError

    if duplicates:
        print(f"{len(duplicates)} input(s) given more than once, detected once: {', '.join(duplicates[:5])}"
              + (" ..." if len(duplicates) > 5 else ""))
    if streaming:
        try:
            return run_streaming_detect(backend, jobs, skipped, options)
        except (BackendError, OSError, distributed.PeerTimeoutError, distributed.PeerLostError) as exc:
            return fail(exc, 1)  # a runtime's failure, a peer that stopped answering, a full disk
        except (ValueError, DisplayError) as exc:  # ranks given different arguments, a part that is a folder, a
            return fail(exc)                        # threshold refused, no window for --show
    return _detect_to_json(backend, jobs, skipped, ignored, options)


def _detect_to_json(backend: Any, jobs: list[Any], skipped: list[tuple[str, str]], ignored: list[str],
                    options: Any) -> int:
    from ..backends import BackendError
    from ..inference.runs import CSV_NAME, DisplayError, JsonReport, write_csv
    from ..io.images import readable_extensions

    try:
        options.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return fail(f"--out: could not create the folder {str(options.out)!r}: {exc}")
    report = JsonReport(options.out / REPORT_NAME, {"model": backend.spec.name,
                                                    "checkpoint": getattr(backend, "source", None),
                                                    "threshold": options.threshold}, len(jobs), skipped)
    started = time.perf_counter()
    try:
        _detect_all(backend, jobs, options, report)
    except (ValueError, DisplayError) as exc:  # e.g. a --threshold below the one fixed in a graph exported with
        return fail(exc)                        # --nms; no window for --show
    except (BackendError, KeyboardInterrupt) as exc:
        try:
            report.save()
            kept = f"they are in {report.path}"
        except OSError as error:
            kept = f"but {report.path} could not be written: {error}"
        if isinstance(exc, BackendError):
            return fail(f"{exc}; {len(report.done)} image(s) were done, {kept}", 1)
        print(f"interrupted: {len(report.done)} of {len(jobs)} image(s) done; {kept}", file=sys.stderr)
        return 130
    try:
        report.save()
        if options.csv:
            write_csv(options.out / CSV_NAME, report.done)
    except OSError as exc:
        return fail(f"could not write {report.path}: {exc}", 1)
    elapsed = time.perf_counter() - started
    written = [REPORT_NAME] + ([CSV_NAME] if options.csv else [])
    extras = [what for what, wanted in (("pictures", options.pictures), ("crops/", options.crops),
                                        ("labels/", options.labels)) if wanted]
    print(f"{len(report.done)} image(s) in {elapsed:.1f} s; {', '.join(extras + written)} in {options.out}")
    if ignored:
        print(f"{len(ignored)} non-image file(s) in the folders ignored (readable: "
              f"{', '.join(sorted(readable_extensions()))})")
    if skipped:
        print(f"{len(skipped)} input(s) skipped:", file=sys.stderr)
        for name, error in skipped:
            print(f"  {name}: {error}", file=sys.stderr)
        return 1
    return 0


def _detect_all(backend: Any, jobs: list[Any], options: Any, report: Any) -> None:
    """Run every job through the shared loop, handing each record to ``report``; bad inputs and pictures that
    cannot be written are reported in ``report.skipped`` (a record then keeps its detections, with no picture) and
    the run goes on."""
    from ..inference.runs import CSV_NAME, picture_paths, run_jobs

    def emit(index: int, record: dict[str, Any], picture_error: str | None) -> None:
        report.add(index, record)
        if picture_error is not None:
            report.skip(jobs[index].name, f"picture not saved: {picture_error}")
            print(f"error: {picture_error}", file=sys.stderr)

    def failed(index: int, error: str) -> None:
        report.skip(jobs[index].name, error)

    pictures = picture_paths(jobs, reserved=(REPORT_NAME, CSV_NAME))
    run_jobs(backend, jobs, range(len(jobs)), options, pictures, emit=emit, failed=failed)
