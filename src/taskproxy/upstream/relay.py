"""Relaying a provider's stream to the client, chunk by chunk, as it arrives.

While the body streams, the client connection is watched: if the client hangs up, the upstream
request is cancelled at once (not at the provider's next chunk) and the provider's connection is
released. A failure of the provider mid-stream ends the stream with an error event the SDKs raise.
`on_done` is called exactly once with how the relay ended.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import orjson
from starlette.types import Receive, Scope, Send

from taskproxy.errors import ApiError, UpstreamTimeout, anthropic_error_body, openai_error_body
from taskproxy.upstream.passthrough import UpstreamReply

CLIENT_DISCONNECTED = "client_disconnected"


def openai_error_event(error: ApiError) -> bytes:
    return b"data: " + orjson.dumps(openai_error_body(error)) + b"\n\n"


def anthropic_error_event(error: ApiError) -> bytes:
    return b"event: error\ndata: " + orjson.dumps(anthropic_error_body(error)) + b"\n\n"


class RelayResponse:
    def __init__(
        self,
        reply: UpstreamReply,
        *,
        on_chunk: Callable[[bytes], bytes],
        on_done: Callable[[str | None, float | None], None],
        finish: Callable[[], bytes] | None = None,
        error_event: Callable[[ApiError], bytes] | None = None,
        max_seconds: float = 1800.0,
    ) -> None:
        assert reply.chunks is not None
        self.reply = reply
        self.chunks = reply.chunks
        self.headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers.items()]
        self.on_chunk = on_chunk  # sees every upstream chunk, returns what the client gets
        self.finish = finish  # what is left to send when upstream ends (a partial event)
        self.on_done = on_done  # (error code or None, time of the first byte or None)
        self.error_event = error_event or openai_error_event
        self.max_seconds = max_seconds  # a stream that never ends is cut here

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Plain asyncio rather than anyio's task group and cancel scopes: this runs once per stream,
        # and the lighter form measurably costs fewer instructions (bench/, docs/performance.md).
        error: str | None = None
        first_byte: float | None = None
        relay = asyncio.current_task()
        assert relay is not None
        completed = disconnected = False

        async def watch_disconnect() -> None:
            nonlocal disconnected
            while (await receive())["type"] != "http.disconnect":
                pass
            if not completed:
                disconnected = True
                relay.cancel()  # stop waiting for the provider at once, not at its next chunk

        watcher = asyncio.get_running_loop().create_task(watch_disconnect())
        try:
            await send({"type": "http.response.start", "status": self.reply.status, "headers": self.headers})
            try:
                async with asyncio.timeout(self.max_seconds):
                    async for chunk in self.chunks:
                        if first_byte is None:
                            first_byte = time.perf_counter()
                        out = self.on_chunk(chunk)
                        if out:
                            await send({"type": "http.response.body", "body": out, "more_body": True})
                tail = self.finish() if self.finish else b""
            except TimeoutError:
                timeout = UpstreamTimeout(f"The stream ran longer than {self.max_seconds:.0f} s (max_stream_seconds) and was ended.")
                error, tail = timeout.code, self.error_event(timeout)
            except ApiError as exc:  # the provider failed mid-stream: tell the client in-band
                error = exc.code
                tail = self.error_event(exc)
            await send({"type": "http.response.body", "body": tail, "more_body": False})
            completed = True
        except OSError:  # the server could not write: the client is gone
            error = CLIENT_DISCONNECTED
        except asyncio.CancelledError:
            if not disconnected:
                raise  # cancelled from outside (the server shutting down): let it propagate
            relay.uncancel()
            error = CLIENT_DISCONNECTED
        finally:
            watcher.cancel()
            try:
                await self.chunks.aclose()  # type: ignore[attr-defined]
                await self.reply.close()
            finally:
                self.on_done(error, first_byte)
