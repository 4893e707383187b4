"""Spend after a moment, per item (a done or closed item's `completed_at`), from the rollups: whole
buckets after the moment, the bucket containing it settled by its rows' first and last event times,
and only the items with a row that straddles the moment read at the next finer level, down to the
raw events of the hour containing it (docs/reports.md, "How they stay exact"). And the other side:
usage up to a moment per item and model (`usage_up_to`), each item its own moment, in one statement,
or between two moments of its own (`usage_between`)."""

from __future__ import annotations

from typing import Any

from collections.abc import Iterator, Sequence
from datetime import datetime

from sqlalchemy import DateTime, Row, String, Table, and_, case, func, select, true, union_all
from sqlalchemy.engine import Connection

from taskproxy.storage import idsets
from taskproxy.storage.rollup import DAILY, EVENTS, HOURLY, LEVELS, Period, any_within, columns_of
from taskproxy.storage.rows import rows

_E = EVENTS.c


def cost_after(connection: Connection, period: Period, items: Table, moment: Any, condition: Any) -> dict[str, int]:
    """Per item of `items` (id column `id`) meeting `condition`: the known cost of its events in `period`
    later than `moment` (a column of `items`).

    A bucket that starts after the moment holds only later events. In the bucket containing the
    moment, a row whose first event is later than the moment counts whole and one whose last event is
    not later counts nothing (`first_ts`, `last_ts`); only an item with a row that straddles the
    moment is read at the next finer level (the hours of that day after it), down to the raw events
    of the hour containing it (one range of the (work_item, ts) index per such item, as a correlated
    subquery, for those items alone). Of the 494,659 items completed in 30 days of the seed
    organisation, 26,546 have a row that straddles it.
    """
    dialect = connection.dialect.name
    spend: dict[str, int] = {}
    queries = []
    for level, ranges in period.sources():
        if level is None:
            joined = EVENTS.join(items, items.c.id == _E.work_item)
            later = [condition, any_within(_E.ts, ranges), _E.ts > moment]
            queries.append(select(_E.work_item, func.sum(_E.cost_nanos)).select_from(joined).where(*later).group_by(_E.work_item))
            continue
        c = level.table.c
        # One pass over the buckets from the moment's on: those that start after it hold only later
        # events; in the moment's own, rows wholly on one side of it are settled here, and the items
        # with a row that straddles it are read at the finer levels, by id.
        moments_bucket = level.floor_sql(moment, dialect)
        in_it = c.bucket == moments_bucket
        straddles = and_(in_it, c.first_ts <= moment, c.last_ts > moment)
        query = (
            select(c.work_item, func.sum(case((c.bucket > moment, c.cost_nanos))), func.sum(case((and_(in_it, c.first_ts > moment), c.cost_nanos))),
                   func.max(case((straddles, 1), else_=0)))
            .select_from(level.table.join(items, items.c.id == c.work_item))
            .where(condition, any_within(c.bucket, ranges), c.bucket >= moments_bucket)
            .group_by(c.work_item)
        )  # fmt: skip
        straddling = []
        for item, after, in_moments_bucket, straddled in rows(connection.execute(query)):
            cost = int(after or 0) + (0 if straddled else int(in_moments_bucket or 0))
            if straddled:
                straddling.append(item)
            if cost:
                spend[item] = spend.get(item, 0) + cost
        for chunk in idsets.batches(connection, straddling):
            mine = [condition, idsets.among(connection, items.c.id, chunk)]
            end = level.next_sql(moment, dialect)  # the end of the moment's bucket, then of its finer buckets
            for finer in LEVELS[LEVELS.index(level) + 1 :]:
                f = finer.table.c
                cost = select(func.sum(f.cost_nanos)).where(f.work_item == items.c.id, f.bucket > moment, f.bucket < end).scalar_subquery()
                queries.append(select(items.c.id, cost).where(*mine))
                end = finer.next_sql(moment, dialect)
            cost = select(func.sum(_E.cost_nanos)).where(_E.work_item == items.c.id, _E.ts > moment, _E.ts < end).scalar_subquery()
            queries.append(select(items.c.id, cost).where(*mine))
    for query in queries:
        for item, cost in rows(connection.execute(query)):
            if cost:
                spend[item] = spend.get(item, 0) + int(cost)
    return spend


UP_TO_FIELDS = ("attempts", "answered", "cost_nanos", "total_tokens")


def usage_up_to(connection: Connection, moments: Sequence[tuple[str, datetime]]) -> Iterator[Row]:
    """Per item and model: (id, model, *UP_TO_FIELDS) of its events at or before its own moment
    (`moments`: (item id, moment) pairs), all time. The whole days before the moment's day come from
    the daily rollup, the whole hours of that day before the moment's hour from the hourly one, and the
    raw events of that hour up to the moment, each read by its (work_item, ...) index: one statement
    for all of them (`idsets.tables`; 10,000 at a time on SQLite). The raw read is bounded by constants
    too, the earliest hour and the latest moment of its items: the planner then leaves out the months
    (partitions) none reaches, and the report's transaction holds no lock on them (storage/partitions.py)."""
    dialect = connection.dialect.name
    daily, hourly = DAILY.table.c, HOURLY.table.c
    for chunk, items in idsets.tables(connection, "moments", (("id", String(200)), ("moment", DateTime())), moments):
        moment = items.c.moment
        day, hour = DAILY.floor_sql(moment, dialect), HOURLY.floor_sql(moment, dialect)
        earliest, latest = HOURLY.floor(min(at for _, at in chunk)), max(at for _, at in chunk)
        sources = ((DAILY.table, [daily.bucket < day]), (HOURLY.table, [hourly.bucket >= day, hourly.bucket < hour]),
                   (EVENTS, [_E.ts >= hour, _E.ts <= moment, _E.ts >= earliest, _E.ts <= latest]))  # fmt: skip
        yield from rows(connection.execute(_per_model(dialect, items, sources, (items.c.id,))))


def usage_between(connection: Connection, spans: Sequence[tuple[str, datetime, datetime]]) -> Iterator[Row]:
    """Per span and model: (id, moment, model, *UP_TO_FIELDS) of the item's events later than the
    span's `after` and at or before its `moment` (`spans`: (item id, after, moment); an item's spans do
    not overlap). As `usage_up_to`, with both ends cut: the whole days between from the daily rollup,
    the whole hours at each end from the hourly one, the raw events of the two partial hours (one when
    both ends share an hour), each part a range of its (work_item, ...) index; one statement per chunk.
    Each raw read is bounded by constants, as there: the hours of the `after`s, the hours of the moments."""
    dialect = connection.dialect.name
    daily, hourly = DAILY.table.c, HOURLY.table.c
    columns = (("id", String(200)), ("after", DateTime()), ("moment", DateTime()))
    for chunk, items in idsets.tables(connection, "spans", columns, spans):
        after, moment = items.c.after, items.c.moment
        day, hour = DAILY.floor_sql(moment, dialect), HOURLY.floor_sql(moment, dialect)
        # The first whole day and hour after `after` (the next ones even when it falls on a bucket's start:
        # an event at `after` itself is not in the span).
        first_day, first_hour = DAILY.next_sql(after, dialect), HOURLY.next_sql(after, dialect)
        earliest, after_hours = min(a for _, a, _ in chunk), HOURLY.floor(max(a for _, a, _ in chunk)) + HOURLY.size
        moment_hours, latest = HOURLY.floor(min(m for _, _, m in chunk)), max(m for _, _, m in chunk)
        sources = (
            (DAILY.table, [daily.bucket > after, daily.bucket < day]),
            (HOURLY.table, [hourly.bucket > after, hourly.bucket < first_day, hourly.bucket < hour]),  # the rest of after's day
            (HOURLY.table, [hourly.bucket >= day, hourly.bucket >= first_day, hourly.bucket < hour]),  # the moment's day, if another
            (EVENTS, [_E.ts > after, _E.ts < first_hour, _E.ts <= moment, _E.ts > earliest, _E.ts < after_hours]),  # the rest of after's hour
            (EVENTS, [_E.ts >= hour, _E.ts >= first_hour, _E.ts <= moment, _E.ts >= moment_hours, _E.ts <= latest]),  # the moment's, if another
        )
        yield from rows(connection.execute(_per_model(dialect, items, sources, (items.c.id, items.c.moment))))


def _per_model(dialect: str, items: Any, sources: Sequence[tuple[Table, list[Any]]], keys: Sequence[Any]) -> Any:
    """(*keys, model, *UP_TO_FIELDS) per row of `items` (its `keys`) and model: the sums of each source's
    rows of the item (`work_item = items.id`) meeting that source's conditions."""
    parts = []
    for source, conditions in sources:
        c = source.c
        if dialect == "postgresql":  # each item's own rows, by index: joined whole, the planner hashed all of usage_daily (7 s for 56,000 items)
            mine = select(c.model.label("model"), *columns_of(source, UP_TO_FIELDS)).where(c.work_item == items.c.id, *conditions).group_by(c.model).lateral()
            parts.append(select(*keys, mine.c.model, *(mine.c[name] for name in UP_TO_FIELDS)).select_from(items.join(mine, true())))
            continue
        mine_keys = [c.work_item.label("id") if key is items.c.id else key for key in keys]  # grouped by the source's own column
        query = select(*mine_keys, c.model.label("model"), *columns_of(source, UP_TO_FIELDS))
        parts.append(query.select_from(source.join(items, items.c.id == c.work_item)).where(*conditions).group_by(*mine_keys, c.model))
    merged = union_all(*parts).subquery()
    names = [key.name for key in keys]
    query = select(*(merged.c[name] for name in names), merged.c.model, *(func.sum(merged.c[name]).label(name) for name in UP_TO_FIELDS))
    return query.group_by(*(merged.c[name] for name in names), merged.c.model)
