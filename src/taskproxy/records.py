"""Keys, work items and usage events as every interface shows them: the API's JSON, the CLI's
`--json` and tables, and the dashboard all serialize through these."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from taskproxy.money import usd
from sqlalchemy.engine import Row

from taskproxy.storage.models import UsageEvent
from taskproxy.timeutil import iso


KEY_FIELDS = ("id", "owner", "team", "role", "prefix", "created_at", "revoked_at")
ITEM_FIELDS = ("id", "source", "title", "url", "team", "status", "created_at", "completed_at", "budget_tokens", "budget_usd")


def _as_json(row: object, fields: tuple[str, ...]) -> dict[str, Any]:
    """The named fields of `row`, times in ISO 8601 (UTC, `Z`)."""
    return {name: iso(value) if isinstance(value := getattr(row, name), datetime) else value for name in fields}


def key_json(key: Row) -> dict[str, Any]:
    return _as_json(key, KEY_FIELDS)


def item_json(item: Row) -> dict[str, Any]:
    return _as_json(item, ITEM_FIELDS)


TEXT_FIELDS = ("prompt_text", "completion_text")
# An event's fields as shown: its columns in table order, money in USD, the texts apart (they are off by default).
EVENT_FIELDS = tuple("cost_usd" if c.name == "cost_nanos" else str(c.name) for c in UsageEvent.__table__.columns if c.name not in TEXT_FIELDS)  # str: orjson takes no subclass as a key


def event_json(event: Row, *, with_texts: bool = False) -> dict[str, Any]:
    data = {name: usd(event.cost_nanos) if name == "cost_usd" else getattr(event, name) for name in EVENT_FIELDS}
    data["ts"] = iso(event.ts)
    if with_texts:
        data["prompt_text"], data["completion_text"] = event.prompt_text, event.completion_text
    return data
