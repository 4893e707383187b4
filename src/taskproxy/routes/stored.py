"""What a provider stores, read back by id: `GET`/`DELETE /v1/responses/{id}`, `POST .../cancel`,
`GET .../input_items`.

These generate nothing, so they need the key but no work item. Each goes to the model whose provider
created the response (`ResponseOrigins`), and only for the person who created it: anyone else is
told it does not exist, as the provider would say of another account's response.

A background response (`background: true`) is answered before it is generated, and its usage comes
only when it is read back finished. Its create is recorded as `deferred` (no tokens); the first
non-streamed read that shows it finished (`GET` or `cancel`) records its usage on the create's work
item, at the create's time and under an id derived from the response id: however many reads and
replicas see it finished, the event is written once (id and time are the events table's key).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from functools import partial

import orjson
from starlette.requests import Request
from starlette.responses import Response

from taskproxy.error_shapes import ApiFormat
from taskproxy.errors import ApiError, NotFound
from taskproxy.guard.auth import KeyStore
from taskproxy.guard.body import DECODE_IN_THREAD_BYTES, decode_json_object, read_body
from taskproxy.guard.ratelimit import RateLimiter
from taskproxy.metering.attempts import Attempts, Caller
from taskproxy.routes.common import MAX_API_BODY, ApiRoute
from taskproxy.settings import ModelSettings, Settings
from taskproxy.storage.response_origins import Origin, ResponseOrigins
from taskproxy.upstream import observe
from taskproxy.upstream.capture import Capture
from taskproxy.upstream.provider import ProviderClient, ProviderRequest, upstream_headers
from taskproxy.upstream.relay import BodyResponse, ClientWatch, RelayResponse
from taskproxy.error_shapes import error_event

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
    origin = await stored.origins.find(response_id)
    if origin is None or origin.owner != principal.owner:
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
        reply = await stored.provider.send(ProviderRequest(model, url, headers, content, stream=False, method=method))
        if reply.is_event_stream:  # GET ?stream=true: relayed as it comes (usage is billed by a non-streamed read)
            return RelayResponse(reply, capture=Capture(), watch=ClientWatch(request.receive), on_done=lambda error, first_byte: None,
                                 error_event=_error_event, max_seconds=model.max_stream_seconds)  # type: ignore[return-value]  # fmt: skip
        limit, parts, size = stored.settings.limits.max_buffered_response_bytes, [], 0
        async for chunk in reply.chunks:
            parts.append(chunk)
            size += len(chunk)
            if size > limit:  # too large to keep: the rest is relayed as it arrives
                return RelayResponse(reply, capture=Capture(), watch=ClientWatch(request.receive), on_done=lambda error, first_byte: None,
                                     error_event=_error_event, max_seconds=model.max_response_seconds, prefix=b"".join(parts))  # type: ignore[return-value]  # fmt: skip
        await reply.close()
        body = b"".join(parts)
        if origin.deferred and reply.status == 200 and suffix != "/input_items":
            await _bill_when_finished(request, stored, origin, model, body)
        return BodyResponse(reply.status, reply.headers, body)  # type: ignore[return-value]

    handler.__name__ = handler.__qualname__ = f"stored_response_{method.lower()}{suffix.replace('/', '_')}"
    return handler


def _error_event(error: ApiError) -> bytes:
    return error_event(error, ApiFormat.OPENAI)


async def _bill_when_finished(request: Request, stored: StoredResponses, origin: Origin, model: ModelSettings, body: bytes) -> None:
    """Record a background response's usage once it is finished, on the work item it was created for."""
    decoded = await decode_json_object(body, stored.settings.limits.max_json_nodes) if len(body) > DECODE_IN_THREAD_BYTES else _loads(body)
    if not isinstance(decoded, dict) or decoded.get("status") not in observe.FINISHED:
        return
    caller = Caller(origin.key_id, origin.owner, origin.team, origin.work_item, origin.attribution_source)
    attempt = stored.attempts.begin(
        caller, ts=origin.ts, started=time.perf_counter(), body={}, user_agent=request.headers.get("user-agent"), route="/v1/responses",
        usage_of=observe.openai_usage, model=model, stream=False, number=1,
    )  # fmt: skip
    attempt.exchange.id = deferred_event_id(origin.response_id)
    attempt.exchange.answered = True
    capture = Capture()
    capture.add(body)
    attempt.exchange.observe = partial(observe.responses_body, capture)
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
