"""uvicorn's HTTP/1.1 protocol (httptools) with limits on a request's head.

httptools keeps a request line and headers in memory however long they grow (one header of
150 MiB took 400 MB), and uvicorn keeps a connection that never finishes its head for good (a
thousand half-sent requests stayed open): one client without an account could exhaust the
server. A head may be at most HEAD_BYTES_MAX bytes (431 past that) and must arrive within
HEAD_S_MAX seconds of its first byte, or of the connection opening (408 then).
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["HEAD_BYTES_MAX", "HEAD_S_MAX", "BoundedHttpTools"]

HEAD_BYTES_MAX = 64 * 1024  # browsers send a few KiB; nginx allows 4 x 8 KiB by default
HEAD_S_MAX = 30.0

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


class BoundedHttpTools(HttpToolsProtocol):
    """Counts the bytes received of the head being read (None while none is: between a head's
    end and the next request's first byte), which bounds what httptools buffers, and the size
    of each head the parser hands over, which enforces the limit exactly; and times a head from
    the first byte that did not finish it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes: int | None = 0
        self._head_size = 0  # of the URL and headers of the request being parsed
        self._head_too_large = False  # for good: the connection closes
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(HEAD_S_MAX, self._head_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_bytes is not None:
            self._head_bytes += len(data)
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self._head_too_large:
            self._refuse(431, f"the request's line and headers pass {HEAD_BYTES_MAX} bytes")
            return
        if self._head_bytes is None:
            return  # the head ended in this data
        if self._head_bytes > HEAD_BYTES_MAX:
            self._refuse(431, f"the request's line and headers pass {HEAD_BYTES_MAX} bytes")
        elif self._head_timer is None:
            self._head_timer = self.loop.call_later(HEAD_S_MAX, self._head_too_slow)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_size = 0
        if self._head_bytes is None:
            self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4  # ": " and CRLF
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_bytes = None
        self._stop_head_timer()
        if self._head_size > HEAD_BYTES_MAX or self._head_too_large:
            self._head_too_large = True  # refused once the parser returns: never served
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._head_too_large:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._head_too_large:
            super().on_message_complete()

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._head_bytes is not None and not self.transport.is_closing():
            self._refuse(408, f"the request's line and headers took over {HEAD_S_MAX:.0f} s")

    def _refuse(self, status: int, message: str) -> None:
        """An OpenAI-shaped error, then the connection closes (the parser's state is lost)."""
        self._stop_head_timer()
        error = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
        body = orjson.dumps({"error": error})
        head = (
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % (status, _REASONS[status], len(body))
        )
        self.transport.write(head + body)
        self.transport.close()
