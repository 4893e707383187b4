"""What a provider stores, read back by id: `GET`/`DELETE /v1/responses/{id}`, `POST .../cancel`,
`GET .../input_items`.

These generate nothing, so they need the key but no work item. Each goes to the model whose provider
created the response (`ResponseOrigins`), and only for the person who created it: anyone else is
told it does not exist, as the provider would say of another account's response.

A background response (`background: true`) is answered before it is generated, and its usage comes
only when it is read back finished. Its create is recorded as `deferred` (no tokens); the first read
that shows it finished (`GET`, `GET ?stream=true` to its `response.completed`, or `cancel` of a
finished one; a cancelled response only with its usage) records it on the create's work item, at the
create's time and under an id derived from the response id: however many reads and replicas see it,
the event is written once (id and time are the events table's key). A read cut short before the end
bills nothing; the next one that sees it does, and a `DELETE` reads it once before deleting it.
A response cancelled while generating shows no usage (the provider does not say what it made), so it
stays deferred; if the generation won the race and a later read shows it completed, that read bills it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import orjson
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import Request
from starlette.responses import Response

from taskproxy import privacy
from taskproxy.error_shapes import ApiFormat, error_event
from taskproxy.errors import ApiError, NotFound, ServiceUnavailable, UpstreamTimeout
from taskproxy.guard.auth import KeyStore
from taskproxy.guard.body import DECODE_IN_THREAD_BYTES, decode_json_object, read_body
from taskproxy.guard.lookups import LookupTimeout
from taskproxy.guard.ratelimit import RateLimiter
from taskproxy.metering.attempts import Attempts, Caller
from taskproxy.routes.common import MAX_API_BODY, ApiRoute
from taskproxy.settings import ModelSettings, Settings
from taskproxy.storage.failures import RETRY_SECONDS
from taskproxy.guard.response_origins import Origin, ResponseOrigins
from taskproxy.jsonbytes import last_usage_object
from taskproxy.metering.observed import Observed
from taskproxy.upstream import observe
from taskproxy.upstream.observe import openai_usage
from taskproxy.upstream.capture import Capture
from taskproxy.upstream.provider import ProviderClient, ProviderReply, ProviderRequest, upstream_headers
from taskproxy.upstream.relay import BodyResponse, ClientWatch, RelayResponse

PRE_READ_SECONDS = 30.0  # the read before a background response's delete
log = logging.getLogger("taskproxy.stored")
DEFERRED_USAGE = uuid.UUID("6f1e2c0a-4d7b-4f3e-9a51-2b8c7d0e9f13")  # namespace of the ids of deferred usage events


@dataclass(frozen=True)
class StoredResponses:
    settings: Settings  # the models, and how much of an answer is kept whole
    keys: KeyStore
    rate_limiter: RateLimiter
    origins: ResponseOrigins
    provider: ProviderClient
    attempts: Attempts  # records a background response's usage


def deferred_event_id(response_id: str) -> str:
    return uuid.uuid5(DEFERRED_USAGE, response_id).hex


async def _origin(request: Request, stored: StoredResponses) -> tuple[Origin, ModelSettings]:
    principal = await stored.keys.authenticate(request.headers)
    await stored.rate_limiter.check(principal.key_id)
    response_id = request.path_params["response_id"]
    try:
        origin = await stored.origins.find(response_id)
    except (SQLAlchemyError, LookupTimeout):
        raise ServiceUnavailable("The response could not be looked up: the database does not answer. Try again shortly.",
                                 retry_after=RETRY_SECONDS) from None  # fmt: skip
    if origin is None or not privacy.same_person(origin.owner, principal.owner):
        raise NotFound(f"No response with id '{response_id[:200]}' was created through this proxy by you. A response is read back "
                       "through the proxy that created it, with a key of the person who created it.", param="response_id")  # fmt: skip
    model = stored.settings.model(origin.model)
    if model is None:
        raise NotFound(f"The response '{response_id}' was created by the model '{origin.model}', which is no longer configured.", param="response_id")
    return origin, model


def _handler(method: str, suffix: str = ""):  # type: ignore[no-untyped-def]
    async def handler(request: Request) -> Response:
        stored: StoredResponses = request.state.stored
        origin, model = await _origin(request, stored)
        content = await read_body(request, MAX_API_BODY, "the 1 MiB limit of a stored response's routes") if method == "POST" else b""
        api_key = model.api_key.get_secret_value() if model.api_key else None
        query = request.url.query
        url = f"{model.base_url}/responses/{origin.response_id}{suffix}" + (f"?{query}" if query else "")
        headers = upstream_headers(request.headers, api_key)
        if method == "DELETE" and origin.deferred:
            try:  # at most PRE_READ_SECONDS, and never in the delete's way: a provider that fails it still gets the delete
                async with asyncio.timeout(min(PRE_READ_SECONDS, model.max_response_seconds)):
                    await _bill_before_delete(request, stored, origin, model, headers)
            except (ApiError, TimeoutError) as exc:
                log.warning("a background response (%s) could not be read before its delete, and stays unbilled: %s", origin.response_id[:200], exc)
        reply = await stored.provider.send(ProviderRequest(model, url, headers, content, stream=False, method=method))
        billable = origin.deferred and reply.status == 200 and suffix != "/input_items"
        if reply.is_event_stream:  # GET ?stream=true: relayed as it comes, billed if it reaches the end
            return _relayed(request, stored, origin, model, reply, billable, observe.responses_stream, model.max_stream_seconds, _usage_in_tail)
        limit, parts, size = stored.settings.limits.max_buffered_response_bytes, [], 0
        try:  # within max_response_seconds, as a model route's buffered answer: a provider a byte a second holds no one
            async with asyncio.timeout(model.max_response_seconds):
                async for chunk in reply.chunks:
                    parts.append(chunk)
                    size += len(chunk)
                    if size > limit:  # too large to keep: the rest is relayed as it arrives, billed from its ends
                        return _relayed(request, stored, origin, model, reply, billable, observe.responses_body, model.max_response_seconds,
                                        _body_settles, prefix=b"".join(parts))  # fmt: skip
        except TimeoutError:
            await reply.close()
            raise UpstreamTimeout(f"The provider of '{model.name}' did not finish its answer within {model.max_response_seconds:.0f} s "
                                  "(max_response_seconds).") from None  # fmt: skip
        await reply.close()
        body = b"".join(parts)
        if billable and _settles(await _decoded(stored, body)):
            capture = Capture()
            capture.add(body)
            _bill(request, stored, origin, model, partial(observe.responses_body, capture))
        return BodyResponse(reply.status, reply.headers, body)  # type: ignore[return-value]

    handler.__name__ = handler.__qualname__ = f"stored_response_{method.lower()}{suffix.replace('/', '_')}"
    return handler


async def _bill_before_delete(request: Request, stored: StoredResponses, origin: Origin, model: ModelSettings, headers: dict[str, str]) -> None:
    """A background response about to be deleted is read once first, and billed if it is finished: once
    deleted, no read can bill it (a read cut short, then a delete, left its generation unbilled for good)."""
    reply = await stored.provider.send(ProviderRequest(model, f"{model.base_url}/responses/{origin.response_id}", headers, b"", stream=False, method="GET"))
    limit, parts, capture = stored.settings.limits.max_buffered_response_bytes, [], Capture()
    try:
        if reply.status != 200 or reply.is_event_stream:
            return
        async for chunk in reply.chunks:
            capture.add(chunk)  # its ends, whatever its size
            if capture.total <= limit:
                parts.append(chunk)  # and the whole of a body small enough to read
    finally:
        await reply.close()
    whole = capture.total <= limit
    if _settles(await _decoded(stored, b"".join(parts))) if whole else _body_settles(capture):
        _bill(request, stored, origin, model, partial(observe.responses_body, capture))


def _error_event(error: ApiError) -> bytes:
    return error_event(error, ApiFormat.OPENAI)


def _relayed(
    request: Request, stored: StoredResponses, origin: Origin, model: ModelSettings, reply: ProviderReply, billable: bool,
    observed: Callable[[Capture], Observed], max_seconds: float, settles: Callable[[Capture], bool], prefix: bytes = b"",
) -> Response:  # fmt: skip
    """Relay a read as it arrives. A background response's usage is recorded when what passed ends with
    it (the stream's `response.completed`, or the body's `usage` once it is no longer generating): a
    read cut short bills nothing, and the next read that sees the end does."""
    capture = Capture()
    capture.add(prefix)

    def on_done(error: str | None, first_byte: float | None) -> None:
        if billable and settles(capture):
            _bill(request, stored, origin, model, partial(observed, capture))

    return RelayResponse(reply, capture=capture, watch=ClientWatch(request.receive), on_done=on_done, error_event=_error_event,
                         max_seconds=max_seconds, prefix=prefix)  # type: ignore[return-value]  # fmt: skip


async def _decoded(stored: StoredResponses, body: bytes) -> object:
    return await decode_json_object(body, stored.settings.limits.max_json_nodes) if len(body) > DECODE_IN_THREAD_BYTES else _loads(body)


def _usage_in_tail(capture: Capture) -> bool:
    return openai_usage(last_usage_object(capture.recent())) is not None


def _body_settles(capture: Capture) -> bool:
    """`_settles` for a body too large to keep whole, from its ends: its usage, and a head that does
    not say it is still generating. (A finished body without usage is not billed this way: its
    output, which an estimate would count, was not kept.)"""
    return _usage_in_tail(capture) and not observe.still_generating(capture)


def _settles(decoded: object) -> bool:
    """Whether a buffered read settles the response's usage: never while it is queued or generating
    (a zero usage object then is not its usage); a final status bills (with an estimate if the
    provider sent no usage); a cancelled one only with its usage, since a cancel can lose the race
    with the generation and a later read show it completed."""
    if not isinstance(decoded, dict):
        return False
    status = decoded.get("status")
    if status in observe.FINISHED:
        return True
    return status == "cancelled" and openai_usage(decoded.get("usage")) is not None


def _bill(request: Request, stored: StoredResponses, origin: Origin, model: ModelSettings, observed: Callable[[], Observed]) -> None:
    """Record a finished background response's usage on the work item it was created for, at its
    create's time and under an id made from its own: written once, however many reads see it."""
    caller = Caller(origin.key_id, origin.owner, origin.team, origin.work_item, origin.attribution_source)
    attempt = stored.attempts.begin(
        caller, ts=origin.ts, started=time.perf_counter(), body={}, user_agent=request.headers.get("user-agent"), route="/v1/responses",
        usage_of=observe.openai_usage, model=model, stream=False, number=1,
    )  # fmt: skip
    attempt.exchange.id = deferred_event_id(origin.response_id)
    attempt.exchange.answered = True
    attempt.exchange.observe = observed
    attempt.record_once(status=200)


def _loads(body: bytes) -> object:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


routes = [
    ApiRoute("/v1/responses/{response_id}", _handler("GET"), methods=["GET"]),
    ApiRoute("/v1/responses/{response_id}", _handler("DELETE"), methods=["DELETE"]),
    ApiRoute("/v1/responses/{response_id}/cancel", _handler("POST", "/cancel"), methods=["POST"]),
    ApiRoute("/v1/responses/{response_id}/input_items", _handler("GET", "/input_items"), methods=["GET"]),
]
