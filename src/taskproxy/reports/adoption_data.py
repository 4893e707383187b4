"""What the adoption report reads (the definitions are in `adoption.py`'s docstring): the work items, the
spend aggregated per item and model, status history, links, people per team and rejections.

Spend comes from the usage rollups (`storage/rollup.py`): the whole days of the period from the daily
rollup, the whole hours left at its ends from the hourly one, its partial hours from the raw events.
Spend after completion is split the same way: buckets that start after `completed_at` are wholly after
it, the one containing it is read at the next finer level. Nothing is approximated: the figures are
those a scan of usage_events would give.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from taskproxy.storage import rollup
from taskproxy.storage.rollup import within
from taskproxy.workitems import RESOLVED
from taskproxy.storage.models import ApiKey, Rejection, UsageEvent, WorkItem, WorkItemChange, WorkItemLink

_E = UsageEvent.__table__.c
_W = WorkItem.__table__.c
_C = WorkItemChange.__table__.c
_L = WorkItemLink.__table__.c
_K = ApiKey.__table__.c
_J = Rejection.__table__.c

_IDS_PER_QUERY = 5000  # ids bound in one IN (...): well under SQLite's limit on parameters


@dataclass
class Item:
    id: str
    team: str | None = None  # the item's team after the fallback to the spending team
    status: str = "unverified"  # current
    created_at: datetime | None = None
    completed_at: datetime | None = None
    status_at_until: str = "unverified"
    # All-time, per model: (events, events below 400, cost in nano-USD or None, total tokens) — completed items only.
    by_model: dict[str, tuple[int, int, int | None, int]] = field(default_factory=dict)
    period_events: int = 0  # events in the period
    spend: int = 0  # their known cost, nano-USD
    spend_after_completion: int = 0  # of which after completed_at (done or closed items)
    merged_pr: bool = False  # a linked item was done as of `until`



def load_items(connection: Connection) -> dict[str, Item]:
    rows = connection.execute(select(_W.id, _W.team, _W.status, _W.created_at, _W.completed_at)).all()
    return {r.id: Item(r.id, r.team, r.status, r.created_at, r.completed_at, r.status) for r in rows}


def load_completed(connection: Connection, items: dict[str, Item], since: datetime, until: datetime) -> None:
    """All-time usage per model of the items completed in the period (from the rollup alone)."""
    completed_ids = select(_W.id).where(_W.status == "done", *within(_W.completed_at, since, until))
    found = rollup.totals(
        connection, by=("work_item", "model"), fields=("attempts", "ok", "cost_nanos", "total_tokens"),
        where=lambda c: [c.work_item.in_(completed_ids)],
    )  # fmt: skip
    for (work_item, model), row in found.items():
        item = items.get(work_item)
        if item is not None:
            cost = None if row["cost_nanos"] is None else int(row["cost_nanos"])
            item.by_model[model] = (int(row["attempts"]), int(row["ok"] or 0), cost, int(row["total_tokens"] or 0))


def load_period_spend(connection: Connection, items: dict[str, Item], since: datetime, until: datetime) -> None:
    period = rollup.Period(since, until)
    for (work_item,), row in rollup.totals(connection, by=("work_item",), period=period, fields=("attempts", "cost_nanos")).items():
        item = items.get(work_item)
        if item is None:  # usage on an item never registered: unverified
            item = items[work_item] = Item(work_item)
        item.period_events = int(row["attempts"])
        item.spend = int(row["cost_nanos"] or 0)
    resolved = _W.status.in_(RESOLVED)
    for work_item, spend in rollup.cost_after(connection, period, WorkItem.__table__, _W.completed_at, resolved).items():
        items[work_item].spend_after_completion = spend


def load_statuses_at(connection: Connection, items: dict[str, Item], since: datetime, until: datetime) -> None:
    """Set `status_at_until` of the items with spend in the period and of linked items, from the history.
    (Call after `load_period_spend`.) The history is small next to the usage: it is read whole, by item."""
    wanted = {item_id for item_id, item in items.items() if item.period_events} | set(connection.execute(select(_L.linked)).scalars())
    query = select(_C.work_item, _C.ts, _C.from_status, _C.to_status).order_by(_C.work_item, _C.ts)
    before: dict[str, str] = {}
    first_after: dict[str, str | None] = {}
    for row in connection.execute(query):
        if row.work_item not in wanted:
            continue
        if row.ts < until:
            before[row.work_item] = row.to_status
        elif row.work_item not in first_after:
            first_after[row.work_item] = row.from_status
    for item_id, item in items.items():
        if item_id not in wanted:
            item.status_at_until = item.status
        elif item_id in before:
            item.status_at_until = before[item_id]
        elif first_after.get(item_id) is not None:
            item.status_at_until = first_after[item_id]  # type: ignore[assignment]
        else:
            item.status_at_until = item.status


def load_links(connection: Connection, items: dict[str, Item]) -> None:
    for ticket, linked in connection.execute(select(_L.work_item, _L.linked)):
        target = items.get(linked)
        if ticket in items and target is not None and target.status_at_until == "done":
            items[ticket].merged_pr = True


def assign_teams(connection: Connection, items: dict[str, Item], since: datetime, until: datetime) -> None:
    """Items without a team take the team that spent the most on them (all time; see adoption.py).
    (Call after `load_period_spend`: the items concerned are those used or completed in the period.)"""
    teamless = sorted(
        item.id for item in items.values() if item.team is None and (item.period_events or (
            item.status == "done" and item.completed_at is not None and since <= item.completed_at < until))
    )  # fmt: skip
    found: dict[tuple, dict[str, Any]] = {}
    for start in range(0, len(teamless), _IDS_PER_QUERY):
        chunk = teamless[start : start + _IDS_PER_QUERY]
        found |= rollup.totals(connection, by=("work_item", "team"), fields=("cost_nanos", "total_tokens"), where=lambda c, ids=chunk: [c.work_item.in_(ids)])
    candidates: dict[str, list[tuple[int, int, str]]] = defaultdict(list)
    for (work_item, team), row in found.items():
        if team is not None:  # events without a team are not counted
            candidates[work_item].append((-int(row["cost_nanos"] or 0), -int(row["total_tokens"] or 0), team))
    for item_id, spenders in candidates.items():
        if item_id in items and items[item_id].team is None:
            items[item_id].team = min(spenders)[2]  # most cost, then most tokens, then the first name


def rejections(connection: Connection, since: datetime, until: datetime) -> list[tuple[str | None, str, int]]:
    query = (
        select(_K.team, _J.reason, func.sum(_J.count).label("n"))
        .select_from(Rejection.__table__.outerjoin(ApiKey.__table__, _K.id == _J.key_id))
        .where(*within(_J.ts, since, until))
        .group_by(_K.team, _J.reason)
    )
    return [(row.team, row.reason, int(row.n)) for row in connection.execute(query)]
