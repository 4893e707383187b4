"""Helpers shared by the JSON API routes: reading JSON, query parameters, and rendering records."""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Awaitable
from datetime import datetime
from typing import Any, TypeVar

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from taskproxy.error_shapes import ApiFormat

from taskproxy.errors import ClientGone, InvalidRequest, ServiceUnavailable
from taskproxy.guard.body import read_body
from taskproxy.guard.auth import Principal
from taskproxy.timeutil import EARLIEST, LATEST, parse_time
from taskproxy.upstream.relay import CLIENT_DISCONNECTED, ClientWatch

MAX_API_BODY = 1024 * 1024
T = TypeVar("T")


class ApiRoute(Route):
    """A route and the API whose shape its errors take (error_shapes.py)."""

    def __init__(self, path: str, endpoint: Any, *, methods: list[str] | None = None, api_format: ApiFormat = ApiFormat.OPENAI) -> None:
        super().__init__(path, endpoint, methods=methods)
        self.api_format = api_format


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def parse_json_object(raw: bytes, what: str = "The request body") -> dict[str, Any]:
    """`raw` as a JSON object, or InvalidRequest saying what it is instead."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest(f"{what} is not valid JSON.") from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"{what} must be a JSON object.")
    return value


async def json_object(request: Request) -> dict[str, Any]:
    """An admin route's body: a JSON object of at most 1 MiB."""
    return parse_json_object(await read_body(request, MAX_API_BODY, "the admin API's limit"))


def time_param(request: Request, name: str) -> Any:
    value = request.query_params.get(name)
    if not value:
        return None
    try:
        return parse_time(value)
    except ValueError:
        raise InvalidRequest(f"'{name}' must be an ISO 8601 time (2026-11-01T00:00:00Z) or a period such as 7d, "
                             f"from {EARLIEST.year} to {LATEST.year - 1}.", param=name) from None  # fmt: skip


def open_period(request: Request) -> tuple[Any, Any]:
    """`since` and `until` from the query, either or both left open (None); when both are given, since
    before until, as a report's period is (an empty answer to a period that ends before it begins
    looked like a quiet one)."""
    since, until = time_param(request, "since"), time_param(request, "until")
    if since is not None and until is not None and since >= until:
        raise InvalidRequest("'since' must be before 'until'.", param="since")
    return since, until


def int_param(request: Request, name: str, default: int, maximum: int) -> int:
    value = request.query_params.get(name)
    if value is None:
        return default
    # Its length first: int() refuses more than 4,300 digits with a ValueError (a 500, before).
    if not (value.isascii() and value.isdigit()) or len(value) > len(str(maximum)) or not 1 <= int(value) <= maximum:
        raise InvalidRequest(f"'{name}' must be a whole number from 1 to {maximum}.", param=name)
    return int(value)


# -- pages: a list read newest first, a page at a time ---------------------------------------------
# A page's last row is named by its (time, id): the next page is the rows after it in that order, read
# by index however deep (an offset would read and skip every row before). The cursor is opaque to
# clients; they follow the `Link: <...>; rel="next"` header (RFC 8288) a full page carries.


def after_param(request: Request) -> tuple[datetime, str] | None:
    """The `after` cursor of the query: the (time, id) of the last row of the page before."""
    value = request.query_params.get("after")
    if not value:
        return None
    try:
        moment, _, row_id = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode().partition("|")
        found = datetime.fromisoformat(moment)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        found, row_id = None, ""
    # A row id of ours is printable: a control character (NUL, which PostgreSQL refuses) was never one.
    if found is None or found.tzinfo is not None or not row_id or not row_id.isprintable() or len(value) > 1024:
        raise InvalidRequest("'after' must be the cursor of a page's Link header (rel=\"next\").", param="after") from None
    return found, row_id


def next_page(response: Response, request: Request, rows: list[Any], limit: int, last: tuple[datetime, str] | None) -> Response:
    """Add the next page's link when this page is full (a relative reference: right behind any proxy)."""
    if last is not None and len(rows) >= limit:
        # Every digit of the time: rows a microsecond apart must not fall between two pages.
        cursor = base64.urlsafe_b64encode(f"{last[0].isoformat()}|{last[1]}".encode()).decode().rstrip("=")
        url = request.url.include_query_params(after=cursor)
        response.headers["Link"] = f'<{url.path}?{url.query}>; rel="next"'
    return response


async def caller(request: Request) -> Principal:
    return await request.state.keys.authenticate(request.headers)  # type: ignore[no-any-return]


async def admin(request: Request) -> Principal:
    principal = await caller(request)
    principal.require_admin()
    return principal


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """`work`, given up if the client hangs up first (a report's process is stopped rather than left
    computing for nobody: the server would notice only when it sends the answer), or if the server
    stops before it is done: then the answer is a 503 in the route's shape, not the server's bare 500."""
    watch = ClientWatch(request.receive)
    try:
        return await work
    except asyncio.CancelledError:
        if watch.ended_by() == CLIENT_DISCONNECTED:
            raise ClientGone("The client hung up before the answer was ready.") from None
        raise ServiceUnavailable("The proxy is shutting down; the report was stopped. Ask again.") from None
    finally:
        watch.stop()
