"""Videos, streams and webcams: detect / detect_iter / ``ssd detect`` over frames decoded by PyAV.

Every video here is made by the test with PyAV: a few small frames of scikit-image's cat photo, sliding sideways, so
that frames differ. Streams come from a server on 127.0.0.1 serving MJPEG (multipart/x-mixed-replace), the format
of most IP cameras' HTTP streams.
"""
from __future__ import annotations

import http.server
import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

av = pytest.importorskip("av")

from ssd.inference.detect import detect, detect_iter  # noqa: E402
from ssd.inference.video import detect_video, run_video  # noqa: E402
from ssd.io.video import VideoError, VideoReader, VideoWriter, is_video_source  # noqa: E402
from ssd.models import SSD300  # noqa: E402

from helpers import REPO  # noqa: E402
from helpers.checkpoints import detecting_state_dict, save_detecting_checkpoint  # noqa: E402

WIDTH, HEIGHT = 96, 64  # small frames: decoding and encoding cost little next to the network
STEP = 7  # pixels the picture slides between frames


def frame_pixels(index: int) -> np.ndarray:
    """Frame ``index``: a WIDTH x HEIGHT window of the cat photo, moved STEP pixels right per frame."""
    cat = data.chelsea()
    return np.ascontiguousarray(cat[100:100 + HEIGHT, index * STEP:index * STEP + WIDTH])


# container -> (suffix, codec, pixel format)
FORMATS = {"mp4": (".mp4", "libx264", "yuv420p"), "avi": (".avi", "mpeg4", "yuv420p"),
           "mkv": (".mkv", "libx264", "yuv420p"), "mov": (".mov", "libx264", "yuv420p"),
           "webm": (".webm", "libvpx-vp9", "yuv420p")}


def make_video(path: pathlib.Path, frames: int = 6, fps: int = 10, kind: str = "mp4") -> pathlib.Path:
    _, codec, pix_fmt = FORMATS[kind]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, pix_fmt
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(frame_pixels(i % 40), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def decoded_frames(path: pathlib.Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


@pytest.fixture(scope="module")
def model() -> SSD300:
    torch.set_num_threads(1)
    model = SSD300().eval()
    model.load_state_dict(detecting_state_dict())
    return model


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> pathlib.Path:
    return make_video(tmp_path_factory.mktemp("video") / "clip.mp4")


def same(a, b) -> bool:
    return (len(a) == len(b) and all(np.array_equal(x.boxes, y.boxes) and np.array_equal(x.scores, y.scores)
                                     and np.array_equal(x.labels, y.labels) for x, y in zip(a, b)))


# ---------------------------------------------------------------------------------------------------------------
# Library


def test_sources_are_told_apart_by_name_alone():
    for video in ["clip.mp4", "a/b.MKV", pathlib.Path("x.webm"), "rtsp://cam/1", "rtmp://host/live",
                  "http://127.0.0.1:8080/stream.mjpg?x=1", "https://host/live.m3u8", 0, "0", np.int64(2)]:
        assert is_video_source(video), video
    for image in ["cat.jpg", "http://host/cat.png", b"\x89PNG", np.zeros((2, 2, 3), np.uint8), True, -1, [0]]:
        assert not is_video_source(image), image


def test_detect_on_a_video_is_detect_on_its_frames(model, clip):
    frames = decoded_frames(clip)
    assert len(frames) == 6
    found = model.detect(clip, batch_size=4)
    assert same(found, detect(model, frames, batch_size=4))
    assert [f.source for f in found] == [f"{clip}#frame={i}" for i in range(6)]
    assert found[0].image.shape == (HEIGHT, WIDTH, 3) and len(found[0]) > 0
    strided = list(detect_iter(model, str(clip), vid_stride=2, batch_size=2))
    assert [index for index, _ in strided] == [0, 2, 4]
    # The same batches as detect over those frames (another batch size would differ by float rounding).
    assert same([f for _, f in strided], detect(model, [frames[i] for i in (0, 2, 4)], batch_size=2))


@pytest.mark.parametrize("kind", ["avi", "mkv", "mov", "webm"])
def test_every_container_is_read(model, tmp_path, kind):
    path = make_video(tmp_path / f"clip{FORMATS[kind][0]}", frames=3, kind=kind)
    found = list(detect_video(model, path, batch_size=3))
    assert [(index, round(seconds, 3)) for index, seconds, _ in found] == [(0, 0.0), (1, 0.1), (2, 0.2)]
    assert all(f.image_size == (HEIGHT, WIDTH) for _, _, f in found)


def test_run_video_writes_an_annotated_video_and_json_lines(model, clip, tmp_path):
    done = run_video(model, clip, tmp_path / "out", vid_stride=2, batch_size=2, progress=False)
    assert done.frames == 3 and done.video == tmp_path / "out" / "clip.mp4"
    with av.open(str(done.video)) as container:
        stream = container.streams.video[0]
        # The input's size; its frame rate divided by the stride, so that the video lasts as long as the input.
        assert (stream.codec_context.width, stream.codec_context.height) == (WIDTH, HEIGHT)
        assert stream.average_rate == 5
        pictures = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    assert len(pictures) == 3
    lines = [json.loads(line) for line in done.jsonl.read_text().splitlines()]
    assert [(line["frame"], line["time"]) for line in lines] == [(0, 0.0), (2, 0.2), (4, 0.4)]
    assert all(line["width"] == WIDTH and line["height"] == HEIGHT for line in lines)
    first = lines[0]["detections"][0]
    assert set(first) == {"name", "category_id", "score", "bbox"} and first["name"] in {"person", "cat"}
    # The boxes are drawn: the annotated frame differs from the input frame where the first box's edge is.
    x, y, w, h = (round(v) for v in first["bbox"])
    edge = pictures[0][min(y + 1, HEIGHT - 1), min(max(x + w // 2, 0), WIDTH - 1)].astype(int)
    assert np.abs(edge - frame_pixels(0)[min(y + 1, HEIGHT - 1), min(max(x + w // 2, 0), WIDTH - 1)]).max() > 30
    assert not list((tmp_path / "out").glob("*.part"))


def test_odd_frame_sizes_keep_their_size(tmp_path):
    pixels = data.chelsea()[:51, :77]
    with VideoWriter(tmp_path / "odd.mp4", 30, 77, 51) as writer:
        for _ in range(3):
            writer.write(pixels)
    with VideoReader(tmp_path / "odd.mp4") as reader:
        assert (reader.width, reader.height, reader.fps) == (77, 51, 30)
        frames = list(reader)
    # H.264 at its default quality: a few levels of error per pixel on average.
    assert len(frames) == 3 and np.abs(frames[0].pixels.astype(int) - pixels).mean() < 4


# ---------------------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the input


def test_damaged_videos_are_named(tmp_path, clip, model):
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])
    garbage = tmp_path / "garbage.mkv"
    garbage.write_bytes(b"not a video at all " * 100)
    for path in (truncated, garbage):
        with pytest.raises(VideoError, match=rf"{path}: expected a readable video, got a damaged or truncated one"):
            model.detect(path)
    with pytest.raises(VideoError, match=r"missing.mp4: expected a video file, got no such file"):
        model.detect(tmp_path / "missing.mp4")
    with pytest.raises(VideoError, match=r"expected a video file, got a folder"):
        VideoReader(tmp_path)
    os.mkfifo(tmp_path / "pipe.mp4")  # opening it to read would block until a writer comes: refused by its kind
    with pytest.raises(VideoError, match=r"pipe.mp4: expected a video file, got a special file"):
        model.detect(tmp_path / "pipe.mp4")


def test_an_unknown_codec_is_named(tmp_path, model):
    path = make_video(tmp_path / "clip.avi", frames=2, kind="avi")
    raw = path.read_bytes()
    assert raw.count(b"FMP4") >= 1
    path.write_bytes(raw.replace(b"FMP4", b"QQQQ"))  # a FourCC that no decoder claims
    with pytest.raises(VideoError, match=r"clip.avi: expected a video codec FFmpeg can decode") as caught:
        model.detect(path)
    assert caught.value.reason == "codec"


def test_a_webcam_that_is_not_there_is_named(model):
    with pytest.raises(VideoError, match=r"webcam 97: expected a webcam at /dev/video97, got no such device|"
                                         r"webcam 97: this PyAV build has no camera input") as caught:
        model.detect(97)
    assert caught.value.reason == "device"


def test_a_video_inside_a_list_of_images_is_refused(model, clip):
    with pytest.raises(ValueError, match=r"clip.mp4: expected an image, got a video; a video is given alone"):
        model.detect([data.chelsea(), str(clip)])


def test_without_pyav_the_error_names_the_extra(model, clip, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # what an environment without PyAV gives: ImportError on import
    with pytest.raises(ImportError, match=r"video input needs PyAV, the \[video\] extra: pip install "
                                          r"'ssd-hub\[video\]'"):
        model.detect(clip)


# ---------------------------------------------------------------------------------------------------------------
# Streams from a server on 127.0.0.1


class MjpegServer:
    """``/live.mjpg``: ``frames`` JPEG frames as multipart/x-mixed-replace, then the end of the stream.
    ``/stall.mjpg``: one frame, then nothing until the test ends (``release``); ``/silent.mjpg``: no answer."""

    def __init__(self, frames: int) -> None:
        self.release = threading.Event()
        jpegs = []
        for i in range(frames):
            buffer = io.BytesIO()
            Image.fromarray(frame_pixels(i)).save(buffer, format="JPEG", quality=95)
            jpegs.append(buffer.getvalue())
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
                if self.path == "/silent.mjpg":
                    owner.release.wait()  # connected, but not a byte of an answer
                    return
                if self.path not in ("/live.mjpg", "/stall.mjpg"):
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                sent = jpegs if self.path == "/live.mjpg" else jpegs[:1]
                try:
                    for jpeg in sent:
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                         + str(len(jpeg)).encode() + b"\r\n\r\n" + jpeg + b"\r\n")
                        self.wfile.flush()
                    if self.path == "/stall.mjpg":
                        owner.release.wait()
                    self.wfile.write(b"--frame--\r\n")  # the closing boundary: the stream's end
                    self.wfile.flush()
                except OSError:
                    pass  # the client went away

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def mjpeg():
    server = MjpegServer(frames=5)
    yield server
    server.stop()


def test_an_mjpeg_stream_is_detected_frame_by_frame(model, mjpeg):
    found = list(detect_iter(model, f"{mjpeg.url}/live.mjpg", batch_size=2))
    assert [index for index, _ in found] == [0, 1, 2, 3, 4]
    # JPEG at quality 95 of the same frames: the same objects found.
    expected = detect(model, [frame_pixels(i) for i in range(5)], batch_size=2)
    assert [f.names for _, f in found] == [f.names for f in expected]


def test_a_stalled_stream_fails_within_its_deadline(model, mjpeg):
    frames = detect_video(model, f"{mjpeg.url}/stall.mjpg", timeout=1.0, batch_size=1)
    with pytest.raises(VideoError, match=r"/stall.mjpg: timed out: the stream stalled") as caught:
        list(frames)
    assert caught.value.reason == "timeout"
    with pytest.raises(VideoError, match=r"/silent.mjpg: timed out: the stream sent no data to finish opening"):
        VideoReader(f"{mjpeg.url}/silent.mjpg", timeout=1.0)


def test_streams_that_cannot_be_reached_are_named(mjpeg):
    import socket

    with socket.socket() as sock:  # bound, then closed: nothing listens on that port
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    url = f"http://127.0.0.1:{closed}/live.mjpg"
    with pytest.raises(VideoError, match=rf"{url}: could not connect \(\[Errno \d+\] Connection refused\)"):
        VideoReader(url)
    with pytest.raises(VideoError, match=r"/nothing.mjpg: expected a stream, got an HTTP error .*404"):
        VideoReader(f"{mjpeg.url}/nothing.mjpg")


# ---------------------------------------------------------------------------------------------------------------
# The command line


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_detecting_checkpoint(tmp_path_factory.mktemp("ckpt") / "detecting.pt")


def cli_env(checkpoint, tmp_path) -> dict:
    return {**os.environ, "SSD_CHECKPOINT": str(checkpoint), "TORCH_HOME": str(tmp_path / "torch"),
            "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def test_command_line_video_with_stride(checkpoint, clip, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "ssd", "detect", str(clip), "--vid-stride", "3", "--out", str(out),
                           "--batch-size", "2"], cwd=tmp_path, env=cli_env(checkpoint, tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{clip}: 2 frame(s)" in done.stdout and "clip.mp4 and clip.jsonl" in done.stdout
    assert len(decoded_frames(out / "clip.mp4")) == 2
    assert [json.loads(line)["frame"] for line in (out / "clip.jsonl").read_text().splitlines()] == [0, 3]


def test_command_line_names_a_bad_video_and_goes_on(checkpoint, clip, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\0" * 1000)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "ssd", "detect", str(bad), str(clip), "--out", str(out)],
                          cwd=tmp_path, env=cli_env(checkpoint, tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1
    assert f"error: {bad}: expected a readable video" in done.stderr and "Traceback" not in done.stderr
    assert len(decoded_frames(out / "clip.mp4")) == 6


DRIVER = """
    import sys
    import ssd.cli
    import ssd.inference.video as video

    run_video = video.run_video

    def announced(*args, **kwargs):
        # The test's signal: a frame is done (its line written, its picture queued for the video).
        return run_video(*args, on_frame=lambda index, *_: print("frame", index, flush=True), **kwargs)

    video.run_video = announced
    sys.exit(ssd.cli.main(sys.argv[1:]))
"""


def test_ctrl_c_keeps_a_finalised_video(checkpoint, tmp_path):
    long_clip = make_video(tmp_path / "long.mp4", frames=400, fps=25)
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(DRIVER), "detect", str(long_clip), "--out",
                                str(out), "--batch-size", "2"], cwd=tmp_path, env=cli_env(checkpoint, tmp_path),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().startswith("frame 0"), process.stderr.read()
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    assert "interrupted: " in err and "(finalised)" in err
    lines = (out / "long.jsonl").read_text().splitlines()
    frames = decoded_frames(out / "long.mp4")  # playable: the container was finalised
    assert 1 <= len(lines) < 400 and len(frames) == len(lines)
    assert not list(out.glob("*.part"))


def test_command_line_without_pyav_names_the_extra_before_loading(clip, tmp_path):
    code = "import sys; sys.modules['av'] = None; import ssd.cli; sys.exit(ssd.cli.main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, "detect", str(clip), "--checkpoint", str(tmp_path / "none.pt"),
                           "--out", str(tmp_path / "out")], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    # The checkpoint does not exist: an error about it would mean the model was loaded first.
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: video input {str(clip)!r} needs PyAV, the [video] extra: "
                                   "pip install 'ssd-hub[video]'")
    assert not (tmp_path / "out").exists()
