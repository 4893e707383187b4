"""Relaying a request byte for byte to a provider that speaks the client's API.

`Upstream.forward` is what the routes call. Underneath it is a `ProviderClient`, chosen by the app
factory: `AiohttpClient` (upstream/aiohttp_client.py) by default — the cheapest in CPU per request
of the clients measured in bench/ — or `HttpxClient` (upstream/httpx_client.py) around an injected
httpx transport, which is how tests fake a provider (httpx.MockTransport, ASGITransport, respx).
Each client translates its library's errors into taskproxy's at exactly one place.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

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
DROP_RESPONSE_HEADERS = frozenset(
    {
        "content-length", "content-encoding", "transfer-encoding", "connection", "keep-alive", "set-cookie",
        "server", "date", "alt-svc", "trailer", "upgrade",
    }
)  # fmt: skip

Header = tuple[bytes, bytes]


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


def client_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The provider's response headers the client gets."""
    return {k: v for k, v in headers if k.lower() not in DROP_RESPONSE_HEADERS}


def is_event_stream(status: int, content_type: str) -> bool:
    return status == 200 and "text/event-stream" in content_type


def timed_out(model: str, connecting: bool) -> UpstreamTimeout:
    phase = "connecting to" if connecting else "waiting for"
    return UpstreamTimeout(f"Timed out {phase} the provider of the model '{model}'. Try again; if it persists, the provider is down or slow.")


def unreachable(model: str, detail: str) -> UpstreamError:
    return UpstreamError(f"Could not reach the provider of the model '{model}' ({detail}). Try again; if it persists, the provider is down.")


def upstream_headers(client_headers: Headers, api_key: str | None, auth_header: str = "authorization", defaults: tuple[tuple[str, str], ...] = ()) -> list[Header]:
    """The client's headers as raw bytes (relayed as sent, not re-encoded), minus hop-by-hop and
    credential headers, plus the configured provider key."""
    connection_named = {t.strip().lower().encode() for t in client_headers.get("connection", "").split(",") if t.strip()}
    drop = _DROP_REQUEST_HEADERS_BYTES | connection_named if connection_named else _DROP_REQUEST_HEADERS_BYTES
    headers = [(name, value) for name, value in client_headers.raw if name.lower() not in drop]
    if defaults:
        present = {name.lower() for name, _ in headers}
        headers += [(name.encode(), value.encode()) for name, value in defaults if name.encode() not in present]
    headers += [(b"content-type", b"application/json"), (b"accept-encoding", b"identity")]  # relay bytes as they are
    if api_key:
        headers.append((auth_header.encode(), (f"Bearer {api_key}" if auth_header == "authorization" else api_key).encode()))
    return headers


class ProviderClient(Protocol):
    """One pooled HTTP client to every provider."""

    async def post(self, model: ModelSettings, url: str, content: bytes, headers: list[Header], *, stream: bool) -> UpstreamReply:
        """POST and answer; a successful event stream (when `stream`) is returned unread, anything
        else read whole. Transport failures raise UpstreamError or UpstreamTimeout."""
        ...

    async def aclose(self) -> None: ...


class Upstream:
    """The routes' way to a provider that speaks their API."""

    def __init__(self, client: ProviderClient) -> None:
        self.client = client

    async def forward(self, model: ModelSettings, path: str, content: bytes, headers: list[Header], *, stream: bool) -> UpstreamReply:
        return await self.client.post(model, model.base_url + path, content, headers, stream=stream)

    async def aclose(self) -> None:
        await self.client.aclose()
