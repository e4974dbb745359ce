"""``python -m ssd detect``: find objects in photos, write annotated pictures and a COCO-style JSON file."""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from . import __version__, distributed
from .backends.loading import check_command_options
from .evaluation import cli as evaluate_cli
from .export import cli as export_cli
from .inference.detections import picture_name
from .inference.runs import Job, PictureWriter, RunOptions, picture_paths, run_jobs, summary
from .io.files import write_json
from .io.images import is_image_file, readable_extensions
from .models.spec import check_int, check_real
from .registry import list_models
from .training import cli as training_cli
from .weights import CheckpointUnavailableError, InvalidCheckpointError

__all__ = ["Job", "PictureWriter", "collect_inputs", "main", "run_detect", "summary"]

SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")  # scikit-image's bundled photographs
_SAVE_EVERY_S = 5.0  # detections.json is rewritten (atomically) at least this often while a run goes on
REPORT_NAME = "detections.json"


def _prog() -> str:
    # The same parser serves the `ssd` console script and `python -m ssd`; usage lines name what was typed.
    return "python -m ssd" if pathlib.Path(sys.argv[0]).name == "__main__.py" else "ssd"


_EXAMPLES = """\
examples:
  ssd detect                                   the bundled sample photos, into ./ssd-out
  ssd detect photos/ street.jpg --out results  a folder (recursively) and a file
  ssd detect https://example.com/cat.jpg --threshold 0.5
  ssd detect photos/ --precision bf16 --batch-size 16
  SSD_CHECKPOINT=/path/to/nvidia_ssdpyt_fp32_190826.pt ssd detect photos/   offline weights

`python -m ssd ...` is the same command.
"""

_DETECT_EPILOG = """\
output:
  --out gets one annotated picture per input, in the input's format (JPEG stays JPEG, PNG stays PNG,
  others become PNG), in the input folder's own subfolders, and detections.json (per image: file, size,
  picture, and each detection's name, COCO category id, score and bbox [x, y, width, height] in pixels).
  Unreadable inputs are reported and skipped; the exit code is then 1. An input given twice is detected once.
  --jsonl (and torchrun) writes detections.jsonl instead, one line per image as results come.

""" + _EXAMPLES


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=_prog(), description=__doc__, epilog=_EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("detect", help="detect objects in images, folders or URLs",
                              description="Detect COCO objects with SSD300. With no INPUT, runs on sample photos.",
                              epilog=_DETECT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("inputs", nargs="*", metavar="INPUT", help="image files, folders (searched recursively) or URLs")
    run.add_argument("--out", default="ssd-out", type=pathlib.Path, help="output folder (default: ./ssd-out)")
    run.add_argument("--threshold", type=float, default=0.4, help="minimum score, 0..1 (default 0.4)")
    run.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                     help="fp32 (default); fp16 half-precision weights (CUDA); bf16 autocast (recent CPUs and GPUs)")
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    run.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    run.add_argument("--checkpoint", default=None,
                     help="checkpoint file or URL (default: SSD_CHECKPOINT, else NVIDIA's published weights)")
    run.add_argument("--jsonl", action="store_true",
                     help="stream results to OUT/detections.jsonl, one line per image (always so under torchrun)")
    run.add_argument("--no-pictures", dest="pictures", action="store_false", help="write no annotated pictures")
    run.add_argument("--resume", action="store_true",
                     help="with JSON Lines: skip inputs an earlier (interrupted) run into OUT already did")
    run.add_argument("--model", default=None, metavar="NAME_OR_FILE",
                     help=f"{', '.join(list_models())} (default nvidia_ssd), or an exported .onnx / OpenVINO .xml "
                          "file")
    run.add_argument("--backend", choices=("auto", "onnxruntime", "openvino"), default=None,
                     help="runtime for --model FILE (default: onnxruntime for .onnx, openvino for .xml); auto with a "
                          "model name: the fastest installed backend whose detections agree with fp32 on a check "
                          "image (OpenVINO, else bf16 on CPUs with native bf16, else fp32), and says which")
    run.add_argument("--timeout", type=float, default=30.0, metavar="MINUTES",
                     help="under torchrun: how long a process waits for the others at each exchange before it stops "
                          "with an error (default 30)")
    evaluate_cli.add_parser(commands)
    training_cli.add_parser(commands)
    export_cli.add_parser(commands)
    _add_benchmark_parser(commands)
    return parser


def _add_benchmark_parser(commands: Any) -> None:
    bench = commands.add_parser(
        "benchmark", help="time a model in every installed format (PyTorch, ONNX, OpenVINO, INT8)",
        description="Per format: file size, ms per image and images/s of the whole detect call at --batch-size; "
                    "with --images and --annotations also the COCO mAP of evaluate. Exported files go to a "
                    "temporary folder.")
    bench.add_argument("--model", default="nvidia_ssd", help=f"{', '.join(list_models())} (default nvidia_ssd)")
    bench.add_argument("--checkpoint", default=None,
                       help="checkpoint file or URL (default: SSD_CHECKPOINT, else the published weights)")
    bench.add_argument("--device", default=None, help="where the PyTorch formats run (default cpu)")
    bench.add_argument("--formats", default=None, metavar="F1,F2",
                       help="comma-separated: pytorch, bf16, onnx, openvino, openvino-bf16, int8 (default: pytorch "
                            "and the installed exported runtimes)")
    bench.add_argument("--images", default=None, metavar="DIR",
                       help="images to time (default: scikit-image's photographs) and, with --annotations, to score")
    bench.add_argument("--annotations", default=None, metavar="FILE", help="COCO annotation file: also print mAP")
    bench.add_argument("--calibration", default=None, metavar="DIR",
                       help="INT8 calibration images, at least 100 (default: --images)")
    bench.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    bench.add_argument("--batches", type=int, default=2, help="batches timed per format (default 2)")
    bench.add_argument("--threads", type=int, default=None, help="CPU threads per backend (default: the thread plan)")


def run_benchmark_command(args: argparse.Namespace) -> int:
    from .benchmark import format_table, run_benchmark

    try:
        rows = run_benchmark(args.model, checkpoint=args.checkpoint, device=args.device, formats=args.formats,
                             images=args.images, annotations=args.annotations, calibration=args.calibration,
                             batch_size=args.batch_size, batches=args.batches, threads=args.threads,
                             log=lambda line: print(line, file=sys.stderr))
    except (CheckpointUnavailableError, InvalidCheckpointError, OSError, ValueError, TypeError) as exc:
        return _error(exc, 2)
    print(format_table(rows, args.batch_size))
    return 1 if all(row.error is not None for row in rows) else 0


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


def _option_error(args: argparse.Namespace) -> str | None:
    """The first option detect would refuse, as one line, checked before the model loads."""
    try:
        # The spec's own validators: the command line accepts exactly what detect accepts (threshold in [0, 1)).
        args.threshold = check_real("--threshold", args.threshold, 0.0, 1.0, open_high=True)
        args.batch_size = check_int("--batch-size", args.batch_size, 1)
        args.timeout = distributed.check_timeout(args.timeout, "--timeout")
        # detect's --precision fp16 means half weights (NVIDIA's model_math='fp16'); bf16 is autocast.
        check_command_options(args.model, backend=args.backend, checkpoint=args.checkpoint,
                              precision="bf16" if args.precision == "bf16" else None, half=args.precision == "fp16")
    except (TypeError, ValueError) as exc:
        return str(exc)
    return _out_conflict(args.out, args.inputs)


class _Report:
    """detections.json, rewritten atomically as results come (every few seconds and at the end), so that an
    interrupted or crashed run keeps what it had done. Records may come from several threads."""

    def __init__(self, path: pathlib.Path, header: dict, size: int, skipped: list[tuple[str, str]]) -> None:
        self.path, self.header, self.skipped = path, header, skipped
        self.records: list[dict | None] = [None] * size
        self.saved_at = time.monotonic()
        self._lock = threading.RLock()

    def add(self, index: int, record: dict) -> None:
        with self._lock:
            self.records[index] = record
            if time.monotonic() - self.saved_at >= _SAVE_EVERY_S:
                try:
                    self.save()
                except OSError as exc:
                    # A full disk now and then must not end the run: the results stay in memory for the next save.
                    print(f"warning: could not update {self.path}: {exc}", file=sys.stderr)
                    self.saved_at = time.monotonic()

    def skip(self, name: str, error: str) -> None:
        with self._lock:
            self.skipped.append((name, error))

    @property
    def done(self) -> list[dict]:
        with self._lock:
            return [r for r in self.records if r is not None]

    def save(self) -> None:
        with self._lock:
            write_json(self.path, {**self.header, "images": self.done,
                                    "skipped": [{"file": name, "error": error} for name, error in self.skipped]})
            self.saved_at = time.monotonic()


def _error(message: Any, status: int) -> int:
    # The same one-line error as evaluate's (with "[rank R] " under torchrun).
    return evaluate_cli.fail(str(message), status)


def run_detect(args: argparse.Namespace) -> int:
    from .backends import BackendError
    from .backends.loading import command_device, load_for_command
    from .inference.jsonl import run_streaming_detect

    args.model = args.model or "nvidia_ssd"
    problem = _option_error(args)
    try:
        device = command_device(args.model, args.device)
    except ValueError as exc:
        problem = problem or str(exc)
    if problem is not None:
        return _error(problem, 2)
    ignored: list[str] = []
    duplicates: list[str] = []
    jobs, skipped = collect_inputs(args.inputs, out=args.out, ignored=ignored, duplicates=duplicates)
    streaming = args.jsonl or args.resume or distributed.env_world_size() > 1
    try:
        backend = load_for_command(args.model, backend=args.backend, checkpoint=args.checkpoint, device=device,
                                   precision="bf16" if args.precision == "bf16" else None,
                                   half=args.precision == "fp16", announce=print)
    except (CheckpointUnavailableError, InvalidCheckpointError, OSError, ValueError, ImportError) as exc:
        return _error(exc, 2)
    except KeyboardInterrupt:
        print("interrupted while loading the model; nothing was done", file=sys.stderr)
        return 130
    options = RunOptions(out=args.out, threshold=args.threshold, batch_size=args.batch_size, pictures=args.pictures,
                         resume=args.resume, timeout=args.timeout)
    if duplicates:
        print(f"{len(duplicates)} input(s) given more than once, detected once: {', '.join(duplicates[:5])}"
              + (" ..." if len(duplicates) > 5 else ""))
    if streaming:
        try:
            return run_streaming_detect(backend, jobs, skipped, options)
        except ValueError as exc:  # ranks given different arguments, a part that is a folder, a threshold refused
            return _error(exc, 2)
        except (BackendError, OSError) as exc:  # a runtime's failure, a peer that stopped answering, a full disk
            return _error(exc, 1)
    return _detect_to_json(backend, jobs, skipped, ignored, options)


def _detect_to_json(backend: Any, jobs: list[Job], skipped: list[tuple[str, str]], ignored: list[str],
                    options: RunOptions) -> int:
    from .backends import BackendError

    try:
        options.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return _error(f"--out: could not create the folder {str(options.out)!r}: {exc}", 2)
    report = _Report(options.out / REPORT_NAME, {"model": backend.spec.name,
                                                 "checkpoint": getattr(backend, "source", None),
                                                 "threshold": options.threshold}, len(jobs), skipped)
    started = time.perf_counter()
    try:
        _detect_all(backend, jobs, options, report)
    except ValueError as exc:  # e.g. a --threshold below the one fixed in a graph exported with --nms
        return _error(exc, 2)
    except (BackendError, KeyboardInterrupt) as exc:
        try:
            report.save()
            kept = f"they are in {report.path}"
        except OSError as error:
            kept = f"but {report.path} could not be written: {error}"
        if isinstance(exc, BackendError):
            return _error(f"{exc}; {len(report.done)} image(s) were done, {kept}", 1)
        print(f"interrupted: {len(report.done)} of {len(jobs)} image(s) done; {kept}", file=sys.stderr)
        return 130
    try:
        report.save()
    except OSError as exc:
        return _error(f"could not write {report.path}: {exc}", 1)
    elapsed = time.perf_counter() - started
    written = f"pictures and {REPORT_NAME}" if options.pictures else REPORT_NAME
    print(f"{len(report.done)} image(s) in {elapsed:.1f} s; {written} in {options.out}")
    if ignored:
        print(f"{len(ignored)} non-image file(s) in the folders ignored (readable: "
              f"{', '.join(sorted(readable_extensions()))})")
    if skipped:
        print(f"{len(skipped)} input(s) skipped:", file=sys.stderr)
        for name, error in skipped:
            print(f"  {name}: {error}", file=sys.stderr)
        return 1
    return 0


def _detect_all(backend: Any, jobs: list[Job], options: RunOptions, report: _Report) -> None:
    """Run every job through the shared loop, handing each record to ``report``; bad inputs and pictures that
    cannot be written are reported in ``report.skipped`` (a record then keeps its detections, with no picture) and
    the run goes on."""

    def emit(index: int, record: dict[str, Any], picture_error: str | None) -> None:
        report.add(index, record)
        if picture_error is not None:
            report.skip(jobs[index].name, f"picture not saved: {picture_error}")
            print(f"error: {picture_error}", file=sys.stderr)

    def failed(index: int, error: str) -> None:
        report.skip(jobs[index].name, error)

    pictures = picture_paths(jobs, reserved=(REPORT_NAME,)) if options.pictures else [None] * len(jobs)
    run_jobs(backend, jobs, range(len(jobs)), options, pictures, emit=emit, failed=failed)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "detect":
        return run_detect(args)
    if args.command == "evaluate":
        return evaluate_cli.run(args)
    if args.command in training_cli.COMMANDS:
        return training_cli.run(args)
    if args.command == "export":
        return export_cli.run(args)
    if args.command == "benchmark":
        return run_benchmark_command(args)
    return 2  # argparse already rejected anything else
