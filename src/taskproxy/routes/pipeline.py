"""The flow every proxy route shares: admit, forward (with fallbacks), relay, record.

Admission runs in the order the contract fixes (docs/api.md): the key, the body size, the work item,
the body's JSON and field types, then the model and the budget. A refusal at any step is counted
(per key and reason) and nothing is sent upstream. Each attempt at a provider — the model, then its
fallbacks — is recorded exactly once, as one usage event (`_record_attempt`), however it ends:
answered, refused by the provider, failed, cut short by the client, or ended by a shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any

import anyio
import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from taskproxy.error_shapes import ApiFormat, error_event
from taskproxy.errors import ApiError, ClientGone, InvalidRequest, ModelNotFound, ServiceUnavailable, UpstreamTimeout
from taskproxy.guard.attribution import Attributed, strip_work_item
from taskproxy.guard.auth import Principal
from taskproxy.guard.body import DECODE_IN_THREAD_BYTES, Undecodable, declared_large, decode_json_object, read_body
from taskproxy.metering.meter import Meter
from taskproxy.metering.observed import ProviderUsage
from taskproxy.metering.usage import Exchange, Rejected
from taskproxy.routes.common import ApiRoute
from taskproxy.services import Services, services
from taskproxy.settings import ModelSettings
from taskproxy.timeutil import utcnow
from taskproxy.upstream.capture import Capture
from taskproxy.upstream.observe import Observer
from taskproxy.upstream.provider import ProviderReply, ProviderRequest, upstream_headers
from taskproxy.upstream.relay import CLIENT_DISCONNECTED, SHUTDOWN, SHUTTING_DOWN, BodyResponse, ClientWatch, RelayResponse
from taskproxy.upstream.sse import SseSplitter

log = logging.getLogger("taskproxy.proxy")

# Reaches a model whose provider does not speak the endpoint's API: (services, model, body, stream).
Translate = Callable[[Services, ModelSettings, dict, bool], Awaitable[ProviderReply]]

_JSON_NAMES = {str: "a string", list: "an array", dict: "an object", bool: "a boolean", int: "an integer", float: "a number"}
RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})
BACKPRESSURE_MAX_SECONDS = 1.0


@dataclass(frozen=True)
class Endpoint:
    """One proxied route and the API it speaks."""

    path: str
    upstream_path: str  # appended to the model's base_url when relaying
    native_provider: str  # the provider kind that takes the body as it is
    api: ApiFormat  # the shape of its errors and stream error events
    observe_body: Observer
    observe_stream: Observer
    usage_of: Callable[[Any], ProviderUsage | None]  # the provider's usage object, normalized
    required: tuple[str, ...] = ()
    types: dict[str, tuple[type, ...]] = field(default_factory=dict)
    streams: bool = True
    usage_chunk_opt_in: bool = False  # OpenAI's stream_options.include_usage
    auth_header: str = "authorization"
    default_headers: tuple[tuple[str, str], ...] = ()
    translate: Translate | None = None

    def validate(self, body: dict) -> None:
        """Refuse missing fields and fields of the wrong JSON type (the provider would, later and less clearly)."""
        for name in ("model", *self.required):
            if name not in body:
                raise InvalidRequest(f"'{name}' is required.", param=name)
        expected = {"model": (str,), "stream": (bool,), "metadata": (dict,), **self.types}
        for name, types in expected.items():
            if name in body and body[name] is not None and not isinstance(body[name], types):
                wanted = " or ".join(_JSON_NAMES.get(t, t.__name__) for t in types)
                raise InvalidRequest(f"'{name}' must be {wanted}.", param=name)

    def reaches(self, model: ModelSettings) -> bool:
        return model.provider == self.native_provider or self.translate is not None

    def error_event(self, error: ApiError) -> bytes:
        return error_event(error, self.api)

    def route(self, handler: Callable[[Request], Awaitable[Response]]) -> ApiRoute:
        return ApiRoute(self.path, handler, methods=["POST"], api_format=self.api)


@dataclass
class Admitted:
    principal: Principal
    attributed: Attributed
    body: dict
    raw: bytes  # the body as received, forwarded as is when nothing in it changes
    model: ModelSettings
    client_model: str  # the model name as the client sent it (in `raw`)
    ts: datetime
    started: float  # perf_counter at arrival


def _model_of(body: dict, svc: Services, endpoint: Endpoint) -> ModelSettings:
    name = body["model"]
    model = svc.settings.model(name)
    if model is None:
        known = ", ".join(m.name for m in svc.settings.models) or "none"
        raise ModelNotFound(f"The model '{name[:100]}' is not configured on this proxy. Configured models: {known}.", param="model")
    if not endpoint.reaches(model):
        raise InvalidRequest(
            f"The model '{name}' is served by the provider '{model.provider}', which {endpoint.path} cannot reach; "
            f"use a model whose provider is '{endpoint.native_provider}', or /v1/chat/completions.",
            param="model",
        )
    return model


async def _wait_for_the_writer(svc: Services) -> None:
    """Under overload the recording thread can fall behind the requests (it shares the GIL with the
    event loop). New requests then wait, briefly, so that it catches up: recording stays complete and
    memory bounded, at the cost of throughput. Bounded: a stuck writer never stops the proxy."""
    deadline = time.perf_counter() + BACKPRESSURE_MAX_SECONDS
    while svc.writer.backlogged and time.perf_counter() < deadline:
        await asyncio.sleep(0.005)


async def _read_and_decode(request: Request, svc: Services) -> tuple[bytes, dict | Undecodable]:
    limits = svc.settings.limits
    try:
        if declared_large(request):  # a few at a time: what large bodies cost in memory and CPU stays bounded
            async with svc.body_gate.large():
                raw = await read_body(request, limits.max_body_bytes)
                return raw, await decode_json_object(raw, limits.max_json_nodes)
        raw = await read_body(request, limits.max_body_bytes)
        return raw, await decode_json_object(raw, limits.max_json_nodes)
    except ClientDisconnect:
        raise ClientGone("The client hung up before its request body arrived.") from None


async def admit(request: Request, svc: Services, endpoint: Endpoint) -> Admitted:
    if svc.writer.backlogged:
        await _wait_for_the_writer(svc)
    started, ts = time.perf_counter(), utcnow()
    principal: Principal | None = None
    try:
        principal = await svc.keys.authenticate(request.headers)
        svc.rate_limiter.check(principal.key_id)
        if svc.writer.refusing:
            raise ServiceUnavailable("Usage cannot be recorded right now (the database and the local spool are both unavailable); "
                                     "the request was not forwarded. Try again shortly.")  # fmt: skip
        raw, body = await _read_and_decode(request, svc)
        attributed = svc.attribution.resolve(request.headers, body if isinstance(body, dict) else None, principal, ts)
        known = await svc.policy.check(attributed.work_item)
        if isinstance(body, Undecodable):
            raise InvalidRequest(body.reason)
        endpoint.validate(body)
        model = _model_of(body, svc, endpoint)
        svc.budgets.check(attributed.work_item, known, principal.team, ts)
        return Admitted(principal, attributed, body, raw, model, body["model"], ts, started)
    except ApiError as exc:
        key_id = principal.key_id if principal else None
        svc.writer.submit(Rejected(ts, key_id, exc.code, endpoint.path))
        log.info("refused %s for key %s: %s %s", endpoint.path, key_id or "-", exc.code, exc.message)
        raise


class OpenAttempts:
    """Attempts begun and not yet recorded. At shutdown the app waits for them (bounded) before it
    drains the writer, so an answer ended by the shutdown is recorded too."""

    def __init__(self) -> None:
        self.count = 0

    async def wait_until_recorded(self, timeout: float) -> int:
        """Wait for the open attempts; answers how many were still open when the time ran out."""
        deadline = time.monotonic() + timeout
        while self.count and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return self.count


@dataclass
class _Attempt:
    """One try at one model: its usage event and what it has counted against the budgets so far."""

    exchange: Exchange
    meter: Meter
    started: float

    def finish(self, svc: Services, *, status: int, error: str | None = None, first_byte: float | None = None) -> None:
        """Record the attempt: called exactly once, however it ended."""
        exchange = self.exchange
        exchange.status = status
        exchange.error = error
        exchange.latency_ms = (time.perf_counter() - self.started) * 1000
        exchange.ttfb_ms = (first_byte - self.started) * 1000 if first_byte is not None else None
        exchange.charged = (self.meter.tokens, self.meter.nanos)
        svc.writer.submit(exchange)
        svc.open_attempts.count -= 1


def _attempt(request: Request, svc: Services, endpoint: Endpoint, admitted: Admitted, model: ModelSettings, stream: bool, number: int) -> _Attempt:
    principal, item = admitted.principal, admitted.attributed
    register = None
    if svc.settings.work_items.mode == "open":
        register = {"id": item.work_item, "source": "auto", "status": "unverified", "created_at": admitted.ts}
    price = svc.prices.get(model.name)
    exchange = Exchange(
        id=uuid.uuid4().hex, ts=admitted.ts, key_id=principal.key_id, owner=principal.owner, team=principal.team,
        work_item=item.work_item, attribution_source=item.source, route=endpoint.path, model=model.name,
        upstream_model=model.target_model, provider=model.provider, stream=stream, body=admitted.body,
        user_agent=request.headers.get("user-agent"), counter=svc.counter, price=price, register_work_item=register,
        store_prompts=svc.settings.recording.store_prompts, attempt=number,
    )  # fmt: skip
    charge = partial(svc.budgets.charge, item.work_item, principal.team, admitted.ts)
    svc.open_attempts.count += 1
    return _Attempt(exchange, Meter(endpoint.usage_of, price, charge), admitted.started)


async def _send(request: Request, svc: Services, endpoint: Endpoint, admitted: Admitted, model: ModelSettings, stream: bool, changed: bool) -> ProviderReply:
    body = admitted.body
    if model.provider != endpoint.native_provider:
        assert endpoint.translate is not None
        return await endpoint.translate(svc, model, body, stream)
    body["model"] = model.target_model
    if changed or model.target_model != admitted.client_model:
        content = await _encode(body, len(admitted.raw))
    else:
        content = admitted.raw
    api_key = model.api_key.get_secret_value() if model.api_key else None
    headers = upstream_headers(request.headers, api_key, endpoint.auth_header, endpoint.default_headers)
    query = request.url.query
    url = model.base_url + endpoint.upstream_path + (f"?{query}" if query else "")
    return await svc.provider.send(ProviderRequest(model, url, headers, content, stream))


async def _encode(body: dict, size: int) -> bytes:
    """JSON for the provider; a large body is encoded in a worker thread, off the event loop."""
    if size > DECODE_IN_THREAD_BYTES:
        return await anyio.to_thread.run_sync(orjson.dumps, body)
    return orjson.dumps(body)


async def proxy(request: Request, endpoint: Endpoint) -> Response:
    svc = services(request)
    admitted = await admit(request, svc, endpoint)
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
    fallbacks = (svc.settings.model(name) for name in admitted.model.fallbacks)
    chain = [admitted.model, *(m for m in fallbacks if m is not None and endpoint.reaches(m))]
    watch = ClientWatch(request.receive)
    handed_over = False
    try:
        for number, model in enumerate(chain, start=1):
            attempt = _attempt(request, svc, endpoint, admitted, model, stream, number)
            more = number < len(chain)
            try:
                reply = await _answer(request, svc, endpoint, admitted, model, stream, changed)
            except ApiError as exc:
                attempt.finish(svc, status=exc.status, error=exc.code)
                if more and exc.status in RETRIED_STATUSES:
                    continue
                raise
            except asyncio.CancelledError:
                return _ended_early(svc, attempt, watch)
            except Exception:  # a bug: the request may have been forwarded, so it is recorded before the 500
                attempt.finish(svc, status=500, error="internal_error")
                raise
            if more and reply.status in RETRIED_STATUSES:
                await reply.close()
                attempt.finish(svc, status=reply.status)
                continue
            response = await _respond(svc, endpoint, model, attempt, reply, stream, client_wants_usage, watch)
            handed_over = isinstance(response, RelayResponse)
            return response
        raise AssertionError("unreachable: the last attempt returns or raises")  # pragma: no cover
    finally:
        if not handed_over:
            watch.stop()


async def _answer(request: Request, svc: Services, endpoint: Endpoint, admitted: Admitted, model: ModelSettings, stream: bool, changed: bool) -> ProviderReply:
    """The provider's reply, status and headers in (a non-streamed answer has `max_response_seconds` in all)."""
    if stream:
        return await _send(request, svc, endpoint, admitted, model, stream, changed)
    try:
        async with asyncio.timeout(model.max_response_seconds):
            return await _send(request, svc, endpoint, admitted, model, stream, changed)
    except TimeoutError:
        raise UpstreamTimeout(f"The provider of '{model.name}' did not answer within {model.max_response_seconds:.0f} s (max_response_seconds).") from None


def _ended_early(svc: Services, attempt: _Attempt, watch: ClientWatch) -> Response:
    """The client hung up, or the server is shutting down, before the provider answered."""
    why = watch.ended_by()
    if why == CLIENT_DISCONNECTED:
        attempt.finish(svc, status=ClientGone.default_status, error=CLIENT_DISCONNECTED)
        return Response(status_code=ClientGone.default_status)  # nobody reads it
    attempt.finish(svc, status=ServiceUnavailable.default_status, error=SHUTDOWN)
    raise ServiceUnavailable(SHUTTING_DOWN)


async def _respond(
    svc: Services, endpoint: Endpoint, model: ModelSettings, attempt: _Attempt, reply: ProviderReply, stream: bool,
    client_wants_usage: bool, watch: ClientWatch,
) -> Response:  # fmt: skip
    exchange, capture = attempt.exchange, Capture()
    if stream and reply.is_event_stream:
        exchange.answered = True
        exchange.observe = partial(endpoint.observe_stream, capture)
        splitter = None if client_wants_usage else SseSplitter()

        def on_done(error: str | None, first_byte: float | None) -> None:
            attempt.finish(svc, status=reply.status, error=error, first_byte=first_byte)

        return RelayResponse(
            reply, capture=capture, watch=watch, on_done=on_done, error_event=endpoint.error_event,
            max_seconds=model.max_stream_seconds, meter=attempt.meter if reply.status < 400 else None,
            transform=splitter.without_usage_only if splitter else None, finish=splitter.rest if splitter else None,
        )  # fmt: skip
    return await _respond_body(svc, endpoint, model, attempt, reply, capture, watch)


async def _respond_body(
    svc: Services, endpoint: Endpoint, model: ModelSettings, attempt: _Attempt, reply: ProviderReply, capture: Capture, watch: ClientWatch
) -> Response:
    """A non-streamed answer: kept whole when it is small enough, else relayed as it arrives."""
    exchange = attempt.exchange
    exchange.answered = reply.status < 400
    exchange.observe = partial(endpoint.observe_body, capture) if exchange.answered else exchange.observe
    limit = svc.settings.limits.max_buffered_response_bytes
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
        attempt.finish(svc, status=error.status, error=error.code, first_byte=first_byte)
        raise error from None
    except asyncio.CancelledError:
        await reply.close()
        return _ended_early(svc, attempt, watch)
    if exchange.answered:
        attempt.meter.saw(capture.recent())
    if capture.total > limit:  # too large to keep: the rest is relayed as it arrives, only its ends kept
        return RelayResponse(
            reply, capture=capture, watch=watch, prefix=b"".join(parts), first_byte=first_byte, error_event=endpoint.error_event,
            max_seconds=max(0.0, deadline - time.perf_counter()), meter=attempt.meter if exchange.answered else None,
            on_done=lambda error, _: attempt.finish(svc, status=reply.status, error=error, first_byte=first_byte),
        )  # fmt: skip
    await reply.close()
    attempt.finish(svc, status=reply.status, first_byte=first_byte)
    return BodyResponse(reply.status, reply.headers, b"".join(parts))  # type: ignore[return-value]
