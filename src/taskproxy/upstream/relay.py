"""Relaying a provider's answer to the client as it arrives: every stream, and any body too large to
keep whole.

The client's connection is watched for the whole exchange (`ClientWatch`): when the client hangs
up, the task serving it is cancelled at once, so the provider's request is cancelled too (not at its
next chunk). What is kept of the answer for accounting is bounded (`Capture`), and the spend the
provider reports is counted the moment its usage passes by (`Meter`), before the client has the
end of the answer. A provider failure mid-stream, the stream's time limit, or the server shutting
down ends the stream with the route's error event, after the last whole event (a stream is relayed
in whole events: `SseSplitter`); a body that is not an event stream has its connection cut instead,
as no event can be appended to it. `on_done` is called exactly once, with how the relay ended, before
the provider's connection is released.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

from starlette.types import Receive, Scope, Send

from taskproxy.errors import ApiError, ServiceUnavailable, UpstreamTimeout
from taskproxy.jsonbytes import has_usage_object
from taskproxy.upstream.capture import Capture
from taskproxy.upstream.provider import Header, ProviderReply
from taskproxy.upstream.sse import SseSplitter

CLIENT_DISCONNECTED = "client_disconnected"
# A provider that sends as fast as the client reads never makes the relay wait (its awaits return at
# once), so it would hold the event loop until the answer ended: it steps aside after this long.
YIELD_EVERY_SECONDS = 0.002
SHUTDOWN = "proxy_shutdown"
SHUTTING_DOWN = "The proxy is shutting down; the answer was ended here. Retry the request."


class UsageMeter(Protocol):
    pending: bool

    def saw(self, recent: bytes) -> None: ...


class ClientWatch:
    """Cancels the task serving a request when its client hangs up (once the request body is read,
    the server's `receive` answers only that)."""

    def __init__(self, receive: Receive) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self.gone = False
        self._stopped = False
        self._watcher: asyncio.Task[None] | None = asyncio.get_running_loop().create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if not self._stopped:
            self.gone = True
            self._task.cancel()

    def stop(self) -> None:
        self._stopped = True
        if self._watcher is not None:
            # Dropped as it is cancelled: its cancellation's traceback holds this object, and a
            # reference back to the task would make a cycle that outlives the request until a full
            # collection, which an idle server may not run for a long time.
            self._watcher.cancel()
            self._watcher = None

    def ended_by(self) -> str:
        """After the serving task was cancelled: why, and the cancellation is taken back so the
        task can record the exchange (and, shutting down, answer with the route's error)."""
        self._task.uncancel()
        return CLIENT_DISCONNECTED if self.gone else SHUTDOWN


class RelayResponse:
    def __init__(
        self,
        reply: ProviderReply,
        *,
        capture: Capture,
        watch: ClientWatch,
        on_done: Callable[[str | None, float | None], None],
        error_event: Callable[[ApiError], bytes],
        max_seconds: float,
        meter: UsageMeter | None = None,
        events: SseSplitter | None = None,
        prefix: bytes = b"",
        first_byte: float | None = None,
    ) -> None:
        self.reply = reply
        self.headers: list[Header] = reply.headers
        self.capture = capture
        self.watch = watch
        self.on_done = on_done  # (error code or None, time of the first byte or None)
        self.error_event = error_event
        self.max_seconds = max_seconds  # an answer that never ends is cut here
        self.meter = meter
        self.events = events  # an event stream's: what the client gets of each chunk (None: a body, relayed as it comes)
        self.prefix = prefix  # already read from upstream (and captured), not yet sent
        self.first_byte = first_byte

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        error: str | None = None
        first_byte = self.first_byte
        capture, meter, events = self.capture, self.meter, self.events
        stepped_aside = time.perf_counter()
        try:
            await send({"type": "http.response.start", "status": self.reply.status, "headers": self.headers})
            try:
                async with asyncio.timeout(self.max_seconds):
                    if self.prefix:
                        await send({"type": "http.response.body", "body": self.prefix, "more_body": True})
                    async for chunk in self.reply.chunks:
                        if first_byte is None:
                            first_byte = time.perf_counter()
                        capture.add(chunk)
                        if meter is not None and (meter.pending or has_usage_object(chunk)):
                            meter.saw(capture.around(chunk))
                        out = events.without_usage_only(chunk) if events is not None else chunk
                        if out:
                            await send({"type": "http.response.body", "body": out, "more_body": True})
                        if (now := time.perf_counter()) - stepped_aside > YIELD_EVERY_SECONDS:
                            await asyncio.sleep(0)  # let the other requests have the event loop
                            stepped_aside = now
                tail: bytes | None = events.rest() if events is not None else b""
            except TimeoutError:
                timeout = UpstreamTimeout(f"The answer took longer than {self.max_seconds:.0f} s and was ended (max_stream_seconds).")
                error, tail = timeout.code, self._ending(timeout)
            except ApiError as exc:  # the provider failed mid-answer: tell the client in-band
                error, tail = exc.code, self._ending(exc)
            if tail is not None:  # else the answer is left unfinished: the server cuts its connection
                await send({"type": "http.response.body", "body": tail, "more_body": False})
        except OSError:  # the server could not write: the client is gone
            error = CLIENT_DISCONNECTED
        except asyncio.CancelledError:
            error = self.watch.ended_by()
            if error == SHUTDOWN and (tail := self._ending(ServiceUnavailable(SHUTTING_DOWN))) is not None:
                await _send_quietly(send, tail)
        finally:
            self.watch.stop()
            self.on_done(error, first_byte)
            chunks = self.reply.chunks
            if hasattr(chunks, "aclose"):
                await chunks.aclose()
            await self.reply.close()

    def _ending(self, error: ApiError) -> bytes | None:
        """The event that ends the answer with `error`, or None where no event can follow what was sent:
        the client is then left an answer that did not end (the server closes a connection whose answer
        the app did not finish). A body's `data: {"error"…}` made megabytes of JSON a 200 that no client
        could parse, and an event glued onto half of one was read as part of it (found by a review)."""
        if self.events is None or self.events.mid_event:
            return None
        return self.error_event(error)


async def _send_quietly(send: Send, body: bytes) -> None:
    try:
        await send({"type": "http.response.body", "body": body, "more_body": False})
    except (OSError, RuntimeError):
        pass


class BodyResponse:
    """A provider's complete answer, its headers as the provider sent them (repeated ones kept)."""

    def __init__(self, status: int, headers: list[Header], body: bytes) -> None:
        self.status, self.body = status, body
        self.headers = [*headers, (b"content-length", str(len(body)).encode())]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body, "more_body": False})
