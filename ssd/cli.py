"""``python -m ssd detect``: find objects in photos, write annotated pictures and a COCO-style JSON file."""
from __future__ import annotations

import argparse
import os
import pathlib
import queue
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

from . import __version__, distributed
from .evaluation import cli as evaluate_cli
from .export import cli as export_cli
from .inference.detect import detect_iter
from .inference.detections import Detections, picture_name
from .inference.jsonl import run_streaming_detect
from .io.files import UniqueNames, write_json
from .io.images import is_image_file, readable_extensions
from .models.spec import check_int, check_real
from .registry import build_model, list_models
from .training import cli as training_cli
from .weights import CheckpointUnavailableError, InvalidCheckpointError

SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")  # scikit-image's bundled photographs
_PROGRESS_FROM = 5  # images; fewer finish before a bar would be useful
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
  Unreadable inputs are reported and skipped; the exit code is then 1.

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
    run.add_argument("--backend", choices=("onnxruntime", "openvino"), default=None,
                     help="runtime for --model FILE (default: onnxruntime for .onnx, openvino for .xml)")
    evaluate_cli.add_parser(commands)
    training_cli.add_parser(commands)
    export_cli.add_parser(commands)
    return parser


class Job(NamedTuple):
    name: str  # as the user wrote it (or the path found in a folder): reports and detections.json use it
    source: Any  # what detect loads
    picture: pathlib.PurePosixPath  # where its picture goes, relative to --out (before making names unique)


def collect_inputs(inputs: Sequence[str], out: pathlib.Path | None = None,
                   ignored: list[str] | None = None) -> tuple[list[Job], list[tuple[str, str]]]:
    """Expand folders; returns the jobs to run and ``(name, error)`` pairs already failed.

    A picture's place under --out mirrors the input: files found in a folder keep their path below that folder, a
    file or URL given by itself is placed at the top, under its own name. Folder scans never enter ``out`` (the
    output folder, when it lies inside a scanned folder: ``detect .`` must not read its own ./ssd-out); files
    without a readable image extension are appended to ``ignored``.
    """
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


class PictureWriter:
    """Saves pictures in one background thread, so that the network never waits for drawing and encoding.

    The queue is bounded: when pictures fall behind, ``put`` blocks, so at most ``depth`` decoded images wait in
    memory however long the input list is.
    """

    def __init__(self, depth: int = 16) -> None:
        self._queue: queue.Queue[tuple[int, Detections, pathlib.Path] | None] = queue.Queue(maxsize=depth)
        self.written: dict[int, pathlib.Path] = {}
        self.errors: dict[int, str] = {}
        self._thread = threading.Thread(target=self._run, name="ssd-pictures", daemon=True)
        self._thread.start()

    def put(self, index: int, found: Detections, path: pathlib.Path) -> None:
        self._queue.put((index, found, path))

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            index, found, path = job
            try:
                self.written[index] = found.save(path)
            except Exception as exc:  # noqa: BLE001 - the thread must keep draining the queue, or put() hangs
                self.errors[index] = f"cannot write {path}: {exc}"

    def close(self) -> None:
        """Wait until every queued picture is written."""
        self._queue.put(None)
        self._thread.join()

    def __enter__(self) -> PictureWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def summary(names: Sequence[str], scores: Sequence[float], most: int = 5) -> str:
    """'3 objects: person 0.98, dog 0.87, cat 0.45' (the best few, then how many more)."""
    if not names:
        return "nothing found"
    best = ", ".join(f"{n} {s:.2f}" for n, s in zip(names[:most], scores[:most]))
    more = f", +{len(names) - most} more" if len(names) > most else ""
    return f"{len(names)} object{'s' if len(names) != 1 else ''}: {best}{more}"


def _option_error(args: argparse.Namespace) -> str | None:
    """The first option detect would refuse, as one line, checked before the model loads."""
    try:
        # The spec's own validators: the command line accepts exactly what detect accepts (threshold in [0, 1)).
        args.threshold = check_real("--threshold", args.threshold, 0.0, 1.0, open_high=True)
        args.batch_size = check_int("--batch-size", args.batch_size, 1)
    except (TypeError, ValueError) as exc:
        return str(exc)
    return _out_conflict(args.out, args.inputs)


class _Report:
    """detections.json, rewritten atomically as results come (every few seconds and at the end), so that an
    interrupted or crashed run keeps what it had done."""

    def __init__(self, path: pathlib.Path, header: dict, size: int, skipped: list[tuple[str, str]]) -> None:
        self.path, self.header, self.skipped = path, header, skipped
        self.records: list[dict | None] = [None] * size
        self.saved_at = time.monotonic()

    def add(self, index: int, record: dict) -> None:
        self.records[index] = record
        if time.monotonic() - self.saved_at >= _SAVE_EVERY_S:
            try:
                self.save()
            except OSError as exc:
                # A full disk now and then must not end the run: the results stay in memory for the next save.
                print(f"warning: could not update {self.path}: {exc}", file=sys.stderr)
                self.saved_at = time.monotonic()

    @property
    def done(self) -> list[dict]:
        return [r for r in self.records if r is not None]

    def save(self) -> None:
        write_json(self.path, {**self.header, "images": self.done,
                                "skipped": [{"file": name, "error": error} for name, error in self.skipped]})
        self.saved_at = time.monotonic()


def run_detect(args: argparse.Namespace) -> int:
    import torch

    problem = _option_error(args)
    try:
        device = distributed.resolve_device(args.device, "--device")
    except ValueError as exc:
        problem = problem or str(exc)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    ignored: list[str] = []
    jobs, skipped = collect_inputs(args.inputs, out=args.out, ignored=ignored)
    exported = args.model is not None and pathlib.Path(args.model).suffix.lower() in export_cli.EXPORTED_SUFFIXES
    streaming = args.jsonl or args.resume or distributed.env_world_size() > 1
    if exported and streaming:
        print("error: --model FILE: expected a PyTorch model for --jsonl, --resume and torchrun runs, got an "
              f"exported file {args.model!r}", file=sys.stderr)
        return 2
    try:
        if exported:
            model = export_cli.load_exported(args.model, args.backend)
        else:
            model = build_model(args.model or "nvidia_ssd", half=args.precision == "fp16",
                                checkpoint=args.checkpoint).to(device)
            if args.precision == "bf16":
                # bf16 already rounds differently from fp32; channels_last adds speed (2.7x fp32 on an AVX-512
                # CPU, see benchmarks/RESULTS.md) at no further cost in agreement.
                model.to(memory_format=torch.channels_last)
    except (CheckpointUnavailableError, InvalidCheckpointError, OSError, ValueError, ImportError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted while loading the model; nothing was done", file=sys.stderr)
        return 130
    if streaming:
        return run_streaming_detect(args, model, jobs, skipped, summary)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"error: --out: could not create the folder {str(args.out)!r}: {exc}", file=sys.stderr)
        return 2

    report = _Report(args.out / REPORT_NAME, {
        "model": model.spec.name, "checkpoint": getattr(model, "checkpoint_source", None),
        "threshold": args.threshold}, len(jobs), skipped)
    started = time.perf_counter()
    try:
        _detect_all(model, jobs, args, report)
    except ValueError as exc:  # e.g. a --threshold below the one fixed in a graph exported with --nms
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        try:
            report.save()
            kept = f"they are in {report.path}"
        except OSError as exc:
            kept = f"but {report.path} could not be written: {exc}"
        print(f"interrupted: {len(report.done)} of {len(jobs)} image(s) done; {kept}", file=sys.stderr)
        return 130
    try:
        report.save()
    except OSError as exc:
        print(f"error: could not write {report.path}: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - started
    written = f"pictures and {REPORT_NAME}" if args.pictures else REPORT_NAME
    print(f"{len(report.done)} image(s) in {elapsed:.1f} s; {written} in {args.out}")
    if ignored:
        print(f"{len(ignored)} non-image file(s) in the folders ignored (readable: "
              f"{', '.join(sorted(readable_extensions()))})")
    if skipped:
        print(f"{len(skipped)} input(s) skipped:", file=sys.stderr)
        for name, error in skipped:
            print(f"  {name}: {error}", file=sys.stderr)
        return 1
    return 0


def _detect_all(model: Any, jobs: list[Job], args: argparse.Namespace, report: _Report) -> None:
    """Run every job, queueing each picture for the background writer and handing each record to ``report``; bad
    inputs and pictures that cannot be written are reported in ``report.skipped`` and the run goes on."""
    import torch
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), unit="image", disable=len(jobs) < _PROGRESS_FROM, file=sys.stderr)
    unique = UniqueNames()
    unique.claim(pathlib.PurePosixPath(REPORT_NAME))
    sources = [job.source for job in jobs]
    if isinstance(model, torch.nn.Module):
        stream = detect_iter(model, sources, threshold=args.threshold, batch_size=args.batch_size,
                             precision="bf16" if args.precision == "bf16" else None, keep_images=args.pictures,
                             skip_errors=True)
    else:  # an exported model: the same pipeline through its runtime
        stream = model.detect_iter(sources, threshold=args.threshold, batch_size=args.batch_size,
                                   keep_images=args.pictures, skip_errors=True)
    with bar, PictureWriter() as pictures:
        for index, result in stream:
            name = jobs[index].name
            bar.update(1)
            if isinstance(result, Exception):
                report.skipped.append((name, str(result)))
                tqdm.write(f"skipped {name}: {result}", file=sys.stderr)
                continue
            picture = unique.claim(jobs[index].picture) if args.pictures else None
            if picture is not None:
                pictures.put(index, result, args.out / picture)
            height, width = result.image_size
            report.add(index, {
                "file": name, "width": width, "height": height,
                "picture": picture.as_posix() if picture is not None else None,
                "detections": [{k: d[k] for k in ("name", "category_id", "score", "bbox")}
                               for d in result.to_dict()["detections"]],
            })
            tqdm.write(f"{name} ({width}x{height}): {summary(result.names, result.scores)}")
            # Only the current batch and the writer's queue keep images alive: memory stays bounded on long lists.
            del result
    for index, error in sorted(pictures.errors.items()):
        # The detections are still good: keep them, with no picture, and say why.
        report.records[index]["picture"] = None
        report.skipped.append((jobs[index].name, f"picture not saved: {error}"))
        print(f"error: {error}", file=sys.stderr)


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
    return 2  # argparse already rejected anything else
