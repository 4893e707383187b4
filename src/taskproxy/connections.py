"""What one client connection may take of the server: bounded in time and in number.

uvicorn closes a keep-alive connection left idle after a response (`timeout_keep_alive`), but not one
that never sends a request, nor one that sends its headers or its body a byte at a time: measured, 3,000
idle and slow sockets were all still open after 120 s, and at ~1,100 the process ran out of file
descriptors (its recording thread too). Its `limit_concurrency` answers 503 only once a request's
headers are in, so it bounds neither. `BoundedHttpProtocol` is uvicorn's httptools protocol with:

- a **header deadline**: a connection must deliver a request's headers within `header_timeout` of
  being opened (or of starting that request, on a kept-alive connection), else it gets 408 and is closed;
- a **body deadline**: the whole body within `body_timeout` of the headers, else 408 and closed
  (the request handler sees the client gone and records nothing but a refusal);
- a **connection limit**: past `max_connections` open connections, a new one is answered 503 and
  closed at once, so idle sockets can never take the descriptors the proxy needs for its own work;
- **a request its parser cannot read** (bytes HTTP forbids in a header, a broken request line)
  answered 400 `invalid_request` in the API's error shape, where uvicorn answers a line of plain
  text: no route sees such a request, and this is the only answer its client gets.

The limits travel on uvicorn's `Config` (`connection_limits`), so worker processes have them too.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from dataclasses import dataclass
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from taskproxy.error_shapes import ApiFormat, error_body
from taskproxy.errors import InvalidRequest

log = logging.getLogger("taskproxy.connections")

# Descriptors kept for the proxy's own use (database pool, spool files, logs, encodings): what the
# connection limit leaves aside when it is derived from the open-file limit.
RESERVED_DESCRIPTORS = 128
_REFUSED = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 31\r\nconnection: close\r\n\r\nToo many connections; retry.\r\n\r\n"
_TOO_SLOW = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\ncontent-length: 47\r\nconnection: close\r\n\r\nThe request did not arrive in time; it is cut.\r\n"


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    max_connections: int = 1000


def default_max_connections() -> int:
    """Half the open-file limit left after the reserve: each client connection may hold one to a provider too."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, (soft - RESERVED_DESCRIPTORS) // 2)


def raise_open_file_limit() -> int:
    """Raise the soft open-file limit to the hard one (many systems start processes at 1,024); answers the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # not allowed here: keep the limit there is
            pass
    return soft


class BoundedHttpProtocol(HttpToolsProtocol):
    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any], _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits: ConnectionLimits = getattr(config, "connection_limits", None) or ConnectionLimits()
        self._deadline: asyncio.TimerHandle | None = None

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is None or not self.cycle.response_started:
            self.transport.write(_TOO_SLOW)
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        # No route matched (none was looked for), so the shape is the one every other route speaks.
        body = orjson.dumps(error_body(InvalidRequest(f"{msg.rstrip('.')}: the request is not valid HTTP/1.1"), ApiFormat.OPENAI))
        head = [b"HTTP/1.1 400 Bad Request\r\n", *(name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers)]
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body))
        self.transport.write(b"".join(head) + body)
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            transport.write(_REFUSED)
            transport.close()
            return
        self._arm(self.limits.header_timeout)  # a request's headers, from the connection's first moment

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:  # a kept-alive connection starting its next request
            self._arm(self.limits.header_timeout)

    def on_headers_complete(self) -> None:
        self._arm(self.limits.body_timeout)  # until its body is complete
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def handle_websocket_upgrade(self) -> None:
        self._disarm()  # a WebSocket has its own pings and limits
        super().handle_websocket_upgrade()
