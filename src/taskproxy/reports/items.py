"""One work item as the API and `taskproxy items show` present it: totals, status history, cycle time,
usage by day and links."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine

from taskproxy.money import usd
from taskproxy.reports.usage import work_item_summary
from taskproxy.storage import rollup
from taskproxy.storage.models import WorkItem, WorkItemChange, WorkItemLink, WorkItemSize
from taskproxy.timeutil import iso, rounded_hours
from taskproxy.workitems import MERGED_PR

_W = WorkItem.__table__.c
_C = WorkItemChange.__table__.c
_L = WorkItemLink.__table__.c
_S = WorkItemSize.__table__.c


def work_item_view(engine: Engine, item_id: str) -> dict[str, Any] | None:
    """`GET /api/work-items/{id}`: None if the item is neither registered nor used."""
    summary = work_item_summary(engine, item_id)
    if summary is None:
        return None
    return {**summary, **item_detail(engine, item_id)}


def item_detail(engine: Engine, item_id: str) -> dict[str, Any]:
    """Extras of `GET /api/work-items/{id}`: cycle time, size (and its history), rework, usage per day,
    status history, links.

    `cycle_time_hours` is completed_at − created_at for a `done` item, else null. `usage_by_day` has one
    entry per UTC day with usage (`requests` as every report counts them, storage/rollup.py `is_request`; `cost_usd` is null when
    no event of that day has a known price). `linked` are the items (merged PRs) recorded as coming out
    of this one; `linked_from` the items this one came out of.
    """
    with engine.connect() as connection:
        item = connection.execute(select(_W.status, _W.created_at, _W.completed_at, _W.lines_added, _W.lines_deleted, _W.files_changed,
                                         _W.points, _W.reworked_at, _W.rework_reason, _W.rework_by).where(_W.id == item_id)).first()  # fmt: skip
        sizes = connection.execute(
            select(_S.ts, _S.source, _S.lines_added, _S.lines_deleted, _S.files_changed, _S.points).where(_S.work_item == item_id).order_by(_S.ts)
        ).all()
        usage = rollup.totals(  # all time, by UTC day: the daily rollup alone answers
            connection, by=("day",), fields=("requests", "total_tokens", "cost_nanos"), where=lambda c: [c.work_item == item_id]
        )
        changes = connection.execute(
            select(_C.ts, _C.from_status, _C.to_status, _C.source, _C.note).where(_C.work_item == item_id).order_by(_C.ts)
        ).all()
        status = select(_W.status).where(_W.id == _L.linked).scalar_subquery()
        linked = connection.execute(
            select(_L.linked, _L.kind, _L.ts, status).where(_L.work_item == item_id, _L.kind == MERGED_PR).order_by(_L.linked)
        ).all()
        status_from = select(_W.status).where(_W.id == _L.work_item).scalar_subquery()
        linked_from = connection.execute(
            select(_L.work_item, _L.kind, _L.ts, status_from).where(_L.linked == item_id, _L.kind == MERGED_PR).order_by(_L.work_item)
        ).all()
    cycle = None
    if item is not None and item.status == "done" and item.completed_at is not None:
        cycle = rounded_hours((item.completed_at - item.created_at).total_seconds() / 3600)
    size_fields = ("lines_added", "lines_deleted", "files_changed", "points")
    return {
        "cycle_time_hours": cycle,
        "size": {name: getattr(item, name) for name in size_fields} if item is not None else None,
        "size_history": [{"ts": iso(r.ts), "source": r.source, **{name: getattr(r, name) for name in size_fields}} for r in sizes],
        "rework": {"at": iso(item.reworked_at), "reason": item.rework_reason, "by": item.rework_by} if item is not None and item.reworked_at else None,
        "usage_by_day": [
            {
                "day": str(day)[:10],  # SQLite answers text, PostgreSQL a date
                "requests": int(row["requests"] or 0),
                "total_tokens": int(row["total_tokens"] or 0),
                "cost_usd": usd(row["cost_nanos"]),
            }
            for (day,), row in sorted(usage.items())
        ],
        "history": [{"ts": iso(row.ts), "from": row.from_status, "to": row.to_status, "source": row.source, "note": row.note} for row in changes],
        "linked": [{"id": r[0], "kind": r[1], "ts": iso(r[2]), "status": r[3] or "unverified"} for r in linked],
        "linked_from": [{"id": r[0], "kind": r[1], "ts": iso(r[2]), "status": r[3] or "unverified"} for r in linked_from],
    }


# -- plain text (the CLI) -------------------------------------------------------------------------
