"""Every route to the weights, and every way a download can go wrong, against a real server on 127.0.0.1."""
from __future__ import annotations

import io
import pathlib
import time
import warnings

import pytest
import torch

from ssd.models.ssd300_resnet50 import NVIDIA_WEIGHTS
from ssd.registry import build_model
from ssd.weights import CheckpointUnavailableError, InvalidCheckpointError, checkpoints

from helpers import forward_error
from helpers.checkpoints import golden_state_dict, serve_published, training_checkpoint


def checkpoint_bytes(distributed: bool = False, salt: int = 0) -> bytes:
    buffer = io.BytesIO()
    torch.save(training_checkpoint(golden_state_dict(salt=salt), distributed=distributed), buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def good_bytes() -> bytes:
    return checkpoint_bytes()


@pytest.fixture()
def local_variants(monkeypatch, http_server):
    """Point the published weights at the local server: one URL for fp32 and fp16, two for amp."""
    return serve_published(monkeypatch, http_server)


def cache_files(hub_dir: pathlib.Path) -> list[str]:
    folder = hub_dir / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_variant_table_holds_the_published_files():
    table = NVIDIA_WEIGHTS
    assert set(table) == {"fp32", "fp16", "amp"}
    assert table["fp32"].urls[0].endswith("/ssdpyt_fp32/versions/2/files/nvidia_ssdpyt_fp32_190826.pt")
    assert len(table["amp"].urls) == 2
    for variant in table.values():
        assert all(url.startswith("https://api.ngc.nvidia.com/") and url.endswith(variant.file_name)
                   for url in variant.urls)


@pytest.mark.parametrize("distributed", [False, True])
def test_training_checkpoint_through_environment_variable(tmp_path, hub_dir, monkeypatch, distributed,
                                                          forward_golden):
    path = tmp_path / "trained.pt"
    path.write_bytes(checkpoint_bytes(distributed=distributed))
    monkeypatch.setenv("SSD_CHECKPOINT", str(path))
    model = build_model("nvidia_ssd")
    assert model.checkpoint_source == str(path)
    assert forward_error(model, forward_golden) < 1e-4
    assert cache_files(hub_dir) == []


def test_argument_wins_over_environment_variable(tmp_path, hub_dir, monkeypatch, good_bytes, forward_golden):
    (tmp_path / "good.pt").write_bytes(good_bytes)
    monkeypatch.setenv("SSD_CHECKPOINT", str(tmp_path / "missing.pt"))
    model = build_model("nvidia_ssd", checkpoint=tmp_path / "good.pt")
    assert forward_error(model, forward_golden) < 1e-4


def test_half_checkpoint_loads_into_a_float32_model(tmp_path, hub_dir, forward_golden):
    path = tmp_path / "half.pt"
    torch.save({"model": {k: (v.half() if v.is_floating_point() else v) for k, v in golden_state_dict().items()}},
               path)
    model = build_model("nvidia_ssd", checkpoint=path)
    tensors = list(model.parameters()) + list(model.buffers())
    assert all(t.device.type == "cpu" for t in tensors)  # nothing left on the meta device
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())
    assert forward_error(model, forward_golden) < 1e-2  # half-rounded weights, still the same network


def test_bare_state_dict_with_module_1_prefix(tmp_path, hub_dir, forward_golden):
    path = tmp_path / "bare.pt"
    torch.save({"module.1." + k: v for k, v in golden_state_dict().items()}, path)
    assert forward_error(build_model("nvidia_ssd", checkpoint=str(path)), forward_golden) < 1e-4


def test_variant_downloads_into_cache_then_is_reused_offline(http_server, local_variants, hub_dir, good_bytes,
                                                             forward_golden):
    url = http_server.add("/amp/0/nvidia_ssdpyt_amp_200703.pt", good_bytes,
                          headers={"Content-Type": "application/octet-stream"})
    model = build_model("nvidia_ssd", weights="amp", progress=False)
    assert model.checkpoint_source == url
    assert cache_files(hub_dir) == ["nvidia_ssdpyt_amp_200703.pt"]
    assert forward_error(model, forward_golden) < 1e-4
    http_server.stop()
    again = build_model("nvidia_ssd", weights="amp", progress=False)
    assert again.checkpoint_source == str(hub_dir / "checkpoints" / "nvidia_ssdpyt_amp_200703.pt")
    assert http_server.hits == {"/amp/0/nvidia_ssdpyt_amp_200703.pt": 1}


def test_published_file_name_in_cache_is_used_without_network(hub_dir, local_variants, good_bytes, forward_golden):
    # Nothing is served: the route through the cache must not need the network at all.
    (hub_dir / "checkpoints").mkdir(parents=True)
    (hub_dir / "checkpoints" / "nvidia_ssdpyt_fp32_190826.pt").write_bytes(good_bytes)
    model = build_model("nvidia_ssd", model_math="fp32")
    assert forward_error(model, forward_golden) < 1e-4


def test_force_download_fetches_again(http_server, local_variants, hub_dir, good_bytes):
    path = "/fp32/0/nvidia_ssdpyt_fp32_190826.pt"
    http_server.add(path, good_bytes)
    build_model("nvidia_ssd", progress=False)
    build_model("nvidia_ssd", progress=False)
    assert http_server.hits[path] == 1
    build_model("nvidia_ssd", progress=False, force_download=True)
    assert http_server.hits[path] == 2


@pytest.mark.parametrize(
    ("behaviour", "status", "headers", "body_kind", "reason"),
    [
        ("drop", 200, {}, "good", "connection broke|received"),
        ("short", 200, {}, "good", r"connection broke after \d+ bytes|received \d+ of the \d+ bytes"),
        ("ok", 200, {"Content-Type": "text/html"}, "html", "web page"),
        ("ok", 200, {}, "html", "web page"),
        ("ok", 404, {}, "html", "HTTP 404"),
        ("ok", 200, {}, "junk", "not a readable PyTorch checkpoint"),
    ],
)
def test_failed_download_leaves_nothing_and_names_the_url(http_server, hub_dir, good_bytes, behaviour, status,
                                                         headers, body_kind, reason):
    body = {"good": good_bytes, "html": b"<!DOCTYPE html><html><body>Moved</body></html>",
            "junk": b"\x00not a checkpoint" * 100}[body_kind]
    url = http_server.add("/files/model.pt", body, status=status, headers=headers, behaviour=behaviour)
    with pytest.raises(CheckpointUnavailableError, match=reason) as info:
        build_model("nvidia_ssd", checkpoint=url, progress=False)
    message = str(info.value)
    assert url in message and "SSD_CHECKPOINT" in message
    assert cache_files(hub_dir) == []
    # Then the server is fixed: the same URL downloads, is cached under a name keyed by the whole URL (ending in
    # its last path segment), and is reused.
    http_server.add("/files/model.pt", good_bytes)
    build_model("nvidia_ssd", checkpoint=url, progress=False)
    assert cache_files(hub_dir) == [checkpoints.url_cache_name(url)]
    assert checkpoints.url_cache_name(url).endswith("-model.pt")
    http_server.stop()
    model = build_model("nvidia_ssd", checkpoint=url, progress=False)
    assert model.checkpoint_source == str(hub_dir / "checkpoints" / checkpoints.url_cache_name(url))


def test_trickling_server_is_abandoned(http_server, hub_dir, good_bytes, monkeypatch):
    # One byte every 0.2 s never trips the read timeout; the minimum average rate does, after its grace time.
    monkeypatch.setattr(checkpoints, "MIN_RATE_GRACE_S", 0.5)
    url = http_server.add("/slow/model.pt", good_bytes, behaviour="trickle")
    start = time.monotonic()
    with pytest.raises(CheckpointUnavailableError, match="too slow") as info:
        build_model("nvidia_ssd", checkpoint=url, progress=False)
    assert time.monotonic() - start < 5
    assert url in str(info.value) and cache_files(hub_dir) == []


def test_first_url_failing_and_next_answering(http_server, local_variants, hub_dir, good_bytes):
    second = http_server.add("/amp/1/nvidia_ssdpyt_amp_200703.pt", good_bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a variant that works through its second URL needs no warning
        model = build_model("nvidia_ssd", weights="amp", progress=False)
    assert model.checkpoint_source == second
    assert http_server.hits["/amp/0/nvidia_ssdpyt_amp_200703.pt"] == 1


def test_missing_variant_falls_back_to_amp_with_a_warning(http_server, local_variants, hub_dir, good_bytes):
    http_server.add("/amp/0/nvidia_ssdpyt_amp_200703.pt", good_bytes)
    with pytest.warns(RuntimeWarning, match=r"'fp32'.*HTTP 404.*loaded the 'amp'"):
        model = build_model("nvidia_ssd", model_math="fp32", progress=False)
    assert model.checkpoint_source.endswith("/amp/0/nvidia_ssdpyt_amp_200703.pt")


def test_offline_error_lists_every_url_and_the_way_out(http_server, local_variants, hub_dir):
    http_server.stop()  # connection refused everywhere, as offline
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one message, the error: no warning saying the same first
        with pytest.raises(CheckpointUnavailableError) as info:
            build_model("nvidia_ssd", model_math="fp16", progress=False)
    message = str(info.value)
    # Each URL once, with a reason a person can act on, not urllib3's paragraph about connection pools.
    assert all(message.count(url) == 1 for urls in local_variants.values() for url in urls.urls
               if url in message)
    assert "connection refused" in message and "HTTPConnectionPool" not in message and len(message) < 2000
    for name in ("fp16", "amp"):
        for url in local_variants[name].urls:
            assert url in message
    assert "SSD_CHECKPOINT=" in message and "ConnectionError" in message
    assert cache_files(hub_dir) == []


class _RunsCode:
    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickle_that_would_run_code_is_refused(tmp_path, hub_dir):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"model": golden_state_dict(), "payload": _RunsCode(marker)}, path)
    with pytest.raises(InvalidCheckpointError, match="refused.*needs code to unpickle.*nothing in it ran"):
        build_model("nvidia_ssd", checkpoint=path)
    assert not marker.exists()


def test_mismatched_checkpoint_names_file_and_keys(tmp_path, hub_dir):
    state = golden_state_dict()
    del state["loc.0.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["conf.5.bias"] = torch.zeros(3)
    path = tmp_path / "other-model.pt"
    torch.save(state, path)
    with pytest.raises(InvalidCheckpointError) as info:
        build_model("nvidia_ssd", checkpoint=path)
    message = str(info.value)
    assert str(path) in message and "loc.0.bias" in message and "extra.weight" in message
    assert "conf.5.bias: expected (324,), got (3,)" in message


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint"])
def test_unreadable_local_file(tmp_path, hub_dir, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(InvalidCheckpointError, match="not a readable") as info:
        build_model("nvidia_ssd", checkpoint=path)
    assert str(path) in str(info.value)


def test_non_state_dict_checkpoint(tmp_path, hub_dir):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(InvalidCheckpointError, match="expected a state dict"):
        build_model("nvidia_ssd", checkpoint=path)


def test_missing_file_and_directory(tmp_path, hub_dir, monkeypatch):
    with pytest.raises(FileNotFoundError, match="checkpoint: .*missing.pt"):
        build_model("nvidia_ssd", checkpoint=tmp_path / "missing.pt")
    monkeypatch.setenv("SSD_CHECKPOINT", str(tmp_path / "gone.pt"))
    with pytest.raises(FileNotFoundError, match="SSD_CHECKPOINT: .*gone.pt"):
        build_model("nvidia_ssd")
    with pytest.raises(IsADirectoryError, match="expected a file"):
        build_model("nvidia_ssd", checkpoint=tmp_path)


def test_url_without_file_name_is_rejected(hub_dir):
    with pytest.raises(ValueError, match="ends in a file name"):
        build_model("nvidia_ssd", checkpoint="http://127.0.0.1:9/")
