"""Reading an HTTP body so that a slow or trickling server cannot hold the caller forever."""
from __future__ import annotations

import time
from collections.abc import Iterator


def iter_body(response, chunk_size: int, *, deadline: float | None = None, min_rate: float | None = None,
              grace: float = 30.0) -> Iterator[bytes]:
    """Yield the body of a streamed ``requests`` response as it arrives.

    Reads one socket read at a time (``urllib3``'s ``read1``) rather than filling whole chunks, so the checks
    run after every packet: a server sending one byte per second is caught too, not only a silent one (which
    the read timeout catches).

    Args:
        deadline: a ``time.monotonic()`` instant after which the download is abandoned.
        min_rate: bytes per second the download must average once ``grace`` seconds have passed.

    Raises:
        TimeoutError: past the deadline, or slower than ``min_rate``.
        ConnectionError: the connection broke or the body ended before its Content-Length.
    """
    import urllib3

    start = time.monotonic()
    received = 0
    while True:
        try:
            chunk = response.raw.read1(chunk_size, decode_content=True)
        except urllib3.exceptions.HTTPError as exc:
            raise ConnectionError(f"the connection broke after {received} bytes ({type(exc).__name__})") from None
        if not chunk:
            return
        received += len(chunk)
        yield chunk
        now = time.monotonic()
        if deadline is not None and now > deadline:
            raise TimeoutError(f"still incomplete after {now - start:.0f} s ({received} bytes received)")
        if min_rate is not None and now - start > grace and received < min_rate * (now - start):
            raise TimeoutError(
                f"too slow: {received} bytes in {now - start:.0f} s, under {min_rate:.0f} bytes/s"
            )
