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

from .export import cli as export_cli
from .inference.detect import detect_iter
from .io.images import IMAGE_EXTENSIONS, is_image_file
from .weights.checkpoints import CheckpointUnavailableError, InvalidCheckpointError
from .zoo import build_ssd300

SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")  # scikit-image's bundled photographs
_PROGRESS_FROM = 5  # images; fewer finish before a bar would be useful


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
    run.add_argument("--model", default=None, help="an exported .onnx or OpenVINO .xml file to run instead")
    run.add_argument("--backend", choices=("onnxruntime", "openvino"), default=None,
                     help="runtime for --model FILE (default: onnxruntime for .onnx, openvino for .xml)")
    export_cli.add_parser(commands)
    return parser


def collect_inputs(inputs: Sequence[str]) -> tuple[list[tuple[str, Any]], list[tuple[str, str]]]:
    """Expand folders; returns ``(name, source)`` pairs to run and ``(name, error)`` pairs already failed."""
    found: list[tuple[str, Any]] = []
    problems: list[tuple[str, str]] = []
    if not inputs:
        from skimage import data

        return [(f"{name}.png", getattr(data, name)()) for name in SAMPLE_PHOTOS], problems
    for item in inputs:
        if item.lower().startswith(("http://", "https://")):
            found.append((item, item))
            continue
        path = pathlib.Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p))
            if not files:
                problems.append((item, f"folder has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})"))
            found += [(str(p), p) for p in files]
        elif path.exists():
            found.append((item, path))
        else:
            problems.append((item, "no such file or folder"))
    return found, problems


def _picture_name(name: str, used: set[str]) -> str:
    stem = pathlib.PurePosixPath(name.split("?", 1)[0].rstrip("/")).stem or "image"
    candidate, n = f"{stem}.png", 1
    while candidate in used:
        n += 1
        candidate = f"{stem}-{n}.png"
    used.add(candidate)
    return candidate


def summary(names: Sequence[str], scores: Sequence[float], most: int = 5) -> str:
    """'3 objects: person 0.98, dog 0.87, cat 0.45' (the best few, then how many more)."""
    if not names:
        return "nothing found"
    best = ", ".join(f"{n} {s:.2f}" for n, s in zip(names[:most], scores[:most]))
    more = f", +{len(names) - most} more" if len(names) > most else ""
    return f"{len(names)} object{'s' if len(names) != 1 else ''}: {best}{more}"


def _write_json(path: pathlib.Path, payload: dict) -> None:
    # Written beside its final name and renamed, so a crash never leaves half a file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(payload, out, indent=2)
        os.replace(tmp, path)
    finally:
        pathlib.Path(tmp).unlink(missing_ok=True)


def run_detect(args: argparse.Namespace) -> int:
    import torch

    if not 0.0 <= args.threshold <= 1.0:
        print(f"error: --threshold: expected a value in [0, 1], got {args.threshold}", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print(f"error: --batch-size: expected a positive integer, got {args.batch_size}", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        print(f"error: --device: expected cpu, cuda or cuda:N, got {args.device!r} ({exc})", file=sys.stderr)
        return 2
    jobs, skipped = collect_inputs(args.inputs)
    try:
        if args.model is not None:
            model = export_cli.load_exported(args.model, args.backend)
        else:
            model = build_ssd300(model_math="fp16" if args.precision == "fp16" else "fp32",
                                 checkpoint=args.checkpoint).to(device)
        if args.precision == "bf16" and args.model is None:
            # bf16 already rounds differently from fp32; channels_last adds speed (2.7x fp32 on an AVX-512
            # CPU, see benchmarks/RESULTS.md) at no further cost in agreement.
            model.to(memory_format=torch.channels_last)
    except (CheckpointUnavailableError, InvalidCheckpointError, OSError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), unit="image", disable=len(jobs) < _PROGRESS_FROM, file=sys.stderr)
    used: set[str] = set()
    records: list[dict | None] = [None] * len(jobs)
    started = time.perf_counter()
    sources = [source for _, source in jobs]
    if args.model is not None:  # an exported model: the same pipeline through its runtime
        try:
            stream = model.detect_iter(sources, threshold=args.threshold, batch_size=args.batch_size,
                                       skip_errors=True)
        except ValueError as exc:  # e.g. a --threshold below the one fixed in a graph exported with --nms
            print(f"error: {exc}", file=sys.stderr)
            return 2
    else:
        stream = detect_iter(model, sources, threshold=args.threshold, batch_size=args.batch_size,
                             precision="bf16" if args.precision == "bf16" else None, skip_errors=True)
    with bar:
        for index, result in stream:
            name = jobs[index][0]
            bar.update(1)
            if isinstance(result, Exception):
                skipped.append((name, str(result)))
                tqdm.write(f"skipped {name}: {result}", file=sys.stderr)
                continue
            picture = _picture_name(name, used)
            result.save(args.out / picture)
            height, width = result.image_size
            records[index] = {
                "file": name, "width": width, "height": height, "picture": picture,
                "detections": [{k: d[k] for k in ("name", "category_id", "score", "bbox")}
                               for d in result.to_dict()["detections"]],
            }
            tqdm.write(f"{name} ({width}x{height}): {summary(result.names, result.scores)}")
    elapsed = time.perf_counter() - started
    done = [r for r in records if r is not None]
    _write_json(args.out / "detections.json", {
        "model": args.model or "SSD300 ResNet-50 (COCO)", "checkpoint": getattr(model, "checkpoint_source", None),
        "threshold": args.threshold, "images": done,
        "skipped": [{"file": name, "error": error} for name, error in skipped],
    })
    print(f"{len(done)} image(s) in {elapsed:.1f} s; pictures and detections.json in {args.out}")
    if skipped:
        print(f"{len(skipped)} input(s) skipped:", file=sys.stderr)
        for name, error in skipped:
            print(f"  {name}: {error}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "detect":
        return run_detect(args)
    if args.command == "export":
        return export_cli.run(args)
    return 2  # argparse already rejected anything else
