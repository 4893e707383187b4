"""The provider client over httpx, used when the app factory is given an httpx transport (tests
inject httpx.MockTransport or an ASGITransport around a fake provider; respx works too).

`map_httpx_errors` is the one place where httpx's exceptions become taskproxy's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import httpx

from taskproxy.settings import ModelSettings
from taskproxy.upstream.passthrough import Header, UpstreamReply, client_headers, is_event_stream, timed_out, unreachable


@contextmanager
def map_httpx_errors(model: str) -> Iterator[None]:
    try:
        yield
    except httpx.TimeoutException as exc:
        raise timed_out(model, connecting=isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout)) from None
    except httpx.TransportError as exc:
        raise unreachable(model, exc.__class__.__name__) from None


class HttpxClient:
    def __init__(self, transport: httpx.AsyncBaseTransport) -> None:
        self.client = httpx.AsyncClient(transport=transport, follow_redirects=False)

    async def post(self, model: ModelSettings, url: str, content: bytes, headers: list[Header], *, stream: bool) -> UpstreamReply:
        timeout = httpx.Timeout(
            connect=model.connect_timeout_seconds,
            read=model.read_timeout_seconds,
            write=model.read_timeout_seconds,
            pool=model.connect_timeout_seconds,
        )
        request = self.client.build_request("POST", url, content=content, headers=headers, timeout=timeout)
        with map_httpx_errors(model.name):
            response = await self.client.send(request, stream=True)
        if stream and is_event_stream(response.status_code, response.headers.get("content-type", "")):
            return UpstreamReply(response.status_code, client_headers(response.headers.items()), chunks=self._chunks(model, response), close=response.aclose)
        try:
            with map_httpx_errors(model.name):
                body = await response.aread()
        finally:
            await response.aclose()
        return UpstreamReply(response.status_code, client_headers(response.headers.items()), body=body)

    @staticmethod
    async def _chunks(model: ModelSettings, response: httpx.Response) -> AsyncIterator[bytes]:
        with map_httpx_errors(model.name):
            async for chunk in response.aiter_bytes():
                yield chunk

    async def aclose(self) -> None:
        await self.client.aclose()
