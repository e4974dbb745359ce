"""Detection runs of the command line, over any backend: one record per image, pictures written in a background
thread, and the loop that both writers share (``detections.json`` of ``ssd detect``, and the JSON Lines parts of
``ssd detect --jsonl`` and torchrun runs, :mod:`ssd.inference.jsonl`).

A record is ``{"file", "width", "height", "picture", "detections": [{"name", "category_id", "score", "bbox"}]}``;
it is handed on once its picture is written (or has failed), so whatever a writer holds has its picture on disk.
"""
from __future__ import annotations

import csv
import datetime
import os
import pathlib
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from ..distributed import DEFAULT_TIMEOUT
from ..io.files import STALE_TEMPORARY_S, UniqueNames, atomic_open, sweep_stale, write_json
from .detect import detect_iter
from .detections import Detections

__all__ = ["CSV_COLUMNS", "DisplayError", "ImageOutputs", "Job", "JsonReport", "PictureWriter", "RunOptions", "Viewer",
           "display_problem", "image_record", "picture_paths", "run_jobs", "summary", "write_csv"]

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
        iou_threshold, max_detections, classes, classes_by, agnostic: detect's arguments of these names (None:
            the model's default). crops: write each object's picture into ``out/crops/CLASS/``. labels: write
            YOLO label files into ``out/labels/``. csv: write ``out/detections.csv`` at the end. show: show each
            annotated picture in a window (:class:`Viewer`).
    """

    out: pathlib.Path
    threshold: float | None = None
    batch_size: int = 8
    pictures: bool = True
    resume: bool = False
    timeout: datetime.timedelta = DEFAULT_TIMEOUT
    iou_threshold: float | None = None
    max_detections: int | None = None
    classes: tuple[str | int, ...] | None = None
    classes_by: str = "label"
    agnostic: bool = False
    crops: bool = False
    labels: bool = False
    csv: bool = False
    show: bool = False

    @property
    def keep_images(self) -> bool:
        """Whether the run needs each image's pixels after detection."""
        return self.pictures or self.crops or self.show

    @property
    def outputs(self) -> ImageOutputs:
        return ImageOutputs(self.out, self.pictures, self.crops, self.labels)

    def detect_arguments(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~ssd.inference.detect.detect_iter` for this run (bar the images)."""
        return {"threshold": self.threshold, "iou_threshold": self.iou_threshold,
                "max_detections": self.max_detections, "batch_size": self.batch_size, "classes": self.classes,
                "classes_by": self.classes_by, "agnostic": self.agnostic}


CROPS_FOLDER = "crops"
LABELS_FOLDER = "labels"
CLASS_LIST = "classes.txt"  # in LABELS_FOLDER: the class of index i (a label file's first column) on line i + 1
CSV_NAME = "detections.csv"
CSV_COLUMNS = ("file", "name", "category_id", "score", "x1", "y1", "x2", "y2")


@dataclass(frozen=True)
class ImageOutputs:
    """The files a run writes for each image, beside its record: its annotated picture ``out/PICTURE``, its objects
    ``out/crops/CLASS/PICTURE-K.EXT`` and its YOLO label file ``out/labels/PICTURE.txt`` (PICTURE keeps the
    input's subfolders)."""

    out: pathlib.Path
    picture: bool = True
    crops: bool = False
    labels: bool = False

    @property
    def any(self) -> bool:
        return self.picture or self.crops or self.labels

    def write(self, found: Detections, relative: pathlib.PurePosixPath) -> None:
        """Write the files of one image; an OSError names the file that could not be written."""
        if self.picture:
            found.save(self.out / relative)
        if self.crops:
            found.save_crops(self.out / CROPS_FOLDER, relative)
        if self.labels:
            found.save_txt(self.out / LABELS_FOLDER / relative.with_suffix(".txt"))

    def prepare(self, class_names: Sequence[str]) -> None:
        """Before the run: the temporaries that killed runs left in the output folder are swept (the atomic
        writes' ``.NAME.*.tmp`` of pictures, crops, label files and reports, an hour old: younger ones may be another
        run's, writing now), and the class list that label files index into is written (index i on line i + 1)."""
        if self.out.is_dir():
            sweep_stale(self.out, ("**/.*.tmp",), STALE_TEMPORARY_S)
        if self.labels:
            folder = self.out / LABELS_FOLDER
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_open(folder / CLASS_LIST, "w", encoding="utf-8") as out:
                out.write("".join(f"{name}\n" for name in class_names))


def write_csv(path: pathlib.Path, records: Iterable[dict[str, Any]]) -> int:
    """Write the detections of ``records`` (see :func:`image_record`) as CSV, one row per detection with
    :data:`CSV_COLUMNS` (the box in pixels, x2/y2 exclusive as in the records' bbox), atomically; records of failed
    inputs have no rows. Returns the number of rows."""
    rows = 0
    with atomic_open(path, "w", encoding="utf-8") as out:
        table = csv.writer(out, lineterminator="\n")
        table.writerow(CSV_COLUMNS)
        for record in records:
            for found in record.get("detections") or ():
                x, y, w, h = found["bbox"]
                table.writerow([record["file"], found["name"], found["category_id"], found["score"], x, y,
                                round(x + w, 2), round(y + h, 2)])
                rows += 1
    return rows


def display_problem() -> str | None:
    """Why no window can be shown here (no display on Linux), or None when one may be."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return ("--show: expected a display (DISPLAY or WAYLAND_DISPLAY set), got none (a server or SSH session?); "
                "the pictures are written to --out anyway")
    return None


class DisplayError(RuntimeError):
    """No window can be shown (no display, or no interactive matplotlib backend)."""


class Viewer:
    """One matplotlib window, redrawn with each annotated picture as results come (main thread only: GUI toolkits
    want it)."""

    def __init__(self) -> None:
        problem = display_problem()
        if problem is not None:
            raise DisplayError(problem)
        import matplotlib
        from matplotlib import pyplot as plt

        if matplotlib.get_backend().lower() in ("agg", "pdf", "ps", "svg", "cairo", "template"):
            raise DisplayError(f"--show: expected an interactive matplotlib backend (TkAgg, QtAgg...), got "
                               f"{matplotlib.get_backend()!r} (install tkinter or PyQt, or set MPLBACKEND)")
        self._plt = plt
        self._figure, self._axes = plt.subplots()

    def show(self, found: Detections, title: str) -> None:
        if not self._plt.fignum_exists(self._figure.number):
            return  # the user closed the window: the run goes on without it
        self._axes.clear()
        found.plot(ax=self._axes)
        self._axes.set_title(title)
        self._plt.pause(0.001)  # lets the toolkit draw; the loop does not wait for the user


class JsonReport:
    """``detections.json`` of ``ssd detect``, rewritten atomically as results come (every ``SAVE_EVERY_S`` seconds
    and at the end), so that an interrupted or crashed run keeps what it had done. Records may come from several
    threads."""

    SAVE_EVERY_S = 5.0

    def __init__(self, path: pathlib.Path, header: dict, size: int, skipped: list[tuple[str, str]]) -> None:
        self.path, self.header, self.skipped = path, header, skipped
        self.records: list[dict | None] = [None] * size
        self.saved_at = time.monotonic()
        self._lock = threading.RLock()

    def add(self, index: int, record: dict) -> None:
        with self._lock:
            self.records[index] = record
            if time.monotonic() - self.saved_at >= self.SAVE_EVERY_S:
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

    def __init__(self, depth: int = 16, done: Done | None = None,
                 write: Callable[[Detections, Any], Any] | None = None) -> None:
        # write(found, path) writes the files of one image (default: its picture at path, found.save).
        self._write = write if write is not None else (lambda found, path: found.save(path))
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
                self.written[index] = self._write(found, path)
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
    image, after its files (``options.outputs``: the picture ``options.out / pictures[i]``, crops and label file
    named after it) are written (``emit(i, record, why)`` with picture None when they cannot be);
    ``failed(i, error)`` for an input that cannot be read. Prints a line per image (``log_results``) and a progress
    bar (``progress``); with ``options.show``, shows each picture.

    An exception (Ctrl-C included) stops the run: the picture being written is finished, the queued ones are not,
    so every record emitted has its picture; the exception then propagates.
    """
    from tqdm.auto import tqdm

    viewer = Viewer() if options.show else None  # first: without a display, nothing is run
    outputs = options.outputs
    outputs.prepare(list(backend.names))
    stream = detect_iter(backend, [jobs[i].source for i in indices], keep_images=options.keep_images,
                         skip_errors=True, **options.detect_arguments())
    bar = tqdm(total=len(indices), unit="image", disable=not progress or len(indices) < _PROGRESS_FROM,
               file=sys.stderr)
    # An image's line is printed once its record is kept (after its files are written): a run interrupted after
    # printing N lines keeps those N records. Pictures are written in the writer's thread, hence the lines' dict.
    lines: dict[int, str] = {}

    def kept(index: int, record: dict[str, Any], why: str | None) -> None:
        emit(index, record, why)
        line = lines.pop(index, None)
        if line is not None:
            tqdm.write(line)

    writer = PictureWriter(done=kept, write=outputs.write)
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
                record = image_record(name, result, picture.as_posix() if options.pictures else None)
                if log_results:
                    height, width = result.image_size
                    took = f" ({sum(result.speed.values()):.0f} ms)" if result.speed else ""
                    lines[index] = f"{name} ({width}x{height}): {summary(result.names, result.scores)}{took}"
                if outputs.any:
                    writer.put(index, result, picture, record)
                else:
                    kept(index, record, None)
                if viewer is not None:
                    viewer.show(result, name)
                # Only the current batch and the writer's queue keep images alive: memory stays bounded on long lists.
                del result
    except BaseException:
        writer.abort()
        raise
    finally:
        stream.close()  # stops the image loaders now, not when the generator is collected
        writer.close()
