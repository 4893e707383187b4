"""A provider client for tests, as httpx's `MockTransport` is for httpx: `create_app(settings,
provider=MockProvider(handler))` runs the real relay against `handler` instead of the network.

    def handler(request: ProviderRequest) -> MockResponse: ...      # or async

A handler may raise `UpstreamError` / `UpstreamTimeout` to stand for a transport failure, and a
response's `chunks` may raise one part-way to stand for a connection dropped mid-stream.
`MockProvider.asgi(app)` answers from an ASGI app in this process (the fake provider), streaming its
body as the app sends it, so a client hanging up reaches the app as a disconnect.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson
from starlette.types import ASGIApp, Message

from taskproxy.errors import UpstreamError
from taskproxy.upstream.provider import ProviderReply, ProviderRequest, client_headers, relayed_headers, unreachable


@dataclass
class MockResponse:
    status: int = 200
    headers: Sequence[tuple[str, str]] | Mapping[str, str] = ()  # text; sent as UTF-8
    body: bytes = b""
    chunks: Iterable[bytes] | AsyncIterable[bytes] | None = None  # the body, chunk by chunk, instead of `body`

    @classmethod
    def json(cls, data: Any, status: int = 200, headers: Sequence[tuple[str, str]] = ()) -> MockResponse:
        return cls(status, [("content-type", "application/json"), *headers], orjson.dumps(data))

    @classmethod
    def sse(cls, events: Iterable[bytes] | AsyncIterable[bytes], headers: Sequence[tuple[str, str]] = ()) -> MockResponse:
        return cls(200, [("content-type", "text/event-stream"), *headers], chunks=events)

    def reply(self) -> ProviderReply:
        pairs = self.headers.items() if isinstance(self.headers, Mapping) else self.headers
        headers = [(name.encode(), value.encode()) for name, value in pairs]
        if self.chunks is None:
            return ProviderReply.of_body(self.status, client_headers(headers), self.body)
        return ProviderReply(self.status, client_headers(headers), _aiter(self.chunks))


async def _aiter(chunks: Iterable[bytes] | AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    if isinstance(chunks, AsyncIterable):
        async for chunk in chunks:
            yield chunk
    else:
        for chunk in chunks:
            yield chunk


Handler = Callable[[ProviderRequest], "MockResponse | ProviderReply | Awaitable[MockResponse | ProviderReply]"]


@dataclass
class MockProvider:
    handler: Handler
    requests: list[ProviderRequest] = field(default_factory=list)  # every request sent, in order

    async def send(self, request: ProviderRequest) -> ProviderReply:
        self.requests.append(request)
        response = self.handler(request)
        if inspect.isawaitable(response):
            response = await response
        if isinstance(response, ProviderReply):
            return response
        assert isinstance(response, MockResponse), f"a MockProvider handler must answer a MockResponse, not {response!r}"
        return response.reply()

    async def aclose(self) -> None:
        return None

    @classmethod
    def asgi(cls, app: ASGIApp) -> MockProvider:
        """Answer from `app` in this process; its body streams as the app sends it."""
        return cls(lambda request: asgi_reply(app, request))


async def asgi_reply(app: ASGIApp, request: ProviderRequest) -> ProviderReply:
    parts = urlsplit(request.url)
    host = parts.hostname or "provider.test"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    headers = [(name.lower(), value) for name, value in request.headers]
    headers += [(b"host", parts.netloc.encode()), (b"content-length", str(len(request.content)).encode())]
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request.method, "scheme": parts.scheme or "http",
        "path": unquote(parts.path), "raw_path": parts.path.encode(), "query_string": parts.query.encode(), "root_path": "",
        "headers": headers, "server": (host, port), "client": ("127.0.0.1", 0),
    }  # fmt: skip
    loop = asyncio.get_running_loop()
    started: asyncio.Future[Message] = loop.create_future()
    body: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
    hung_up = asyncio.Event()
    request_sent = False

    async def receive() -> Message:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": request.content, "more_body": False}
        await hung_up.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            started.set_result(message)
        elif message["type"] == "http.response.body":
            if message.get("body"):
                body.put_nowait(message["body"])
            if not message.get("more_body", False):
                body.put_nowait(None)

    def ended(task: asyncio.Task[None]) -> None:
        error = None if task.cancelled() else task.exception()
        if error is not None and not started.done():
            started.set_exception(unreachable(request.model.name, error.__class__.__name__))
        else:  # a connection dropped mid-body, or a body the app never finished
            body.put_nowait(unreachable(request.model.name, error.__class__.__name__) if error else None)

    task = loop.create_task(app(scope, receive, send))  # type: ignore[arg-type]
    task.add_done_callback(ended)
    start = await started

    async def chunks() -> AsyncIterator[bytes]:
        while (chunk := await body.get()) is not None:
            if isinstance(chunk, BaseException):
                raise chunk
            yield chunk

    async def close() -> None:
        hung_up.set()
        if not task.done():
            task.cancel()

    try:
        headers = relayed_headers(request.model.name, start["status"], start.get("headers", []))
    except UpstreamError:
        await close()
        raise
    return ProviderReply(start["status"], headers, chunks(), close)
