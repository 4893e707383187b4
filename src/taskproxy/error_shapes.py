"""The one place an error becomes what a client reads: a route's JSON error body, or the event that
ends a stream, in the shape of the API the route speaks. Each proxy `Endpoint` declares its API, and
its routes carry it (`api_format` on the route); every other route speaks OpenAI's shape, as the
admin API does."""

from __future__ import annotations

from enum import Enum
from http import HTTPStatus

import orjson
from collections.abc import Iterable

from starlette.responses import Response
from starlette.routing import BaseRoute, Match
from starlette.types import Scope

from taskproxy.errors import ApiError, MethodNotAllowed, RateLimited, ServiceUnavailable


class ApiFormat(Enum):
    OPENAI = "openai"  # {"error": {"message", "type", "param", "code"}}; streams: `data: {"error": ...}`
    ANTHROPIC = "anthropic"  # {"type": "error", "error": {"type", "message"}}; streams: `event: error`


def error_body(error: ApiError, api: ApiFormat) -> dict:
    if api is ApiFormat.ANTHROPIC:
        return {"type": "error", "error": {"type": error.anthropic_type, "message": error.message}}
    return {"error": {"message": error.message, "type": error.openai_type, "param": error.param, "code": error.code}}


def error_headers(error: ApiError) -> dict[str, str]:
    """The headers that go with `error`'s status."""
    if error.status == 401:
        return {"www-authenticate": "Bearer"}
    if isinstance(error, RateLimited | ServiceUnavailable) and error.retry_after is not None:
        return {"retry-after": str(error.retry_after)}
    if isinstance(error, MethodNotAllowed):
        return {"allow": error.allow}
    return {}


def error_response(error: ApiError, api: ApiFormat = ApiFormat.OPENAI) -> Response:
    return Response(orjson.dumps(error_body(error, api)), status_code=error.status, media_type="application/json", headers=error_headers(error))


def raw_error_response(error: ApiError, api: ApiFormat, server_headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """`error` as the bytes of a whole HTTP/1.1 response that closes its connection, for the server to
    write where no app answers (connections.py): the same body and headers as `error_response`."""
    body = orjson.dumps(error_body(error, api))
    lines = [b"HTTP/1.1 %d %s" % (error.status, HTTPStatus(error.status).phrase.encode()), *(name + b": " + value for name, value in server_headers),
             *(f"{name}: {value}".encode("latin-1") for name, value in error_headers(error).items()),
             b"content-type: application/json", b"content-length: %d" % len(body), b"connection: close"]  # fmt: skip
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def error_event(error: ApiError, api: ApiFormat) -> bytes:
    """The server-sent event that ends a stream with `error`, as the SDKs of `api` raise it."""
    data = orjson.dumps(error_body(error, api))
    return (b"event: error\ndata: " if api is ApiFormat.ANTHROPIC else b"data: ") + data + b"\n\n"


def socket_error(error: ApiError) -> bytes:
    """The Responses WebSocket's error message: OpenAI's error object with the HTTP status it stands for
    (what Codex and the openai SDK read on the socket)."""
    return orjson.dumps({"type": "error", "status": error.status, **error_body(error, ApiFormat.OPENAI)})


def api_format_of(scope: Scope) -> ApiFormat:
    """The format the route that took the request declared, else OpenAI's."""
    return getattr(scope.get("route"), "api_format", ApiFormat.OPENAI)


def api_format_before_routing(scope: Scope, routes: Iterable[BaseRoute]) -> ApiFormat:
    """For an error found before the router ran (headers too large): the route the request was for."""
    for route in routes:
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            return getattr(route, "api_format", ApiFormat.OPENAI)
    return ApiFormat.OPENAI
