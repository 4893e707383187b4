"""What one client connection may take of the server: bounded in time and in number.

uvicorn closes a keep-alive connection left idle after a response (`timeout_keep_alive`), but not one
that never sends a request, nor one that sends its headers or its body a byte at a time: measured, 3,000
idle and slow sockets were all still open after 120 s, and at ~1,100 the process ran out of file
descriptors (its recording thread too). Its `limit_concurrency` answers 503 only once a request's
headers are in, so it bounds neither. `BoundedHttpProtocol` is uvicorn's httptools protocol with:

- a **header deadline**: a connection must deliver a request's headers within `header_timeout` of
  being opened (or of starting that request, on a kept-alive connection), else it gets 408
  `request_timeout` and is closed;
- a **body deadline**: the whole body within `body_timeout` of the headers, else 408 and closed
  (the request handler sees the client gone and records nothing but a refusal);
- a **connection limit**: past `max_connections` open connections, a new one is answered 503
  `service_unavailable` (with `Retry-After`) and closed at once, so idle sockets can never take the
  descriptors the proxy needs for its own work;
- **a request its parser cannot read** (bytes HTTP forbids in a header, a broken request line)
  answered 400 `invalid_request`, where uvicorn answers a line of plain text: no route sees such a
  request, and this is the only answer its client gets;
- **a head bounded in size** as it arrives: past `max_header_bytes` and `HEAD_SLACK_BYTES` of request
  line and headers, 431 `request_header_too_large` and closed (the route's own check of the headers,
  app.HeaderLimit, comes only once they are all in, and the parser copies a URL or a header value
  over again on each read);
- **pipelining bounded**: more than `MAX_PIPELINED` requests read ahead of the one being answered,
  the connection is closed (the request being answered is told its client is gone).

`BoundedWebSocketProtocol` is uvicorn's websockets-sansio protocol (the Responses WebSocket) with:

- **control frames bounded**: uvicorn answers every ping on the event loop (~6 µs each) and writes its
  pong whether or not the client reads; one client sending pings as fast as it could (over 100,000
  a second) starved every other client (p50 1–2.6 s) and, not reading its pongs, grew the process by
  what it sent. Past `MAX_CONTROL_FRAMES_PER_SECOND` pings and pongs in a second the socket is closed
  with 1008 (policy violation); a client's keep-alive pings are one every few seconds;
- **no pong piled up**: while the socket's write buffer is full (its client reads nothing), a ping's
  pong waits until it drains (up to 64 KiB of them; then the socket is closed), so pongs cannot pile up;
  a socket closed for either of these is let go of within `CLOSE_GRACE_SECONDS`, whether or not what
  was buffered for it was sent (a close waits to send it: for a client that reads nothing, forever);
- **a message deadline**: a message partly in must be whole within `body_timeout`, as a request's
  body must, else the socket is closed with 1008: a client that answers pings was never closed, and
  ten sockets holding 30 MiB each of a message whose last fragment never came kept 300 MiB;
- **refused upgrades logged once a minute** (`refused_upgrades.py`): uvicorn and websockets log two
  lines for each upgrade refused (a bad key), whatever the access log says;
- no permessage-deflate (`serve` turns it off): a 32 MiB message compresses to 32 KiB, and inflating
  it took ~120 ms of the event loop; 16 of them waiting on each of three sockets took a process to
  1.8 GiB for 1.5 MiB sent.

Each of these answers is JSON in the API's error shape (an SDK raises it like any other error): the
shape of the route the request was for once its headers are in (a body too slow for `/v1/messages`
gets Anthropic's), else OpenAI's, which the admin API speaks too.

The limits travel on uvicorn's `Config` (`connection_limits`), so worker processes have them too.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame
from websockets.protocol import State

from taskproxy.error_shapes import ApiFormat, api_format_of, raw_error_response
from taskproxy.errors import ApiError, HeadersTooLarge, InvalidRequest, RequestTimeout, ServiceUnavailable
from taskproxy.refused_upgrades import ConnectionLog, RefusedUpgrades

log = logging.getLogger("taskproxy.connections")

# Descriptors kept for the proxy's own use (database pool, spool files, logs, encodings): what the
# connection limit leaves aside when it is derived from the open-file limit.
RESERVED_DESCRIPTORS = 128
MAX_CONTROL_FRAMES_PER_SECOND = 50  # pings and pongs a WebSocket client may send in a second
MAX_DEFERRED_BYTES = 64 * 1024  # pongs waiting for a client that reads nothing; past it the socket is closed
CLOSE_GRACE_SECONDS = 2.0  # a socket closed for its client's conduct is let go of after this, sent what was buffered or not
PARSE_SLICE_BYTES = 4 * 1024  # what a WebSocket's frames are parsed in, at most, between checks that it is still open
POLICY_VIOLATION = 1008  # RFC 6455's close code for a peer that broke the rules
# A request's line and headers may take max_header_bytes and this much more (its URL, and a read that
# also held the end of the request before) before the connection is answered 431 and closed.
HEAD_SLACK_BYTES = 256 * 1024
MAX_PIPELINED = 16  # requests read ahead of the one being answered on one connection; one more closes it


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    max_connections: int = 1000
    send_timeout: float = 60.0
    max_header_bytes: int = 64 * 1024  # limits.max_header_bytes: the headers a route takes (app.HeaderLimit)


class StalledWritesCut:
    """A connection whose client has read nothing of what was written to it for `send_timeout` is
    aborted (nginx's `send_timeout`). The answer waits for a client that is slow to read, as it should,
    but one that reads nothing held the answer, its provider's connection and its record (written when
    the answer ends) until `max_stream_seconds` and then for good: closing a connection waits to send
    what is buffered. Mixed into both protocols: the transport says when its buffer fills and drains."""

    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    limits: ConnectionLimits
    client: Any
    _stall: asyncio.TimerHandle | None = None
    _stall_buffered = 0  # what was waiting to be sent when the timer was armed

    def pause_writing(self) -> None:
        super().pause_writing()  # type: ignore[misc]
        if self._stall is None:
            self._arm_stall()

    def _arm_stall(self) -> None:
        self._stall_buffered = self.transport.get_write_buffer_size()
        self._stall = self.loop.call_later(self.limits.send_timeout, self._stalled)

    def resume_writing(self) -> None:
        self._no_stall()
        super().resume_writing()  # type: ignore[misc]

    def connection_lost(self, exc: Exception | None) -> None:
        self._no_stall()
        super().connection_lost(exc)  # type: ignore[misc]

    def _no_stall(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _stalled(self) -> None:
        self._stall = None
        if self.transport.get_write_buffer_size() < self._stall_buffered:  # read from, slowly: waited for
            self._arm_stall()
            return
        log.warning("cut a connection from %s: it read nothing of its answer for %g s (server.send_timeout_seconds)",
                    self.client, self.limits.send_timeout)  # fmt: skip
        self.transport.abort()


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


class BoundedHttpProtocol(StalledWritesCut, HttpToolsProtocol):
    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any], _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits: ConnectionLimits = getattr(config, "connection_limits", None) or ConnectionLimits()
        self._deadline: asyncio.TimerHandle | None = None
        self._awaited: Any = None  # the request cycle whose body the deadline waits for; None: headers
        # A pipelined request began while the answer before it is still going out (a long stream):
        # its headers' deadline starts once that answer is out (uvicorn reads on then, not before).
        self._headers_after_answer = False
        self._in_head = False  # a request's line and headers have begun and not ended
        self._running: Any = None  # the request cycle being answered (uvicorn's `cycle` is the one parsed last)
        self._refused = False  # closed for pipelining too deep: no answer is written
        self._head_bytes = 0  # bytes read while they had not ended

    def _arm_headers(self) -> None:
        self._disarm()
        self._awaited = None
        self._deadline = self.loop.call_later(self.limits.header_timeout, self._too_slow)

    def _arm_body(self, cycle: Any) -> None:
        self._disarm()
        self._awaited = cycle
        self._deadline = self.loop.call_later(self.limits.body_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _answering(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _too_slow(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        cycle = self._awaited
        if cycle is None:  # the headers: no route is known yet
            self._answer(RequestTimeout(f"The request's headers did not arrive within {self.limits.header_timeout:g} s "
                                        "(server.header_timeout_seconds); the connection is closed."), ApiFormat.OPENAI)  # fmt: skip
        elif not cycle.response_started:
            # The router has run on the request's scope (in place): the error speaks its route's shape.
            self._answer(RequestTimeout(f"The request's body did not arrive within {self.limits.body_timeout:g} s "
                                        "(server.body_timeout_seconds); the connection is closed."), api_format_of(cycle.scope))  # fmt: skip
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        # No route matched (none was looked for), so the shape is the one every other route speaks.
        if not self._refused:
            self._answer(InvalidRequest(f"{msg.rstrip('.')}: the request is not valid HTTP/1.1"), ApiFormat.OPENAI)
        self.transport.close()

    def _answer(self, error: ApiError, api: ApiFormat) -> None:
        """Write `error` as a whole response that closes the connection (no app is there to answer it)."""
        self.transport.write(raw_error_response(error, api, self.server_state.default_headers))

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            message = f"The server holds its limit of {self.limits.max_connections} open connections (server.max_connections); retry shortly."
            self._answer(ServiceUnavailable(message, retry_after=1), ApiFormat.OPENAI)
            transport.close()
            return
        self._arm_headers()  # a request's headers, from the connection's first moment

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # uvicorn and httptools bound a request's head in time only, and build its URL and each header
        # value by copying what came before on every read: one client sending 80 MiB of URL or of one
        # header within the header deadline held the event loop for seconds (others waited up to 8 s) and
        # took 150 MiB (found by a review). Counted here, as it arrives.
        super().data_received(data)
        if self._in_head and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes + HEAD_SLACK_BYTES:
                self._disarm()
                self._answer(HeadersTooLarge(f"The request's line and headers are larger than {self.limits.max_header_bytes} bytes "
                                             "(limits.max_header_bytes); the connection is closed."), ApiFormat.OPENAI)  # fmt: skip
                self.transport.close()

    def on_message_begin(self) -> None:
        self._in_head, self._head_bytes = True, 0
        super().on_message_begin()
        if self._deadline is None:  # a kept-alive connection starting its next request
            if self._answering():
                self._headers_after_answer = True
            else:
                self._arm_headers()

    def on_headers_complete(self) -> None:
        self._in_head = False
        if len(self.pipeline) >= MAX_PIPELINED:
            # uvicorn queues every request of a read (up to 256 KiB) behind the one being answered, ~3 KB
            # each: 20 connections pipelining 8,000 requests each and reading nothing took a process from
            # 150 to 587 MiB (found by a review). No client pipelines this deep: the connection is closed.
            self._refuse_pipelining()
        self._disarm()
        self._headers_after_answer = False
        super().on_headers_complete()  # starts the request (`_start_asgi_task`), or queues it behind the answer going out

    def _refuse_pipelining(self) -> None:
        """Close the connection without an answer: one is being given (the 503 was written into it, and
        taken by its client as the answer of a request the proxy went on to bill), and the requests
        queued behind it are dropped. The one being answered learns its client is gone (uvicorn tells
        only the cycle parsed last, which was a queued one: its answer then wrote to a closed socket)
        and is recorded as such. Raised out of the parser's callback, which stops the parse of the rest
        of the read (httptools raises it as a parse error: `send_400_response` closes)."""
        log.warning("a client sent more than %d requests ahead of their answers on one connection: it is closed", MAX_PIPELINED)
        for cycle in (self._running, *(queued for queued, _ in self.pipeline)):
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        self.pipeline.clear()
        self.cycle = self._running
        self._refused = True
        raise ConnectionAbortedError("too many pipelined requests")

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        self._running = cycle
        super()._start_asgi_task(cycle, app)
        if cycle.more_body:  # its body, from the moment the app can read it
            self._arm_body(cycle)

    def on_message_complete(self) -> None:
        if self._awaited is self.cycle:
            self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._headers_after_answer and not self.transport.is_closing():
            self._headers_after_answer = False
            self._arm_headers()

    def handle_websocket_upgrade(self) -> None:
        self._disarm()  # a WebSocket has its own pings and limits
        super().handle_websocket_upgrade()


class BoundedWebSocketProtocol(StalledWritesCut, WebSocketsSansIOProtocol):
    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any], _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits: ConnectionLimits = getattr(config, "connection_limits", None) or ConnectionLimits()
        self._second = 0.0  # when the second being counted began
        self._control_frames = 0
        self._deferred = b""  # frames written once the client reads again
        self._message_deadline: asyncio.TimerHandle | None = None  # while a message is partly in
        self._message_arrived = False  # a message came whole during this read: the next one's clock starts anew
        refused = getattr(config, "refused_upgrades", None)  # one per server (each worker its own), made by the first socket
        if refused is None:
            refused = config.refused_upgrades = RefusedUpgrades(self.logger)
        self.logger = self.conn.logger = ConnectionLog(self.logger, refused)  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        # Parsed a slice at a time: a read of 256 KiB of empty pings is ~43,000 frames, parsed in one go
        # before any handler sees the first (~130 ms of the event loop); sliced, the flood is closed
        # after the first slice (~700 frames). A 32 MiB message parses in 8.3 ms instead of 4.5.
        for start in range(0, len(data), PARSE_SLICE_BYTES):
            if self.transport.is_closing():
                return
            super().data_received(data[start : start + PARSE_SLICE_BYTES] if len(data) > PARSE_SLICE_BYTES else data)
        self._time_the_message()

    def _time_the_message(self) -> None:
        """A message partly in (fragments held, or a frame's bytes in the parser) must be whole within
        `body_timeout`, as a request's body must: ten sockets each holding 30 MiB of a message whose
        last fragment never came kept 300 MiB for as long as their clients answered pings."""
        partial = bool(self.frames) or bool(self.conn.reader.buffer)
        if self._message_arrived and self._message_deadline is not None:  # each message its own time, not the first's
            self._message_deadline.cancel()
            self._message_deadline = None
        self._message_arrived = False
        if partial and self._message_deadline is None:
            self._message_deadline = self.loop.call_later(self.limits.body_timeout, self._message_too_slow)
        elif not partial and self._message_deadline is not None:
            self._message_deadline.cancel()
            self._message_deadline = None

    def send_receive_event_to_app(self) -> None:
        self._message_arrived = True
        super().send_receive_event_to_app()

    # websockets' parser keeps the last frame it parsed until the next one arrives: an idle socket held
    # its last message's bytes (three idle sockets, 24 MiB each). The handlers take the bytes they need.
    def handle_text(self, event: Frame) -> None:
        super().handle_text(event)
        event.data = b""

    def handle_bytes(self, event: Frame) -> None:
        super().handle_bytes(event)
        event.data = b""

    def handle_cont(self, event: Frame) -> None:
        super().handle_cont(event)
        event.data = b""

    def _message_too_slow(self) -> None:
        self._message_deadline = None
        if self.close_sent or self.transport.is_closing():
            return
        log.warning("closed a WebSocket from %s: a message did not arrive within %g s", self.client, self.limits.body_timeout)
        self.frames = []  # what came of it is let go of now
        self.conn.send_close(POLICY_VIOLATION, f"a message did not arrive within {self.limits.body_timeout:g} s (server.body_timeout_seconds)")
        self.handle_parser_exception()  # tells the app (websocket.disconnect, 1008), writes the close frame, closes
        self.loop.call_later(CLOSE_GRACE_SECONDS, self.transport.abort)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._message_deadline is not None:
            self._message_deadline.cancel()
        super().connection_lost(exc)

    def handle_ping(self) -> None:
        if self._too_many_control_frames():
            return
        if not self.writable.is_set():
            # The client reads nothing just now: what the ping queued (its pong; a close reply from the same
            # read) waits for the write buffer to drain, up to a bound, rather than pile up in it.
            self._deferred += b"".join(self.conn.data_to_send())
            if len(self._deferred) > MAX_DEFERRED_BYTES:
                log.warning("closed a WebSocket from %s: it sends pings and reads nothing", self.client)
                # Aborted, not closed: a close waits to send what is buffered, which this client never reads.
                self.transport.abort()
            return
        super().handle_ping()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._deferred and not self.transport.is_closing():
            deferred, self._deferred = self._deferred, b""
            self.transport.write(deferred)

    def handle_pong(self, event: Any) -> None:
        if self._too_many_control_frames():
            return
        super().handle_pong(event)

    def _too_many_control_frames(self) -> bool:
        if self.close_sent or self.transport.is_closing():
            return True
        now = self.loop.time()
        if now - self._second >= 1.0:
            self._second, self._control_frames = now, 0
        self._control_frames += 1
        if self._control_frames <= MAX_CONTROL_FRAMES_PER_SECOND:
            return False
        log.warning("closed a WebSocket from %s: more than %d pings and pongs in a second", self.client, MAX_CONTROL_FRAMES_PER_SECOND)
        self.conn.data_to_send()  # the pongs queued for this flood are not sent
        if self.conn.state is not State.OPEN:  # closing already: no second close frame
            self.transport.close()
        else:
            self.conn.send_close(POLICY_VIOLATION, f"more than {MAX_CONTROL_FRAMES_PER_SECOND} pings and pongs in a second")
            self.handle_parser_exception()  # tells the app (websocket.disconnect, 1008), writes the close frame, closes
        # A close waits to send what is buffered: for a client that reads nothing, forever.
        self.loop.call_later(CLOSE_GRACE_SECONDS, self.transport.abort)
        return True
