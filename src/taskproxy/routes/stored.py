"""What a provider stores, read back by id: `GET`/`DELETE /v1/responses/{id}`, `POST .../cancel`,
`GET .../input_items`.

These generate nothing, so they need the key but no work item. Each goes to the model whose provider
created the response (`ResponseOrigins`), and only for the person who created it: anyone else is
told it does not exist, as the provider would say of another account's response. The provider's
answer, from sending to the end of its body, takes at most the model's `max_response_seconds` (an
event stream: `max_stream_seconds` from its headers on), and a client that hangs up before its answer
starts ends the provider's request at once.

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
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import Request
from starlette.responses import Response

from taskproxy import privacy
from taskproxy.error_shapes import ApiFormat, error_event
from taskproxy.errors import ApiError, NotFound, ServiceUnavailable, UpstreamTimeout
from taskproxy.guard.auth import KeyStore
from taskproxy.guard.body import read_body
from taskproxy.guard.lookups import LookupTimeout
from taskproxy.guard.ratelimit import RateLimiter
from taskproxy.metering.attempts import Attempts
from taskproxy.routes.common import MAX_API_BODY, ApiRoute, unless_client_leaves
from taskproxy.settings import ModelSettings, Settings
from taskproxy.storage.failures import RETRY_SECONDS
from taskproxy.guard.response_origins import Origin, ResponseOrigins
from taskproxy.metering.observed import Observed
from taskproxy import background
from taskproxy.upstream import observe
from taskproxy.upstream.capture import Capture
from taskproxy.upstream.provider import Header, ProviderClient, ProviderReply, ProviderRequest, upstream_headers
from taskproxy.upstream.relay import BodyResponse, ClientWatch, RelayResponse
from taskproxy.upstream.sse import SseSplitter

PRE_READ_SECONDS = 30.0  # the read before a background response's delete
log = logging.getLogger("taskproxy.stored")


@dataclass(frozen=True)
class StoredResponses:
    settings: Settings  # the models, and how much of an answer is kept whole
    keys: KeyStore
    rate_limiter: RateLimiter
    origins: ResponseOrigins
    provider: ProviderClient
    attempts: Attempts  # records a background response's usage


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


@dataclass(frozen=True)
class _Read:
    """What the provider answered, up to where the client's answer starts."""

    reply: ProviderReply
    body: bytes | None  # a body kept whole; None: the rest is relayed as it arrives (an event stream, or a body too large to keep)
    prefix: bytes = b""  # what was read of a body too large to keep
    seconds_left: float = 0.0  # of max_response_seconds, for the relay of a body too large to keep


def _handler(method: str, suffix: str = ""):  # type: ignore[no-untyped-def]
    async def handler(request: Request) -> Response:
        stored: StoredResponses = request.state.stored
        origin, model = await _origin(request, stored)
        content = await read_body(request, MAX_API_BODY, "the 1 MiB limit of a stored response's routes") if method == "POST" else b""
        api_key = model.api_key.get_secret_value() if model.api_key else None
        query = request.url.query
        url = f"{model.base_url}/responses/{origin.response_id}{suffix}" + (f"?{query}" if query else "")
        headers = upstream_headers(request.headers, api_key)
        forwarded = ProviderRequest(model, url, headers, content, stream=False, method=method)
        # Until the answer starts, a client that hangs up ends the provider's request at once (as a model route's).
        read = await unless_client_leaves(request, _exchange(request, stored, origin, model, forwarded, method == "DELETE" and origin.deferred))
        reply = read.reply
        billable = origin.deferred and reply.status == 200 and suffix != "/input_items"
        if reply.is_event_stream:  # GET ?stream=true: relayed as it comes, billed if it reaches the end
            return _relayed(request, stored, origin, model, reply, billable, observe.responses_stream, model.max_stream_seconds, background.usage_in_tail)
        if read.body is None:  # too large to keep: the rest is relayed as it arrives, billed from its ends
            return _relayed(request, stored, origin, model, reply, billable, observe.responses_body, read.seconds_left, background.body_settles,
                            prefix=read.prefix)  # fmt: skip
        if billable and await background.settles(read.body, stored.settings.limits.max_json_nodes):
            capture = Capture()
            capture.add(read.body)
            background.bill_body(stored.attempts, stored.origins, origin, model, capture, request.headers.get("user-agent"))
        return BodyResponse(reply.status, reply.headers, read.body)  # type: ignore[return-value]

    handler.__name__ = handler.__qualname__ = f"stored_response_{method.lower()}{suffix.replace('/', '_')}"
    return handler


async def _exchange(request: Request, stored: StoredResponses, origin: Origin, model: ModelSettings, forwarded: ProviderRequest,
                    read_first: bool) -> _Read:  # fmt: skip
    """The provider's answer, from sending the request to the end of a body kept whole, within
    max_response_seconds, as a model route's non-streamed answer: only the body was bounded, and a
    provider sending its status and headers a byte at a time, each within the read timeout, held the
    client as long as it went on. An event stream is relayed within max_stream_seconds, from its headers.
    A delete's read first has a time of its own, as long: cut any shorter, a finished response slow to
    come was deleted unbilled (a review found that of half the time)."""
    if read_first:
        try:  # never in the delete's way: a provider that fails it, or is slow to, still gets the delete
            async with asyncio.timeout(min(PRE_READ_SECONDS, model.max_response_seconds)):
                await _bill_before_delete(request, stored, origin, model, forwarded.headers)
        except (ApiError, TimeoutError) as exc:
            log.warning("a background response (%s) could not be read before its delete, and stays unbilled: %s", origin.response_id[:200], exc)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + model.max_response_seconds
    limit, parts, size = stored.settings.limits.max_buffered_response_bytes, [], 0
    reply: ProviderReply | None = None
    try:
        async with asyncio.timeout_at(deadline):
            reply = await stored.provider.send(forwarded)
            if reply.is_event_stream:
                return _Read(reply, None)
            async for chunk in reply.chunks:
                parts.append(chunk)
                size += len(chunk)
                if size > limit:
                    return _Read(reply, None, b"".join(parts), max(0.0, deadline - loop.time()))
    except BaseException as exc:  # timed out, failed, or the client gone: the provider's request ends here
        if reply is not None:
            await reply.close()
        if isinstance(exc, TimeoutError):
            what = "finish its answer" if reply is not None else "answer"
            raise UpstreamTimeout(f"The provider of '{model.name}' did not {what} within {model.max_response_seconds:.0f} s "
                                  "(max_response_seconds).") from None  # fmt: skip
        raise
    await reply.close()
    return _Read(reply, b"".join(parts))


async def _bill_before_delete(request: Request, stored: StoredResponses, origin: Origin, model: ModelSettings, headers: list[Header]) -> None:
    """A background response about to be deleted is read once first, and billed if it is finished: once
    deleted, no read can bill it (a read cut short, then a delete, left its generation unbilled for good)."""
    found = await background.read(stored.provider, model, origin.response_id, headers, stored.settings.limits)
    if found.finished is not None:
        background.bill_body(stored.attempts, stored.origins, origin, model, found.finished, request.headers.get("user-agent"))


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
            background.bill(stored.attempts, stored.origins, origin, model, partial(observed, capture), request.headers.get("user-agent"))

    return RelayResponse(reply, capture=capture, watch=ClientWatch(request.receive), on_done=on_done, error_event=_error_event,
                         max_seconds=max_seconds, prefix=prefix,
                         events=SseSplitter(keep_usage_only=True) if reply.is_event_stream else None)  # type: ignore[return-value]  # fmt: skip


routes = [
    ApiRoute("/v1/responses/{response_id}", _handler("GET"), methods=["GET"]),
    ApiRoute("/v1/responses/{response_id}", _handler("DELETE"), methods=["DELETE"]),
    ApiRoute("/v1/responses/{response_id}/cancel", _handler("POST", "/cancel"), methods=["POST"]),
    ApiRoute("/v1/responses/{response_id}/input_items", _handler("GET", "/input_items"), methods=["GET"]),
]
