"""Hostile and broken checkpoints, caches and arguments: real files on disk, real HTTP on 127.0.0.1."""
from __future__ import annotations

import gzip
import io
import os
import pathlib
import pickle
import random
import re
import resource
import shutil
import struct
import subprocess
import sys
import time
import tracemalloc
import zipfile
import zlib

import pytest
import torch

from ssd.io.http import DownloadError
from ssd.registry import build_model, get_entry, list_models
from ssd.weights import CheckpointUnavailableError, InvalidCheckpointError, checkpoints, load_file, loader
from ssd.weights import read_checkpoint as read_for
from ssd.weights.checkpoints import url_cache_name

from helpers.checkpoints import golden_state_dict, serve_published, training_checkpoint

MiB = 2**20


def saved(obj: object, **options) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return golden_state_dict()


@pytest.fixture(scope="module")
def good_bytes(golden) -> bytes:
    return saved(training_checkpoint(golden))


@pytest.fixture(scope="module")
def other_bytes() -> bytes:
    return saved(training_checkpoint(golden_state_dict(salt=1)))


def cache_files(hub_dir: pathlib.Path) -> list[str]:
    folder = hub_dir / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture()
def local_variants(monkeypatch, http_server):
    """The published weights, served by the local server: one URL for fp32 and fp16, two for amp."""
    return serve_published(monkeypatch, http_server)


# ---------------------------------------------------------------- zip bombs

def zip_archive(entries: list[tuple[str, int, bytes, int, int]]) -> bytes:
    """A zip file from ``(name, method, stored data, crc32, uncompressed size)`` entries, data already encoded.

    Written by hand because zipfile can only produce a deflated entry by compressing all of it, and a 1.6 GB run
    of zeros takes seconds to compress; deflate blocks of zeros flushed with Z_FULL_FLUSH are identical, so
    repeating one gives the same stream for a fraction of the cost.
    """
    out = io.BytesIO()
    directory = []
    for name, method, data, crc, size in entries:
        offset = out.tell()
        raw_name = name.encode()
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, len(data), size,
                              len(raw_name), 0) + raw_name + data)
        directory.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0x21, crc, len(data),
                                     size, len(raw_name), 0, 0, 0, 0, 0, offset) + raw_name)
    start = out.tell()
    out.write(b"".join(directory))
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), out.tell() - start, start, 0))
    return out.getvalue()


def deflated_zeros(mebibytes: int) -> tuple[bytes, int]:
    """A raw deflate stream of ``mebibytes`` MiB of zeros, and its CRC-32."""
    block = bytes(MiB)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    second = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    assert first == second  # a full flush resets the compressor: every block encodes alike
    stream = first * mebibytes + compressor.flush()
    crc = 0
    for _ in range(mebibytes):
        crc = zlib.crc32(block, crc)
    return stream, crc


def torch_zip_bomb(mebibytes: int) -> bytes:
    """A real torch.save archive whose tensor data entry is replaced by ``mebibytes`` MiB of deflated zeros."""
    with zipfile.ZipFile(io.BytesIO(saved({"model": {"w": torch.zeros(4)}}))) as source:
        entries = []
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("/data/0"):
                stream, crc = deflated_zeros(mebibytes)
                entries.append((info.filename, zipfile.ZIP_DEFLATED, stream, crc, mebibytes * MiB))
            else:
                entries.append((info.filename, zipfile.ZIP_STORED, data, zlib.crc32(data), len(data)))
    return zip_archive(entries)


@pytest.fixture(scope="module")
def bomb_bytes() -> bytes:
    data = torch_zip_bomb(1600)  # 1.6 GiB unpacked, over MAX_UNPACKED_BYTES (1.5 GiB)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:  # a genuine bomb: zipfile reads it as one
        entry = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
        assert entry.compress_type == zipfile.ZIP_DEFLATED and entry.file_size == 1600 * MiB
        with archive.open(entry) as fp:
            assert fp.read(MiB) == bytes(MiB)
    assert len(data) < 4 * MiB
    return data


def test_zip_bomb_is_refused_before_memory_grows(tmp_path, monkeypatch, bomb_bytes):
    path = tmp_path / "bomb.pt"
    path.write_bytes(bomb_bytes)

    def never(*args, **kwargs):
        raise AssertionError("torch.load must not see a zip bomb")

    monkeypatch.setattr(torch, "load", never)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    tracemalloc.start()
    try:
        with pytest.raises(InvalidCheckpointError) as info:
            load_file(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    message = str(info.value)
    with zipfile.ZipFile(path) as archive:
        declared = sum(entry.file_size for entry in archive.infolist())
    assert str(path) in message and f"would unpack to {declared} bytes" in message and "zip bomb" in message
    assert peak < 8 * MiB and grown < 100 * 1024


def test_zip_bomb_under_the_total_is_refused_by_its_ratio(tmp_path):
    path = tmp_path / "ratio.pt"
    path.write_bytes(torch_zip_bomb(64))
    with pytest.raises(InvalidCheckpointError, match="ratio over 100") as info:
        load_file(path)
    assert str(path) in str(info.value) and "data/0" in str(info.value)


def test_zip_of_too_many_entries_is_refused_before_its_directory_is_read(tmp_path, monkeypatch):
    path = tmp_path / "many.pt"
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(loader.MAX_ZIP_ENTRIES + 1):
            archive.writestr(f"archive/data/{i}", b"")

    def never(*args, **kwargs):
        raise AssertionError("the zip directory must not be read")

    monkeypatch.setattr(zipfile, "ZipFile", never)  # opening a ZipFile reads its whole directory
    with pytest.raises(InvalidCheckpointError, match=f"declares {loader.MAX_ZIP_ENTRIES + 1} entries") as info:
        load_file(path)
    assert str(path) in str(info.value)


def test_limit_is_configurable_and_bounds_legacy_files(tmp_path, golden):
    modern = tmp_path / "modern.pt"
    modern.write_bytes(saved(golden))
    assert load_file(modern).keys() == golden.keys()
    with pytest.raises(InvalidCheckpointError, match="over the 1000000-byte limit") as info:
        load_file(modern, max_unpacked_bytes=10**6)
    assert str(modern) in str(info.value)
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(saved(golden, _use_new_zipfile_serialization=False))
    assert legacy.read_bytes()[:4] != b"PK\x03\x04"
    assert load_file(legacy).keys() == golden.keys()
    with pytest.raises(InvalidCheckpointError, match=f"the file is {legacy.stat().st_size} bytes") as info:
        read_for(legacy, "nvidia_ssd", max_unpacked_bytes=10 * MiB)
    assert str(legacy) in str(info.value)
    with pytest.raises(ValueError, match="max_unpacked_bytes: expected"):
        load_file(legacy, max_unpacked_bytes=0)


def test_downloaded_bomb_is_refused_and_not_kept(http_server, hub_dir, bomb_bytes):
    url = http_server.add("/bomb.pt", bomb_bytes)
    with pytest.raises(CheckpointUnavailableError, match="zip bomb") as info:
        build_model("nvidia_ssd", checkpoint=url, progress=False)
    assert info.value.reason == "invalid_checkpoint" and info.value.url == url
    assert cache_files(hub_dir) == []


def test_download_cap_counts_raw_bytes(http_server, hub_dir, monkeypatch, good_bytes):
    # No Content-Length: only counting the bytes as they arrive can stop this body.
    monkeypatch.setattr(checkpoints, "MAX_CHECKPOINT_BYTES", len(good_bytes) // 2)
    url = http_server.add("/big.pt", good_bytes, behaviour="nolength")
    with pytest.raises(CheckpointUnavailableError, match="max_bytes") as info:
        build_model("nvidia_ssd", checkpoint=url, progress=False)
    assert info.value.reason == "too_large" and cache_files(hub_dir) == []


def test_gzip_encoded_checkpoint_downloads(http_server, hub_dir):
    # Content-Length is the compressed size: compared with the decoded bytes, this download would look short.
    weight = (torch.arange(100_000) % 10).float()  # compressible, so the encoded body is clearly shorter
    original = saved({"model": {"conv.weight": weight, "conv.bias": torch.zeros(10)}})
    packed = gzip.compress(original)
    assert len(packed) < len(original) // 2
    url = http_server.add("/packed.pt", packed, headers={"Content-Encoding": "gzip"})
    found = checkpoints.resolve(get_entry("nvidia_ssd"), lambda path, name: load_file(path, name=name),
                                checkpoint=url, progress=False)
    assert found.source == url and torch.equal(found.value["model"]["conv.weight"], weight)
    assert cache_files(hub_dir) == [url_cache_name(url)]
    assert (hub_dir / "checkpoints" / url_cache_name(url)).read_bytes() == original


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # torch notes odd bytes, then fails
@pytest.mark.parametrize("legacy", [False, True])
def test_damaged_files_are_invalid_checkpoints(tmp_path, legacy):
    # Truncations and flipped bytes of small real files: torch.load meets them with struct errors and internal
    # asserts as well as RuntimeErrors, and every one must come out as InvalidCheckpointError naming the file.
    options = {"_use_new_zipfile_serialization": False} if legacy else {}
    blob = saved({"model": {"a.weight": torch.randn(50, 20), "a.bias": torch.randn(50)}}, **options)
    rng = random.Random(7)
    damaged = [blob[:n] for n in (0, 1, 4, 9, 30, 64, 200, len(blob) // 2, len(blob) - 22, len(blob) - 1)]
    for _ in range(60):
        copy = bytearray(blob)
        for _ in range(rng.randint(1, 6)):
            copy[rng.randrange(len(copy))] = rng.randrange(256)
        damaged.append(bytes(copy))
    path = tmp_path / "damaged.pt"
    refused = 0
    for data in damaged:
        path.write_bytes(data)
        try:
            load_file(path)
        except InvalidCheckpointError as exc:
            assert str(path) in str(exc)
            refused += 1
    assert refused >= 10  # at least every truncation; a flip inside tensor data may still load


# ---------------------------------------------------------------- tensors that hold no model


@pytest.mark.parametrize(("key", "value", "match"), [
    ("loc.0.weight", lambda t: torch.empty(t.shape, device="meta"), "meta tensor"),
    ("loc.0.bias", lambda t: t.long(), "expected floating-point weights, got torch.int64"),
    ("conf.1.bias", lambda t: t > 0, "expected floating-point weights, got torch.bool"),
    ("loc.2.bias", lambda t: t.index_fill(0, torch.tensor([1]), float("nan")), "1 NaN or infinite"),
    ("conf.3.weight", lambda t: t.clone().fill_(float("inf")), "NaN or infinite"),
    ("feature_extractor.feature_extractor.1.num_batches_tracked", lambda t: t.float() / 0, "NaN or infinite"),
])
def test_tensors_that_hold_no_model_are_refused(tmp_path, hub_dir, golden, key, value, match):
    state = dict(golden)
    state[key] = value(state[key])
    path = tmp_path / "odd.pt"
    path.write_bytes(saved({"model": state}))
    with pytest.raises(InvalidCheckpointError, match=match) as info:
        build_model("nvidia_ssd", checkpoint=path)
    assert str(path) in str(info.value) and repr(key) in str(info.value)


def test_integer_batch_counters_and_half_weights_are_fine(tmp_path, golden):
    counter = "feature_extractor.feature_extractor.1.num_batches_tracked"
    path = tmp_path / "half.pt"
    path.write_bytes(saved({k: v.half() if v.is_floating_point() else v for k, v in golden.items()}))
    assert read_for(path, "nvidia_ssd").state_dict[counter].dtype == torch.int64
    # Converted wholesale, the counters become floats too: still a model.
    path.write_bytes(saved({k: v.half() for k, v in golden.items()}))
    assert read_for(path, "nvidia_ssd").state_dict[counter].dtype == torch.float16


def test_wrapped_and_unwrapped_copies_of_a_key_collide(tmp_path, golden):
    state = dict(golden)
    state["module.loc.0.bias"] = state["loc.0.bias"] + 1
    path = tmp_path / "both.pt"
    path.write_bytes(saved(state))
    with pytest.raises(InvalidCheckpointError, match="both name 'loc.0.bias'") as info:
        read_for(path, "nvidia_ssd")
    assert str(path) in str(info.value) and "'module.loc.0.bias'" in str(info.value)


# ---------------------------------------------------------------- cache identity


def test_cache_name_is_keyed_by_the_whole_url():
    a, b = "http://h/a/model.pt", "http://h/b/model.pt"
    assert url_cache_name(a) == url_cache_name(a)
    assert url_cache_name(a) != url_cache_name(b) != url_cache_name(b + "?v=2")
    assert url_cache_name(a).startswith("url-") and url_cache_name(a).endswith("-model.pt")
    # Encoded separators are decoded, then replaced: nothing in the name can climb out of the cache folder.
    assert url_cache_name("http://h/x/" + "%2e%2e%2F" * 3 + "w e.pt").endswith("-_.._.._w_e.pt")
    long = url_cache_name("http://h/" + "w" * 5000 + ".pt")
    assert len(long) < 100 and long.endswith("w.pt")


def test_same_file_name_at_two_urls_are_two_entries(http_server, hub_dir, good_bytes, other_bytes):
    first = http_server.add("/a/model.pt", good_bytes)
    second = http_server.add("/b/model.pt", other_bytes)
    one = build_model("nvidia_ssd", checkpoint=first, progress=False).state_dict()["loc.0.bias"]
    two = build_model("nvidia_ssd", checkpoint=second, progress=False).state_dict()["loc.0.bias"]
    assert not torch.equal(one, two)
    assert cache_files(hub_dir) == sorted([url_cache_name(first), url_cache_name(second)])
    http_server.stop()
    assert torch.equal(build_model("nvidia_ssd", checkpoint=first, progress=False).state_dict()["loc.0.bias"], one)
    assert torch.equal(build_model("nvidia_ssd", checkpoint=second, progress=False).state_dict()["loc.0.bias"], two)


def test_url_cannot_stand_in_for_a_published_checkpoint(http_server, local_variants, hub_dir, good_bytes,
                                                        other_bytes):
    name = local_variants["fp32"].file_name
    impostor = http_server.add(f"/elsewhere/{name}", other_bytes)
    build_model("nvidia_ssd", checkpoint=impostor, progress=False)
    assert name not in cache_files(hub_dir)
    published = f"/fp32/0/{name}"
    http_server.add(published, good_bytes)
    model = build_model("nvidia_ssd", progress=False)
    assert model.checkpoint_source == http_server.url(published) and http_server.hits[published] == 1


def test_very_long_url_file_name(http_server, hub_dir, good_bytes):
    url = http_server.add("/" + "w" * 1000 + ".pt", good_bytes)
    build_model("nvidia_ssd", checkpoint=url, progress=False)
    assert cache_files(hub_dir) == [url_cache_name(url)]
    http_server.stop()
    assert build_model("nvidia_ssd", checkpoint=url, progress=False).checkpoint_source.endswith(url_cache_name(url))


# ---------------------------------------------------------------- cache hygiene


def test_stale_part_files_are_swept_and_fresh_ones_kept(http_server, hub_dir, good_bytes):
    folder = hub_dir / "checkpoints"
    folder.mkdir(parents=True)
    # What a download killed two hours ago leaves, and what one running in another process right now writes.
    stale = folder / "url-0123456789abcdef-model.pt.k1ll3d.part"
    fresh = folder / "nvidia_ssdpyt_fp32_190826.pt.runn1n.part"
    stale.write_bytes(b"half a checkpoint")
    fresh.write_bytes(b"a quarter")
    old = time.time() - 2 * checkpoints.STALE_PART_S
    os.utime(stale, (old, old))
    url = http_server.add("/model.pt", good_bytes)
    build_model("nvidia_ssd", checkpoint=url, progress=False)
    assert not stale.exists() and fresh.exists()
    assert cache_files(hub_dir) == sorted([fresh.name, url_cache_name(url)])


def test_killed_download_leaves_a_part_file_that_a_later_run_sweeps(http_server, hub_dir, good_bytes):
    # A real download in another process, killed (SIGKILL: no finally runs) while the server trickles the body.
    url = http_server.add("/model.pt", good_bytes, behaviour="trickle")
    folder = hub_dir / "checkpoints"
    script = ("import sys; from ssd.weights import checkpoints; "
              "checkpoints.download(sys.argv[1], sys.argv[2], progress=False)")
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", script, url, str(folder / url_cache_name(url))], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert http_server.wait_for_request("/model.pt", timeout=120)
    finally:
        child.kill()
        child.wait()
    leftovers = list(folder.glob("*.part"))
    assert len(leftovers) == 1  # the body was streaming into it when the process died
    http_server.add("/model.pt", good_bytes)
    build_model("nvidia_ssd", checkpoint=url, progress=False)
    assert leftovers[0].exists()  # an hour has not passed: it might be another process's download in progress
    old = time.time() - 2 * checkpoints.STALE_PART_S
    os.utime(leftovers[0], (old, old))
    build_model("nvidia_ssd", checkpoint=url, progress=False)
    assert cache_files(hub_dir) == [url_cache_name(url)]


def _make_unwritable(folder: pathlib.Path) -> bool:
    """Make ``folder`` unwritable even for root (chattr +i) where plain permissions are not enough."""
    folder.chmod(0o555)
    probe = folder / "probe"
    try:
        probe.touch()
    except PermissionError:
        return True
    probe.unlink()
    if shutil.which("chattr") is None:
        return False
    done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    return done.returncode == 0


def test_read_only_cache_gives_a_hint(http_server, hub_dir, good_bytes):
    folder = hub_dir / "checkpoints"
    folder.mkdir(parents=True)
    url = http_server.add("/model.pt", good_bytes)
    try:
        if not _make_unwritable(folder):
            pytest.skip("cannot make a folder read-only here")
        with pytest.raises(CheckpointUnavailableError) as info:
            build_model("nvidia_ssd", checkpoint=url, progress=False)
    finally:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        folder.chmod(0o755)
    error = info.value
    assert error.reason == "cache" and str(folder) in str(error) and "TORCH_HOME" in str(error)
    assert "SSD_CHECKPOINT" in str(error) and http_server.hits.get("/model.pt") is None
    assert cache_files(hub_dir) == []


def test_torch_home_pointing_at_a_file(tmp_path, monkeypatch, http_server, local_variants, good_bytes):
    not_a_folder = tmp_path / "torch-home"
    not_a_folder.write_text("oops")
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(not_a_folder))
    monkeypatch.delenv("SSD_CHECKPOINT", raising=False)
    url = http_server.add("/model.pt", good_bytes)
    for kwargs in ({"checkpoint": url}, {}):
        with pytest.raises(CheckpointUnavailableError) as info:
            build_model("nvidia_ssd", progress=False, **kwargs)
        assert info.value.reason == "cache" and "TORCH_HOME" in str(info.value)
        assert str(not_a_folder) in str(info.value)
    assert not_a_folder.read_text() == "oops"


def test_corrupt_cached_file_says_how_to_recover(http_server, hub_dir, good_bytes):
    url = http_server.add("/model.pt", good_bytes)
    build_model("nvidia_ssd", checkpoint=url, progress=False)
    cached = hub_dir / "checkpoints" / url_cache_name(url)
    cached.write_bytes(good_bytes[: len(good_bytes) // 3])
    with pytest.raises(InvalidCheckpointError, match="force_download=True") as info:
        build_model("nvidia_ssd", checkpoint=url, progress=False)
    assert f"delete {str(cached)!r}" in str(info.value)
    build_model("nvidia_ssd", checkpoint=url, progress=False, force_download=True)
    assert cached.read_bytes() == good_bytes and http_server.hits["/model.pt"] == 2


def test_download_that_does_not_fit_is_not_cached(http_server, hub_dir, golden):
    state = dict(golden)
    del state["loc.0.bias"]
    url = http_server.add("/other-model.pt", saved(state))
    with pytest.raises(CheckpointUnavailableError, match="does not fit nvidia_ssd.*loc.0.bias") as info:
        build_model("nvidia_ssd", checkpoint=url, progress=False)
    assert info.value.reason == "invalid_checkpoint" and cache_files(hub_dir) == []


def test_variant_mirror_serving_another_model_falls_through(http_server, local_variants, hub_dir, golden,
                                                            good_bytes):
    state = dict(golden)
    state["conf.5.bias"] = torch.zeros(3)
    name = local_variants["amp"].file_name
    http_server.add(f"/amp/0/{name}", saved(state))
    second = http_server.add(f"/amp/1/{name}", good_bytes)
    assert build_model("nvidia_ssd", weights="amp", progress=False).checkpoint_source == second
    assert (hub_dir / "checkpoints" / name).read_bytes() == good_bytes


def test_every_failure_is_kept_with_its_reason(http_server, local_variants, hub_dir):
    with pytest.raises(CheckpointUnavailableError) as info:
        build_model("nvidia_ssd", weights="fp16", progress=False)
    error = info.value
    assert error.reason == "unavailable" and error.url is None
    assert [f.url for f in error.failures] == [*local_variants["fp16"].urls, *local_variants["amp"].urls]
    assert all(isinstance(f, DownloadError) and (f.reason, f.status) == ("http_status", 404) for f in error.failures)
    again = pickle.loads(pickle.dumps(error))  # errors cross process boundaries (DataLoader workers, pools)
    assert (again.reason, str(again), [f.url for f in again.failures]) == (
        "unavailable", str(error), [f.url for f in error.failures])


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize("value", ["", "   "])
def test_empty_checkpoint_is_refused(hub_dir, monkeypatch, value):
    with pytest.raises(ValueError, match="checkpoint: expected a path or URL, got an empty string"):
        build_model("nvidia_ssd", checkpoint=value)
    monkeypatch.setenv("SSD_CHECKPOINT", "  ")
    with pytest.raises(ValueError, match="SSD_CHECKPOINT: expected a path or URL, got an empty string"):
        build_model("nvidia_ssd")


def test_file_url(tmp_path, hub_dir, good_bytes, golden):
    path = tmp_path / "my weights" / "model.pt"
    path.parent.mkdir()
    path.write_bytes(good_bytes)
    url = path.as_uri()
    assert "%20" in url
    model = build_model("nvidia_ssd", checkpoint=url)
    assert model.checkpoint_source == str(path) and cache_files(hub_dir) == []
    torch.testing.assert_close(model.state_dict()["loc.0.weight"], golden["loc.0.weight"])
    with pytest.raises(FileNotFoundError, match="checkpoint: .*missing.pt"):
        build_model("nvidia_ssd", checkpoint=(tmp_path / "missing.pt").as_uri())
    with pytest.raises(ValueError, match="host 'elsewhere'"):
        build_model("nvidia_ssd", checkpoint="file://elsewhere/model.pt")


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/model.pt", "s3://bucket/model.pt", "HDFS://x/y.pt"])
def test_unsupported_scheme_is_named(hub_dir, url):
    scheme = url.split(":", 1)[0].lower()
    with pytest.raises(ValueError, match=f"checkpoint: unsupported URL scheme '{scheme}'"):
        build_model("nvidia_ssd", checkpoint=url)
    assert cache_files(hub_dir) == []


def test_status_is_an_attribute(http_server, hub_dir):
    url = http_server.url("/nowhere.pt")
    with pytest.raises(CheckpointUnavailableError) as info:
        build_model("nvidia_ssd", checkpoint=url, progress=False)
    error = info.value
    assert isinstance(error, OSError) and (error.url, error.reason, error.status) == (url, "http_status", 404)


def test_download_keeps_its_timeout_argument(http_server, tmp_path):
    url = http_server.add("/hang.pt", b"", behaviour="hang")
    start = time.monotonic()
    with pytest.raises(CheckpointUnavailableError) as info:
        checkpoints.download(url, tmp_path / "x.pt", progress=False, timeout=(1.0, 0.5))
    assert info.value.reason == "timeout" and time.monotonic() - start < 3.0
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TypeError, match="timeout: expected a"):
        checkpoints.download(url, tmp_path / "x.pt", timeout=5)


# ---------------------------------------------------------------- every family's loader, every entry point


class Layout:
    """How one model's files are written: the family's own format, and two of its keys as the file names them
    (``ours`` is the key after conversion, which fit errors name)."""

    def __init__(self, state: dict[str, torch.Tensor], save, predictor: str, body: str, ours: str) -> None:
        self.state, self.save, self.predictor, self.body, self.ours = state, save, predictor, body, ours

    def write(self, path: pathlib.Path, change=None) -> pathlib.Path:
        state = dict(self.state)
        if change is not None:
            change(state, self)
        self.save(path, state)
        return path


def _save_nvidia(path: pathlib.Path, state: dict) -> None:
    torch.save(training_checkpoint(state), path)


def _save_mmdet(path: pathlib.Path, state: dict) -> None:
    from helpers.mmdet import save_mmdet

    save_mmdet(path, state, legacy=False)


_LAYOUTS: dict[str, Layout] = {}


def layout_of(model: str) -> Layout:
    if model not in _LAYOUTS:
        from helpers.mmdet import mmdet_state_dict

        if model == "nvidia_ssd":
            _LAYOUTS[model] = Layout(golden_state_dict(), _save_nvidia, "conf.0.weight", "loc.0.bias", "loc.0.bias")
        elif model.startswith("tv_"):
            from helpers.tv import detecting_state_dict

            # torchvision's key names are this family's own: the file's key is the converted one.
            level = "0" if model == "tv_ssd300_vgg16" else "0.1"
            body = f"head.regression_head.module_list.{level}.bias"
            _LAYOUTS[model] = Layout(detecting_state_dict(model), lambda path, state: torch.save(state, path),
                                     f"head.classification_head.module_list.{level}.weight", body, body)
        else:
            short, level = {"ssd300_vgg16": ("ssd300", "0"), "ssd512_vgg16": ("ssd512", "0"),
                            "ssdlite320_mobilenet_v2": ("ssdlite", "1")}[model]
            _LAYOUTS[model] = Layout(mmdet_state_dict(short), _save_mmdet, f"bbox_head.cls_convs.0.{level}.weight",
                                     f"bbox_head.reg_convs.0.{level}.bias",
                                     "loc.0.bias" if level == "0" else "loc.0.1.bias")
    return _LAYOUTS[model]


def _put(role: str, make):
    def change(state: dict, layout: Layout) -> None:
        key = getattr(layout, role)
        state[key] = make(state[key])
    return change


def _drop(role: str):
    def change(state: dict, layout: Layout) -> None:
        del state[getattr(layout, role)]
    return change


def _twice(state: dict, layout: Layout) -> None:
    state["module." + layout.body] = state[layout.body] + 1


# Each: (how the file is spoiled, what the message says). Every one must be InvalidCheckpointError naming the file
# and the key, never a RuntimeError, KeyError, ZeroDivisionError or IndexError from deeper down.
SPOILED = {
    "nan": (_put("body", lambda t: t.clone().index_fill_(0, torch.tensor([0]), float("nan"))), "NaN or infinite"),
    "infinite": (_put("body", lambda t: torch.full_like(t, float("inf"))), "NaN or infinite"),
    "integer": (_put("body", lambda t: t.long()), "expected floating-point weights, got torch.int64"),
    "meta": (_put("body", lambda t: torch.empty(t.shape, device="meta")), "meta tensor"),
    # A few bytes declaring a head of a million classes: never a model of that size, nor an allocation.
    "expanded": (_put("predictor", lambda t: torch.zeros(()).expand(t.shape[0] * 12_000, *t.shape[1:])),
                 "expanded view"),
    "0-d head": (_put("predictor", lambda t: torch.tensor(1.0)), r"\(\)"),
    "0-channel head": (_put("predictor", lambda t: t[:0].clone()), r"\(0, "),
    "odd head": (_put("predictor", lambda t: t[:-1].clone()), "expected"),
    "missing head": (_drop("predictor"), "missing"),
    "wrong shape": (_put("body", lambda t: torch.zeros(3)), r"got \(3,\)"),
    "module. and plain": (_twice, "both name"),
}


@pytest.mark.parametrize("model", ["nvidia_ssd", "ssd300_vgg16", "ssdlite320_mobilenet_v2",
                                   "tv_ssdlite320_mobilenet_v3_large"])
@pytest.mark.parametrize("spoiled", list(SPOILED))
def test_every_family_refuses_spoiled_files_naming_file_and_key(tmp_path, hub_dir, model, spoiled):
    change, message = SPOILED[spoiled]
    layout = layout_of(model)
    path = layout.write(tmp_path / "spoiled.pt", change)
    with pytest.raises(InvalidCheckpointError, match=message) as info:
        build_model(model, checkpoint=str(path))
    text = str(info.value)
    assert str(path) in text and "\n" not in text
    assert any(key in text for key in (layout.predictor, layout.body, layout.ours)), text


def _by_argument(model, path, monkeypatch):
    return build_model(model, checkpoint=str(path))


def _by_environment(model, path, monkeypatch):
    monkeypatch.setenv("SSD_CHECKPOINT", str(path))
    return build_model(model)


def _by_file_url(model, path, monkeypatch):
    return build_model(model, checkpoint=path.as_uri())


def _by_hub(model, path, monkeypatch):
    from helpers import REPO

    return torch.hub.load(str(REPO), model, source="local", checkpoint=str(path))


ENTRIES = {"checkpoint=": _by_argument, "SSD_CHECKPOINT": _by_environment, "file://": _by_file_url,
           "torch.hub": _by_hub}


@pytest.mark.parametrize("model", list_models())
@pytest.mark.parametrize("entry", list(ENTRIES))
def test_every_entry_point_reads_through_the_guarded_reader(tmp_path, hub_dir, monkeypatch, model, entry):
    layout = layout_of(model)
    change, message = SPOILED["nan"]
    path = layout.write(tmp_path / "nan.pt", change)
    with pytest.raises(InvalidCheckpointError, match=message) as info:
        ENTRIES[entry](model, path, monkeypatch)
    assert str(path) in str(info.value) and layout.body in str(info.value)
    assert cache_files(hub_dir) == []


def _command(command: str, model: str, path: pathlib.Path, work: pathlib.Path, shapes) -> list[str]:
    """The command line that reads ``path`` as model ``model``'s checkpoint, for each command that takes one."""
    annotations, images = shapes
    data = ["--images", str(images), "--annotations", str(annotations)]
    train = ["train", "--model", model, *data, "--out", str(work / "run"), "--epochs", "1", "--batch-size", "2",
             "--device", "cpu", "--workers", "0"]
    return {
        "detect --checkpoint": ["detect", str(next(images.iterdir())), "--model", model, "--checkpoint", str(path),
                                "--out", str(work / "detected")],
        "evaluate --checkpoint": ["evaluate", "--model", model, "--checkpoint", str(path), *data, "--no-progress"],
        "export --checkpoint": ["export", "--model", model, "--checkpoint", str(path), "--out", str(work / "m.onnx")],
        "train --checkpoint": [*train, "--checkpoint", str(path)],
        "train --resume": [*train, "--resume", str(path)],
    }[command]


COMMANDS = ("detect --checkpoint", "evaluate --checkpoint", "export --checkpoint", "train --checkpoint",
            "train --resume")


@pytest.mark.parametrize("model", list_models())
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_reads_checkpoints_through_the_guarded_reader(tmp_path, hub_dir, capsys, shapes, model,
                                                                    command):
    """A file with a NaN weight, in the family's own format (or as ssd train's last.pt for --resume), given to every
    command that reads a checkpoint: one error line naming the file and the key, exit 2, nothing built or written."""
    from ssd.cli import main

    layout = layout_of(model)
    change, message = SPOILED["nan"]
    if command == "train --resume":
        # What ssd train writes for this model and the shapes' classes, one weight spoiled.
        network = build_model(model, pretrained=False, class_names=["circle", "square", "triangle"])
        state = {k: v.clone() for k, v in network.state_dict().items()}
        key = layout.ours
        state[key][0] = float("nan")
        path = tmp_path / "run" / "last.pt"
        path.parent.mkdir()
        torch.save({"format": "ssd-train/2", "model": model, "state_dict": state,
                    "class_names": ["circle", "square", "triangle"], "category_ids": [1, 2, 3], "epoch": 0,
                    "iteration": 1, "best_map": None, "optimizer": {"state": {}, "param_groups": []},
                    "scheduler": {}, "scaler": {}}, path)
        names = (key,)
    else:
        path = layout.write(tmp_path / "nan.pt", change)
        names = (layout.body, layout.ours)
    if command.startswith("evaluate"):
        pytest.importorskip("pycocotools")
    if command.startswith("export"):
        pytest.importorskip("onnx")
    code = main(_command(command, model, path, tmp_path, shapes))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert str(path) in err and re.search(message, err) and any(k in err for k in names), err
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "detected").exists()
    assert cache_files(hub_dir) == []


@pytest.mark.parametrize("model", ["ssd300_vgg16", "ssdlite320_mobilenet_v2"])
def test_a_spoiled_download_of_any_family_is_refused_and_not_cached(http_server, hub_dir, tmp_path, model):
    layout = layout_of(model)
    change, message = SPOILED["integer"]
    url = http_server.add("/spoiled.pth", layout.write(tmp_path / "spoiled.pth", change).read_bytes())
    with pytest.raises(CheckpointUnavailableError, match=message) as info:
        build_model(model, checkpoint=url, progress=False)
    assert info.value.reason == "invalid_checkpoint" and url in str(info.value) and layout.body in str(info.value)
    assert "SSD_CHECKPOINT" in str(info.value) and cache_files(hub_dir) == []


def _address_space_limit(extra_bytes: int):
    """A context lowering this process's address-space limit to what it uses now plus ``extra_bytes``, so that a
    regression allocating a huge model fails with MemoryError instead of filling the machine."""
    import contextlib

    @contextlib.contextmanager
    def limited():
        status = pathlib.Path("/proc/self/status").read_text().splitlines()
        used = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (used + extra_bytes, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))

    return limited()


@pytest.mark.skipif(not pathlib.Path("/proc/self/status").exists(), reason="needs Linux's /proc")
@pytest.mark.parametrize("model", ["nvidia_ssd", "ssdlite320_mobilenet_v2"])
def test_class_names_that_contradict_the_head_are_refused_before_anything_is_built(tmp_path, hub_dir, model):
    # 30,000 names beside weights scoring 80 classes: believing the names would ask for a 13.9 GB SSD300.
    names = [f"thing{i}" for i in range(30_000)]
    layout = layout_of(model)
    path = tmp_path / "liar.pt"
    if model == "nvidia_ssd":
        torch.save({"format": "ssd-train/2", "model": model, "state_dict": dict(layout.state), "class_names": names,
                    "category_ids": list(range(1, 30_001))}, path)
    else:
        from helpers.mmdet import mmdet_meta, save_mmdet

        save_mmdet(path, layout.state, legacy=False, meta=mmdet_meta(tuple(names)))
    with _address_space_limit(3 * 2**30), pytest.raises(InvalidCheckpointError) as info:
        build_model(model, checkpoint=str(path))
    assert str(path) in str(info.value) and "30000 classes" in str(info.value) and "80" in str(info.value)


# ---------------------------------------------------------------- train: --checkpoint and --resume


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from ssd.data.synthetic import make_shapes_dataset

    root = tmp_path_factory.mktemp("shapes")
    return make_shapes_dataset(root, 2, image_size=64, seed=1), root / "images"


@pytest.mark.parametrize("spoiled", ["nan", "expanded", "0-channel head", "module. and plain"])
def test_training_start_reads_through_the_guarded_reader(shapes, tmp_path, spoiled):
    from ssd.training.loop import TrainConfig, train

    change, message = SPOILED[spoiled]
    path = layout_of("nvidia_ssd").write(tmp_path / "start.pt", change)
    annotations, images = shapes
    with pytest.raises(InvalidCheckpointError, match=message) as info:
        train(TrainConfig(annotations, images, tmp_path / "out", epochs=1, batch_size=2, device="cpu",
                          init_checkpoint=path))
    assert str(path) in str(info.value)


def _last_pt(**changes) -> dict:
    """A last.pt as ssd train writes it for nvidia_ssd and the shapes set, with ``changes`` (None deletes a key)."""
    from ssd.models.ssd300_resnet50 import SSD300, nvidia_spec

    state = {"format": "ssd-train/2", "model": "nvidia_ssd",
             "state_dict": SSD300(nvidia_spec(class_names=("circle", "square", "triangle"))).state_dict(),
             "class_names": ["circle", "square", "triangle"], "category_ids": [1, 2, 3], "epoch": 0,
             "iteration": 1, "best_map": None, "optimizer": {"state": {}, "param_groups": []}, "scheduler": {},
             "scaler": {}}
    for key, value in changes.items():
        if value is None:
            del state[key]
        else:
            state[key] = value
    return state


RESUMED = {
    "empty": (lambda: b"", "not a readable PyTorch checkpoint"),
    "truncated": (lambda: saved(_last_pt())[:100_000], "not a readable PyTorch checkpoint"),
    "zip bomb": (lambda: torch_zip_bomb(1600), "zip bomb"),
    "no optimizer": (lambda: saved(_last_pt(optimizer=None)), r"expected last.pt \(with the optimizer state\)"),
    "no epoch": (lambda: saved(_last_pt(epoch=None)), "key 'epoch' is missing"),
    "no weights": (lambda: saved(_last_pt(state_dict=None)), "weights .*missing"),
    "text epoch": (lambda: saved(_last_pt(epoch="0")), "key 'epoch'"),
    "NaN weights": (lambda: saved(_last_pt(state_dict={
        k: v.float().fill_(float("nan")) if k == "loc.0.bias" else v
        for k, v in _last_pt()["state_dict"].items()})), "NaN or infinite"),
    "another model": (lambda: saved(_last_pt(model="ssd300_vgg16")), "for ssd300_vgg16, not nvidia_ssd"),
    "NVIDIA's file": (lambda: saved(training_checkpoint(golden_state_dict())), "expected a training checkpoint"),
    "optimizer of another run": (lambda: saved(_last_pt(optimizer={"state": {}, "param_groups": [{"params": [0]}]})),
                                 "optimizer state does not fit"),
}


@pytest.mark.parametrize("case", list(RESUMED))
def test_resume_of_a_bad_last_pt_is_one_error_line_naming_it(shapes, tmp_path, capsys, case):
    from ssd.cli import main

    make, message = RESUMED[case]
    last = tmp_path / "out" / "last.pt"
    last.parent.mkdir()
    last.write_bytes(make())
    annotations, images = shapes
    code = main(["train", "--images", str(images), "--annotations", str(annotations), "--out", str(last.parent),
                 "--batch-size", "2", "--device", "cpu", "--epochs", "2", "--resume", str(last)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and str(last) in err, err
    assert re.search(message, err), err
    assert "weights_only" not in err and "Traceback" not in err
