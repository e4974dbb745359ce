"""Detection over videos, streams and webcams: frames through the batched pipeline of ``detect_iter``, an annotated
video and per-frame JSON Lines out.

Memory is bounded by the batch, not the video: frames are decoded as the pipeline asks for them (the batch running
and the one loading), results are written as they come, and the encoder's queue is bounded.
"""
from __future__ import annotations

import collections
import dataclasses
import fractions
import json
import os
import pathlib
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from ..io.images import DEFAULT_TIMEOUT
from ..io.video import VideoReader, VideoWriter, describe_video, webcam_index
from .detections import Detections, StageTimes
from .drawing import render

__all__ = ["VideoDetections", "VideoRun", "detect_video", "run_video", "video_record", "video_stem"]


class VideoDetections:
    """The detections of a video's frames, as they come: iterate for ``(frame index, time in s, Detections)``.

    ``name``, ``fps``, ``width``, ``height``, ``frames`` (declared count or None) and ``live`` are the video's
    (:class:`~ssd.io.video.VideoReader`); ``close()`` stops decoding (also done at the end and by ``with``).
    """

    def __init__(self, reader: VideoReader, stream: Iterator[tuple[int, Detections | Exception]],
                 pending: collections.deque) -> None:
        self._reader, self._stream, self._pending = reader, stream, pending
        self.name, self.fps, self.live = reader.name, reader.fps, reader.live
        self.width, self.height, self.frames, self.stride = reader.width, reader.height, reader.frames, reader.stride

    def __iter__(self) -> Iterator[tuple[int, float, Detections]]:
        try:
            for _, found in self._stream:
                index, seconds = self._pending.popleft()
                yield index, seconds, dataclasses.replace(found, source=f"{self.name}#frame={index}")
        finally:
            self.close()

    def close(self) -> None:
        self._stream.close()  # type: ignore[attr-defined]
        self._reader.close()

    def __enter__(self) -> VideoDetections:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def detect_video(model: Any, source: Any, *, vid_stride: int = 1, timeout: float = DEFAULT_TIMEOUT,
                 times: StageTimes | None = None, **detect_options: Any) -> VideoDetections:
    """Open ``source`` (a video file, a stream URL or a webcam index) and detect objects in every ``vid_stride``-th
    frame, ``batch_size`` frames per forward pass; ``detect_options`` are :func:`~ssd.inference.detect.detect_iter`'s.

    The video is opened now (a missing file, a dead stream or a damaged header fail here, as VideoError naming it);
    frames are decoded as the batches need them. ``timeout``: for streams and webcams, the longest wait for the
    stream to open and then for each packet.
    """
    from .detect import detect_iter

    reader = VideoReader(source, stride=vid_stride, timeout=timeout)
    pending: collections.deque[tuple[int, float]] = collections.deque()

    def frames() -> Iterator[Any]:
        for frame in reader:
            pending.append((frame.index, frame.time))  # consumed in order by VideoDetections
            yield frame.pixels

    try:
        stream = detect_iter(model, frames(), times=times, **detect_options)
    except BaseException:
        reader.close()
        raise
    return VideoDetections(reader, stream, pending)


def video_stem(source: Any) -> str:
    """The output name of ``source`` without suffix: the file's stem, the URL's last path part, or ``webcam0``."""
    index = webcam_index(source)
    if index is not None:
        return f"webcam{index}"
    name = describe_video(source).split("?", 1)[0].split("#", 1)[0].rstrip("/")
    stem = pathlib.PurePath(name.rsplit("/", 1)[-1]).stem
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem).strip("._")
    return stem[:100] or "video"


def video_record(index: int, seconds: float, found: Detections) -> dict[str, Any]:
    """One frame's JSON Lines record: ``frame`` (index in the video), ``time`` (s), ``width``, ``height`` and each
    detection's ``name``, ``category_id``, ``score`` and ``bbox`` ``[x, y, width, height]`` in pixels."""
    height, width = found.image_size
    detections = [{key: d[key] for key in ("name", "category_id", "score", "bbox")}
                  for d in found.to_dict()["detections"]]
    return {"frame": index, "time": round(seconds, 6), "width": width, "height": height, "detections": detections}


class VideoRun(NamedTuple):
    """What :func:`run_video` wrote: the frames done, the annotated video (None without one) and the JSON Lines."""

    frames: int
    video: pathlib.Path | None
    jsonl: pathlib.Path
    seconds: float


class _Encoder:
    """Draws and encodes frames in one background thread, so that the network never waits for them. The queue is
    bounded (``put`` blocks when encoding falls behind): at most ``depth`` frames wait in memory."""

    def __init__(self, writer: VideoWriter, depth: int) -> None:
        self._writer = writer
        self._queue: queue.Queue[Detections | None] = queue.Queue(maxsize=depth)
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ssd-video-encoder", daemon=True)
        self._thread.start()

    def put(self, found: Detections) -> None:
        if self._failure is not None:
            raise self._failure
        self._queue.put(found)

    def _run(self) -> None:
        while (found := self._queue.get()) is not None:
            if self._failure is not None:
                continue  # keep draining, so that put() and close() never block
            try:
                picture = render(found.image, found.boxes, found.labels.tolist(), found.captions())
                self._writer.write(_as_array(picture))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                self._failure = exc

    def close(self) -> pathlib.Path:
        """Encode what is queued, finalise the file (also after a failure: what was written stays playable)."""
        self._queue.put(None)
        self._thread.join()
        path = self._writer.close()
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure
        return path


def _as_array(picture: Any) -> Any:
    import numpy as np

    return np.asarray(picture.convert("RGB") if picture.mode != "RGB" else picture)


def run_video(model: Any, source: Any, out: pathlib.Path, *, stem: str | None = None, vid_stride: int = 1,
              video: bool = True, timeout: float = DEFAULT_TIMEOUT, threshold: float | None = None,
              batch_size: int = 8, precision: str | None = None, classes: Any = None, classes_by: str = "label",
              iou_threshold: float | None = None, max_detections: int | None = None, agnostic: bool = False,
              progress: bool = True, on_frame: Callable[[int, float, Detections], None] | None = None) -> VideoRun:
    """Detect objects in the video ``source``, writing ``out/<stem>.mp4`` (annotated, at the input's size and frame
    rate divided by ``vid_stride``, so it lasts as long as the input; none when ``video`` is False) and
    ``out/<stem>.jsonl`` (one :func:`video_record` per frame, written as frames come). ``threshold``,
    ``iou_threshold``, ``max_detections``, ``classes``, ``classes_by`` and ``agnostic`` are detect's.

    Both files are written under ``.part`` names and renamed into place when the run ends, whichever way it ends:
    after Ctrl-C (KeyboardInterrupt, re-raised) or an error, the frames done so far are in a finalised, playable
    video and complete JSON lines. ``on_frame``, when given, is called with each frame's results.
    """
    out = pathlib.Path(out)
    stem = stem or video_stem(source)
    found_frames = detect_video(model, source, vid_stride=vid_stride, timeout=timeout, threshold=threshold,
                                batch_size=batch_size, precision=precision, classes=classes, classes_by=classes_by,
                                iou_threshold=iou_threshold, max_detections=max_detections, agnostic=agnostic,
                                keep_images=video)
    started = time.perf_counter()
    done = 0
    jsonl = out / f"{stem}.jsonl"
    video_path = out / f"{stem}.mp4" if video else None
    with found_frames:
        out.mkdir(parents=True, exist_ok=True)
        encoder = None
        if video_path is not None:
            fps = fractions.Fraction(found_frames.fps) / found_frames.stride
            encoder = _Encoder(VideoWriter(video_path, fps, found_frames.width, found_frames.height), 2 * batch_size)
        part = jsonl.with_name(jsonl.name + ".part")
        lines = open(part, "w", encoding="utf-8")  # noqa: SIM115 - closed in the finally below, on every way out
        bar = _progress(found_frames, progress)
        # The frame queued for the video whose line is not written yet (Ctrl-C came in between): written at the end,
        # so that the video and the lines hold the same frames.
        unwritten = None
        try:
            for index, seconds, found in found_frames:
                line = json.dumps(video_record(index, seconds, found), allow_nan=False) + "\n"
                if encoder is not None:
                    encoder.put(found)
                    unwritten = line
                lines.write(line)
                unwritten = None
                lines.flush()  # a line is whole once written: a killed run leaves whole lines
                done += 1
                bar.update(1)
                if on_frame is not None:
                    on_frame(index, seconds, found)
        finally:
            bar.close()
            if unwritten is not None:
                lines.write(unwritten)
            lines.close()
            os.replace(part, jsonl)
            if encoder is not None:
                encoder.close()
    return VideoRun(done, video_path, jsonl, time.perf_counter() - started)


def _progress(found: VideoDetections, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    total = None if found.frames is None else -(-found.frames // found.stride)
    return tqdm(total=total, unit="frame", desc=found.name, disable=not enabled, file=sys.stderr)
