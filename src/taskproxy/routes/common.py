"""Helpers shared by the JSON API routes: reading JSON, query parameters, and rendering records."""

from __future__ import annotations

from typing import Any

import anyio
import orjson
from starlette.requests import Request
from starlette.responses import Response

from taskproxy.errors import InvalidRequest
from taskproxy.guard.auth import Principal
from taskproxy.services import services
from taskproxy.storage.models import ApiKey, UsageEvent, WorkItem
from taskproxy.timeutil import iso, parse_time

MAX_API_BODY = 1024 * 1024


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


async def json_object(request: Request) -> dict[str, Any]:
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_API_BODY:
            raise InvalidRequest("The request body is larger than 1 MiB.")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The request body is not valid JSON.") from None
    if not isinstance(value, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return value


def time_param(request: Request, name: str) -> Any:
    value = request.query_params.get(name)
    if not value:
        return None
    try:
        return parse_time(value)
    except ValueError:
        raise InvalidRequest(f"'{name}' must be an ISO 8601 time (2026-11-01T00:00:00Z) or a period such as 7d.", param=name) from None


def int_param(request: Request, name: str, default: int, maximum: int) -> int:
    value = request.query_params.get(name)
    if value is None:
        return default
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= maximum:
        raise InvalidRequest(f"'{name}' must be a whole number from 1 to {maximum}.", param=name)
    return int(value)


async def caller(request: Request) -> Principal:
    return await services(request).keys.authenticate(request.headers)


async def admin(request: Request) -> Principal:
    principal = await caller(request)
    principal.require_admin()
    return principal


async def in_thread(function: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a blocking database call off the event loop."""
    return await anyio.to_thread.run_sync(lambda: function(*args, **kwargs))


def key_json(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "owner": key.owner,
        "team": key.team,
        "role": key.role,
        "prefix": key.prefix,
        "created_at": iso(key.created_at),
        "revoked_at": iso(key.revoked_at),
    }


def item_json(item: WorkItem) -> dict[str, Any]:
    return {
        "id": item.id,
        "source": item.source,
        "title": item.title,
        "url": item.url,
        "team": item.team,
        "status": item.status,
        "created_at": iso(item.created_at),
        "completed_at": iso(item.completed_at),
        "budget_tokens": item.budget_tokens,
        "budget_usd": item.budget_usd,
    }


_EVENT_FIELDS = [c.name for c in UsageEvent.__table__.columns if c.name not in {"prompt_text", "completion_text"}]


def event_json(event: UsageEvent, *, with_texts: bool = False) -> dict[str, Any]:
    data = {name: getattr(event, name) for name in _EVENT_FIELDS}
    data["ts"] = iso(event.ts)
    if with_texts:
        data["prompt_text"], data["completion_text"] = event.prompt_text, event.completion_text
    return data
