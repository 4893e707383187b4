"""The flow every proxy route shares: admit, forward (with fallbacks), answer, record.

`ProxyFlow` holds exactly what the flow uses and lives in the app's lifespan state; a proxy route
calls `proxy(request, ENDPOINT)`. Each attempt at a provider — the model, then its fallbacks — is
recorded exactly once (metering/attempts.py), however it ends.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from functools import partial

import anyio
import orjson
from starlette.requests import Request
from starlette.responses import Response

from taskproxy.errors import ApiError, ClientGone, ServiceUnavailable, UpstreamTimeout
from taskproxy.guard.attribution import strip_work_item
from taskproxy.guard.body import DECODE_IN_THREAD_BYTES
from taskproxy.metering.attempts import Attempt, Attempts, Caller
from taskproxy.routes.admission import Admission, Admitted
from taskproxy.routes.common import ApiRoute
from taskproxy.routes.endpoint import Endpoint, Translation
from taskproxy.settings import ModelSettings, Settings
from taskproxy.upstream.capture import Capture
from taskproxy.upstream.provider import ProviderClient, ProviderReply, ProviderRequest, upstream_headers
from taskproxy.upstream.relay import CLIENT_DISCONNECTED, SHUTDOWN, SHUTTING_DOWN, BodyResponse, ClientWatch, RelayResponse
from taskproxy.upstream.sse import SseSplitter

RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class ProxyFlow:
    settings: Settings  # the models, their fallbacks and limits
    admission: Admission
    attempts: Attempts
    provider: ProviderClient
    translation: Translation


def proxy_route(endpoint: Endpoint) -> ApiRoute:
    """The route of a proxied endpoint: POST on its path, errors in its API's shape."""

    async def handler(request: Request) -> Response:
        return await proxy(request, endpoint)

    handler.__name__ = handler.__qualname__ = endpoint.path.strip("/").replace("/", "_")
    return endpoint.route(handler)


async def proxy(request: Request, endpoint: Endpoint) -> Response:
    flow: ProxyFlow = request.state.proxy
    admitted = await flow.admission.admit(request, endpoint)
    body = admitted.body
    changed = strip_work_item(body)
    stream = endpoint.streams and body.get("stream") is True
    client_wants_usage = True
    if stream and endpoint.usage_chunk_opt_in:
        options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
        client_wants_usage = options.get("include_usage") is True
        if not client_wants_usage:  # always ask: it is how the usage of a stream is known
            body["stream_options"] = {**options, "include_usage": True}
            changed = True
    fallbacks = (flow.settings.model(name) for name in admitted.model.fallbacks)
    chain = [admitted.model, *(m for m in fallbacks if m is not None and endpoint.reaches(m))]
    caller = Caller(admitted.principal.key_id, admitted.principal.owner, admitted.principal.team, admitted.attributed.work_item,
                    admitted.attributed.source)  # fmt: skip
    watch = ClientWatch(request.receive)
    handed_over = False
    try:
        for number, model in enumerate(chain, start=1):
            attempt = flow.attempts.begin(
                caller, ts=admitted.ts, started=admitted.started, body=admitted.body, user_agent=request.headers.get("user-agent"),
                route=endpoint.path, usage_of=endpoint.usage_of, model=model, stream=stream, number=number,
                weight=len(admitted.raw) if number == 1 else 0,  # a fallback's attempt holds the same body
            )  # fmt: skip
            more = number < len(chain)
            try:
                reply = await _answer(request, flow, endpoint, admitted, model, stream, changed)
            except ApiError as exc:
                attempt.record_once(status=exc.status, error=exc.code)
                if more and exc.status in RETRIED_STATUSES:
                    continue
                raise
            except asyncio.CancelledError:
                return _ended_early(attempt, watch)
            except Exception:  # a bug: the request may have been forwarded, so it is recorded before the 500
                attempt.record_once(status=500, error="internal_error")
                raise
            if more and reply.status in RETRIED_STATUSES:
                await reply.close()
                attempt.record_once(status=reply.status)
                continue
            response = await _respond(flow, endpoint, model, attempt, reply, stream, client_wants_usage, watch)
            handed_over = isinstance(response, RelayResponse)
            return response
        raise AssertionError("unreachable: the last attempt returns or raises")  # pragma: no cover
    finally:
        if not handed_over:
            watch.stop()


async def _answer(request: Request, flow: ProxyFlow, endpoint: Endpoint, admitted: Admitted, model: ModelSettings, stream: bool, changed: bool) -> ProviderReply:
    """The provider's reply, status and headers in (a non-streamed answer has `max_response_seconds` in all;
    a stream's status and headers `max_stream_seconds`: a provider sending its headers a byte at a time,
    each within the read timeout, held a stream's request for as long as it went on)."""
    limit, setting = (model.max_stream_seconds, "max_stream_seconds") if stream else (model.max_response_seconds, "max_response_seconds")
    try:
        async with asyncio.timeout(limit):
            return await _send(request, flow, endpoint, admitted, model, stream, changed)
    except TimeoutError:
        raise UpstreamTimeout(f"The provider of '{model.name}' did not answer within {limit:.0f} s ({setting}).") from None


async def _send(request: Request, flow: ProxyFlow, endpoint: Endpoint, admitted: Admitted, model: ModelSettings, stream: bool, changed: bool) -> ProviderReply:
    body = admitted.body
    if model.provider != endpoint.native_provider:
        assert endpoint.translate is not None
        return await endpoint.translate(flow.translation, model, body, stream)
    body["model"] = model.target_model
    if changed or model.target_model != admitted.client_model:
        content = await encode_body(body, len(admitted.raw))
    else:
        content = admitted.raw
    api_key = model.api_key.get_secret_value() if model.api_key else None
    headers = upstream_headers(request.headers, api_key, endpoint.auth_header, endpoint.default_headers)
    query = request.url.query
    url = model.base_url + endpoint.upstream_path + (f"?{query}" if query else "")
    return await flow.provider.send(ProviderRequest(model, url, headers, content, stream))


async def encode_body(body: dict, size: int) -> bytes:
    """JSON for the provider; a large body is encoded in a worker thread, off the event loop."""
    if size > DECODE_IN_THREAD_BYTES:
        return await anyio.to_thread.run_sync(orjson.dumps, body)
    return orjson.dumps(body)


def _ended_early(attempt: Attempt, watch: ClientWatch) -> Response:
    """The client hung up, or the server is shutting down, before the provider answered."""
    why = watch.ended_by()
    if why == CLIENT_DISCONNECTED:
        attempt.record_once(status=ClientGone.default_status, error=CLIENT_DISCONNECTED)
        return Response(status_code=ClientGone.default_status)  # nobody reads it
    attempt.record_once(status=ServiceUnavailable.default_status, error=SHUTDOWN)
    raise ServiceUnavailable(SHUTTING_DOWN)


async def _respond(
    flow: ProxyFlow, endpoint: Endpoint, model: ModelSettings, attempt: Attempt, reply: ProviderReply, stream: bool,
    client_wants_usage: bool, watch: ClientWatch,
) -> Response:  # fmt: skip
    exchange, capture = attempt.exchange, Capture()
    if stream and reply.is_event_stream:
        exchange.answered = True
        exchange.observe = partial(endpoint.observe_stream, capture)

        def on_done(error: str | None, first_byte: float | None) -> None:
            attempt.record_once(status=reply.status, error=error, first_byte=first_byte)

        return RelayResponse(
            reply, capture=capture, watch=watch, on_done=on_done, error_event=endpoint.error_event,
            max_seconds=model.max_stream_seconds, meter=attempt.meter if reply.status < 400 else None,
            events=SseSplitter(keep_usage_only=client_wants_usage),
        )  # fmt: skip
    return await _respond_body(flow, endpoint, model, attempt, reply, capture, watch)


async def _respond_body(
    flow: ProxyFlow, endpoint: Endpoint, model: ModelSettings, attempt: Attempt, reply: ProviderReply, capture: Capture, watch: ClientWatch
) -> Response:
    """A non-streamed answer: kept whole when it is small enough, else relayed as it arrives."""
    exchange = attempt.exchange
    exchange.answered = reply.status < 400
    exchange.observe = partial(endpoint.observe_body, capture) if exchange.answered else exchange.observe
    limit = flow.settings.limits.max_buffered_response_bytes
    deadline = attempt.started + model.max_response_seconds
    parts: list[bytes] = []
    first_byte: float | None = None
    try:
        async with asyncio.timeout(max(0.0, deadline - time.perf_counter())):
            async for chunk in reply.chunks:
                first_byte = first_byte or time.perf_counter()
                capture.add(chunk)
                parts.append(chunk)
                if capture.total > limit:
                    break
    except (ApiError, TimeoutError) as exc:
        await reply.close()
        error = exc if isinstance(exc, ApiError) else UpstreamTimeout(
            f"The provider of '{model.name}' did not finish its answer within {model.max_response_seconds:.0f} s (max_response_seconds).")
        attempt.record_once(status=error.status, error=error.code, first_byte=first_byte)
        raise error from None
    except asyncio.CancelledError:
        await reply.close()
        return _ended_early(attempt, watch)
    if exchange.answered:
        attempt.meter.saw(capture.recent())
    if capture.total > limit:  # too large to keep: the rest is relayed as it arrives, only its ends kept
        return RelayResponse(
            reply, capture=capture, watch=watch, prefix=b"".join(parts), first_byte=first_byte, error_event=endpoint.error_event,
            max_seconds=max(0.0, deadline - time.perf_counter()), meter=attempt.meter if exchange.answered else None,
            on_done=lambda error, _: attempt.record_once(status=reply.status, error=error, first_byte=first_byte),
        )  # fmt: skip
    await reply.close()
    attempt.record_once(status=reply.status, first_byte=first_byte)
    return BodyResponse(reply.status, reply.headers, b"".join(parts))  # type: ignore[return-value]
