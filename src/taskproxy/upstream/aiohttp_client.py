"""The default provider client, over aiohttp's connection pool.

Chosen by measurement (bench/, docs/performance.md): per relayed request it costs a fraction of
the CPU of httpx's client and pool, whose bookkeeping grew with concurrency. `map_aiohttp_errors`
is the one place where aiohttp's exceptions become taskproxy's.

aiohttp writes header values as UTF-8, so a client header whose bytes are not UTF-8 (obsolete
ISO-8859-1 text) cannot be relayed byte for byte; it is left out and the fact logged.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import aiohttp
import certifi

from taskproxy.settings import ModelSettings
from taskproxy.errors import UpstreamError
from taskproxy.upstream.provider import Header, ProviderReply, ProviderRequest, relayed_headers, timed_out, unreachable

log = logging.getLogger("taskproxy.upstream")
READ_BUFFER_BYTES = 32 * 1024


@contextmanager
def map_aiohttp_errors(model: str) -> Iterator[None]:
    try:
        yield
    except aiohttp.ConnectionTimeoutError:
        raise timed_out(model, connecting=True) from None
    except (aiohttp.ServerTimeoutError, TimeoutError):
        raise timed_out(model, connecting=False) from None
    except aiohttp.ClientError as exc:
        raise unreachable(model, exc.__class__.__name__) from None


def _text_headers(headers: list[Header]) -> list[tuple[str, str]]:
    out = []
    for name, value in headers:
        try:
            out.append((name.decode("ascii"), value.decode("utf-8")))
        except UnicodeDecodeError:
            log.info("header %r is not UTF-8 and was not relayed to the provider", name[:100])
    return out


class AiohttpClient:
    """Opened in the app's lifespan (aiohttp's session belongs to the running event loop)."""

    def __init__(self, *, max_connections_per_provider: int = 1000, keepalive_seconds: float = 30.0) -> None:
        # No limit across providers: with one, a provider that accepts and never answers held every
        # connection and the others' requests timed out waiting for one. The client connections bound
        # the total (server.max_connections: each may hold one to a provider).
        connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=max_connections_per_provider, keepalive_timeout=keepalive_seconds,
            ssl=ssl.create_default_context(cafile=certifi.where()),
        )  # fmt: skip
        self.session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),  # one provider session must not carry cookies between users
            auto_decompress=False,  # bytes are relayed as the provider sent them
            trust_env=False,
            timeout=aiohttp.ClientTimeout(total=None),
            # What one answer may wait in memory before reading from the provider pauses (twice this). aiohttp's
            # 256 KiB let 500 streams in flight hold ~250 MiB of the provider's bytes (bench/streams_memory.py).
            read_bufsize=READ_BUFFER_BYTES,
        )
        self._timeouts: dict[tuple[float, float], aiohttp.ClientTimeout] = {}

    def _timeout(self, model: ModelSettings) -> aiohttp.ClientTimeout:
        key = (model.connect_timeout_seconds, model.read_timeout_seconds)
        timeout = self._timeouts.get(key)
        if timeout is None:
            # `connect` includes waiting for a free connection in the pool; `sock_read` is the longest
            # silence between two reads, so a long stream that keeps sending is never cut by it.
            timeout = self._timeouts[key] = aiohttp.ClientTimeout(
                total=None, connect=model.connect_timeout_seconds, sock_connect=model.connect_timeout_seconds,
                sock_read=model.read_timeout_seconds,
            )  # fmt: skip
        return timeout

    async def send(self, request: ProviderRequest) -> ProviderReply:
        model = request.model
        with map_aiohttp_errors(model.name):
            response = await self.session.request(
                request.method, request.url, data=request.content or None, headers=_text_headers(request.headers),
                timeout=self._timeout(model), allow_redirects=False,
            )  # fmt: skip
        try:
            headers = relayed_headers(model.name, response.status, response.raw_headers)
        except UpstreamError:
            response.close()
            raise
        return ProviderReply(response.status, headers, self._chunks(model, response), self._closer(response))

    @staticmethod
    async def _chunks(model: ModelSettings, response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        with map_aiohttp_errors(model.name):
            async for chunk in response.content.iter_any():
                yield chunk

    @staticmethod
    def _closer(response: aiohttp.ClientResponse):  # type: ignore[no-untyped-def]
        async def close() -> None:
            # A body read to its end returns its connection to the pool; one cut short closes it.
            if response.content.at_eof():
                response.release()
            else:
                response.close()

        return close

    async def aclose(self) -> None:
        await self.session.close()
