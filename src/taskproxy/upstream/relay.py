"""Relaying a provider's streamed body to the client, byte for byte, as it arrives.

While the body streams, the client connection is watched: if the client hangs up, the upstream
request is cancelled at once (not at the provider's next chunk) and the provider's connection is
released. A failure of the provider mid-stream ends the stream with an error event the SDKs raise.
`on_done` is called exactly once with how the relay ended.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio
import httpx
import orjson
from starlette.types import Receive, Scope, Send

from taskproxy.errors import ApiError, openai_error_body
from taskproxy.upstream.passthrough import map_transport_errors

CLIENT_DISCONNECTED = "client_disconnected"


def openai_error_event(error: ApiError) -> bytes:
    return b"data: " + orjson.dumps(openai_error_body(error)) + b"\n\n"


class RelayResponse:
    def __init__(
        self,
        upstream: httpx.Response,
        *,
        provider: str,
        headers: dict[str, str],
        on_chunk: Callable[[bytes], bytes],
        on_done: Callable[[str | None, float | None], None],
        finish: Callable[[], bytes] | None = None,
        error_event: Callable[[ApiError], bytes] | None = None,
    ) -> None:
        self.upstream = upstream
        self.provider = provider
        self.headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        self.on_chunk = on_chunk  # sees every upstream chunk, returns what the client gets
        self.finish = finish  # what is left to send when upstream ends (a partial event)
        self.on_done = on_done  # (error code or None, time of the first byte or None)
        self.error_event = error_event or openai_error_event

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        error: str | None = None
        first_byte: float | None = None
        completed = False

        async def watch_disconnect(cancel: anyio.CancelScope) -> None:
            nonlocal error
            while (await receive())["type"] != "http.disconnect":
                pass
            if not completed:
                error = CLIENT_DISCONNECTED
                cancel.cancel()

        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(watch_disconnect, tasks.cancel_scope)
                await send({"type": "http.response.start", "status": self.upstream.status_code, "headers": self.headers})
                try:
                    with map_transport_errors(self.provider):
                        async for chunk in self.upstream.aiter_bytes():
                            if first_byte is None:
                                first_byte = time.perf_counter()
                            out = self.on_chunk(chunk)
                            if out:
                                await send({"type": "http.response.body", "body": out, "more_body": True})
                    tail = self.finish() if self.finish else b""
                except ApiError as exc:  # the provider failed mid-stream: tell the client in-band
                    error = exc.code
                    tail = self.error_event(exc)
                await send({"type": "http.response.body", "body": tail, "more_body": False})
                completed = True
                tasks.cancel_scope.cancel()
        except OSError:  # the server could not write: the client is gone
            error = CLIENT_DISCONNECTED
        finally:
            with anyio.CancelScope(shield=True):
                await self.upstream.aclose()
            self.on_done(error, first_byte)
