"""What the gaming signals read: their thresholds, the rows loaded per key and item, and the helpers
that shape their evidence. Queries aggregate in SQL; only request times are streamed into Python."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.engine import Connection

from taskproxy.storage.models import ApiKey, UsageEvent, WorkItem
from taskproxy.money import usd
from taskproxy.storage.rollup import request_clause, within
from taskproxy.timeutil import iso

EVENTS = UsageEvent.__table__.c
ITEMS = WorkItem.__table__.c
KEYS = ApiKey.__table__.c

KINDS = (
    "repeated_prompt",
    "spend_after_completion",
    "spend_without_completion",
    "machine_cadence",
    "cost_outlier",
    "unverified_spend",
    "trivial_completions",
    "split_work",
)
WITHOUT_VERIFICATION = ("unverified", "unknown")
MAX_LISTED = 50  # work items listed per signal
MAD_SCALE = 0.6745  # Iglewicz and Hoaglin: 0.6745 × (x − median) / MAD ~ a z-score for normal data
MEAN_AD_SCALE = 1.253314  # sqrt(pi / 2): the mean absolute deviation's scale, when MAD is 0


def rounded(value: float | None, digits: int = 6) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)


# -- what the queries load ------------------------------------------------------------------------


@dataclass
class KeyInfo:
    id: str
    owner: str | None = None
    team: str | None = None
    role: str | None = None


@dataclass
class Spend:
    """One key's events on one item in the period."""

    item: str
    requests: int = 0
    cost: int = 0  # nano-USD
    tokens: int = 0
    first: datetime | None = None
    last: datetime | None = None


@dataclass
class ItemRow:
    status: str
    completed_at: datetime | None
    team: str | None
    created_at: datetime | None = None
    changed_lines: int | None = None  # lines added + deleted, when the tracker said


@dataclass
class Intervals:
    requests: int = 0
    first: datetime | None = None
    last: datetime | None = None
    gaps: list[float] = field(default_factory=list)
    hours: set[int] = field(default_factory=set)
    day_hours: dict[Any, set[int]] = field(default_factory=lambda: defaultdict(set))



def load_keys(connection: Connection) -> dict[str, KeyInfo]:
    return {r.id: KeyInfo(r.id, r.owner, r.team, r.role) for r in connection.execute(select(KEYS.id, KEYS.owner, KEYS.team, KEYS.role))}


def load_items(connection: Connection) -> dict[str, ItemRow]:
    rows = connection.execute(select(ITEMS.id, ITEMS.status, ITEMS.completed_at, ITEMS.team, ITEMS.created_at, ITEMS.lines_added, ITEMS.lines_deleted))
    return {r.id: ItemRow(r.status, r.completed_at, r.team, r.created_at,
                          None if r.lines_added is None and r.lines_deleted is None else (r.lines_added or 0) + (r.lines_deleted or 0))
            for r in rows}  # fmt: skip


def requests_column() -> Any:
    return func.sum(case((request_clause(EVENTS), 1), else_=0))


def load_spend(connection: Connection, keys: dict[str, KeyInfo], since: datetime, until: datetime) -> dict[str, dict[str, Spend]]:
    """Per key and item: the key's requests, spend, tokens and first/last event in the period."""
    query = (
        select(
            EVENTS.key_id,
            EVENTS.work_item,
            requests_column().label("requests"),
            func.sum(EVENTS.cost_nanos).label("cost"),
            func.coalesce(func.sum(EVENTS.total_tokens), 0).label("tokens"),
            func.min(EVENTS.ts).label("first"),
            func.max(EVENTS.ts).label("last"),
            func.max(EVENTS.owner).label("owner"),
            func.max(EVENTS.team).label("team"),
        )
        .where(*within(EVENTS.ts, since, until))
        .group_by(EVENTS.key_id, EVENTS.work_item)
    )
    spend: dict[str, dict[str, Spend]] = defaultdict(dict)
    for row in connection.execute(query):
        spend[row.key_id][row.work_item] = Spend(
            row.work_item, int(row.requests or 0), int(row.cost or 0), int(row.tokens), row.first, row.last
        )
        if row.key_id not in keys:  # a key with events but no row: what its events say
            keys[row.key_id] = KeyInfo(row.key_id, row.owner, row.team, None)
    return spend


def status_of(items: dict[str, ItemRow], item_id: str) -> str:
    row = items.get(item_id)
    return row.status if row is not None else "unknown"


def item_entry(items: dict[str, ItemRow], spend: Spend, **extra: Any) -> dict[str, Any]:
    return {
        "id": spend.item,
        "status": status_of(items, spend.item),
        "requests": spend.requests,
        "cost_usd": usd(spend.cost),
        **extra,
    }


def listed(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(entries, key=lambda e: e["id"])[:MAX_LISTED]


def span(spends: list[Spend]) -> dict[str, Any]:
    firsts = [s.first for s in spends if s.first is not None]
    lasts = [s.last for s in spends if s.last is not None]
    return {"first": iso(min(firsts)) if firsts else None, "last": iso(max(lasts)) if lasts else None}


def totals(spends: list[Spend]) -> dict[str, Any]:
    return {
        "requests": sum(s.requests for s in spends),
        "cost_usd": usd(sum(s.cost for s in spends)),
        "tokens": sum(s.tokens for s in spends),
        "items": len(spends),
        **span(spends),
    }


# -- the signals, one function per kind; each yields (key id, evidence, work items) ----------------
