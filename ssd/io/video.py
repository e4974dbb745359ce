"""Video files, streams and webcams, read and written with PyAV (the optional ``[video]`` extra).

:class:`VideoReader` yields the frames of a video file (mp4, avi, mkv, mov, webm...), of an RTSP, RTMP or HTTP stream
(an MJPEG or HLS URL, say) or of a webcam (its index, ``0``), one at a time: memory holds the frame being decoded,
however long the input. :class:`VideoWriter` encodes frames into a file written under a temporary name and renamed
into place when it is closed, so that a file under the final name is always a finalised, playable video.

Streams cannot hang a run: opening one, and then every packet read from it, must finish within ``timeout`` seconds
(the same default as image URLs), measured by FFmpeg's interrupt callback from the start of each wait, so a server
that trickles a byte now and then without completing a frame is cut off as surely as a silent one. Every failure is
a :class:`VideoError` (an ``OSError``) naming the input, with a machine-readable ``reason``.
"""
from __future__ import annotations

import fractions
import os
import pathlib
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .images import DEFAULT_TIMEOUT

__all__ = ["DEFAULT_FPS", "EXTRA", "STREAM_SCHEMES", "VIDEO_EXTENSIONS", "VideoError", "VideoFrame", "VideoReader",
           "VideoWriter", "describe_video", "is_video_source", "require_av", "webcam_index"]

EXTRA = "pip install 'ssd-hub[video]'"  # what brings PyAV (and FFmpeg with it)
VIDEO_EXTENSIONS: frozenset[str] = frozenset({
    ".mp4", ".m4v", ".avi", ".mkv", ".mov", ".webm", ".mpg", ".mpeg", ".ts", ".wmv", ".flv",
    ".m3u8",  # an HLS playlist
    ".mjpg", ".mjpeg",  # an MJPEG stream (multipart/x-mixed-replace)
})
STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "srt", "udp", "tcp")
# When a stream does not say its frame rate (MJPEG over HTTP), FFmpeg assumes 25 frames/s; so do we.
DEFAULT_FPS = fractions.Fraction(25)
# The reasons of VideoError.
REASONS = frozenset({"missing", "device", "corrupt", "codec", "no_video", "timeout", "connection"})

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class VideoError(OSError):
    """A video, stream or webcam could not be opened or read. ``source`` names it; ``reason`` is one of
    ``"missing"``, ``"device"`` (no such webcam), ``"corrupt"`` (damaged or truncated), ``"codec"`` (a codec
    FFmpeg cannot decode), ``"no_video"``, ``"timeout"`` (a stream that stalls) or ``"connection"``."""

    def __init__(self, source: str, reason: str, detail: str) -> None:
        super().__init__(f"{source}: {detail}")
        self.source, self.reason, self.detail = source, reason, detail

    def __reduce__(self):
        return type(self), (self.source, self.reason, self.detail)


@dataclass(frozen=True)
class VideoFrame:
    """One decoded frame: its index in the video (counting every frame, strided or not), its time in seconds from
    the start, and its pixels (H x W x 3 uint8 RGB)."""

    index: int
    time: float
    pixels: np.ndarray


def require_av(what: str = "video input") -> Any:
    """PyAV, or an ImportError that says which extra installs it."""
    try:
        import av
    except ImportError as exc:
        raise ImportError(f"{what} needs PyAV, the [video] extra: {EXTRA}") from exc
    return av


def webcam_index(source: Any) -> int | None:
    """The webcam index ``source`` names (an int ``0``, or a string of digits as typed on a command line), or None."""
    if isinstance(source, bool):
        return None
    if isinstance(source, (int, np.integer)):
        return int(source) if source >= 0 else None
    if isinstance(source, str) and source.isascii() and source.isdigit():
        return int(source)
    return None


def is_video_source(source: Any) -> bool:
    """Whether ``source`` is a video: a path or URL with a video extension, an RTSP/RTMP/... URL, or a webcam index.

    Decided from the name alone (nothing is opened and PyAV is not needed), so that the rest goes to the image
    loader as before.
    """
    if webcam_index(source) is not None:
        return True
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        return False
    scheme = _URL.match(source)
    if scheme is not None:
        if scheme.group(1).lower() in STREAM_SCHEMES:
            return True
        source = source.split("?", 1)[0].split("#", 1)[0]
    return os.path.splitext(source)[1].lower() in VIDEO_EXTENSIONS


def describe_video(source: Any) -> str:
    """How errors and reports name ``source``: ``webcam 0``, or the path or URL."""
    index = webcam_index(source)
    if index is not None:
        return f"webcam {index}"
    return os.fsdecode(source) if isinstance(source, (str, os.PathLike)) else repr(source)


def _webcam(index: int) -> tuple[str, str]:
    """FFmpeg's device name and input format for webcam ``index`` on this platform."""
    if sys.platform.startswith("linux"):
        return f"/dev/video{index}", "v4l2"
    if sys.platform == "darwin":
        return str(index), "avfoundation"
    return f"video={index}", "dshow"


def _classify(name: str, exc: BaseException, opening: bool) -> VideoError:
    """FFmpeg's error, as a VideoError naming the input."""
    av = sys.modules["av"]
    # FFmpeg's messages end with ": '<the input>'", which our message names already.
    message = str(exc).split(": '", 1)[0].strip() or type(exc).__name__
    if isinstance(exc, getattr(av, "ExitError", ())) or "Immediate exit" in message:
        return VideoError(name, "timeout", "timed out: the stream sent no data to finish opening" if opening
                          else "timed out: the stream stalled (no frame within the time limit)")
    if isinstance(exc, FileNotFoundError):
        return VideoError(name, "missing", "no such file or stream")
    if isinstance(exc, ConnectionError):
        return VideoError(name, "connection", f"could not connect ({message})")
    if any(cls.__name__.startswith("HTTP") for cls in type(exc).__mro__):  # HTTPError, HTTPNotFoundError, ...
        return VideoError(name, "connection", f"expected a stream, got an HTTP error ({message})")
    if isinstance(exc, getattr(av, "DecoderNotFoundError", ())):
        return VideoError(name, "codec", f"expected a video codec FFmpeg can decode, got one it cannot ({message})")
    return VideoError(name, "corrupt", f"expected a readable video, got a damaged or truncated one ({message})")


class VideoReader:
    """The frames of a video file, stream or webcam, decoded one at a time.

    Args:
        source: a path, an rtsp:// rtmp:// http(s):// ... URL, or a webcam index (``0``).
        stride: yield every ``stride``-th frame (frames 0, N, 2N...); the others are decoded (their successors
            depend on them) but never converted or yielded.
        timeout: for URLs and webcams, the longest wait in seconds for the stream to open, and then for each packet;
            a stall raises a VideoError with reason ``"timeout"``.

    Attributes: ``name`` (as errors name it), ``fps`` (a Fraction: the stream's rate, or 25 when it does not say),
    ``width``, ``height``, ``frames`` (the frame count a file declares, else None), ``live`` (a stream or webcam).
    """

    def __init__(self, source: Any, *, stride: int = 1, timeout: float = DEFAULT_TIMEOUT) -> None:
        if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 1:
            raise ValueError(f"vid_stride: expected an integer >= 1, got {stride!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
            raise ValueError(f"timeout: expected a number of seconds > 0, got {timeout!r}")
        av = require_av()
        self.name = describe_video(source)
        self.stride = int(stride)
        index = webcam_index(source)
        options: dict[str, Any] = {}
        if index is not None:
            target, options["format"] = _webcam(index)
            if options["format"] not in _formats(av):
                raise VideoError(self.name, "device", f"this PyAV build has no camera input ({options['format']})")
            if options["format"] == "v4l2" and not os.path.exists(target):
                raise VideoError(self.name, "device", f"expected a webcam at {target}, got no such device")
        elif isinstance(source, (str, os.PathLike)):
            target = os.fsdecode(source)
            if _URL.match(target) is None and not os.path.isfile(target):
                what = ("a folder" if os.path.isdir(target) else "a special file (FIFO, device or socket), which "
                        "might never end" if os.path.exists(target) else "no such file")
                raise VideoError(self.name, "missing", f"expected a video file, got {what}")
        else:
            raise TypeError(f"video: expected a path, a URL or a webcam index, got {type(source).__name__}")
        self.live = index is not None or _URL.match(target) is not None
        if self.live:
            options["timeout"] = (float(timeout), float(timeout))
        try:
            self._container = av.open(target, "r", **options)
        except Exception as exc:  # noqa: BLE001 - FFmpeg's errors come in many types; each becomes a VideoError
            raise _classify(self.name, exc, opening=True) from None
        try:
            self._stream = self._video_stream()
        except BaseException:
            self._container.close()
            raise
        self._stream.thread_type = "AUTO"  # frame- and slice-threaded decoding where the codec has it
        context = self._stream.codec_context
        self.width, self.height = int(context.width), int(context.height)
        rate = self._stream.average_rate or self._stream.guessed_rate or self._stream.base_rate
        self.fps = fractions.Fraction(rate) if rate else DEFAULT_FPS
        self.frames = int(self._stream.frames) if self._stream.frames and not self.live else None

    def _video_stream(self) -> Any:
        streams = self._container.streams.video
        if not streams:
            raise VideoError(self.name, "no_video", "expected a video stream, got none (audio or data only)")
        stream = streams[0]
        if stream.codec_context is None or not getattr(stream.codec_context, "codec", None):
            raise VideoError(self.name, "codec", "expected a video codec FFmpeg can decode, got an unknown one")
        return stream

    def __iter__(self) -> Iterator[VideoFrame]:
        index = 0
        try:
            for frame in self._container.decode(self._stream):
                if index % self.stride == 0:
                    time = float(frame.time) if frame.time is not None else float(index / self.fps)
                    yield VideoFrame(index, time, frame.to_ndarray(format="rgb24"))
                index += 1
        except (GeneratorExit, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - as in __init__
            error = _classify(self.name, exc, opening=False)
            if self.live and index > 0 and error.reason != "timeout" and isinstance(exc, OSError):
                return  # a stream ends when its server closes the connection (FFmpeg reads that as an I/O error)
            raise error from None
        if index == 0:
            raise VideoError(self.name, "corrupt", "expected frames, got none (a damaged or empty video)")

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _formats(av: Any) -> set[str]:
    return {name for entry in av.formats_available for name in entry.split(",")}


# Output suffix -> (codec, container format): H.264 plays everywhere; WebM needs VP9.
_CODECS = {".mp4": ("libx264", "mp4"), ".mkv": ("libx264", "matroska"), ".mov": ("libx264", "mov"),
           ".webm": ("libvpx-vp9", "webm")}


class VideoWriter:
    """Encodes frames (H x W x 3 uint8 RGB, all of one size) into ``path`` at ``fps``.

    The file is written as ``<path>.part`` and renamed to ``path`` by :meth:`close`, which also flushes the encoder
    and writes the container's index: a file under its final name is always finalised. Close it on every way out
    (a ``with`` block): an interrupted run then keeps a playable video of the frames written so far.
    ``.mp4``, ``.mkv`` and ``.mov`` get H.264 (4:2:0, or 4:4:4 where a side is odd, which 4:2:0 cannot hold),
    ``.webm`` VP9.
    """

    def __init__(self, path: str | os.PathLike[str], fps: fractions.Fraction | float, width: int, height: int) -> None:
        av = require_av("video output")
        self.path = pathlib.Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in _CODECS:
            raise ValueError(f"video output {str(self.path)!r}: expected a suffix among {', '.join(_CODECS)}, "
                             f"got {suffix or 'none'!r}")
        if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
            raise ValueError(f"video output: expected a positive width and height, got {width!r} x {height!r}")
        codec, container_format = _CODECS[suffix]
        self.fps = fractions.Fraction(fps).limit_denominator(1001 * 1000)
        self.width, self.height = width, height
        self._part = self.path.with_name(self.path.name + ".part")
        self.frames = 0
        self._container = av.open(str(self._part), "w", format=container_format)
        try:
            self._stream = self._container.add_stream(codec, rate=self.fps)
            self._stream.width, self._stream.height = width, height
            even = width % 2 == 0 and height % 2 == 0
            self._stream.pix_fmt = "yuv420p" if even or codec != "libx264" else "yuv444p"
            if codec == "libx264":
                self._stream.options = {"preset": "veryfast", "crf": "23"}
        except BaseException:
            self._container.close()
            self._part.unlink(missing_ok=True)
            raise
        self._closed = False

    def write(self, pixels: np.ndarray) -> None:
        """Append one frame."""
        if pixels.shape != (self.height, self.width, 3) or pixels.dtype != np.uint8:
            raise ValueError(f"video frame: expected {self.height} x {self.width} x 3 uint8, got "
                             f"{' x '.join(map(str, pixels.shape))} {pixels.dtype}")
        frame = sys.modules["av"].VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
        frame.pts = self.frames
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> pathlib.Path:
        """Flush the encoder, finalise the file and move it to ``path``; returns ``path``."""
        if not self._closed:
            self._closed = True
            try:
                for packet in self._stream.encode(None):
                    self._container.mux(packet)
            finally:
                self._container.close()
            os.replace(self._part, self.path)
        return self.path

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
