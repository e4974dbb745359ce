"""Fuzzing the image loader: mutated real files give pixels or ImageLoadError, never anything else, never a hang.

Each format gets a few hundred deterministic mutants (seeded byte flips, truncations, header edits, spliced and
duplicated runs) of small crops of scikit-image's photographs, written to disk and loaded by path, the way
``detect`` and the command line load them.
"""
from __future__ import annotations

import io
import pathlib
import random
import time

import numpy as np
import pytest
from PIL import Image
from skimage import data

from ssd.io.images import ImageLoadError, load_rgb, load_uint8

FORMATS = {
    "PNG": {"suffix": ".png"},
    "JPEG": {"suffix": ".jpg", "quality": 85},
    "GIF": {"suffix": ".gif"},
    "TIFF": {"suffix": ".tif", "compression": "tiff_lzw"},
    "WEBP": {"suffix": ".webp", "quality": 80},
}
MUTANTS_PER_FORMAT = 1000  # 5,000 in all: about 20 s on one core
# A mutant header may claim a large image that then decodes (slowly) into garbage; a lower pixel cap keeps each
# case fast, and exercises ImageTooLargeError too.
FUZZ_MAX_PIXELS = 2_000_000
EXTREME_WORDS = (b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x00\x00\x00\x00", b"\x00\x01\x00\x00")
SLOWEST_CASE_S = 5.0  # a generous bound per file on a loaded 2-core machine; a hang is caught by the timeout mark


def _originals(fmt: str) -> list[bytes]:
    """Three small encodings of real photos (colour, grey, with EXIF for JPEG) in ``fmt``."""
    options = {k: v for k, v in FORMATS[fmt].items() if k != "suffix"}
    pictures = [data.chelsea()[60:156, 120:248], data.astronaut()[:80, :64], data.camera()[100:164, 200:300]]
    encoded = []
    for i, pixels in enumerate(pictures):
        buffer = io.BytesIO()
        im = Image.fromarray(pixels)
        extra = {}
        if fmt == "JPEG" and i == 0:
            exif = Image.Exif()
            exif[0x0112] = 6  # an orientation, so that the EXIF path is fuzzed too
            extra["exif"] = exif.tobytes()
        im.save(buffer, fmt, **options, **extra)
        encoded.append(buffer.getvalue())
    return encoded


def _mutate(original: bytes, rng: random.Random) -> bytes:
    buf = bytearray(original)
    kind = rng.randrange(6)
    if kind == 0:  # a few random bytes anywhere
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
    elif kind == 1:  # bit flips
        for _ in range(rng.randint(1, 16)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    elif kind == 2:  # truncated anywhere, including inside the header
        buf = buf[: rng.randrange(len(buf))]
    elif kind == 3:  # header edits: sizes, counts and offsets live in the first bytes of every format
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(min(len(buf), 64))
            buf[at] = rng.choice((0x00, 0x01, 0x7F, 0x80, 0xFF, rng.randrange(256)))
    elif kind == 4:  # a run of bytes duplicated or cut out (chunk lengths then lie)
        start = rng.randrange(len(buf))
        length = rng.randint(1, 64)
        if rng.random() < 0.5:
            buf[start:start] = buf[start:start + length]
        else:
            del buf[start:start + length]
    else:  # a 4-byte big/little-endian integer overwritten with an extreme value
        at = rng.randrange(max(1, min(len(buf), 256) - 4))
        buf[at:at + 4] = rng.choice(EXTREME_WORDS)
    return bytes(buf)


@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns on corrupt EXIF / tags: expected here
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_mutated_files_give_pixels_or_image_load_error(fmt, tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", FUZZ_MAX_PIXELS)
    originals = _originals(fmt)
    rng = random.Random(f"ssd-fuzz-{fmt}")  # a string seed is hashed deterministically (not by PYTHONHASHSEED)
    path = pathlib.Path(tmp_path) / f"mutant{FORMATS[fmt]['suffix']}"
    outcomes = {"pixels": 0, "refused": 0}
    slowest = 0.0
    for case in range(MUTANTS_PER_FORMAT):
        mutant = _mutate(originals[case % len(originals)], rng)
        path.write_bytes(mutant)
        loader = load_uint8 if case % 2 else load_rgb  # with and without EXIF orientation
        started = time.perf_counter()
        try:
            pixels = loader(path)
        except ImageLoadError as exc:  # ImageTooLargeError included
            assert str(path) in str(exc), f"case {case}: the error does not name the file: {exc}"
            outcomes["refused"] += 1
        except Exception as exc:  # anything else is the bug this test hunts; keep the file to reproduce it
            keep = pathlib.Path(tmp_path) / f"failing-{case}{FORMATS[fmt]['suffix']}"
            keep.write_bytes(mutant)
            raise AssertionError(f"case {case} ({keep}): {type(exc).__name__}: {exc}") from exc
        else:
            if isinstance(pixels, tuple):
                pixels = pixels[0]
            assert pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.size > 0, f"case {case}"
            assert pixels.dtype == np.uint8 or (pixels.dtype == np.float64 and np.isfinite(pixels).all())
            outcomes["pixels"] += 1
        slowest = max(slowest, time.perf_counter() - started)
    assert slowest < SLOWEST_CASE_S, f"a single mutant took {slowest:.1f} s"
    # Both outcomes must occur, or the mutations are too weak (or too strong) to test anything.
    assert outcomes["pixels"] > 0 and outcomes["refused"] > 0, outcomes
