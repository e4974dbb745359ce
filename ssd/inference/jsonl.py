"""Detection results as JSON Lines: one image a line, flushed as it finishes, so a killed run keeps its work.

``python -m ssd detect --jsonl`` (and every ``torchrun`` run of it) streams each rank's images to
``OUT/detections.rank{r}.jsonl``; a rerun with ``--resume`` skips the files those parts already hold; at the end
rank 0 merges every part into ``OUT/detections.jsonl`` in input order. A line is ``{"file", "width", "height",
"picture", "detections": [...]}``, or ``{"file", "error"}`` for an input that could not be read.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import IO, Any

from ..io.files import UniqueNames, atomic_open

__all__ = ["PART_PATTERN", "JsonlWriter", "merge_parts", "part_path", "read_records", "run_streaming_detect"]

PART_PATTERN = re.compile(r"^detections\.rank(\d+)\.jsonl$")
MERGED_NAME = "detections.jsonl"


def part_path(out_dir: pathlib.Path, rank: int) -> pathlib.Path:
    return out_dir / f"detections.rank{rank}.jsonl"


def _parts(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Every rank's part in ``out_dir``, by rank (parts of an earlier run with more ranks included)."""
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := PART_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def read_records(path: pathlib.Path, repair: bool = False) -> list[dict[str, Any]]:
    """The complete records of a JSON Lines file; a last line cut short by a kill is ignored, and with ``repair``
    cut off the file, so that appending goes on from a clean line boundary. Lines that are not a JSON object with
    a ``file`` are skipped."""
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1  # bytes up to the last newline; anything after is a torn write
    records = []
    for line in data[:complete].splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("file"), str):
            records.append(record)
    if repair and complete < len(data):
        os.truncate(path, complete)
    return records


class JsonlWriter:
    """Appends one JSON object a line and flushes it, so each finished image is on disk (in the OS's hands) before
    the next starts: a killed process loses at most the line it was writing, which :func:`read_records` drops."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self._file: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()/__exit__

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def merge_parts(out_dir: pathlib.Path, order: Sequence[str], extra: Iterable[dict[str, Any]] = ()) -> list[dict]:
    """Every part's records for the files in ``order``, one per file (a success beats an error, a later line an
    earlier one), in ``order``, then ``extra``; written atomically to ``out_dir/detections.jsonl`` and returned."""
    position = {name: i for i, name in enumerate(order)}
    best: dict[str, dict[str, Any]] = {}
    for path in _parts(out_dir):
        for record in read_records(path):
            name = record["file"]
            if name in position and ("error" not in record or "error" in best.get(name, {"error": ""})):
                best[name] = record
    merged = sorted(best.values(), key=lambda r: position[r["file"]]) + list(extra)
    with atomic_open(out_dir / MERGED_NAME, "w", encoding="utf-8") as out:
        for record in merged:
            out.write(json.dumps(record, allow_nan=False) + "\n")
    return merged


def run_streaming_detect(args: argparse.Namespace, model: Any, jobs: Sequence[tuple[str, Any, pathlib.PurePath]],
                         problems: list[tuple[str, str]], summary: Callable[[list, Any], str]) -> int:
    """``detect`` writing JSON Lines, on this process's share of ``jobs`` when ``torchrun`` started several.

    ``args`` is ``detect``'s parsed command line (``out``, ``threshold``, ``batch_size``, ``precision``,
    ``pictures``, ``resume``); ``jobs`` holds (name, source, picture path relative to ``out``); ``summary`` words
    one image's detections for the log. Returns 0, or 1 when some input failed (rank 0 reports; the others 0).
    """
    from .. import distributed
    from .detect import detect_iter
    from .plan import _first_conv_weight

    distributed.init_from_env(_first_conv_weight(model).device)
    try:
        return _stream(args, model, jobs, problems, distributed, detect_iter, summary)
    finally:
        distributed.cleanup()


def _stream(args: argparse.Namespace, model: Any, jobs: Sequence[tuple[str, Any, pathlib.PurePath]],
            problems: list[tuple[str, str]], distributed: Any, detect_iter: Any, summary: Any) -> int:
    rank, world, main = distributed.rank(), distributed.world_size(), distributed.is_main()
    out: pathlib.Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    # Names for every input, decided alike on every rank, so two ranks never write the same picture.
    unique = UniqueNames()
    pictures = ([unique.claim(job[2]).as_posix() for job in jobs] if args.pictures else [None] * len(jobs))
    mine_path = part_path(out, rank)
    if not args.resume and main:
        for path in _parts(out):  # a fresh run: earlier parts would be merged with this run's otherwise
            path.unlink()
    distributed.barrier()
    done: set[str] = set()
    if args.resume:
        for path in _parts(out):
            done |= {r["file"] for r in read_records(path, repair=path == mine_path) if "error" not in r}
    distributed.barrier()  # everyone has read the parts before anyone appends
    mine = [i for i in distributed.shard(range(len(jobs)), rank, world) if jobs[i][0] not in done]
    if args.resume and main:
        print(f"resuming: {len(done)} image(s) already done in {out}")

    from tqdm.auto import tqdm

    started = time.perf_counter()
    stream = detect_iter(model, [jobs[i][1] for i in mine], threshold=args.threshold, batch_size=args.batch_size,
                         precision="bf16" if args.precision == "bf16" else None, keep_images=args.pictures,
                         skip_errors=True)
    with JsonlWriter(mine_path) as writer, tqdm(total=len(mine), unit="image", disable=not main or len(mine) < 5,
                                                file=sys.stderr) as bar:
        for position, result in stream:
            index = mine[position]
            name = jobs[index][0]
            bar.update(1)
            if isinstance(result, Exception):
                writer.write({"file": name, "error": str(result)})
                tqdm.write(f"skipped {name}: {result}", file=sys.stderr)
                continue
            if pictures[index] is not None:
                result.save(out / pictures[index])
            height, width = result.image_size
            writer.write({
                "file": name, "width": width, "height": height, "picture": pictures[index],
                "detections": [{key: d[key] for key in ("name", "category_id", "score", "bbox")}
                               for d in result.to_dict()["detections"]],
            })
            if world == 1:
                tqdm.write(f"{name} ({width}x{height}): {summary(result.names, result.scores)}")
    elapsed = time.perf_counter() - started
    distributed.barrier()  # every part is complete before rank 0 reads them
    if not main:
        return 0
    merged = merge_parts(out, [job[0] for job in jobs], [{"file": n, "error": e} for n, e in problems])
    failed = [r for r in merged if "error" in r]
    processes = f" on {world} processes" if world > 1 else ""
    print(f"{len(merged) - len(failed)} image(s) in {MERGED_NAME} in {out}; this run: {len(mine)} image(s) on "
          f"rank 0 in {elapsed:.1f} s{processes}")
    if failed:
        print(f"{len(failed)} input(s) skipped:", file=sys.stderr)
        for record in failed:
            print(f"  {record['file']}: {record['error']}", file=sys.stderr)
        return 1
    return 0
