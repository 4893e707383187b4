"""Usage figures: per work item, grouped, and the per-task report. Pure queries and arithmetic.

Totals come from the usage rollups (whole days, whole hours) and the raw events (the partial hours at a
period's edges): see storage/rollup.py. They equal a scan of the raw events.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import distinct, func, select
from sqlalchemy.engine import Engine

from taskproxy import privacy
from taskproxy.money import usd
from taskproxy.storage import rollup
from taskproxy.storage.models import Rejection, UsageEvent, WorkItem
from taskproxy.timeutil import iso

GroupBy = Literal["work_item", "team", "model"]
GROUP_COLUMNS = {"work_item": UsageEvent.work_item, "team": UsageEvent.team, "model": UsageEvent.model}

_K = rollup.KEY_DAILY.table.c  # per key, day and item
_D = rollup.DAILY.table.c  # all time, per item: the daily rollup answers alone
# What each figure of `_totals` is made of (storage/rollup.py: over raw events or the rollup alike).
_FIELDS = (
    "requests", "attempts", "prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens",
    "cost_nanos", "unpriced_attempts", "first_used", "last_used",
)  # fmt: skip


def _totals(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "requests": int(row["requests"] or 0),
        "attempts": int(row["attempts"] or 0),
        "prompt_tokens": int(row["prompt_tokens"] or 0),
        "completion_tokens": int(row["completion_tokens"] or 0),
        "total_tokens": int(row["total_tokens"] or 0),
        "cached_tokens": int(row["cached_tokens"] or 0),
        "reasoning_tokens": int(row["reasoning_tokens"] or 0),
        "cost_usd": usd(row["cost_nanos"]),
        "unpriced_attempts": int(row["unpriced_attempts"] or 0),
        "first_used": iso(row["first_used"]),
        "last_used": iso(row["last_used"]),
    }


def work_item_summary(engine: Engine, item_id: str) -> dict[str, Any] | None:
    """Totals of one work item, or None if it is neither registered nor used."""
    with engine.connect() as connection:
        item = connection.execute(select(WorkItem.__table__).where(WorkItem.__table__.c.id == item_id)).first()
        totals = rollup.totals(connection, period=rollup.LIFETIME, fields=_FIELDS, where=lambda c: [c.work_item == item_id]).get((), dict.fromkeys(_FIELDS))
        models = connection.execute(select(_D.model).where(_D.work_item == item_id).distinct().order_by(_D.model)).scalars().all()
        people = privacy.people(connection.execute(select(_D.owner).where(_D.work_item == item_id).distinct()).scalars())
    if item is None and not totals["attempts"]:
        return None
    return {
        "id": item_id,
        "status": item.status if item else "unverified",
        "source": item.source if item else "auto",
        "title": item.title if item else None,
        "url": item.url if item else None,
        "team": item.team if item else None,
        "created_at": iso(item.created_at) if item else None,
        "completed_at": iso(item.completed_at) if item else None,
        **_totals(totals),
        "models": list(models),
        "people": int(people),
    }


def usage_grouped(engine: Engine, group_by: GroupBy, since: datetime | None = None, until: datetime | None = None) -> list[dict[str, Any]]:
    if group_by not in GROUP_COLUMNS:
        raise KeyError(group_by)
    with engine.connect() as connection:
        levels = rollup.TEAM_LEVELS if group_by in ("team", "model") else rollup.LEVELS  # a team's days: a few rows, not one per item
        found = rollup.totals(connection, by=(group_by,), period=rollup.Period(since, until, levels=levels), fields=_FIELDS)
    result = [{group_by: key, **_totals(row)} for (key,), row in found.items()]
    return sorted(result, key=lambda r: (-(r["cost_usd"] or 0.0), -r["total_tokens"]))


def tasks_report(engine: Engine, since: datetime | None = None, until: datetime | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Work items by cost in the window, with their status: the per-task report."""
    rows = usage_grouped(engine, "work_item", since, until)[:limit]
    ids = [r["work_item"] for r in rows]
    with engine.connect() as connection:
        statuses = dict(connection.execute(select(WorkItem.__table__.c.id, WorkItem.__table__.c.status).where(WorkItem.__table__.c.id.in_(ids))).all()) if ids else {}
        models: dict[str, list[str]] = {}
        if ids:  # the models used in the window, as the figures are (not all time)
            used = rollup.totals(connection, by=("work_item", "model"), period=rollup.Period(since, until), fields=("attempts",),
                                 where=lambda c: [c.work_item.in_(ids)])  # fmt: skip
            for item_id, model in used:
                models.setdefault(item_id, []).append(model)
    return [{**r, "status": statuses.get(r["work_item"], "unverified"), "models": sorted(models.get(r["work_item"], []))} for r in rows]


def rejections_by_reason(engine: Engine, since: datetime | None = None, until: datetime | None = None, key_id: str | None = None) -> dict[str, int]:
    r = Rejection.__table__.c
    query = select(r.reason, func.sum(r.count)).group_by(r.reason)
    if since is not None:
        query = query.where(r.ts >= since)
    if until is not None:
        query = query.where(r.ts < until)
    if key_id is not None:
        query = query.where(r.key_id == key_id)
    with engine.connect() as connection:
        return {reason: int(count) for reason, count in connection.execute(query).all()}


MY_ITEMS = 100  # the work items a key's own page lists (the most recently used)


def usage_for_key(engine: Engine, key_id: str, limit: int = MY_ITEMS) -> tuple[list[dict[str, Any]], int]:
    """One key's own usage per work item, all time, for the `limit` items it used most recently (most
    recent first), and how many items it ever used: what `taskproxy me` shows its owner. Read from the
    per-key daily rollup by its index on the key: the database groups the key's days; only `limit`
    items come back (a key's whole history, 50,000 items, built and rendered on every view held up
    the process)."""
    with engine.connect() as connection:
        last = func.max(_K.last_ts)
        recent = (select(_K.work_item).where(_K.key_id == key_id).group_by(_K.work_item)
                  .order_by(last.desc(), _K.work_item).limit(limit))  # fmt: skip
        ids = list(connection.execute(recent).scalars())
        total = connection.execute(select(func.count(distinct(_K.work_item))).where(_K.key_id == key_id)).scalar_one()
        found = rollup.totals(connection, by=("work_item",), period=rollup.KEY_ALL_TIME, fields=_FIELDS,
                              where=lambda c: [c.key_id == key_id, c.work_item.in_(ids)]) if ids else {}  # fmt: skip
    # In the order the query chose them, latest first, then by id (not by the times shown: they are
    # rounded to the millisecond, and two items used within one tied).
    rank = {item: n for n, item in enumerate(ids)}
    items = sorted(({"work_item": item, **_totals(row)} for (item,), row in found.items()), key=lambda r: rank[r["work_item"]])
    return items, int(total)


def tasks_view(engine: Engine, since: datetime | None = None, until: datetime | None = None, limit: int = 50) -> dict[str, Any]:
    """The per-task report as `GET /api/reports/tasks` and `taskproxy report tasks --json` give it."""
    return {"since": iso(since), "until": iso(until), "tasks": tasks_report(engine, since, until, limit),
            "rejected_requests": rejections_by_reason(engine, since, until)}  # fmt: skip
