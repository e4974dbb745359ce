"""ssd.io.http: the one download policy, against a real server on 127.0.0.1 that misbehaves on purpose."""
from __future__ import annotations

import gzip
import io
import pickle
import shutil
import socket
import subprocess
import time

import pytest

from ssd.io.http import REASONS, DownloadError, DownloadPolicy, download, fetch
from ssd.io.images import ImageFetchError, load_rgb

from helpers.http_server import LocalServer

BODY = bytes(range(256)) * 64  # 16 KiB that no sniffing mistakes for text


def quick(**changes) -> DownloadPolicy:
    """A policy with test-sized limits."""
    fields = {"connect_timeout": 2.0, "read_timeout": 2.0, "deadline": 10.0, "max_bytes": 1 << 20}
    fields.update(changes)
    return DownloadPolicy(**fields)


def failure(url: str, policy: DownloadPolicy) -> tuple[DownloadError, float]:
    start = time.monotonic()
    with pytest.raises(DownloadError) as info:
        fetch(url, policy)
    return info.value, time.monotonic() - start


# ---------------------------------------------------------------- the policy and the error


@pytest.mark.parametrize(("changes", "error", "field"), [
    ({"connect_timeout": 0}, ValueError, "connect_timeout"),
    ({"read_timeout": float("nan")}, ValueError, "read_timeout"),
    ({"deadline": -1.0}, ValueError, "deadline"),
    ({"deadline": float("inf")}, ValueError, "deadline"),
    ({"max_bytes": 0}, ValueError, "max_bytes"),
    ({"max_bytes": 1.5}, TypeError, "max_bytes"),
    ({"min_rate": True}, TypeError, "min_rate"),
    ({"content_types": "image/png"}, TypeError, "content_types"),
    ({"headers": (("Accept",),)}, TypeError, "headers"),
    ({"refuse_html": 1}, TypeError, "refuse_html"),
])
def test_policy_refuses_bad_fields_by_name(changes, error, field):
    with pytest.raises(error, match=f"DownloadPolicy.{field}: expected"):
        DownloadPolicy(**changes)


def test_policy_is_frozen_and_defaults_are_finite():
    policy = DownloadPolicy()
    with pytest.raises(AttributeError):
        policy.max_bytes = 1  # type: ignore[misc]
    assert policy.deadline is not None and policy.max_bytes > 0


def test_error_carries_attributes_and_survives_pickling():
    error = DownloadError("http://h/x", "http_status", "HTTP 500 Oops", status=500)
    assert isinstance(error, OSError)
    assert str(error) == "could not download http://h/x: HTTP 500 Oops"
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is DownloadError and str(again) == str(error)
    assert (again.url, again.reason, again.detail, again.status) == ("http://h/x", "http_status", "HTTP 500 Oops", 500)


@pytest.mark.parametrize(("url", "error"), [("ftp://127.0.0.1/x", ValueError), ("/local/file", ValueError),
                                            (b"http://127.0.0.1/x", TypeError)])
def test_only_http_urls(url, error):
    with pytest.raises(error, match="url: expected"):
        fetch(url, quick())


# ---------------------------------------------------------------- what comes back


def test_body_and_headers(http_server):
    url = http_server.add("/f.bin", BODY)
    seen = []
    sink = io.BytesIO()
    written = download(url, sink, policy=quick(headers=(("User-Agent", "ssd-tests"),)),
                       progress=lambda received, total: seen.append((received, total)))
    assert written == len(BODY) and sink.getvalue() == BODY
    assert seen[-1] == (len(BODY), len(BODY))
    assert http_server.request_headers["/f.bin"]["User-Agent"] == "ssd-tests"


def test_gzip_body_is_decoded_and_its_length_checked_on_the_wire(http_server):
    # Content-Length counts the encoded bytes: comparing it with the decoded size would call this body short.
    packed = gzip.compress(BODY)
    url = http_server.add("/f.gz", packed, headers={"Content-Encoding": "gzip"})
    assert fetch(url, quick()) == BODY


def test_redirect_is_followed(http_server):
    target = http_server.add("/new.bin", BODY)
    url = http_server.add("/old.bin", b"", status=302, headers={"Location": target})
    assert fetch(url, quick()) == BODY
    assert http_server.hits == {"/old.bin": 1, "/new.bin": 1}


@pytest.mark.parametrize("target", ["file:///etc/hostname", "ftp://127.0.0.1/w.pt"])
def test_redirect_to_another_scheme_blames_the_server_not_the_url(http_server, target):
    url = http_server.add("/w.pt", b"", status=302, headers={"Location": target})
    error, _ = failure(url, quick())
    assert error.reason == "redirects" and error.url == url
    assert f"the server redirected to {target!r}, which is not an http(s) URL" in str(error)
    assert "expected a valid http(s) URL" not in str(error)  # the URL given was fine


def test_endless_redirects(http_server):
    url = http_server.add("/loop", b"", status=302, headers={"Location": "/loop"})
    error, _ = failure(url, quick())
    assert error.reason == "redirects" and error.url == url


# ---------------------------------------------------------------- time


def test_trickled_headers_meet_the_overall_deadline(http_server):
    # One header byte every 0.2 s: every read succeeds long before the read timeout; only the deadline ends it.
    url = http_server.add("/slow-headers", BODY, behaviour="trickle_headers")
    error, elapsed = failure(url, quick(read_timeout=1.0, deadline=2.0))
    assert 1.9 <= elapsed < 3.0
    assert error.reason == "timeout" and error.url == url and "headers" in error.detail
    assert url in str(error) and "timed out" in str(error)


def test_trickled_headers_meet_the_minimum_rate(http_server):
    url = http_server.add("/slow-headers", BODY, behaviour="trickle_headers")
    error, elapsed = failure(url, quick(deadline=None, min_rate=1000.0, min_rate_grace=1.0))
    assert error.reason == "too_slow" and elapsed < 3.0


def test_trickled_body_meets_the_overall_deadline(http_server):
    url = http_server.add("/slow-body", BODY, behaviour="trickle")
    error, elapsed = failure(url, quick(read_timeout=1.0, deadline=1.5))
    assert 1.4 <= elapsed < 3.0
    assert error.reason == "timeout" and "still incomplete" in error.detail


def test_silent_server_meets_the_read_timeout(http_server):
    url = http_server.add("/hang", b"", behaviour="hang")
    error, elapsed = failure(url, quick(read_timeout=0.5))
    assert error.reason == "timeout" and elapsed < 3.0


# ---------------------------------------------------------------- size


def test_content_length_over_the_cap_is_refused_unread(http_server):
    url = http_server.add("/big", BODY)
    error, _ = failure(url, quick(max_bytes=1000))
    assert error.reason == "too_large" and "Content-Length 16384" in error.detail and "max_bytes=1000" in error.detail


def test_body_without_length_is_capped_on_bytes_received(http_server):
    url = http_server.add("/endless", BODY, behaviour="nolength")
    error, _ = failure(url, quick(max_bytes=1000))
    assert error.reason == "too_large" and "bytes received" in error.detail
    assert fetch(url, quick()) == BODY  # within the cap, the end of the connection ends the body


def test_gzip_bomb_is_capped_on_decoded_bytes(http_server):
    packed = gzip.compress(bytes(5_000_000))
    url = http_server.add("/bomb", packed, headers={"Content-Encoding": "gzip"})
    error, _ = failure(url, quick(max_bytes=1_000_000))
    assert error.reason == "too_large" and "decoded" in error.detail


@pytest.mark.parametrize("behaviour", ["short", "drop"])
def test_body_shorter_than_announced(http_server, behaviour):
    url = http_server.add("/cut", BODY, behaviour=behaviour)
    error, _ = failure(url, quick())
    assert error.reason == "short_body" and "bytes announced" in error.detail


# ---------------------------------------------------------------- what the server says


@pytest.mark.parametrize("status", [404, 500, 503])
def test_status(http_server, status):
    url = http_server.add("/gone", b"no", status=status)
    error, _ = failure(url, quick())
    assert (error.reason, error.status) == ("http_status", status) and f"HTTP {status}" in error.detail


def test_web_page_is_refused_only_when_asked(http_server):
    page = b"<!DOCTYPE html><html><body>Please log in</body></html>"
    typed = http_server.add("/typed", page, headers={"Content-Type": "text/html; charset=utf-8"})
    untyped = http_server.add("/untyped", page)
    for url in (typed, untyped):
        error, _ = failure(url, quick(refuse_html=True))
        assert error.reason == "html"
        assert fetch(url, quick()) == page


def test_accepted_content_types(http_server):
    png = http_server.add("/a.png", BODY, headers={"Content-Type": "image/png"})
    text = http_server.add("/a.txt", BODY, headers={"Content-Type": "text/plain"})
    bare = http_server.add("/a", BODY)
    policy = quick(content_types=("image/",))
    assert fetch(png, policy) == BODY and fetch(bare, policy) == BODY
    error, _ = failure(text, policy)
    assert error.reason == "content_type" and "text/plain" in error.detail


def test_connection_refused():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    error, _ = failure(f"http://127.0.0.1:{port}/x", quick())
    assert error.reason == "connection" and "ConnectionError" in error.detail


def test_every_reason_is_documented(http_server):
    assert {"http_status", "timeout", "too_large", "connection", "html", "short_body"} <= REASONS


# ---------------------------------------------------------------- https


@pytest.fixture()
def https_server(tmp_path, monkeypatch):
    """The local server behind TLS, with a throwaway certificate for 127.0.0.1 that requests is told to trust."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    server = LocalServer(tls=(str(cert), str(key)))
    yield server
    server.stop()


def test_https_body(https_server):
    url = https_server.add("/f.bin", BODY)
    assert url.startswith("https://") and fetch(url, quick()) == BODY


def test_https_trickled_headers_meet_the_deadline(https_server):
    # TLS wraps (and detaches) the socket the watchdog saw first: shutting it down must still end the read.
    url = https_server.add("/slow-headers", BODY, behaviour="trickle_headers")
    error, elapsed = failure(url, quick(read_timeout=1.0, deadline=2.0))
    assert 1.9 <= elapsed < 3.0 and error.reason == "timeout"


# ---------------------------------------------------------------- image URLs use the same policy


def test_image_fetch_error_is_a_download_error(http_server):
    url = http_server.add("/slow.png", BODY, behaviour="trickle_headers")
    start = time.monotonic()
    with pytest.raises(ImageFetchError) as info:
        load_rgb(url, timeout=0.4)  # deadline 6 x 0.4 = 2.4 s, headers included
    assert time.monotonic() - start < 3.5
    assert isinstance(info.value, DownloadError) and info.value.reason == "timeout" and info.value.url == url
