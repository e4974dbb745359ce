"""Detection runs of the command line, over any backend: one record per image, pictures written in a background
thread, and the loop that both writers share (``detections.json`` of ``ssd detect``, and the JSON Lines parts of
``ssd detect --jsonl`` and torchrun runs, :mod:`ssd.inference.jsonl`).

A record is ``{"file", "width", "height", "picture", "detections": [{"name", "category_id", "score", "bbox"}]}``;
it is handed on once its picture is written (or has failed), so whatever a writer holds has its picture on disk.
"""
from __future__ import annotations

import datetime
import pathlib
import queue
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from ..distributed import DEFAULT_TIMEOUT
from ..io.files import UniqueNames
from .detect import detect_iter
from .detections import Detections

__all__ = ["Job", "PictureWriter", "RunOptions", "image_record", "picture_paths", "run_jobs", "summary"]

_PROGRESS_FROM = 5  # images; fewer finish before a progress bar would be useful


class Job(NamedTuple):
    """One input of a run."""

    name: str  # as the user wrote it (or the path found in a folder): reports and records use it
    source: Any  # what detect loads
    picture: pathlib.PurePosixPath  # where its picture goes, relative to the output folder (before making it unique)


@dataclass(frozen=True)
class RunOptions:
    """What a detection run of the command line does.

    Attributes:
        out: the output folder. threshold: detect's score threshold (None: the model's default).
        batch_size: images per forward pass. pictures: write an annotated picture per image.
        resume: (JSON Lines) skip the inputs that the parts in ``out`` already hold for the same model, settings
            and file. timeout: (torchrun) how long a process waits for the others at each exchange.
    """

    out: pathlib.Path
    threshold: float | None = None
    batch_size: int = 8
    pictures: bool = True
    resume: bool = False
    timeout: datetime.timedelta = DEFAULT_TIMEOUT


def summary(names: Sequence[str], scores: Sequence[float], most: int = 5) -> str:
    """'3 objects: person 0.98, dog 0.87, cat 0.45' (the best few, then how many more)."""
    if not names:
        return "nothing found"
    best = ", ".join(f"{n} {s:.2f}" for n, s in zip(names[:most], scores[:most]))
    more = f", +{len(names) - most} more" if len(names) > most else ""
    return f"{len(names)} object{'s' if len(names) != 1 else ''}: {best}{more}"


def image_record(name: str, found: Detections, picture: str | None) -> dict[str, Any]:
    """The record of one image: its name, size, picture (relative to the output folder) and detections, each
    with its class name, COCO category id, score and ``bbox`` ``[x, y, width, height]`` in pixels."""
    height, width = found.image_size
    return {"file": name, "width": width, "height": height, "picture": picture,
            "detections": [{key: d[key] for key in ("name", "category_id", "score", "bbox")}
                           for d in found.to_dict()["detections"]]}


def picture_paths(jobs: Sequence[Job], reserved: Sequence[str] = ()) -> list[pathlib.PurePosixPath]:
    """A distinct picture path per job (``cat.png``, ``cat-2.png``, ...), decided from the job list alone, so that
    every rank of a torchrun job and every rerun names the same picture alike; ``reserved`` names are never used."""
    unique = UniqueNames()
    for name in reserved:
        unique.claim(pathlib.PurePosixPath(name))
    return [unique.claim(job.picture) for job in jobs]


# Called once a picture is done: (index, record, why the picture could not be written or None).
Done = Callable[[int, dict[str, Any], "str | None"], None]


class PictureWriter:
    """Saves pictures in one background thread, so that the network never waits for drawing and encoding.

    The queue is bounded: when pictures fall behind, ``put`` blocks, so at most ``depth`` decoded images wait in
    memory however long the input list is. ``written``/``errors`` say how each went; ``done``, when given, is
    called (in the writer's thread) with each picture's record once the picture is written or has failed.
    :meth:`abort` lets the picture being written finish and drops the queued ones (an interrupted run).
    """

    def __init__(self, depth: int = 16, done: Done | None = None) -> None:
        self._queue: queue.Queue[tuple[int, Detections, pathlib.Path, Any] | None] = queue.Queue(maxsize=depth)
        self.written: dict[int, pathlib.Path] = {}
        self.errors: dict[int, str] = {}
        self._done = done
        self._stopping = False
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ssd-pictures", daemon=True)
        self._thread.start()

    def put(self, index: int, found: Detections, path: pathlib.Path, record: dict[str, Any] | None = None) -> None:
        if self._failure is not None:
            raise self._failure
        self._queue.put((index, found, path, record))

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            if self._stopping:
                continue  # aborted: drain without writing, so that put() and close() never block
            index, found, path, record = job
            error = None
            try:
                self.written[index] = found.save(path)
            except Exception as exc:  # noqa: BLE001 - the thread must keep draining the queue, or put() hangs
                error = self.errors[index] = f"cannot write {path}: {exc}"
                if record is not None:
                    record["picture"] = None  # the detections stand; the record names no picture that is not there
            if self._done is not None:
                try:
                    self._done(index, record, error)
                except BaseException as exc:  # noqa: BLE001 - e.g. a full disk: raised in the caller's thread
                    self._failure, self._stopping = exc, True

    def abort(self) -> None:
        """Write no more pictures than the one being written."""
        self._stopping = True

    def close(self) -> None:
        """Wait until every queued picture is written (or dropped, after :meth:`abort`); re-raise a failure of
        ``done``."""
        self._queue.put(None)
        self._thread.join()
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    def __enter__(self) -> PictureWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def run_jobs(backend: Any, jobs: Sequence[Job], indices: Sequence[int], options: RunOptions,
             pictures: Sequence[pathlib.PurePosixPath | None], *, emit: Done, failed: Callable[[int, str], None],
             log_results: bool = True, progress: bool = True) -> None:
    """Detect ``jobs[i]`` for ``i`` in ``indices`` (in that order) with ``backend``: ``emit(i, record, None)`` for each
    image, after its picture ``options.out / pictures[i]`` is written (``emit(i, record, why)`` with picture None
    when it cannot be; no picture when ``pictures[i]`` is None); ``failed(i, error)`` for an input that cannot be
    read. Prints a line per image (``log_results``) and a progress bar (``progress``).

    An exception (Ctrl-C included) stops the run: the picture being written is finished, the queued ones are not,
    so every record emitted has its picture; the exception then propagates.
    """
    from tqdm.auto import tqdm

    stream = detect_iter(backend, [jobs[i].source for i in indices], threshold=options.threshold,
                         batch_size=options.batch_size, keep_images=options.pictures, skip_errors=True)
    bar = tqdm(total=len(indices), unit="image", disable=not progress or len(indices) < _PROGRESS_FROM,
               file=sys.stderr)
    writer = PictureWriter(done=emit)
    try:
        with bar:
            for position, result in stream:
                index = indices[position]
                name = jobs[index].name
                bar.update(1)
                if isinstance(result, Exception):
                    failed(index, str(result))
                    tqdm.write(f"skipped {name}: {result}", file=sys.stderr)
                    continue
                picture = pictures[index]
                record = image_record(name, result, picture.as_posix() if picture is not None else None)
                if picture is not None:
                    writer.put(index, result, options.out / picture, record)
                else:
                    emit(index, record, None)
                if log_results:
                    height, width = result.image_size
                    tqdm.write(f"{name} ({width}x{height}): {summary(result.names, result.scores)}")
                # Only the current batch and the writer's queue keep images alive: memory stays bounded on long lists.
                del result
    except BaseException:
        writer.abort()
        raise
    finally:
        stream.close()  # stops the image loaders now, not when the generator is collected
        writer.close()
