"""Keys, work items and usage events as every interface shows them: the API's JSON, the CLI's
`--json` and tables, and the dashboard all serialize through these."""

from __future__ import annotations

from typing import Any

from taskproxy.money import usd
from taskproxy.storage.models import ApiKey, UsageEvent, WorkItem
from taskproxy.timeutil import iso


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


TEXT_FIELDS = ("prompt_text", "completion_text")
# An event's fields as shown: its columns in table order, money in USD, the texts apart (they are off by default).
EVENT_FIELDS = tuple("cost_usd" if c.name == "cost_nanos" else c.name for c in UsageEvent.__table__.columns if c.name not in TEXT_FIELDS)


def event_json(event: UsageEvent, *, with_texts: bool = False) -> dict[str, Any]:
    data = {name: usd(event.cost_nanos) if name == "cost_usd" else getattr(event, name) for name in EVENT_FIELDS}
    data["ts"] = iso(event.ts)
    if with_texts:
        data["prompt_text"], data["completion_text"] = event.prompt_text, event.completion_text
    return data
