"""Relaying a request byte for byte to a provider that speaks the client's API, over one pooled client.

`map_transport_errors` is the one place where httpx's exceptions become taskproxy's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
from starlette.datastructures import Headers

from taskproxy.errors import UpstreamError, UpstreamTimeout
from taskproxy.settings import ModelSettings

# Never forwarded upstream: hop-by-hop headers, the client's proxy credentials, taskproxy's own headers.
_DROP_REQUEST_HEADERS = frozenset(
    {
        "host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
        "proxy-authorization", "proxy-connection", "authorization", "x-api-key", "cookie", "accept-encoding",
        "x-work-item", "x-git-branch", "forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto",
        "x-real-ip",
        # The developer's own OpenAI organization and project would not match the configured key.
        "openai-organization", "openai-project",
    }
)  # fmt: skip
_DROP_REQUEST_HEADERS_BYTES = frozenset(name.encode() for name in _DROP_REQUEST_HEADERS | {"content-type"})
# Not relayed to the client: hop-by-hop headers and those the proxy's own server sets.
_DROP_RESPONSE_HEADERS = frozenset(
    {
        "content-length", "content-encoding", "transfer-encoding", "connection", "keep-alive", "set-cookie",
        "server", "date", "alt-svc", "trailer", "upgrade",
    }
)  # fmt: skip


async def _nothing_to_close() -> None:
    return None


@dataclass
class UpstreamReply:
    """What a provider answered, however it was reached: a complete body, or a stream of bytes."""

    status: int
    headers: dict[str, str]
    body: bytes = b""
    chunks: AsyncIterator[bytes] | None = None  # set only for a successful stream; errors already mapped
    close: Callable[[], Awaitable[None]] = _nothing_to_close

    @property
    def streaming(self) -> bool:
        return self.chunks is not None


@contextmanager
def map_transport_errors(model: str) -> Iterator[None]:
    try:
        yield
    except httpx.TimeoutException as exc:
        phase = "connecting to" if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout) else "waiting for"
        raise UpstreamTimeout(f"Timed out {phase} the provider of the model '{model}'. Try again; if it persists, the provider is down or slow.") from None
    except httpx.TransportError as exc:
        detail = exc.__class__.__name__
        raise UpstreamError(f"Could not reach the provider of the model '{model}' ({detail}). Try again; if it persists, the provider is down.") from None


Header = tuple[bytes, bytes]


def upstream_headers(client_headers: Headers, api_key: str | None, auth_header: str = "authorization", defaults: tuple[tuple[str, str], ...] = ()) -> list[Header]:
    """The client's headers as raw bytes (any byte a client may send is relayed, not re-encoded),
    minus hop-by-hop and credential headers, plus the configured provider key."""
    connection_named = {t.strip().lower().encode() for t in client_headers.get("connection", "").split(",") if t.strip()}
    drop = _DROP_REQUEST_HEADERS_BYTES | connection_named
    headers = [(name, value) for name, value in client_headers.raw if name.lower() not in drop]
    present = {name.lower() for name, _ in headers}
    headers += [(name.encode(), value.encode()) for name, value in defaults if name.encode() not in present]
    headers += [(b"content-type", b"application/json"), (b"accept-encoding", b"identity")]  # relay bytes as they are
    if api_key:
        headers.append((auth_header.encode(), (f"Bearer {api_key}" if auth_header == "authorization" else api_key).encode()))
    return headers


def client_headers(upstream: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in upstream.headers.items() if k.lower() not in _DROP_RESPONSE_HEADERS}


class Upstream:
    """The pooled client to every provider. Its transport is injected by the app factory."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def forward(self, model: ModelSettings, path: str, content: bytes, headers: list[Header], *, stream: bool) -> UpstreamReply:
        """Send; a successful event stream is returned unread, anything else read whole."""
        response = await self._send(model, path, content, headers)
        if stream and response.status_code == 200 and "text/event-stream" in response.headers.get("content-type", ""):
            return UpstreamReply(response.status_code, client_headers(response), chunks=self._chunks(model, response), close=response.aclose)
        try:
            with map_transport_errors(model.name):
                body = await response.aread()
        finally:
            await response.aclose()
        return UpstreamReply(response.status_code, client_headers(response), body=body)

    @staticmethod
    async def _chunks(model: ModelSettings, response: httpx.Response) -> AsyncIterator[bytes]:
        with map_transport_errors(model.name):
            async for chunk in response.aiter_bytes():
                yield chunk

    async def _send(self, model: ModelSettings, path: str, content: bytes, headers: list[Header]) -> httpx.Response:
        """Send and return once the response headers are in."""
        timeout = httpx.Timeout(
            connect=model.connect_timeout_seconds,
            read=model.read_timeout_seconds,
            write=model.read_timeout_seconds,
            pool=model.connect_timeout_seconds,
        )
        request = self.client.build_request("POST", model.base_url + path, content=content, headers=headers, timeout=timeout)
        with map_transport_errors(model.name):
            return await self.client.send(request, stream=True)
