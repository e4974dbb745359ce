"""A real HTTP server on 127.0.0.1 for tests, with routes that misbehave on purpose."""
from __future__ import annotations

import contextlib
import http.server
import socket
import ssl
import sys
import threading
from dataclasses import dataclass, field


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    # "ok", "drop" (close after half the body), "short" (claim more bytes than sent), "hang" (never answer),
    # "trickle" (one byte every 0.2 s: each read succeeds, the whole takes long), "trickle_headers" (the status
    # line and headers one byte every 0.2 s, then the body), "nolength" (no Content-Length: the body ends when the
    # connection closes)
    behaviour: str = "ok"


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # Clients that hang up on purpose (the timeouts under test) are not errors of the server.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class LocalServer:
    """Serves registered routes; counts requests per path so tests can prove a cache was (not) used."""

    def __init__(self, tls: tuple[str, str] | None = None) -> None:
        """``tls``: ``(certificate, key)`` PEM files to serve https instead of http."""
        self.routes: dict[str, Route] = {}
        self.hits: dict[str, int] = {}
        # The headers of the last request to each path, so tests can see what the client asked for.
        self.request_headers: dict[str, dict[str, str]] = {}
        self._arrived = threading.Condition()
        self._release = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                server.request_headers[self.path] = dict(self.headers.items())
                with server._arrived:
                    server._arrived.notify_all()
                route = server.routes.get(self.path)
                if route is None:
                    route = Route(b"<html><body>404 Not Found</body></html>", 404, {"Content-Type": "text/html"})
                if route.behaviour == "hang":
                    server._release.wait(60)  # released at shutdown; the client's read timeout fires first
                    return
                if route.behaviour == "trickle_headers":
                    self._trickle_headers(route)
                    return
                if route.behaviour == "nolength":
                    self.send_response(route.status)
                    for key, value in route.headers.items():
                        self.send_header(key, value)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(route.body)
                    self.close_connection = True
                    return
                self.send_response(route.status)
                length = len(route.body) * (2 if route.behaviour == "short" else 1)
                self.send_header("Content-Length", str(length))
                for key, value in route.headers.items():
                    self.send_header(key, value)
                self.end_headers()
                if route.behaviour == "trickle":
                    for i in range(len(route.body)):
                        if server._release.wait(0.2):  # stop at shutdown
                            return
                        try:
                            self.wfile.write(route.body[i:i + 1])
                            self.wfile.flush()
                        except OSError:  # the client gave up
                            return
                    return
                if route.behaviour == "drop":
                    self.wfile.write(route.body[: len(route.body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(route.body)
                if route.behaviour == "short":
                    self.wfile.flush()
                    self.close_connection = True

            def _trickle_headers(self, route: Route) -> None:
                lines = [f"HTTP/1.1 {route.status} OK", f"Content-Length: {len(route.body)}"]
                lines += [f"{key}: {value}" for key, value in route.headers.items()]
                head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
                for i in range(len(head)):
                    if server._release.wait(0.2):  # stop at shutdown
                        return
                    try:
                        self.wfile.write(head[i:i + 1])
                        self.wfile.flush()
                    except OSError:  # the client gave up
                        return
                with contextlib.suppress(OSError):
                    self.wfile.write(route.body)
                self.close_connection = True

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.scheme = "http"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            # The handshake runs in each handler's thread, on its first read, not in the accepting loop.
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True,
                                                    do_handshake_on_connect=False)
            self.scheme = "https"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def add(self, path: str, body: bytes = b"", status: int = 200, headers: dict[str, str] | None = None,
            behaviour: str = "ok") -> str:
        """Register ``path`` and return its full URL."""
        self.routes[path] = Route(body, status, dict(headers or {}), behaviour)
        return self.url(path)

    def wait_for_request(self, path: str, timeout: float = 30.0) -> bool:
        """Block until ``path`` has been requested at least once (or ``timeout`` passes); True if it was."""
        with self._arrived:
            return self._arrived.wait_for(lambda: self.hits.get(path, 0) > 0, timeout)

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self._release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
