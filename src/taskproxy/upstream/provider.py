"""The seam between taskproxy and the model providers: what is sent, what comes back, and the small
interface every provider client implements.

`ProviderClient` is taskproxy's own: `AiohttpClient` (upstream/aiohttp_client.py) is the one
production uses, `MockProvider` (upstream/mock.py) the one tests inject through
`create_app(settings, provider=...)`. Both hand the relay the same `ProviderReply`, so tests and
production run the same relay code. Each client translates its library's errors into taskproxy's
(`UpstreamError`, `UpstreamTimeout`) at exactly one place.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from starlette.datastructures import Headers

from taskproxy.errors import UpstreamError, UpstreamTimeout
from taskproxy.settings import ModelSettings

Header = tuple[bytes, bytes]

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
# Not relayed to the client: hop-by-hop headers and those the proxy's own server sets; and the
# provider account's, which every key shares: its organization (and project), and its rate limits'
# remaining requests and tokens, which fall with everybody's use (one probe before and one after
# another person's request gave their tokens exactly). The proxy's own limits answer 429 with
# Retry-After, and a provider's 429 keeps its Retry-After.
DROP_RESPONSE_HEADERS = frozenset(
    {
        b"content-length", b"content-encoding", b"transfer-encoding", b"connection", b"keep-alive", b"set-cookie",
        b"server", b"date", b"alt-svc", b"trailer", b"upgrade", b"openai-organization", b"openai-project", b"anthropic-organization-id",
    }
)  # fmt: skip
DROP_RESPONSE_HEADER_PREFIXES = (b"x-ratelimit-", b"anthropic-ratelimit-")
MAX_RELAYED_HEADER_BYTES = 16 * 1024  # of a provider's response headers, relayed to the client


@dataclass(frozen=True)
class ProviderRequest:
    """One request to a provider. `url` is complete (the client's query string included)."""

    model: ModelSettings  # whose timeouts apply
    url: str
    headers: list[Header]
    content: bytes
    stream: bool  # the client asked for a stream
    method: str = "POST"  # GET and DELETE read and remove what the provider stores (a response by id)


async def _nothing_to_close() -> None:
    return None


async def _no_chunks() -> AsyncIterator[bytes]:
    return
    yield  # pragma: no cover  (makes this an async generator)


@dataclass
class ProviderReply:
    """What a provider answered, however it was reached. The body is always an iterator of chunks,
    read as it arrives; `close` releases the connection (a body not read to its end closes it)."""

    status: int
    headers: list[Header]  # as the client gets them: names lower-cased, repeated headers kept, values as sent
    chunks: AsyncIterator[bytes] = field(default_factory=_no_chunks)
    close: Callable[[], Awaitable[None]] = _nothing_to_close

    @classmethod
    def of_body(cls, status: int, headers: Iterable[Header], body: bytes) -> ProviderReply:
        async def one() -> AsyncIterator[bytes]:
            if body:
                yield body

        return cls(status, list(headers), one())

    def header(self, name: bytes) -> bytes:
        return next((v for k, v in self.headers if k == name), b"")

    @property
    def is_event_stream(self) -> bool:
        return self.status == 200 and b"text/event-stream" in self.header(b"content-type").lower()  # media types are case-insensitive


class ProviderClient(Protocol):
    """One pooled client to every provider."""

    async def send(self, request: ProviderRequest) -> ProviderReply:
        """Send and answer once the status and headers are in; the body is read from `chunks`.
        Transport failures raise UpstreamError or UpstreamTimeout, before or while the body is read."""
        ...

    async def aclose(self) -> None: ...


def client_headers(headers: Iterable[Header]) -> list[Header]:
    """The provider's response headers the client gets, in order, repeated ones kept, names lower-cased,
    at most MAX_RELAYED_HEADER_BYTES of them (`content-type` always): a provider answering with ~800 KB of
    headers had them relayed as they were, the client's HTTP library gave up on the answer (httpx: its
    buffer), and the request was recorded as answered (found by a review). What passes the bound is
    informational (request ids, timings) and is dropped."""
    kept: list[Header] = []
    room = MAX_RELAYED_HEADER_BYTES
    for name, value in ((k.lower(), v) for k, v in headers):
        if name in DROP_RESPONSE_HEADERS or name.startswith(DROP_RESPONSE_HEADER_PREFIXES):
            continue
        size = len(name) + len(value) + 4
        if size <= room or name == b"content-type":
            kept.append((name, value))
            room -= size
    return kept


def relayed_headers(model: str, status: int, headers: Iterable[Header]) -> list[Header]:
    """`client_headers`, for an answer the proxy can relay and meter as one of the API's; else UpstreamError.
    A body encoded although none was asked for (`Content-Encoding: gzip`) reached the client as binary
    without the header that says so; a 2xx HTML page (a wrong base_url, a load balancer's page) passed
    as an answer, and made the work item AI-assisted with nothing generated."""
    headers = list(headers)
    encoding = next((v for k, v in headers if k.lower() == b"content-encoding"), b"identity").strip().lower()
    if encoding not in (b"", b"identity"):
        raise UpstreamError(f"The provider of the model '{model}' answered with Content-Encoding: {encoding[:40].decode('latin-1')}, "
                            "although the proxy asks for none: it relays and meters answers as they are sent.")  # fmt: skip
    kind = next((v for k, v in headers if k.lower() == b"content-type"), b"").strip().lower()
    if 200 <= status < 300 and kind.startswith(b"text/html"):
        raise UpstreamError(f"The provider of the model '{model}' answered {status} with an HTML page, not an API answer "
                            "(a wrong base_url, or a load balancer's page?).")  # fmt: skip
    return client_headers(headers)


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
