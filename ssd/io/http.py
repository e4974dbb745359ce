"""The one download policy of the library: image URLs and checkpoints are fetched by the same code and rules.

A :class:`DownloadPolicy` says how long a download may take and how large it may be; :func:`download` streams a URL
into a file object under it and :func:`fetch` returns the body as bytes. Every failure is a :class:`DownloadError`
(an ``OSError``) whose ``url``, ``reason`` and ``detail`` are attributes, so callers branch on ``reason`` rather than
on the wording of a message.

The overall deadline is enforced by a watchdog thread that shuts down the request's sockets when it passes. A
per-read timeout alone cannot do that: a server sending one byte of its headers (or body) every 0.2 s satisfies
every read and would hold the caller for hours.
"""
from __future__ import annotations

import contextlib
import functools
import io
import math
import numbers
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from ..copies import error_bases

__all__ = ["REASONS", "DownloadError", "DownloadPolicy", "download", "fetch"]

# The machine-readable values of DownloadError.reason.
REASONS: frozenset[str] = frozenset({
    "http_status",   # the server answered with a non-2xx status (``status`` holds it)
    "timeout",       # a connect or read timeout, or the overall deadline, passed
    "too_slow",      # the download averaged less than the policy's minimum rate
    "too_large",     # Content-Length, the bytes received, or the decoded body exceeded max_bytes
    "connection",    # the connection could not be made or broke (no Content-Length to compare with)
    "short_body",    # the body ended before the Content-Length the server announced
    "html",          # a web page (or a JSON message) came back instead of the file
    "content_type",  # the Content-Type is not one the policy accepts
    "redirects",     # too many redirects, or a redirect to a URL that is not http(s) (file://, ftp://)
})

_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
_CHUNK = 1 << 20
# How much of the body is looked at to recognise a web page sent in place of a binary file.
_SNIFF_BYTES = 64
# How often the watchdog re-checks the minimum rate; the deadline itself is waited for exactly.
_RATE_CHECK_S = 0.25


class DownloadError(*error_bases("io.http.DownloadError", OSError)):
    """A URL could not be downloaded under its policy.

    Attributes:
        url: the URL (``None`` when no single URL is at fault, e.g. a summary of several failures).
        reason: a short machine-readable code, one of :data:`REASONS` (subclasses may add their own).
        detail: a human-readable sentence saying what happened.
        status: the HTTP status for ``reason == 'http_status'``, else ``None``.
    """

    def __init__(self, url: str | None, reason: str, detail: str, *, status: int | None = None,
                 message: str | None = None) -> None:
        if message is None:
            message = f"could not download {url}: {detail}" if url else detail
        super().__init__(message)
        self.url = url
        self.reason = reason
        self.detail = detail
        self.status = status

    def __reduce__(self):
        # The default reduce would call __init__ with the message alone; rebuild from the attributes instead, so
        # that the error survives being sent between processes (DataLoader workers, multiprocessing pools).
        return _rebuild_error, (type(self), str(self)), self.__dict__


def _rebuild_error(cls: type[DownloadError], message: str) -> DownloadError:
    error = cls.__new__(cls, message)
    OSError.__init__(error, message)
    return error


def _check_number(name: str, value: object, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"DownloadPolicy.{name}: expected a number, got {type(value).__name__}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"DownloadPolicy.{name}: expected a positive finite number, got {value!r}")


@dataclass(frozen=True)
class DownloadPolicy:
    """How long one download may take and how much it may bring back.

    Attributes:
        connect_timeout: seconds to open the connection.
        read_timeout: seconds any single read may wait for data.
        deadline: seconds the whole request may take, measured from its start (connection, request, headers,
            redirects and body included); ``None`` for none (then set ``min_rate``, or a trickling server is
            bounded by nothing).
        max_bytes: the cap on the body, checked on the Content-Length header before reading, on the raw bytes
            received and on the decoded bytes (a small gzip body can inflate past it).
        min_rate: bytes per second the download must average once ``min_rate_grace`` seconds have passed (the
            headers count as zero bytes, so a server trickling its headers fails too); ``None`` for no minimum.
        min_rate_grace: seconds before ``min_rate`` applies.
        content_types: accepted media types (``"image/png"``) or families (``"image/"``); empty accepts any.
            A response without a Content-Type is accepted.
        refuse_html: refuse a web page (HTML Content-Type, or a body starting like HTML/XML/JSON): what a login
            wall or a moved file returns with status 200.
        headers: extra request headers, as ``(name, value)`` pairs.
    """

    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    deadline: float | None = 60.0
    max_bytes: int = 50 * 2**20
    min_rate: float | None = None
    min_rate_grace: float = 30.0
    content_types: tuple[str, ...] = ()
    refuse_html: bool = False
    headers: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        _check_number("connect_timeout", self.connect_timeout)
        _check_number("read_timeout", self.read_timeout)
        _check_number("deadline", self.deadline, optional=True)
        _check_number("min_rate", self.min_rate, optional=True)
        _check_number("min_rate_grace", self.min_rate_grace)
        if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, numbers.Integral):
            raise TypeError(f"DownloadPolicy.max_bytes: expected an int, got {type(self.max_bytes).__name__}")
        if self.max_bytes <= 0:
            raise ValueError(f"DownloadPolicy.max_bytes: expected a positive number of bytes, got {self.max_bytes}")
        # A bare string is a tuple of characters to Python; catch that mistake rather than accept "i", "m"...
        if not isinstance(self.content_types, tuple) or not all(isinstance(t, str) for t in self.content_types):
            raise TypeError(f"DownloadPolicy.content_types: expected a tuple of strings, got {self.content_types!r}")
        if not isinstance(self.refuse_html, bool):
            raise TypeError(f"DownloadPolicy.refuse_html: expected True or False, got {self.refuse_html!r}")
        if not isinstance(self.headers, tuple) or not all(
            isinstance(h, tuple) and len(h) == 2 and all(isinstance(s, str) for s in h) for h in self.headers
        ):
            raise TypeError(f"DownloadPolicy.headers: expected a tuple of (name, value) string pairs, "
                            f"got {self.headers!r}")


# ---------------------------------------------------------------------------------------------------------------
# The watchdog: the one place where the deadline and the minimum rate are enforced, headers included.


class _Watchdog:
    """Shuts down the sockets of one request when its deadline passes or it falls under the minimum rate.

    Shutting a socket down from another thread wakes a ``recv`` blocked on it (it returns end-of-file), so the
    request fails at once wherever it is: connecting through a redirect, reading headers, or reading the body.
    """

    def __init__(self, url: str, policy: DownloadPolicy) -> None:
        self.url = url
        self.policy = policy
        self.start = time.monotonic()
        self.received = 0  # raw body bytes so far, updated by the reading thread
        self.headers_done = False
        self._sockets: list[socket.socket] = []
        self._error: DownloadError | None = None
        self._stopped = False
        self._closed = False
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        if policy.deadline is not None or policy.min_rate is not None:
            self._thread = threading.Thread(target=self._run, name="ssd-download-watchdog", daemon=True)
            self._thread.start()

    def _verdict(self, now: float) -> DownloadError | None:
        elapsed = now - self.start
        policy = self.policy
        if policy.deadline is not None and elapsed >= policy.deadline:
            if self.headers_done:
                detail = (f"timed out: still incomplete after {round(elapsed, 1):g} s, the {policy.deadline:g} s "
                          f"deadline ({self.received} bytes received)")
            else:
                detail = (f"timed out: the response headers were still incomplete after {round(elapsed, 1):g} s, the "
                          f"{policy.deadline:g} s deadline")
            return DownloadError(self.url, "timeout", detail)
        if (policy.min_rate is not None and elapsed > policy.min_rate_grace
                and self.received < policy.min_rate * elapsed):
            return DownloadError(self.url, "too_slow", f"too slow: {self.received} bytes in {elapsed:.0f} s, "
                                                       f"under {policy.min_rate:.0f} bytes/s")
        return None

    def poll(self) -> DownloadError | None:
        """The error that ended the request, deciding now whether one has; ``None`` while it may go on."""
        with self._lock:
            if self._error is None and not self._stopped:
                self._error = self._verdict(time.monotonic())
                if self._error is not None:
                    for sock in self._sockets:
                        _shutdown(sock)
            return self._error

    def attach(self, sock: socket.socket) -> None:
        # Keep a duplicate descriptor: TLS wrapping detaches the original socket object (its fileno becomes -1),
        # while shutting down any descriptor of a socket shuts down the connection itself.
        try:
            handle = sock.dup()
        except OSError:
            return
        with self._lock:
            if self._closed:
                handle.close()
                return
            self._sockets.append(handle)
            fired = self._error is not None
        if fired:  # a redirect's connection opened just after the deadline
            _shutdown(handle)

    def stop(self) -> DownloadError | None:
        """Stop watching; returns the error if the watchdog fired before (the body may then be cut short)."""
        with self._lock:
            self._stopped = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            self._closed = True
            handles, self._sockets = self._sockets, []
        for handle in handles:
            handle.close()
        return self._error

    def _run(self) -> None:
        policy = self.policy
        while True:
            wait = math.inf
            if policy.deadline is not None:
                wait = max(0.0, self.start + policy.deadline - time.monotonic())
            if policy.min_rate is not None:
                wait = min(wait, _RATE_CHECK_S)
            # Event.wait rejects an infinite timeout; None waits for stop() alone.
            if self._wake.wait(None if math.isinf(wait) else wait) or self.poll() is not None:
                return


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed by the client: nothing left to wake
        sock.shutdown(socket.SHUT_RDWR)


# requests runs a request in the calling thread, so a thread-local tells the connection classes below which
# watchdog should own the sockets they open.
_ACTIVE = threading.local()


@functools.cache
def _watched_adapter_class() -> type:
    """A requests adapter whose connections report their sockets to the active watchdog.

    Built on first use so that importing this module does not import requests.
    """
    import requests.adapters
    import urllib3
    import urllib3.connection
    import urllib3.poolmanager

    def register(sock: socket.socket) -> socket.socket:
        watchdog = getattr(_ACTIVE, "watchdog", None)
        if watchdog is not None:
            watchdog.attach(sock)
        return sock

    # _new_conn returns the plain TCP socket for http and https alike, before the TLS handshake, so the watchdog
    # covers a handshake trickled by the server too; shutting the socket down also ends a TLS read in progress.
    class WatchedHTTPConnection(urllib3.connection.HTTPConnection):
        def _new_conn(self) -> socket.socket:
            return register(super()._new_conn())

    class WatchedHTTPSConnection(urllib3.connection.HTTPSConnection):
        def _new_conn(self) -> socket.socket:
            return register(super()._new_conn())

    class WatchedHTTPPool(urllib3.HTTPConnectionPool):
        ConnectionCls = WatchedHTTPConnection

    class WatchedHTTPSPool(urllib3.HTTPSConnectionPool):
        ConnectionCls = WatchedHTTPSConnection

    watched_pools = {"http": WatchedHTTPPool, "https": WatchedHTTPSPool}

    def watch(manager: Any) -> Any:
        # Only managers built on urllib3's stock pools (direct and http(s) proxies); a SOCKS proxy keeps its own
        # pools, and there the deadline is checked between reads of the body only.
        if getattr(manager, "pool_classes_by_scheme", None) is urllib3.poolmanager.pool_classes_by_scheme:
            manager.pool_classes_by_scheme = watched_pools
        return manager

    class WatchedAdapter(requests.adapters.HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            watch(self.poolmanager)

        def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
            return watch(super().proxy_manager_for(proxy, **proxy_kwargs))

    return WatchedAdapter


# ---------------------------------------------------------------------------------------------------------------
# Downloading


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _check_url(url: object) -> str:
    if not isinstance(url, str):
        raise TypeError(f"url: expected an http(s) URL string, got {type(url).__name__}")
    match = _URL_SCHEME.match(url)
    if match is None or match.group(1).lower() not in ("http", "https"):
        scheme = f"scheme {match.group(1)!r}" if match else "no scheme"
        raise ValueError(f"url: expected an http or https URL, got {url!r} ({scheme})")
    return url


def _content_length(headers: Any) -> int | None:
    declared = headers.get("Content-Length", "").strip()
    return int(declared) if declared.isdigit() else None


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def _is_html_type(media: str) -> bool:
    return media in ("text/html", "application/xhtml+xml")


def _looks_like_html(head: bytes) -> bool:
    return head.lstrip().lower().startswith((b"<!doctype", b"<html", b"<?xml", b"{"))


# urllib3 wraps the reason in a paragraph ("HTTPSConnectionPool(host=...): Max retries exceeded with url: ...
# (Caused by NameResolutionError(...))"): these patterns pull out the part a person can act on.
_REASONS = (
    (re.compile(r"Failed to resolve '([^']+)'"), "cannot resolve host {0} (offline, or no DNS?)"),
    (re.compile(r"Connection refused"), "connection refused"),
    (re.compile(r"Network is unreachable"), "network is unreachable (offline?)"),
    (re.compile(r"CERTIFICATE_VERIFY_FAILED"), "the server's TLS certificate could not be verified"),
)


def _short_reason(exc: BaseException) -> str:
    text = str(exc)
    for pattern, template in _REASONS:
        match = pattern.search(text)
        if match:
            return template.format(*match.groups())
    line = _first_line(exc)
    return line if len(line) <= 160 else line[:157] + "..."


def _request_error(url: str, exc: BaseException) -> DownloadError | ValueError:
    import requests

    what = f"{type(exc).__name__}: {_short_reason(exc)}"
    if isinstance(exc, requests.Timeout):
        return DownloadError(url, "timeout", f"timed out ({what})")
    if isinstance(exc, requests.TooManyRedirects):
        return DownloadError(url, "redirects", what)
    if isinstance(exc, (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema,
                        requests.exceptions.MissingSchema)):
        # requests names the URL it could not use: when that is not the one given, a redirect led there, and the
        # fault is the server's answer, not the caller's URL.
        named = re.search(r"'([^']+)'", str(exc))
        if named is not None and named.group(1) != url:
            return DownloadError(url, "redirects", f"the server redirected to {named.group(1)!r}, which is not an "
                                                   "http(s) URL (only http and https redirects are followed)")
        return ValueError(f"url: expected a valid http(s) URL, got {url!r} ({what})")
    return DownloadError(url, "connection", what)


def download(url: str, sink: BinaryIO, *, policy: DownloadPolicy,
             progress: Callable[[int, int | None], None] | None = None) -> int:
    """Stream the body of ``url`` (http or https) into ``sink.write`` under ``policy``; return the bytes written.

    The body is decoded (gzip, deflate) as it arrives; the Content-Length is compared with the raw bytes on the
    wire. ``progress(raw_bytes_so_far, content_length_or_None)`` is called after every chunk. On failure ``sink``
    may hold part of the body: write into a temporary file and keep it only when this returns.

    Raises:
        DownloadError: with ``reason`` one of :data:`REASONS`.
        ValueError / TypeError: ``url`` is not an http(s) URL string.
    """
    _check_url(url)
    if not isinstance(policy, DownloadPolicy):
        raise TypeError(f"policy: expected a DownloadPolicy, got {type(policy).__name__}")
    import requests

    watchdog = _Watchdog(url, policy)
    session = requests.Session()
    adapter = _watched_adapter_class()()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    try:
        return _transfer(session, url, sink, policy, watchdog, progress)
    finally:
        watchdog.stop()
        session.close()


def _transfer(session: Any, url: str, sink: BinaryIO, policy: DownloadPolicy, watchdog: _Watchdog,
              progress: Callable[[int, int | None], None] | None) -> int:
    import requests
    import urllib3

    # The per-operation timeouts never outlast the deadline (which the watchdog enforces in any case).
    limit = policy.deadline if policy.deadline is not None else math.inf
    timeout = (min(policy.connect_timeout, limit), min(policy.read_timeout, limit))
    previous = getattr(_ACTIVE, "watchdog", None)
    _ACTIVE.watchdog = watchdog
    try:
        response = session.get(url, stream=True, timeout=timeout, headers=dict(policy.headers),
                               allow_redirects=True)
    except requests.RequestException as exc:
        raise (watchdog.poll() or _request_error(url, exc)) from None
    finally:
        _ACTIVE.watchdog = previous
    watchdog.headers_done = True

    with response:
        status = response.status_code
        if not 200 <= status < 300:
            raise DownloadError(url, "http_status", f"HTTP {status} {response.reason}", status=status)
        content_type = response.headers.get("Content-Type", "")
        media = _media_type(content_type)
        if policy.refuse_html and _is_html_type(media):
            raise DownloadError(url, "html", f"the server sent a web page ({content_type}), not the file")
        if policy.content_types and media and not any(
            media == accepted or (accepted.endswith("/") and media.startswith(accepted))
            for accepted in (a.lower() for a in policy.content_types)
        ):
            raise DownloadError(url, "content_type", f"the server sent {content_type!r}, expected one of "
                                                     f"{', '.join(policy.content_types)}")
        declared = _content_length(response.headers)
        if declared is not None and declared > policy.max_bytes:
            raise DownloadError(url, "too_large", f"Content-Length {declared} bytes exceeds "
                                                  f"max_bytes={policy.max_bytes}")

        raw = response.raw
        written = 0
        head = b""
        sniffing = policy.refuse_html
        while True:
            try:
                # read1: one socket read at a time, so every check below runs after each packet.
                chunk = raw.read1(_CHUNK, decode_content=True)
            except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
                raise (watchdog.poll() or _broken(url, raw.tell(), declared, exc)) from None
            wire = raw.tell()  # bytes received on the wire, before decoding
            watchdog.received = wire
            if wire > policy.max_bytes:
                raise DownloadError(url, "too_large", f"the body went past max_bytes={policy.max_bytes} "
                                                      f"({wire} bytes received)")
            if not chunk:
                break
            written += len(chunk)
            if written > policy.max_bytes:
                raise DownloadError(url, "too_large", f"the decoded body exceeds max_bytes={policy.max_bytes} "
                                                      f"(Content-Encoding {response.headers.get('Content-Encoding')})")
            if sniffing:
                head += chunk[:_SNIFF_BYTES]
                if len(head) >= _SNIFF_BYTES:
                    _refuse_html_body(url, head)
                    sniffing = False
            sink.write(chunk)
            if progress is not None:
                progress(wire, declared)
            if (error := watchdog.poll()) is not None:
                raise error
        # The watchdog may have cut the connection just before an end-of-file that then looked like a full body.
        if (error := watchdog.stop()) is not None:
            raise error
        if sniffing:
            _refuse_html_body(url, head)
        if declared is not None and raw.tell() != declared:
            raise DownloadError(url, "short_body", f"received {raw.tell()} of the {declared} bytes announced")
    return written


def _refuse_html_body(url: str, head: bytes) -> None:
    if _looks_like_html(head):
        raise DownloadError(url, "html", "the server sent a web page or a JSON message, not the file")


def _broken(url: str, received: int, declared: int | None, exc: BaseException) -> DownloadError:
    if declared is not None and received < declared:
        return DownloadError(url, "short_body", f"received {received} of the {declared} bytes announced "
                                                f"(the connection broke: {type(exc).__name__})")
    return DownloadError(url, "connection", f"the connection broke after {received} bytes ({type(exc).__name__})")


def fetch(url: str, policy: DownloadPolicy) -> bytes:
    """The body of ``url`` as bytes, downloaded under ``policy`` (see :func:`download`)."""
    buffer = io.BytesIO()
    download(url, buffer, policy=policy)
    return buffer.getvalue()
