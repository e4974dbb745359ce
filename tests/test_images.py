"""ssd.io.images: every kind of input gives the same pixels, and every kind of bad input a clear, named error."""
from __future__ import annotations

import gzip
import io
import pathlib
import socket
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from ssd.io.images import (
    IMAGE_EXTENSIONS,
    ImageFetchError,
    ImageLoadError,
    ImageTooLargeError,
    describe_source,
    fetch_bytes,
    is_image_file,
    load_image,
    load_rgb,
)


def encode(image: Image.Image | np.ndarray, fmt: str, **options) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def write(path: pathlib.Path, data: bytes) -> pathlib.Path:
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def chelsea() -> np.ndarray:
    return skimage.data.chelsea()  # 300 x 451: not square, so a width/height swap cannot hide


@pytest.fixture()
def chelsea_png(tmp_path, chelsea) -> pathlib.Path:
    return write(tmp_path / "chelsea.png", encode(chelsea, "PNG"))


def png_claiming(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose header claims ``width`` x ``height`` RGB pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(
        b"IEND", b"")


# ---------------------------------------------------------------- every input kind gives the file's pixels


def test_png_round_trip_is_exact(chelsea_png, chelsea):
    img = load_rgb(chelsea_png)
    assert img.dtype == np.uint8 and img.shape == (300, 451, 3)
    np.testing.assert_array_equal(img, chelsea)


@pytest.mark.parametrize("kind", ["str", "path", "bytes", "bytearray", "memoryview", "file", "bytesio", "pil",
                                  "numpy", "numpy_rgba", "tensor_uint8", "tensor_float"])
def test_every_source_kind_matches_the_file(kind, chelsea_png):
    expected = load_rgb(chelsea_png)
    data = chelsea_png.read_bytes()
    if kind == "file":
        with open(chelsea_png, "rb") as fp:
            got = load_rgb(fp)
    else:
        src = {
            "str": lambda: str(chelsea_png),
            "path": lambda: chelsea_png,
            "bytes": lambda: data,
            "bytearray": lambda: bytearray(data),
            "memoryview": lambda: memoryview(data),
            "bytesio": lambda: io.BytesIO(data),
            "pil": lambda: Image.open(io.BytesIO(data)),
            "numpy": lambda: expected.copy(),
            "numpy_rgba": lambda: np.dstack([expected, np.full(expected.shape[:2], 7, np.uint8)]),
            "tensor_uint8": lambda: torch.from_numpy(expected.copy()).permute(2, 0, 1),
            "tensor_float": lambda: torch.from_numpy(expected.copy()).permute(2, 0, 1).double() / 255,
        }[kind]()
        got = load_rgb(src)
    assert got.shape == (300, 451, 3)
    if kind == "tensor_float":
        assert got.dtype == np.float64
        np.testing.assert_allclose(got * 255, expected, atol=1e-9)
    else:
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, expected)


def test_url_gives_what_the_file_gives(http_server, chelsea_png):
    url = http_server.add("/cat.png", chelsea_png.read_bytes(), headers={"Content-Type": "image/png"})
    np.testing.assert_array_equal(load_rgb(url), load_rgb(chelsea_png))
    assert http_server.hits["/cat.png"] == 1
    assert fetch_bytes(url) == chelsea_png.read_bytes()


def test_gzip_encoded_url_is_decoded(http_server, chelsea_png):
    url = http_server.add("/cat.png", gzip.compress(chelsea_png.read_bytes()), headers={"Content-Encoding": "gzip"})
    np.testing.assert_array_equal(load_rgb(url), load_rgb(chelsea_png))


# ---------------------------------------------------------------- colour modes


def test_grayscale_becomes_three_equal_channels_in_the_right_orientation(tmp_path):
    gray = skimage.data.camera()[:200, :350]  # not square: NVIDIA's loader swapped width and height here
    img = load_rgb(write(tmp_path / "gray.png", encode(gray, "PNG")))
    assert img.shape == (200, 350, 3) and img.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(img[:, :, c], gray)
    np.testing.assert_array_equal(load_rgb(gray), img)
    np.testing.assert_array_equal(load_rgb(gray[:, :, None]), img)


def test_alpha_is_dropped(tmp_path):
    logo = skimage.data.logo()  # RGBA
    assert logo.shape[2] == 4
    img = load_rgb(write(tmp_path / "logo.png", encode(logo, "PNG")))
    np.testing.assert_array_equal(img, logo[:, :, :3])
    gray = skimage.data.camera()[:64, :96]
    la = Image.merge("LA", [Image.fromarray(gray), Image.fromarray(255 - gray)])
    img = load_rgb(write(tmp_path / "la.png", encode(la, "PNG")))
    np.testing.assert_array_equal(img, np.dstack([gray] * 3))


@pytest.mark.parametrize("transparency", [False, True])
def test_palette_images(tmp_path, chelsea, transparency):
    palette = Image.fromarray(chelsea).convert("P")
    options = {"transparency": 0} if transparency else {}
    path = write(tmp_path / "p.png", encode(palette, "PNG", **options))
    with Image.open(path) as im:
        assert im.mode == "P" and ("transparency" in im.info) == transparency
    np.testing.assert_array_equal(load_rgb(path), np.asarray(palette.convert("RGB")))
    np.testing.assert_array_equal(load_rgb(palette.convert("PA")), np.asarray(palette.convert("RGB")))


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk(tmp_path, chelsea, fmt):
    cmyk = Image.fromarray(chelsea).convert("CMYK")
    path = write(tmp_path / f"cmyk.{fmt.lower()}", encode(cmyk, fmt))
    img = load_rgb(path)
    assert img.shape == (300, 451, 3) and img.dtype == np.uint8
    with Image.open(path) as im:
        assert im.mode == "CMYK"
        np.testing.assert_array_equal(img, np.asarray(im.convert("RGB")))
    # A round trip through CMYK keeps the picture (JPEG adds its usual loss).
    assert np.abs(img.astype(float) - chelsea).mean() < 8


def test_sixteen_bit_grayscale_is_scaled_to_unit_float(tmp_path):
    deep = (skimage.data.camera()[:100, :150].astype(np.uint16) * 257) ^ 0x00A5
    path = write(tmp_path / "deep.png", encode(deep, "PNG"))
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # Pillow 13 opens it as "I;16", Pillow 10.1 (the floor) as 32-bit "I"
    img = load_rgb(path)
    assert img.dtype == np.float64 and img.shape == (100, 150, 3)
    np.testing.assert_array_equal(img[:, :, 1], skimage.img_as_float(deep))
    np.testing.assert_array_equal(load_rgb(deep.astype(">u2")), img)
    np.testing.assert_array_equal(load_rgb(deep), img)
    np.testing.assert_array_equal(load_image(path), img)


def test_other_modes(tmp_path):
    gray = skimage.data.camera()[:40, :60]
    bilevel = Image.fromarray(gray > 128)
    assert bilevel.mode == "1"
    np.testing.assert_array_equal(load_rgb(bilevel)[:, :, 0], (gray > 128) * 255)
    np.testing.assert_array_equal(load_rgb(gray > 128), load_rgb(bilevel))
    # Pillow reads 16-bit PGM as 32-bit "I": the 16-bit scale must still apply.
    deep = gray.astype(np.uint16) * 200
    # Encoded from mode "I": Pillow 10.1 (the floor) cannot write "I;16" as PPM; both write the same 16-bit file.
    pgm = write(tmp_path / "deep.pgm", encode(Image.fromarray(deep).convert("I"), "PPM"))
    with Image.open(pgm) as im:
        assert im.mode == "I"
    np.testing.assert_allclose(load_rgb(pgm)[:, :, 2], deep / 65535.0, rtol=1e-15)
    unit = gray / 255.0
    tiff = write(tmp_path / "float.tiff", encode(Image.fromarray(unit.astype(np.float32), "F"), "TIFF"))
    np.testing.assert_allclose(load_rgb(tiff)[:, :, 0], unit, atol=1e-7)
    ycbcr = Image.fromarray(skimage.data.coffee()).convert("YCbCr")
    assert load_rgb(ycbcr).shape == (400, 600, 3)


def test_exif_orientation_is_not_applied(tmp_path, chelsea):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = write(tmp_path / "rotated.jpg", encode(chelsea, "JPEG", exif=exif.tobytes()))
    with Image.open(path) as im:
        assert im.getexif()[0x0112] == 6
    assert load_rgb(path).shape == (300, 451, 3)  # as stored, like skimage.io.imread


def test_load_image_is_img_as_float(chelsea_png, chelsea):
    img = load_image(chelsea_png)
    assert img.dtype == np.float64
    np.testing.assert_array_equal(img, skimage.img_as_float(chelsea))


def test_describe_source(tmp_path, chelsea):
    assert describe_source(tmp_path / "a.png") == str(tmp_path / "a.png")
    assert describe_source("http://example.com/a.jpg") == "http://example.com/a.jpg"
    assert describe_source(b"abc") == "<bytes of length 3>"
    assert describe_source(Image.fromarray(chelsea)) == "<PIL.Image 451x300 RGB>"
    assert describe_source(chelsea) == "<numpy array 300x451x3 uint8>"
    assert describe_source(torch.zeros(3, 4, 5)) == "<torch.Tensor 3x4x5 float32>"
    assert describe_source(io.BytesIO()) == "<BytesIO object>"
    assert describe_source(42) == "<builtins.int object>"
    assert len(describe_source("x" * 1000)) <= 200


def test_is_image_file():
    assert {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"} <= IMAGE_EXTENSIONS
    assert is_image_file("a/b/photo.JPG") and is_image_file(pathlib.Path("x.webp"))
    assert not is_image_file("notes.txt") and not is_image_file("png") and not is_image_file("dir.png/readme")


# ---------------------------------------------------------------- bad input: right exception, input named


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jpg"
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        load_rgb(path)


def test_directory(tmp_path):
    with pytest.raises(IsADirectoryError, match="directory") as info:
        load_rgb(tmp_path)
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize(("content", "hint"), [(b"", "empty"), (b"hello, I am not a picture\n", "text"),
                                               (b"<!DOCTYPE html><html></html>", "HTML")])
def test_not_an_image_file(tmp_path, content, hint):
    path = write(tmp_path / "fake.png", content)
    with pytest.raises(ImageLoadError, match=hint) as info:
        load_rgb(path)
    assert isinstance(info.value, ValueError)
    assert str(path) in str(info.value) and "not a readable image" in str(info.value)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file(tmp_path, chelsea, fmt):
    data = encode(chelsea, fmt)
    path = write(tmp_path / f"cut.{fmt.lower()}", data[: len(data) // 2])
    try:
        img = load_rgb(path)
    except ImageLoadError as exc:
        assert str(path) in str(exc)
    else:
        assert img.shape == (300, 451, 3)


def test_scrambled_and_corrupted_bytes(chelsea):
    data = encode(chelsea, "PNG")
    scrambled = bytes(np.random.default_rng(0).permutation(np.frombuffer(data, np.uint8)))
    with pytest.raises(ImageLoadError, match=f"<bytes of length {len(data)}>"):
        load_rgb(scrambled)
    corrupted = bytearray(data)
    corrupted[len(data) // 2: len(data) // 2 + 64] = b"x" * 64
    with pytest.raises(ImageLoadError, match="bytearray of length"):
        load_rgb(corrupted)


def test_decompression_bomb_header_is_refused_before_decoding(tmp_path):
    path = write(tmp_path / "bomb.png", png_claiming(100_000, 100_000))
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLargeError) as info:
            load_rgb(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert str(path) in message and "10000000000" in message and str(Image.MAX_IMAGE_PIXELS) in message
    assert isinstance(info.value, ValueError) and peak < 10 * 2**20


@pytest.mark.parametrize("factor", [0.75, 0.4])  # Pillow's own warning zone (1x..2x) and its error zone (> 2x)
def test_decompression_bomb_limit_is_honoured(monkeypatch, chelsea, factor):
    limit = int(300 * 451 * factor)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    data = encode(chelsea, "PNG")
    with pytest.raises(ImageTooLargeError, match=str(limit)) as info:
        load_rgb(data)
    assert f"<bytes of length {len(data)}>" in str(info.value) and "135300" in str(info.value)
    if factor > 0.5:
        assert "451 x 300" in str(info.value)


def test_url_404(http_server):
    url = http_server.url("/missing.jpg")
    with pytest.raises(ImageFetchError, match="404") as info:
        load_rgb(url)
    assert isinstance(info.value, OSError) and url in str(info.value)


def test_url_returning_html(http_server):
    url = http_server.add("/photo.jpg", b"<html><body>Login required</body></html>",
                          headers={"Content-Type": "text/html"})
    with pytest.raises(ImageLoadError, match="HTML") as info:
        load_rgb(url)
    assert url in str(info.value)


def test_url_that_never_answers_times_out(http_server):
    url = http_server.add("/slow.jpg", b"", behaviour="hang")
    start = time.monotonic()
    with pytest.raises(ImageFetchError, match="timed out") as info:
        load_rgb(url, timeout=1.0)
    assert time.monotonic() - start < 5.0
    assert url in str(info.value)


def test_url_that_trickles_is_cut_off_at_the_overall_deadline(http_server, chelsea):
    # One byte every 0.2 s: no single read reaches the 0.5 s timeout, the whole download would take hours.
    url = http_server.add("/trickle.png", encode(chelsea, "PNG"), behaviour="trickle")
    start = time.monotonic()
    with pytest.raises(ImageFetchError, match="still incomplete after 3 s") as info:
        load_rgb(url, timeout=0.5)
    assert time.monotonic() - start < 6.0
    assert url in str(info.value)


@pytest.mark.parametrize("behaviour", ["drop", "short"])
def test_url_cut_short(http_server, chelsea, behaviour):
    url = http_server.add("/cut.png", encode(chelsea, "PNG"), behaviour=behaviour)
    with pytest.raises(ImageFetchError, match="could not download") as info:
        load_rgb(url)
    assert url in str(info.value)


def test_url_body_over_max_bytes(http_server, chelsea):
    url = http_server.add("/big.png", encode(chelsea, "PNG"))
    with pytest.raises(ImageFetchError, match="max_bytes=1000") as info:
        load_rgb(url, max_bytes=1000)
    assert url in str(info.value) and "Content-Length" in str(info.value)
    # A small gzip body that inflates past the cap: only counting the received bytes can catch it.
    url = http_server.add("/bomb.png", gzip.compress(b"\0" * 3_000_000), headers={"Content-Encoding": "gzip"})
    with pytest.raises(ImageFetchError, match="body exceeds max_bytes") as info:
        load_rgb(url, max_bytes=1_000_000)
    assert url in str(info.value)


def test_connection_refused():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x.jpg"
    with pytest.raises(ImageFetchError, match="could not download") as info:
        load_rgb(url, timeout=2.0)
    assert url in str(info.value)


def test_bad_arguments():
    with pytest.raises(ValueError, match="scheme 'ftp'"):
        load_rgb("ftp://example.com/a.jpg")
    with pytest.raises(ValueError, match="timeout"):
        fetch_bytes("http://127.0.0.1:9/a.jpg", timeout=0)
    with pytest.raises(TypeError, match="int") as info:
        load_rgb(42)
    assert "numpy array" in str(info.value) and "URL" in str(info.value)
    with pytest.raises(TypeError, match="binary"), open(__file__) as text:
        load_rgb(text)


@pytest.mark.parametrize(("array", "error", "match"), [
    (np.zeros((4, 5, 2), np.uint8), ValueError, "H x W x 3"),
    (np.zeros((2, 4, 5, 3), np.uint8), ValueError, "got shape"),
    (np.zeros((0, 5, 3), np.uint8), ValueError, "non-empty"),
    (np.zeros((4, 5, 3), np.int64), TypeError, "int64"),
    (np.zeros((4, 5, 3), np.complex64), TypeError, "complex64"),
    (np.full((4, 5, 3), 255.0), ValueError, r"\[0, 1\]"),
    (np.full((4, 5, 3), np.nan), ValueError, r"\[0, 1\]"),
])
def test_bad_arrays(array, error, match):
    with pytest.raises(error, match=match) as info:
        load_rgb(array)
    assert "numpy array" in str(info.value)


def test_bad_tensors():
    with pytest.raises(ValueError, match="3 x H x W"):
        load_rgb(torch.zeros(4, 5, 3, dtype=torch.uint8))
    with pytest.raises(TypeError, match="int64"):
        load_rgb(torch.zeros(3, 4, 5, dtype=torch.int64))
    assert load_rgb(torch.ones(1, 4, 5, dtype=torch.bfloat16)).shape == (4, 5, 3)
