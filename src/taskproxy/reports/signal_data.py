"""What the gaming signals read: their thresholds, the rows loaded per key and item, and the helpers
that shape their evidence. Queries aggregate in SQL; only request times are streamed into Python.

Per-key spend comes from `usage_key_daily` (whole days; storage/rollup.py) and the raw events of the
partial days at the period's edges; the keys and work items loaded are those the period touched, by
id. So the work grows with the period's activity, not with the organisation's history, and these
figures survive the raw partitions that `recording.retention_months` drops."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from collections.abc import Iterable, Iterator, Mapping, Sequence

from sqlalchemy import DateTime, String, and_, bindparam, func, or_, select, true
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection

from taskproxy.storage.models import ApiKey, UsageEvent, WorkItem
from taskproxy.money import usd
from taskproxy.storage import idsets, rollup
from taskproxy.storage.rollup import within
from taskproxy.storage.rows import rows
from taskproxy.timeutil import iso
from taskproxy.workitems import changed_lines, team_of_project

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


Found = tuple[str, dict[str, Any], list[dict[str, Any]]]  # a signal: key id, evidence, work items


def rounded(value: float | None, digits: int = 6) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)


# -- what the queries load ------------------------------------------------------------------------


@dataclass(slots=True)
class KeyInfo:
    id: str
    owner: str | None = None
    team: str | None = None
    role: str | None = None


@dataclass(slots=True)
class Spend:
    """One key's events on one item in the period."""

    item: str
    requests: int = 0
    cost: int = 0  # nano-USD
    tokens: int = 0
    first: datetime | None = None
    last: datetime | None = None


@dataclass(slots=True)
class ItemRow:
    status: str
    completed_at: datetime | None
    team: str | None
    created_at: datetime | None = None
    changed_lines: int | None = None  # lines added + deleted, when the tracker said
    reworked_at: datetime | None = None  # its first rework (a revert, a reopening after done)
    rework_reason: str | None = None


def load_keys(connection: Connection, ids: Iterable[str], into: dict[str, KeyInfo] | None = None) -> dict[str, KeyInfo]:
    """The keys among `ids` not loaded yet (a key with events but no row stays as its events said)."""
    keys = {} if into is None else into
    for chunk in idsets.batches(connection, set(ids) - {k for k, info in keys.items() if info.role is not None}):
        for r in connection.execute(select(KEYS.id, KEYS.owner, KEYS.team, KEYS.role).where(idsets.among(connection, KEYS.id, chunk))):
            keys[r.id] = KeyInfo(r.id, r.owner, r.team, r.role)
    return keys


def load_items(connection: Connection, ids: Iterable[str], item_teams: Mapping[str, str]) -> dict[str, ItemRow]:
    """The registered items among `ids`, by id; an item no one gave a team takes its project's (`item_teams`)."""
    found = {}
    columns = (ITEMS.id, ITEMS.status, ITEMS.completed_at, ITEMS.team, ITEMS.created_at, ITEMS.lines_added, ITEMS.lines_deleted, ITEMS.reworked_at,
               ITEMS.rework_reason)  # fmt: skip
    for chunk in idsets.batches(connection, ids):
        # Unpacked, not read by name: a row's attribute costs about a microsecond.
        for item_id, status, completed_at, team, created_at, added, deleted, reworked_at, reason in rows(
            connection.execute(select(*columns).where(idsets.among(connection, ITEMS.id, chunk)))
        ):
            found[item_id] = ItemRow(status, completed_at, team or team_of_project(item_id, item_teams), created_at, changed_lines(added, deleted),
                                     reworked_at, reason)  # fmt: skip
    return found


SPEND_FIELDS = ("requests", "cost_nanos", "total_tokens", "first_used", "last_used")


def add_spend(spend: Spend, requests: int | None, cost: int | None, tokens: int | None, first: datetime | None, last: datetime | None) -> None:
    """Add a rollup answer's figures (SPEND_FIELDS, in that order) to `spend`."""
    spend.requests += int(requests or 0)
    spend.cost += int(cost or 0)
    spend.tokens += int(tokens or 0)
    spend.first = first if spend.first is None or (first is not None and first < spend.first) else spend.first
    spend.last = last if spend.last is None or (last is not None and last > spend.last) else spend.last


def load_spend(connection: Connection, since: datetime, until: datetime) -> dict[str, dict[str, Spend]]:
    """Per key and item: the key's requests, spend, tokens and first/last event in the period."""
    period = rollup.Period(since, until, levels=rollup.KEY_LEVELS)
    spend: dict[str, dict[str, Spend]] = defaultdict(dict)
    # A row per key and item (the database adds up the rollup's days and the raw edges): built straight
    # into Spend, for the 1.5 M pairs a month of an 85,000-person organisation makes.
    for key_id, item, requests, cost, tokens, first, last in rollup.grouped(connection, by=("key_id", "work_item"), period=period, fields=SPEND_FIELDS):
        spend[key_id][item] = Spend(item, int(requests or 0), int(cost or 0), int(tokens or 0), first, last)
    return spend


def load_spend_before(connection: Connection, item_ids: Iterable[str], since: datetime) -> dict[str, dict[str, Spend]]:
    """Per key and item of `item_ids`: the key's requests, spend, tokens and first/last event on it
    before `since`, all time. The whole days from the per-key rollup, the part of `since`'s day before
    it from the raw events; read by the items' ids, so the work grows with them (the items completed in
    a period), not with the organisation's history."""
    period = rollup.Period(None, since, levels=rollup.KEY_LEVELS)
    found: dict[str, dict[str, Spend]] = defaultdict(dict)
    for chunk in idsets.batches(connection, item_ids):
        for key_id, item, *figures in rollup.grouped(connection, by=("key_id", "work_item"), period=period, fields=SPEND_FIELDS,
                                                     where=lambda c, ids=chunk: [idsets.among(connection, c.work_item, ids)]):  # fmt: skip
            add_spend(found[key_id].setdefault(item, Spend(item)), *figures)
    return found


def with_spend(spend: dict[str, dict[str, Spend]], more: Mapping[str, Mapping[str, Spend]]) -> dict[str, dict[str, Spend]]:
    """`spend` with `more` added, per key and item: a new mapping, `spend` left as it was (the other signals read it)."""
    found = {key_id: dict(per_item) for key_id, per_item in spend.items()}
    for key_id, per_item in more.items():
        mine = found.setdefault(key_id, {})
        for item, part in per_item.items():
            before = mine.get(item)
            merged = Spend(item) if before is None else replace(before)  # a copy: `spend`'s Spend is shared
            add_spend(merged, part.requests, part.cost, part.tokens, part.first, part.last)
            mine[item] = merged
    return found


def keys_from_events(connection: Connection, ids: Iterable[str], since: datetime, until: datetime) -> dict[str, KeyInfo]:
    """Keys with events but no row: owner and team as their events in the period say (by the (key_id, ts) index)."""
    found = {}
    for chunk in idsets.batches(connection, ids):
        query = (select(EVENTS.key_id, func.max(EVENTS.owner).label("owner"), func.max(EVENTS.team).label("team"))
                 .where(idsets.among(connection, EVENTS.key_id, chunk), *within(EVENTS.ts, since, until)).group_by(EVENTS.key_id))  # fmt: skip
        found |= {r.key_id: KeyInfo(r.key_id, r.owner, r.team, None) for r in connection.execute(query)}
    return found


def is_service(keys: dict[str, KeyInfo], key_id: str) -> bool:
    """A declared automation key (role `service`)."""
    key = keys.get(key_id)
    return key is not None and key.role == "service"


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


# -- raw events by span (what the per-key rollup cannot split) --------------------------------------

_RANGES_PER_QUERY = 500  # four parameters each (SQLite)
_SPANS_PER_ARRAY = 100_000  # PostgreSQL
Span = tuple[str, str | None, datetime, datetime]  # (work item, key or None for any, after, before)
_EVENT_FIGURES = (EVENTS.key_id, EVENTS.work_item, EVENTS.ts, EVENTS.attempt, EVENTS.route, EVENTS.cost_nanos, EVENTS.total_tokens)


def events_within(connection: Connection, spans: Sequence[Span]) -> Iterator[Any]:
    """The events of each span's work item (and key, unless None) later than its `after` and earlier than its `before`.
    PostgreSQL joins the spans, bound as four arrays, to the (work_item, ts) index: one statement for
    100,000 spans. SQLite takes them as OR-ed ranges, a few hundred to a statement."""
    if connection.dialect.name == "postgresql":
        kinds = (String(), String(), DateTime(), DateTime())
        for start in range(0, len(spans), _SPANS_PER_ARRAY):
            chunk = spans[start : start + _SPANS_PER_ARRAY]
            arrays = [bindparam(None, list(values), type_=ARRAY(kind)) for values, kind in zip(zip(*chunk), kinds, strict=True)]
            wanted = func.unnest(*arrays).table_valued("item", "key_id", "later_than", "earlier_than").render_derived(name="spans")
            on = and_(EVENTS.work_item == wanted.c.item, or_(wanted.c.key_id.is_(None), EVENTS.key_id == wanted.c.key_id),
                      EVENTS.ts > wanted.c.later_than, EVENTS.ts < wanted.c.earlier_than)  # fmt: skip
            # The spans' outer bounds as values too: the planner leaves out the months (partitions) none
            # reaches, so the report's transaction holds no lock on them (nor on the default partition,
            # which a month being made must lock: storage/partitions.py).
            bounds = (EVENTS.ts > min(span[2] for span in chunk), EVENTS.ts < max(span[3] for span in chunk))
            yield from connection.execute(select(*_EVENT_FIGURES).select_from(wanted.join(UsageEvent.__table__, on)).where(*bounds))
        return
    for start in range(0, len(spans), _RANGES_PER_QUERY):
        chunk = spans[start : start + _RANGES_PER_QUERY]
        yield from connection.execute(select(*_EVENT_FIGURES).where(or_(*(
            and_(EVENTS.work_item == item, true() if key_id is None else EVENTS.key_id == key_id, EVENTS.ts > after, EVENTS.ts < before)
            for item, key_id, after, before in chunk))))  # fmt: skip


# -- the signals, one function per kind; each yields (key id, evidence, work items) ----------------
