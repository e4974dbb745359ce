"""Detection results as JSON Lines: one image a line, flushed as it finishes, so a killed run keeps its work.

``python -m ssd detect --jsonl`` (and every ``torchrun`` run of it) streams each rank's images to
``OUT/detections.rank{r}.jsonl``; at the end rank 0 merges every part into ``OUT/detections.jsonl`` in input order.
A line is ``{"file", "width", "height", "picture", "detections": [...]}`` (with ``"picture_error"`` when the picture
could not be written), or ``{"file", "error"}`` for an input that could not be read.

What protects the work:

- every rank compares the run's fingerprint (model, checkpoint, threshold, recipe, pictures, ``--out``, the input
  list) before any work, so ranks given different arguments stop at once instead of losing half the images;
- a part line carries a ``fingerprint`` of the model (a digest of its weights), threshold, recipe and pictures plus
  the input file's size and modification time, decided by rank 0: ``--resume`` skips an input only when its record
  matches, and the merge takes only matching records (a stale part of another run or model is ignored);
- the merge lists every input without a record (a rank's part lost, a node whose ``--out`` was not shared) and the
  command then exits with status 1; damaged lines (not JSON, NaN, not a record) are skipped and reported.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from typing import IO, Any

import torch

from ..backends.base import input_format, spec_of
from ..io.files import atomic_open
from .detect import detection_recipe
from .runs import CSV_NAME, Job, RunOptions, picture_paths, run_jobs, write_csv

__all__ = ["MERGED_NAME", "PART_PATTERN", "JsonlWriter", "MergeResult", "merge_parts", "part_path", "read_part",
           "read_records", "run_identity", "run_streaming_detect"]

PART_PATTERN = re.compile(r"^detections\.rank(\d+)\.jsonl$")
MERGED_NAME = "detections.jsonl"
FINGERPRINT = "fingerprint"  # the key of a part line's fingerprint (dropped from the merged file)


def part_path(out_dir: pathlib.Path, rank: int) -> pathlib.Path:
    return out_dir / f"detections.rank{rank}.jsonl"


def _parts(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Every entry of ``out_dir`` named like a rank's part, by rank (parts of an earlier run with more ranks
    included)."""
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := PART_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def _refuse_constant(token: str) -> None:
    raise ValueError(f"{token} is not JSON")


def _record(line: bytes) -> dict[str, Any] | None:
    """The record on ``line``, or None when it is not one: not JSON (NaN and Infinity included), or not an object
    with a ``file`` and either an ``error`` or ``detections``."""
    try:
        record = json.loads(line, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("file"), str):
        return None
    if isinstance(record.get("error"), str) != ("detections" not in record):
        return None
    if "detections" in record and not isinstance(record["detections"], list):
        return None
    return record


def read_part(path: pathlib.Path, repair: bool = False) -> tuple[list[dict[str, Any]], int]:
    """The records of a JSON Lines file and how many damaged lines were skipped (see :func:`_record`). A last line
    cut short by a kill (no newline) is ignored, not counted, and with ``repair`` cut off the file, so that
    appending goes on from a clean line boundary. The file is read a line at a time."""
    records, damaged, complete, torn = [], 0, 0, False
    with open(path, "rb") as lines:
        for line in lines:
            if not line.endswith(b"\n"):
                torn = True
                break
            complete += len(line)
            if not line.strip():
                continue
            record = _record(line)
            if record is None:
                damaged += 1
            else:
                records.append(record)
    if repair and torn:
        os.truncate(path, complete)
    return records, damaged


def read_records(path: pathlib.Path, repair: bool = False) -> list[dict[str, Any]]:
    """The complete records of a JSON Lines file (:func:`read_part` without the count)."""
    return read_part(path, repair)[0]


class JsonlWriter:
    """Appends one JSON object a line and flushes it, so each finished image is on disk (in the OS's hands) before
    the next starts: a killed process loses at most the line it was writing, which :func:`read_records` drops.
    Several threads may write; ``count`` is how many lines this writer wrote."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self.count = 0
        self._lock = threading.Lock()
        self._file: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()/__exit__

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, allow_nan=False) + "\n"  # built whole first: a line is written whole or not at all
        with self._lock:
            self._file.write(line)
            self._file.flush()
            self.count += 1

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MergeResult(list):
    """The merged records (a list, in input order, then the extra ones), plus ``missing`` (the inputs without a
    record, in input order) and ``damaged`` (``(part, what)`` for every part with lines skipped or unreadable)."""

    def __init__(self, records: Iterable[dict[str, Any]], missing: list[str],
                 damaged: list[tuple[pathlib.Path, str]]) -> None:
        super().__init__(records)
        self.missing = missing
        self.damaged = damaged


def _finished(record: dict[str, Any]) -> bool:
    return "error" not in record and "picture_error" not in record


def merge_parts(out_dir: pathlib.Path, order: Sequence[str], extra: Iterable[dict[str, Any]] = (),
                fingerprints: dict[str, str] | None = None) -> MergeResult:
    """Every part's records for the files in ``order``, one per file (a finished one beats one with an error, a
    later line an earlier one), in ``order``, then ``extra``; written atomically to ``out_dir/detections.jsonl``
    (without the part lines' fingerprints) and returned. With ``fingerprints`` (file name -> fingerprint) a record
    counts only when its fingerprint matches (others are another run's)."""
    position = {name: i for i, name in enumerate(order)}
    best: dict[str, dict[str, Any]] = {}
    damaged: list[tuple[pathlib.Path, str]] = []
    for path in _parts(out_dir):
        try:
            records, bad = read_part(path)
        except OSError as exc:
            damaged.append((path, f"unreadable ({exc})"))
            continue
        if bad:
            damaged.append((path, f"{bad} damaged line(s) skipped (not JSON, NaN or not a record)"))
        for record in records:
            name = record["file"]
            if name not in position:
                continue
            if fingerprints is not None and record.get(FINGERPRINT) != fingerprints.get(name):
                continue
            if _finished(record) or not _finished(best.get(name, {"error": ""})):
                best[name] = record
    merged = [{k: v for k, v in best[name].items() if k != FINGERPRINT} for name in order if name in best]
    merged += list(extra)
    with atomic_open(out_dir / MERGED_NAME, "w", encoding="utf-8") as out:
        for record in merged:
            out.write(json.dumps(record, allow_nan=False) + "\n")
    return MergeResult(merged, [name for name in order if name not in best], damaged)


# ------------------------------------------------------------------------------------------------ fingerprints


def _file_identity(source: Any) -> Any:
    """An input file as (its name, size, modification time); anything else (a URL, an array) as its description."""
    if isinstance(source, (str, os.PathLike)):
        try:
            status = os.stat(source)
        except (OSError, ValueError):
            return os.fspath(source)
        return [os.fspath(source), status.st_size, status.st_mtime_ns]
    return None if source is None else type(source).__name__


def _weights_digest(backend: Any) -> str | None:
    """A digest of the weights ``backend`` runs, whatever their path or download time: the network's tensors, or an
    exported file's bytes (an OpenVINO .xml with its .bin). So a fresh download and its cache entry, or one
    checkpoint copied to every machine, are the same weights, and a checkpoint rewritten in place is not."""
    digest = hashlib.sha256()
    model = getattr(backend, "model", None)
    if isinstance(model, torch.nn.Module):
        for name, tensor in model.state_dict().items():
            value = tensor.detach().to("cpu").contiguous()
            digest.update(f"{name} {value.dtype} {tuple(value.shape)}".encode())
            digest.update(value.view(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
        return digest.hexdigest()
    path = getattr(backend, "path", None)
    if not isinstance(path, (str, os.PathLike)):
        return getattr(backend, "source", None)
    files = [pathlib.Path(path)]
    if files[0].suffix.lower() == ".xml":
        files.append(files[0].with_suffix(".bin"))
    for file in files:
        with open(file, "rb") as data:
            while chunk := data.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def run_identity(backend: Any, options: RunOptions) -> dict[str, Any]:
    """What decides a record's content, apart from the input: the model (name, classes, runtime, precision, input
    dtype and a digest of its weights), the detection recipe (threshold included) and whether pictures are
    written."""
    spec = spec_of(backend)
    recipe = detection_recipe(backend, options.threshold, options.iou_threshold, options.max_detections)
    return {
        "model": spec.name,
        "classes": list(spec.classes.names),
        "runtime": getattr(backend, "runtime", type(backend).__name__),
        "precision": getattr(backend, "precision", None),
        "input_dtype": str(input_format(backend)[0]),
        "weights": _weights_digest(backend),
        "recipe": dataclasses.asdict(recipe),
        "pictures": options.pictures,
        "wanted_classes": None if options.classes is None else [str(c) for c in options.classes],
        "classes_by": options.classes_by,
        "agnostic": options.agnostic,
    }


def _fingerprint(identity_text: str, job: Job) -> str:
    text = json.dumps([identity_text, job.name, _file_identity(job.source)])
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


# ------------------------------------------------------------------------------------------------ the run


def _plan(out: pathlib.Path, jobs: Sequence[Job], identity_text: str, resume: bool) -> tuple[list[str], set[int]]:
    """Each job's fingerprint, and (with ``resume``) the jobs whose finished record with that fingerprint the parts
    in ``out`` already hold."""
    fingerprints = [_fingerprint(identity_text, job) for job in jobs]
    done: set[int] = set()
    if resume:
        position = {job.name: i for i, job in enumerate(jobs)}
        for path in _parts(out):
            for record in read_records(path):
                index = position.get(record["file"])
                if index is not None and _finished(record) and record.get(FINGERPRINT) == fingerprints[index]:
                    done.add(index)
    return fingerprints, done


def _cut_torn_tail(path: pathlib.Path) -> None:
    """Cut a last line without its newline (a write cut short by a kill) off ``path``, reading only its end."""
    with open(path, "rb") as data:
        end = data.seek(0, os.SEEK_END)
        position = end
        while position > 0:
            step = min(1 << 16, position)
            data.seek(position - step)
            chunk = data.read(step)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                position = position - step + newline + 1
                break
            position -= step
    if position < end:
        os.truncate(path, position)


def _preflight(out: pathlib.Path, rank: int, main: bool) -> str | None:
    """Why this rank cannot write its part (or rank 0 the merge) in ``out``, found before any work; or None."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"--out: could not create the folder {str(out)!r}: {exc}"
    paths = [part_path(out, rank)] + ([*_parts(out), out / MERGED_NAME] if main else [])
    for path in paths:
        if path.is_symlink() or (path.exists() and not path.is_file()):
            kind = "a symbolic link" if path.is_symlink() else "a folder" if path.is_dir() else "not a regular file"
            return f"{path}: expected a JSON Lines file or nothing, got {kind}; remove it or choose another --out"
        if path.exists() and not os.access(path, os.R_OK | os.W_OK):
            return f"{path}: expected a file this process can read and write, got one it cannot (permission denied)"
    if not os.access(out, os.W_OK | os.X_OK):
        return f"--out: expected a writable folder, got {str(out)!r} (permission denied)"
    return None


class _Progress:
    """What this rank has done, for the message of an interrupted run."""

    def __init__(self) -> None:
        self.writer: JsonlWriter | None = None
        self.total = 0


def run_streaming_detect(backend: Any, jobs: Sequence[Job], problems: Sequence[tuple[str, str]],
                         options: RunOptions) -> int:
    """``detect`` writing JSON Lines, on this process's share of ``jobs`` when ``torchrun`` started several.

    ``backend`` is any backend (a PyTorch model, an exported file); ``problems`` are ``(name, error)`` pairs of
    inputs that failed before the run (missing files). Returns 0; 1 on rank 0 when some input failed or has no
    record; 130 after Ctrl-C (the line being written is finished; rerun with ``options.resume``).

    Raises:
        ValueError: this or another rank cannot run as asked (its part is a folder, the ranks were given
            different arguments), on every rank, before any work. ssd.distributed.PeerTimeoutError /
            PeerLostError: another process stopped answering. ssd.backends.BackendError: the runtime failed.
    """
    from .. import distributed

    progress = _Progress()
    try:
        distributed.init_from_env(backend.device, timeout=options.timeout, timeout_name="--timeout")
        return _stream(backend, jobs, problems, options, distributed, progress)
    except KeyboardInterrupt:
        part = progress.writer
        done = (f"{part.count} of {progress.total} image(s) of this process are in {part.path}" if part is not None
                else "nothing was done")
        print(f"interrupted: {done}; rerun with --resume to finish them and merge", file=sys.stderr)
        return 130
    finally:
        distributed.cleanup()


def _stream(backend: Any, jobs: Sequence[Job], problems: Sequence[tuple[str, str]], options: RunOptions,
            distributed: Any, progress: _Progress) -> int:
    rank, world, main = distributed.rank(), distributed.world_size(), distributed.is_main()
    out = options.out
    identity = run_identity(backend, options)  # also checks the threshold against the model, on every rank alike
    names = [job.name for job in jobs]
    listing = hashlib.sha256("\0".join(names).encode("utf-8", "surrogatepass")).hexdigest()[:16]
    # Every rank says what stops it and what it was asked, before any work: a lone failing rank would leave the
    # others waiting, and ranks given different arguments would each write half a result.
    for other, problem in enumerate(distributed.all_gather(_preflight(out, rank, main))):
        if problem is not None:
            raise ValueError(problem if other == rank else f"{problem} (on rank {other})")
    try:
        distributed.check_same({"model and settings": identity, "--out": str(out.resolve()),
                                "inputs": f"{len(names)} inputs, listing {listing}"}, "detect")
    except ValueError as exc:
        raise ValueError(f"{exc}; every rank needs the same command, and a run over several machines a --out "
                         "they all share (or one run per machine, merged with --resume)") from None
    pictures = picture_paths(jobs)  # also the names of the crops and label files
    mine_path = part_path(out, rank)
    if not options.resume and main:
        for path in _parts(out):  # a fresh run: earlier parts would be merged with this run's otherwise
            path.unlink()
    # Rank 0 decides, from its view of the input files, each input's fingerprint and what an earlier run already
    # did; every rank gets the same answer, so the shards agree even where the machines see the files differently.
    plan = _plan(out, jobs, json.dumps(identity, sort_keys=True), options.resume) if main else None
    fingerprints, done = distributed.broadcast_from_main(plan)
    if options.resume and mine_path.is_file():
        _cut_torn_tail(mine_path)  # appending goes on from a clean line boundary
    by_name = dict(zip(names, fingerprints))
    mine = [i for i in distributed.shard(range(len(jobs)), rank, world) if i not in done]
    if options.resume and main:
        print(f"resuming: {len(done)} image(s) already done in {out}")

    started = time.perf_counter()
    with JsonlWriter(mine_path) as writer:
        progress.writer, progress.total = writer, len(mine)

        def emit(index: int, record: dict[str, Any], picture_error: str | None) -> None:
            if picture_error is not None:
                record["picture_error"] = picture_error
            writer.write({**record, FINGERPRINT: fingerprints[index]})

        def failed(index: int, error: str) -> None:
            writer.write({"file": names[index], "error": error, FINGERPRINT: fingerprints[index]})

        run_jobs(backend, jobs, mine, options, pictures, emit=emit, failed=failed, log_results=world == 1,
                 progress=main)
    elapsed = time.perf_counter() - started
    distributed.barrier()  # every part is complete before rank 0 reads them
    if not main:
        return 0
    return _report(out, names, problems, by_name, len(mine), elapsed, world, options.csv)


def _report(out: pathlib.Path, names: list[str], problems: Sequence[tuple[str, str]], fingerprints: dict[str, str],
            mine: int, elapsed: float, world: int, csv: bool = False) -> int:
    merged = merge_parts(out, names, [{"file": n, "error": e} for n, e in problems], fingerprints)
    if csv:
        write_csv(out / CSV_NAME, merged)
    for path, what in merged.damaged:
        print(f"warning: {path}: {what}", file=sys.stderr)
    failed = [r for r in merged if not _finished(r)]
    processes = f" on {world} processes" if world > 1 else ""
    print(f"{len(merged) - len(failed)} image(s) in {MERGED_NAME} in {out}; this run: {mine} image(s) on rank 0 in "
          f"{elapsed:.1f} s{processes}")
    if failed:
        print(f"{len(failed)} input(s) failed:", file=sys.stderr)
        for record in failed:
            print(f"  {record['file']}: {record.get('error') or 'picture not saved: ' + record['picture_error']}",
                  file=sys.stderr)
    if merged.missing:
        print(f"{len(merged.missing)} input(s) have no record in the parts (a process stopped early, or wrote its "
              "part where rank 0 cannot see it: a run over several machines needs a --out they all share); rerun "
              "with --resume to do them:", file=sys.stderr)
        for name in merged.missing:
            print(f"  {name}", file=sys.stderr)
    return 1 if failed or merged.missing else 0
