"""``python -m ssd detect``: find objects in photos, write annotated pictures and a COCO-style JSON file."""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from .inference.detect import detect_iter
from .io.images import is_image_file, readable_extensions
from .models.spec import check_int, check_real
from .weights.checkpoints import CheckpointUnavailableError, InvalidCheckpointError
from .zoo import build_ssd300

SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")  # scikit-image's bundled photographs
_PROGRESS_FROM = 5  # images; fewer finish before a bar would be useful
_SAVE_EVERY_S = 5.0  # detections.json is rewritten (atomically) at least this often while a run goes on
_STEM_LIMIT = 100  # bytes of an input's name kept in its picture's name; file systems allow 255 bytes
REPORT_NAME = "detections.json"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ssd", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("detect", help="detect objects in images, folders or URLs",
                              description="Detect COCO objects with SSD300. With no INPUT, runs on sample photos.")
    run.add_argument("inputs", nargs="*", metavar="INPUT", help="image files, folders (searched recursively) or URLs")
    run.add_argument("--out", default="ssd-out", type=pathlib.Path, help="output folder (default: ./ssd-out)")
    run.add_argument("--threshold", type=float, default=0.4, help="minimum score, 0..1 (default 0.4)")
    run.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                     help="fp32 (default); fp16 half-precision weights (CUDA); bf16 autocast (recent CPUs and GPUs)")
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    run.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    run.add_argument("--checkpoint", default=None,
                     help="checkpoint file or URL (default: SSD_CHECKPOINT, else NVIDIA's published weights)")
    return parser


def collect_inputs(inputs: Sequence[str], out: pathlib.Path | None = None,
                   ignored: list[str] | None = None) -> tuple[list[tuple[str, Any]], list[tuple[str, str]]]:
    """Expand folders; returns ``(name, source)`` pairs to run and ``(name, error)`` pairs already failed.

    Folder scans never enter ``out`` (the output folder, when it lies inside a scanned folder: ``detect .`` must
    not read its own ./ssd-out); files without a readable image extension are appended to ``ignored``.
    """
    found: list[tuple[str, Any]] = []
    problems: list[tuple[str, str]] = []
    if not inputs:
        from skimage import data

        return [(f"{name}.png", getattr(data, name)()) for name in SAMPLE_PHOTOS], problems
    out_resolved = out.resolve() if out is not None else None
    for item in inputs:
        if item.lower().startswith(("http://", "https://")):
            found.append((item, item))
            continue
        path = pathlib.Path(item)
        if path.is_dir():
            files, others = _scan_folder(path, out_resolved)
            if ignored is not None:
                ignored += others
            if not files:
                problems.append((item, f"folder has no images ({', '.join(sorted(readable_extensions()))})"))
            found += [(str(p), p) for p in files]
        elif path.exists():
            found.append((item, path))
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
            if not path.is_file():
                others.append(str(path))  # FIFOs, sockets, devices, broken links: never opened
            elif is_image_file(path):
                images.append(path)
            else:
                others.append(str(path))
    return sorted(images), others


def _out_conflict(out: pathlib.Path, inputs: Sequence[str]) -> str | None:
    """Why ``out`` cannot take the pictures of ``inputs`` (it is an input folder, or holds an input file), if so.

    Pictures and detections.json go straight into ``out``; refusing these cases is what guarantees that an input
    is never overwritten. An ``out`` inside an input folder is fine: the scan skips it.
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


def _picture_name(name: str, used: set[str]) -> str:
    stem = pathlib.PurePosixPath(name.split("?", 1)[0].rstrip("/")).stem or "image"
    # Long input names would make "<stem>-<n>.png" longer than a file name may be (255 bytes, not characters).
    stem = stem.encode("utf-8", "surrogateescape")[:_STEM_LIMIT].decode("utf-8", "ignore") or "image"
    candidate, n = f"{stem}.png", 1
    # Compared case-insensitively: on macOS and Windows "Cat.png" and "cat.png" are one file.
    while candidate.casefold() in used:
        n += 1
        candidate = f"{stem}-{n}.png"
    used.add(candidate.casefold())
    return candidate


def summary(names: Sequence[str], scores: Sequence[float], most: int = 5) -> str:
    """'3 objects: person 0.98, dog 0.87, cat 0.45' (the best few, then how many more)."""
    if not names:
        return "nothing found"
    best = ", ".join(f"{n} {s:.2f}" for n, s in zip(names[:most], scores[:most]))
    more = f", +{len(names) - most} more" if len(names) > most else ""
    return f"{len(names)} object{'s' if len(names) != 1 else ''}: {best}{more}"


def _write_json(path: pathlib.Path, payload: dict) -> None:
    # Written beside its final name and renamed, so a crash never leaves half a file. allow_nan=False: NaN and
    # Infinity are not JSON, and a reader of the file would choke on them.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(payload, out, indent=2, allow_nan=False)
        os.replace(tmp, path)
    finally:
        pathlib.Path(tmp).unlink(missing_ok=True)


def _option_error(args: argparse.Namespace) -> str | None:
    """The first option detect would refuse, as one line, checked before the model loads."""
    try:
        # The spec's own validators: the CLI accepts exactly what detect accepts (threshold in [0, 1)).
        args.threshold = check_real("--threshold", args.threshold, 0.0, 1.0, open_high=True)
        args.batch_size = check_int("--batch-size", args.batch_size, 1)
    except (TypeError, ValueError) as exc:
        return str(exc)
    return _out_conflict(args.out, args.inputs)


def _device(requested: str | None) -> Any:
    """The torch.device to run on, or the one-line error for a device this machine does not have."""
    import torch

    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        return f"--device: expected cpu, cuda or cuda:N, got {requested!r} ({exc})"
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return f"--device: expected a device this machine has, got {requested!r} (CUDA is not available here)"
        if device.index is not None and device.index >= count:
            return f"--device: expected cuda:0 to cuda:{count - 1}, got {requested!r}"
    return device


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
        _write_json(self.path, {**self.header, "images": self.done,
                                "skipped": [{"file": name, "error": error} for name, error in self.skipped]})
        self.saved_at = time.monotonic()


def run_detect(args: argparse.Namespace) -> int:
    import torch

    problem = _option_error(args)
    device = _device(args.device)
    if problem is None and isinstance(device, str):
        problem = device
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    ignored: list[str] = []
    jobs, skipped = collect_inputs(args.inputs, out=args.out, ignored=ignored)
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
    except KeyboardInterrupt:
        print("interrupted while loading the model; nothing was done", file=sys.stderr)
        return 130
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"error: --out: could not create the folder {str(args.out)!r}: {exc}", file=sys.stderr)
        return 2

    report = _Report(args.out / REPORT_NAME, {
        "model": "SSD300 ResNet-50 (COCO)", "checkpoint": getattr(model, "checkpoint_source", None),
        "threshold": args.threshold}, len(jobs), skipped)
    started = time.perf_counter()
    try:
        _detect_all(model, jobs, args, report)
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
    print(f"{len(report.done)} image(s) in {elapsed:.1f} s; pictures and {REPORT_NAME} in {args.out}")
    if ignored:
        print(f"{len(ignored)} non-image file(s) in the folders ignored (readable: "
              f"{', '.join(sorted(readable_extensions()))})")
    if skipped:
        print(f"{len(skipped)} input(s) skipped:", file=sys.stderr)
        for name, error in skipped:
            print(f"  {name}: {error}", file=sys.stderr)
        return 1
    return 0


def _detect_all(model: Any, jobs: list[tuple[str, Any]], args: argparse.Namespace, report: _Report) -> None:
    """Run every job, saving each picture and handing each record to ``report``; bad inputs and pictures that
    cannot be written are reported in ``report.skipped`` and the run goes on."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), unit="image", disable=len(jobs) < _PROGRESS_FROM, file=sys.stderr)
    used: set[str] = {REPORT_NAME.casefold()}
    stream = detect_iter(model, [source for _, source in jobs], threshold=args.threshold,
                         batch_size=args.batch_size, precision="bf16" if args.precision == "bf16" else None,
                         skip_errors=True)
    with bar:
        for index, result in stream:
            name = jobs[index][0]
            bar.update(1)
            if isinstance(result, Exception):
                report.skipped.append((name, str(result)))
                tqdm.write(f"skipped {name}: {result}", file=sys.stderr)
                continue
            picture: str | None = _picture_name(name, used)
            try:
                result.save(args.out / picture)
            except (OSError, ValueError) as exc:
                # The detections are still good: keep them, with no picture, and say why.
                report.skipped.append((name, f"picture not saved: {exc}"))
                tqdm.write(f"could not save the picture of {name}: {exc}", file=sys.stderr)
                picture = None
            height, width = result.image_size
            report.add(index, {
                "file": name, "width": width, "height": height, "picture": picture,
                "detections": [{k: d[k] for k in ("name", "category_id", "score", "bbox")}
                               for d in result.to_dict()["detections"]],
            })
            tqdm.write(f"{name} ({width}x{height}): {summary(result.names, result.scores)}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "detect":
        return run_detect(args)
    return 2  # argparse already rejected anything else
