"""The flow every proxy route shares: admit, forward (with fallbacks), relay, record.

Admission runs in the order the contract fixes (DESIGN §3): the key, the body size, the work item,
the body's JSON and field types, then the model. A refusal at any step is counted (per key and
reason) and nothing is sent upstream. Each attempt at a provider — the model, then its fallbacks —
is recorded as one usage event.
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

import anyio
import orjson
from starlette.requests import Request
from starlette.responses import Response

from taskproxy.errors import ApiError, InvalidRequest, ModelNotFound
from taskproxy.guard.attribution import Attributed, strip_work_item
from taskproxy.guard.auth import Principal
from taskproxy.guard.body import DECODE_IN_THREAD_BYTES, Undecodable, decode_json_object, read_body
from taskproxy.metering.usage import Exchange, Observed, Rejected
from taskproxy.services import Services, services
from taskproxy.settings import ModelSettings
from taskproxy.timeutil import utcnow
from taskproxy.upstream.passthrough import UpstreamReply, upstream_headers
from taskproxy.upstream.relay import RelayResponse, openai_error_event
from taskproxy.upstream.sse import SseSplitter

log = logging.getLogger("taskproxy.proxy")

# Reaches a model whose provider does not speak the endpoint's API: (services, model, body, stream).
Translate = Callable[[Services, ModelSettings, dict, bool], Awaitable[UpstreamReply]]

_JSON_NAMES = {str: "a string", list: "an array", dict: "an object", bool: "a boolean", int: "an integer", float: "a number"}
RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Endpoint:
    """One proxied route and the API format it speaks."""

    path: str
    upstream_path: str  # appended to the model's base_url when relaying
    native_provider: str  # the provider kind that takes the body as it is
    observe_body: Callable[[bytes], Observed]
    observe_stream: Callable[[list[bytes]], Observed]
    required: tuple[str, ...] = ()
    types: dict[str, tuple[type, ...]] = field(default_factory=dict)
    streams: bool = True
    usage_chunk_opt_in: bool = False  # OpenAI's stream_options.include_usage
    auth_header: str = "authorization"
    default_headers: tuple[tuple[str, str], ...] = ()
    error_event: Callable[[ApiError], bytes] = openai_error_event
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


BACKPRESSURE_MAX_SECONDS = 1.0


async def _wait_for_the_writer(svc: Services) -> None:
    """Under overload the recording thread can fall behind the requests (it shares the GIL with the
    event loop). New requests then wait, briefly, so that it catches up: recording stays complete and
    memory bounded, at the cost of throughput. Bounded: a stuck writer never stops the proxy."""
    deadline = time.perf_counter() + BACKPRESSURE_MAX_SECONDS
    while svc.writer.backlogged and time.perf_counter() < deadline:
        await asyncio.sleep(0.005)


async def admit(request: Request, svc: Services, endpoint: Endpoint) -> Admitted:
    if svc.writer.backlogged:
        await _wait_for_the_writer(svc)
    started, ts = time.perf_counter(), utcnow()
    principal: Principal | None = None
    try:
        principal = await svc.keys.authenticate(request.headers)
        svc.rate_limiter.check(principal.key_id)
        raw = await read_body(request, svc.settings.limits.max_body_bytes)
        body = await decode_json_object(raw)
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
        svc.writer.submit(Rejected(uuid.uuid4().hex, ts, key_id, exc.code, endpoint.path))
        log.info("refused %s for key %s: %s %s", endpoint.path, key_id or "-", exc.code, exc.message)
        raise


def _exchange(request: Request, svc: Services, admitted: Admitted, model: ModelSettings, route: str, stream: bool) -> Exchange:
    principal, item = admitted.principal, admitted.attributed
    register = None
    if svc.settings.work_items.mode == "open":
        register = {"id": item.work_item, "source": "auto", "status": "unverified", "created_at": admitted.ts}
    return Exchange(
        id=uuid.uuid4().hex,
        ts=admitted.ts,
        key_id=principal.key_id,
        owner=principal.owner,
        team=principal.team,
        work_item=item.work_item,
        attribution_source=item.source,
        route=route,
        model=model.name,
        upstream_model=model.target_model,
        provider=model.provider,
        stream=stream,
        body=admitted.body,
        user_agent=request.headers.get("user-agent"),
        counter=svc.counter,
        price=svc.prices.get(model.name),
        register_work_item=register,
        store_prompts=svc.settings.recording.store_prompts,
    )


def _finish(svc: Services, exchange: Exchange, started: float, *, status: int, error: str | None = None, first_byte: float | None = None) -> None:
    exchange.status = status
    exchange.error = error
    exchange.latency_ms = (time.perf_counter() - started) * 1000
    exchange.ttfb_ms = (first_byte - started) * 1000 if first_byte is not None else None
    svc.writer.submit(exchange)


async def _attempt(
    request: Request, svc: Services, endpoint: Endpoint, admitted: Admitted, model: ModelSettings, stream: bool, changed: bool
) -> UpstreamReply:
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
    return await svc.upstream.forward(model, endpoint.upstream_path, content, headers, stream=stream)


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
    for index, model in enumerate(chain):
        more = index + 1 < len(chain)
        exchange = _exchange(request, svc, admitted, model, endpoint.path, stream)
        exchange.attempt = index + 1
        try:
            reply = await _attempt(request, svc, endpoint, admitted, model, stream, changed)
        except ApiError as exc:
            _finish(svc, exchange, admitted.started, status=exc.status, error=exc.code)
            if more and exc.status in RETRIED_STATUSES:
                continue
            raise
        except Exception:  # a bug: the request may have been forwarded, so it is recorded before the 500
            _finish(svc, exchange, admitted.started, status=500, error="internal_error")
            raise
        if more and reply.status in RETRIED_STATUSES:  # never a stream: those are 200
            _finish(svc, exchange, admitted.started, status=reply.status)
            continue
        return _respond(svc, endpoint, admitted, exchange, reply, client_wants_usage, model)
    raise AssertionError("unreachable: the last attempt returns or raises")  # pragma: no cover


def _respond(
    svc: Services, endpoint: Endpoint, admitted: Admitted, exchange: Exchange, reply: UpstreamReply, client_wants_usage: bool,
    exchange_model: ModelSettings,
) -> Response:
    if not reply.streaming:
        if reply.status < 400:
            exchange.observe = partial(endpoint.observe_body, reply.body)
        _finish(svc, exchange, admitted.started, status=reply.status, first_byte=time.perf_counter())
        return Response(reply.body, status_code=reply.status, headers=reply.headers)

    chunks: list[bytes] = []
    splitter = None if client_wants_usage else SseSplitter()

    def on_chunk(chunk: bytes) -> bytes:
        chunks.append(chunk)
        return chunk if splitter is None else splitter.without_usage_only(chunk)

    def on_done(error: str | None, first_byte: float | None) -> None:
        _finish(svc, exchange, admitted.started, status=reply.status, error=error, first_byte=first_byte)

    exchange.observe = partial(endpoint.observe_stream, chunks)
    return RelayResponse(
        reply, on_chunk=on_chunk, on_done=on_done, finish=splitter.rest if splitter else None, error_event=endpoint.error_event,
        max_seconds=exchange_model.max_stream_seconds,
    )  # fmt: skip
