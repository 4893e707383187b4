"""OpenAI-compatible routes: chat completions, completions, embeddings, models.

The body goes upstream unchanged except for three things: the model name (configured
`upstream_model`), the work item in `metadata` (removed), and `stream_options.include_usage`
(always on for streams, so usage is known; the extra usage chunk is withheld from a client that
did not ask for it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial

import httpx
import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from taskproxy.errors import ApiError
from taskproxy.guard.attribution import strip_work_item
from taskproxy.metering.usage import Exchange
from taskproxy.routes.pipeline import Admitted, admit, check_types, finish, new_exchange
from taskproxy.services import Services, services
from taskproxy.upstream.passthrough import client_headers, upstream_headers
from taskproxy.upstream.relay import RelayResponse
from taskproxy.upstream.sse import SseSplitter, is_usage_only_chunk, openai_body_observation, openai_stream_observation

_COMMON_TYPES: dict[str, tuple[type, ...]] = {"stream": (bool,), "stream_options": (dict,), "metadata": (dict,)}


@dataclass(frozen=True)
class Endpoint:
    path: str
    upstream_path: str
    required: tuple[str, ...]
    types: dict[str, tuple[type, ...]] = field(default_factory=dict)
    streams: bool = True

    def validate(self, body: dict) -> None:
        check_types(body, {"model": (str,), **_COMMON_TYPES, **self.types}, ("model", *self.required))


CHAT = Endpoint("/v1/chat/completions", "/chat/completions", ("messages",), {"messages": (list,), "tools": (list,)})
COMPLETIONS = Endpoint("/v1/completions", "/completions", ("prompt",), {"prompt": (str, list)})
EMBEDDINGS = Endpoint("/v1/embeddings", "/embeddings", ("input",), {"input": (str, list)}, streams=False)


def rewrite_for_upstream(admitted: Admitted, *, streams: bool) -> tuple[bytes, bool, bool]:
    """The body to send, whether it streams, and whether the client itself asked for stream usage."""
    body = admitted.body
    changed = strip_work_item(body)
    if body["model"] != admitted.model.target_model:
        body["model"] = admitted.model.target_model
        changed = True
    stream = streams and body.get("stream") is True
    client_wants_usage = False
    if stream:
        options = body.get("stream_options") or {}
        client_wants_usage = options.get("include_usage") is True
        if not client_wants_usage:
            body["stream_options"] = {**options, "include_usage": True}
            changed = True
    return (orjson.dumps(body) if changed else admitted.raw), stream, client_wants_usage


async def _proxy(request: Request, endpoint: Endpoint) -> Response:
    svc = services(request)
    admitted = await admit(request, svc, endpoint.path, endpoint.validate)
    content, stream, client_wants_usage = rewrite_for_upstream(admitted, streams=endpoint.streams)
    model = admitted.model
    exchange = new_exchange(request, svc, admitted, endpoint.path, stream=stream)
    headers = upstream_headers(request.headers, model.api_key.get_secret_value() if model.api_key else None)
    try:
        upstream = await svc.upstream.send(model, endpoint.upstream_path, content, headers)
    except ApiError as exc:
        finish(svc, exchange, admitted.started, status=exc.status, error=exc.code)
        raise
    streaming = stream and upstream.status_code == 200 and "text/event-stream" in upstream.headers.get("content-type", "")
    if streaming:
        return _relay_stream(svc, admitted, exchange, upstream, client_wants_usage)
    first_byte = time.perf_counter()  # the response headers are in
    try:
        data = await svc.upstream.read(model, upstream)
    except ApiError as exc:
        finish(svc, exchange, admitted.started, status=exc.status, error=exc.code)
        raise
    finally:
        await upstream.aclose()
    if upstream.status_code < 400:
        exchange.observe = partial(openai_stream_observation if stream else openai_body_observation, [data] if stream else data)
    finish(svc, exchange, admitted.started, status=upstream.status_code, first_byte=first_byte)
    return Response(data, status_code=upstream.status_code, headers=client_headers(upstream))


def _relay_stream(
    svc: Services, admitted: Admitted, exchange: Exchange, upstream: httpx.Response, client_wants_usage: bool
) -> RelayResponse:
    chunks: list[bytes] = []
    splitter = None if client_wants_usage else SseSplitter()

    def on_chunk(chunk: bytes) -> bytes:
        chunks.append(chunk)
        if splitter is None:
            return chunk
        return b"".join(event for event in splitter.feed(chunk) if not is_usage_only_chunk(event))

    def on_done(error: str | None, first_byte: float | None) -> None:
        finish(svc, exchange, admitted.started, status=upstream.status_code, error=error, first_byte=first_byte)

    exchange.observe = partial(openai_stream_observation, chunks)
    return RelayResponse(
        upstream,
        provider=admitted.model.name,
        headers=client_headers(upstream),
        on_chunk=on_chunk,
        on_done=on_done,
        finish=splitter.rest if splitter else None,
    )


async def chat_completions(request: Request) -> Response:
    return await _proxy(request, CHAT)


async def completions(request: Request) -> Response:
    return await _proxy(request, COMPLETIONS)


async def embeddings(request: Request) -> Response:
    return await _proxy(request, EMBEDDINGS)


async def list_models(request: Request) -> Response:
    svc = services(request)
    await svc.keys.authenticate(request.headers)
    data = [{"id": m.name, "object": "model", "created": 0, "owned_by": m.provider} for m in svc.settings.models]
    return JSONResponse({"object": "list", "data": data})


routes = [
    Route(CHAT.path, chat_completions, methods=["POST"]),
    Route(COMPLETIONS.path, completions, methods=["POST"]),
    Route(EMBEDDINGS.path, embeddings, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
]
