"""Usage figures: per work item, grouped, and the per-task report. Pure queries and arithmetic."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from sqlalchemy import case, distinct, func, select
from sqlalchemy.engine import Engine

from taskproxy.storage.models import Rejection, UsageEvent, WorkItem
from taskproxy.timeutil import iso

GroupBy = Literal["work_item", "team", "model"]
GROUP_COLUMNS = {"work_item": UsageEvent.work_item, "team": UsageEvent.team, "model": UsageEvent.model}

_E = UsageEvent.__table__.c
COUNT_TOKENS_ROUTE = "/v1/messages/count_tokens"

_TOTALS = (
    # One client request = one first attempt; fallback attempts are events but not more requests, and
    # token counting (Claude Code calls count_tokens often) generates nothing.
    func.sum(case(((_E.attempt == 1) & (_E.route != COUNT_TOKENS_ROUTE), 1), else_=0)).label("requests"),
    func.count().label("attempts"),
    func.coalesce(func.sum(_E.prompt_tokens), 0).label("prompt_tokens"),
    func.coalesce(func.sum(_E.completion_tokens), 0).label("completion_tokens"),
    func.coalesce(func.sum(_E.total_tokens), 0).label("total_tokens"),
    func.coalesce(func.sum(_E.cached_tokens), 0).label("cached_tokens"),
    func.coalesce(func.sum(_E.reasoning_tokens), 0).label("reasoning_tokens"),
    func.sum(_E.cost_usd).label("cost_usd"),  # NULL when no event has a known price
    func.sum(case((_E.cost_usd.is_(None), 1), else_=0)).label("unpriced_requests"),
    func.min(_E.ts).label("first_used"),
    func.max(_E.ts).label("last_used"),
)


def _totals(row: Any) -> dict[str, Any]:
    return {
        "requests": int(row.requests or 0),
        "attempts": int(row.attempts),
        "prompt_tokens": int(row.prompt_tokens),
        "completion_tokens": int(row.completion_tokens),
        "total_tokens": int(row.total_tokens),
        "cached_tokens": int(row.cached_tokens),
        "reasoning_tokens": int(row.reasoning_tokens),
        "cost_usd": None if row.cost_usd is None else round(float(row.cost_usd), 8),
        "unpriced_requests": int(row.unpriced_requests or 0),
        "first_used": iso(row.first_used),
        "last_used": iso(row.last_used),
    }


def _window(query, since: datetime | None, until: datetime | None):  # type: ignore[no-untyped-def]
    if since is not None:
        query = query.where(_E.ts >= since)
    if until is not None:
        query = query.where(_E.ts < until)
    return query


def work_item_summary(engine: Engine, item_id: str) -> dict[str, Any] | None:
    """Totals of one work item (DESIGN §6), or None if it is neither registered nor used."""
    with engine.connect() as connection:
        item = connection.execute(select(WorkItem.__table__).where(WorkItem.__table__.c.id == item_id)).first()
        totals = connection.execute(select(*_TOTALS).where(_E.work_item == item_id)).one()
        models = connection.execute(select(_E.model).where(_E.work_item == item_id).distinct().order_by(_E.model)).scalars().all()
        people = connection.execute(select(func.count(distinct(_E.owner))).where(_E.work_item == item_id)).scalar_one()
    if item is None and not totals.attempts:
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
    column = GROUP_COLUMNS[group_by]
    query = _window(select(column.label("key"), *_TOTALS).group_by(column), since, until)
    with engine.connect() as connection:
        rows = connection.execute(query).all()
    result = [{group_by: row.key, **_totals(row)} for row in rows]
    return sorted(result, key=lambda r: (-(r["cost_usd"] or 0.0), -r["total_tokens"]))


def tasks_report(engine: Engine, since: datetime | None = None, until: datetime | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Work items by cost in the window, with their status: the per-task report."""
    rows = usage_grouped(engine, "work_item", since, until)[:limit]
    ids = [r["work_item"] for r in rows]
    with engine.connect() as connection:
        statuses = dict(connection.execute(select(WorkItem.__table__.c.id, WorkItem.__table__.c.status).where(WorkItem.__table__.c.id.in_(ids))).all()) if ids else {}
        models: dict[str, list[str]] = {}
        if ids:
            for item_id, model in connection.execute(select(_E.work_item, _E.model).where(_E.work_item.in_(ids)).distinct()):
                models.setdefault(item_id, []).append(model)
    return [{**r, "status": statuses.get(r["work_item"], "unverified"), "models": sorted(models.get(r["work_item"], []))} for r in rows]


def rejections_by_reason(engine: Engine, since: datetime | None = None, until: datetime | None = None, key_id: str | None = None) -> dict[str, int]:
    r = Rejection.__table__.c
    query = select(r.reason, func.count()).group_by(r.reason)
    if since is not None:
        query = query.where(r.ts >= since)
    if until is not None:
        query = query.where(r.ts < until)
    if key_id is not None:
        query = query.where(r.key_id == key_id)
    with engine.connect() as connection:
        return {reason: int(count) for reason, count in connection.execute(query).all()}


def usage_for_key(engine: Engine, key_id: str) -> list[dict[str, Any]]:
    """One key's own usage per work item: what `taskproxy me` shows its owner."""
    query = select(_E.work_item.label("key"), *_TOTALS).where(_E.key_id == key_id).group_by(_E.work_item)
    with engine.connect() as connection:
        rows = connection.execute(query).all()
    return sorted(({"work_item": row.key, **_totals(row)} for row in rows), key=lambda r: r["last_used"] or "", reverse=True)
