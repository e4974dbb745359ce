"""``python -m ssd detect``: find objects in photos, write annotated pictures and a COCO-style JSON file."""
from __future__ import annotations

import argparse
import json
import pathlib
import queue
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

from . import __version__, distributed
from .evaluation import cli as evaluate_cli
from .inference.detect import detect_iter
from .inference.detections import Detections, picture_name
from .inference.jsonl import run_streaming_detect
from .io.files import UniqueNames, atomic_open
from .io.images import IMAGE_EXTENSIONS, is_image_file
from .training import cli as training_cli
from .weights.checkpoints import CheckpointUnavailableError, InvalidCheckpointError
from .zoo import build_ssd300

SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")  # scikit-image's bundled photographs
_PROGRESS_FROM = 5  # images; fewer finish before a bar would be useful


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
    evaluate_cli.add_parser(commands)
    training_cli.add_parser(commands)
    return parser


class Job(NamedTuple):
    name: str  # as the user wrote it (or the path found in a folder): reports and detections.json use it
    source: Any  # what detect loads
    picture: pathlib.PurePosixPath  # where its picture goes, relative to --out (before making names unique)


def collect_inputs(inputs: Sequence[str]) -> tuple[list[Job], list[tuple[str, str]]]:
    """Expand folders; returns the jobs to run and ``(name, error)`` pairs already failed.

    A picture's place under --out mirrors the input: files found in a folder keep their path below that folder, a
    file or URL given by itself is placed at the top, under its own name.
    """
    found: list[Job] = []
    problems: list[tuple[str, str]] = []
    if not inputs:
        from skimage import data

        return [Job(f"{name}.png", getattr(data, name)(), pathlib.PurePosixPath(f"{name}.png"))
                for name in SAMPLE_PHOTOS], problems
    for item in inputs:
        if item.lower().startswith(("http://", "https://")):
            found.append(Job(item, item, picture_name(item, "image")))
            continue
        path = pathlib.Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p))
            if not files:
                problems.append((item, f"folder has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})"))
            for file in files:
                relative = pathlib.PurePosixPath(file.relative_to(path).as_posix())
                found.append(Job(str(file), file, relative.parent / picture_name(relative.name, "image")))
        elif path.exists():
            found.append(Job(item, path, picture_name(item, "image")))
        else:
            problems.append((item, "no such file or folder"))
    return found, problems


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


def _write_json(path: pathlib.Path, payload: dict) -> None:
    # Written beside its final name and renamed, so a crash never leaves half a file; readable by others.
    with atomic_open(path, "w") as out:
        json.dump(payload, out, indent=2)


def run_detect(args: argparse.Namespace) -> int:
    import torch

    if not 0.0 <= args.threshold <= 1.0:
        print(f"error: --threshold: expected a value in [0, 1], got {args.threshold}", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print(f"error: --batch-size: expected a positive integer, got {args.batch_size}", file=sys.stderr)
        return 2
    try:
        device = distributed.device_for_rank(args.device, "--device")  # under torchrun, "cuda" is cuda:LOCAL_RANK
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    jobs, skipped = collect_inputs(args.inputs)
    try:
        model = build_ssd300(model_math="fp16" if args.precision == "fp16" else "fp32",
                             checkpoint=args.checkpoint).to(device)
        if args.precision == "bf16":
            # bf16 already rounds differently from fp32; channels_last adds speed (2.7x fp32 on an AVX-512
            # CPU, see benchmarks/RESULTS.md) at no further cost in agreement.
            model.to(memory_format=torch.channels_last)
    except (CheckpointUnavailableError, InvalidCheckpointError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.jsonl or args.resume or distributed.env_world_size() > 1:
        return run_streaming_detect(args, model, jobs, skipped, summary)
    args.out.mkdir(parents=True, exist_ok=True)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), unit="image", disable=len(jobs) < _PROGRESS_FROM, file=sys.stderr)
    unique = UniqueNames()
    records: list[dict | None] = [None] * len(jobs)
    started = time.perf_counter()
    stream = detect_iter(model, [job.source for job in jobs], threshold=args.threshold,
                         batch_size=args.batch_size, precision="bf16" if args.precision == "bf16" else None,
                         skip_errors=True)
    with bar, PictureWriter() as pictures:
        for index, result in stream:
            name = jobs[index].name
            bar.update(1)
            if isinstance(result, Exception):
                skipped.append((name, str(result)))
                tqdm.write(f"skipped {name}: {result}", file=sys.stderr)
                continue
            picture = unique.claim(jobs[index].picture) if args.pictures else None
            if picture is not None:
                pictures.put(index, result, args.out / picture)
            height, width = result.image_size
            records[index] = {
                "file": name, "width": width, "height": height,
                "picture": picture.as_posix() if picture is not None else None,
                "detections": [{k: d[k] for k in ("name", "category_id", "score", "bbox")}
                               for d in result.to_dict()["detections"]],
            }
            tqdm.write(f"{name} ({width}x{height}): {summary(result.names, result.scores)}")
            # Only the current batch and the writer's queue keep images alive: memory stays bounded on long lists.
            del result
    elapsed = time.perf_counter() - started
    for index, error in sorted(pictures.errors.items()):
        records[index]["picture"] = None
        print(f"error: {error}", file=sys.stderr)
    done = [r for r in records if r is not None]
    _write_json(args.out / "detections.json", {
        "model": "SSD300 ResNet-50 (COCO)", "checkpoint": getattr(model, "checkpoint_source", None),
        "threshold": args.threshold, "images": done,
        "skipped": [{"file": name, "error": error} for name, error in skipped],
    })
    written = "pictures and detections.json" if args.pictures else "detections.json"
    print(f"{len(done)} image(s) in {elapsed:.1f} s; {written} in {args.out}")
    if skipped:
        print(f"{len(skipped)} input(s) skipped:", file=sys.stderr)
        for name, error in skipped:
            print(f"  {name}: {error}", file=sys.stderr)
        return 1
    return 1 if pictures.errors else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "detect":
        return run_detect(args)
    if args.command == "evaluate":
        return evaluate_cli.run(args)
    if args.command in training_cli.COMMANDS:
        return training_cli.run(args)
    return 2  # argparse already rejected anything else
