"""The machine-cadence signal: a key whose requests come at near-constant intervals, or around the
clock (see `signals.py`). On PostgreSQL the database computes each key's figures (a window over its
requests in the order of the (key_id, ts) index) and a row per key comes back; SQLite streams the
request times. One evidence definition for both.

Only the keys that could meet either test have their requests read (`could_be_flagged`). The hours of
each whole day in which a key made requests (`usage_key_daily.request_hours`, kept by the writer) rule
the others out without reading an event:

- Around the clock: fewer days with `around_clock_min_hours` hours than `around_clock_min_days`, even
  counting the period's partial days (at most two) as such days.
- Regular intervals: a run of L hours without a request, between two hours with one, is an interval
  longer than L hours. With n requests, the mean interval m is at most (last − first) / (n − 1) over
  the key's events, and the intervals' squared deviations add up to at least Σ (L × 3600 − m)² over
  the runs longer than m. Above (n − 1) × (cadence_max_cv × m)², the coefficient of variation cannot
  be within `cadence_max_cv`. A person's nights and weekends are such runs.

Each is a necessary condition, so a key the full test would flag is never ruled out, as long as the
hours were kept for all its requests (a row that counts requests but no hour, written by a replica
older than migration 0012 during an upgrade, rules nothing out for its key) and the period's raw
events are all there (`recording.retention_months`; the check reads nothing in a dropped month). The
evidence of every flagged key comes from its requests, as before."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from itertools import groupby
from typing import Any

from sqlalchemy import Integer, and_, cast, distinct, func, select
from sqlalchemy.engine import Connection

from taskproxy.reports.signal_data import EVENTS, Found, ItemRow, KeyInfo, Spend, is_service, item_entry, listed, rounded
from taskproxy.settings import SignalSettings
from taskproxy.storage import idsets
from taskproxy.storage.rollup import KEY_DAILY, KEY_LEVELS, Period, Range, any_within, request_clause, within
from taskproxy.timeutil import iso


@dataclass(frozen=True)
class Cadence:
    """One key's requests in the period, as the machine-cadence signal reads them."""

    requests: int
    first: datetime | None
    last: datetime | None
    gaps: int  # intervals between consecutive requests
    mean: float | None  # of the intervals, in seconds
    pstdev: float | None
    median: float | None
    distinct_hours: int  # hours of the day (UTC) with a request
    around_days: int  # days with requests in at least `around_clock_min_hours` distinct hours


@dataclass
class Intervals:
    requests: int = 0
    first: datetime | None = None
    last: datetime | None = None
    gaps: list[float] = field(default_factory=list)
    hours: set[int] = field(default_factory=set)
    day_hours: dict[Any, set[int]] = field(default_factory=lambda: defaultdict(set))


def cadence(
    connection: Connection, keys: dict[str, KeyInfo], spend: dict[str, dict[str, Spend]], items: dict[str, ItemRow],
    since: datetime, until: datetime, t: SignalSettings,
) -> list[Found]:  # fmt: skip
    counts: dict[str, int] = {k: sum(s.requests for s in per_item.values()) for k, per_item in spend.items()}
    wanted = sorted(
        k for k, n in counts.items() if n >= t.cadence_min_requests and (t.flag_service_keys or not is_service(keys, k))
    )
    wanted = could_be_flagged(connection, wanted, spend, since, until, t)
    if not wanted:
        return []
    runs = _cadence_in_postgres if connection.dialect.name == "postgresql" else _cadence_from_times
    found: list[Found] = []
    for key_id, run in runs(connection, wanted, since, until, t):
        result = _cadence_evidence(run, t)
        if result is not None:
            found.append((key_id, result, listed([item_entry(items, s) for s in spend[key_id].values() if s.requests])))
    return found


def could_be_flagged(
    connection: Connection, keys: list[str], spend: dict[str, dict[str, Spend]], since: datetime, until: datetime, t: SignalSettings
) -> list[str]:  # fmt: skip
    """The `keys` that the hours of their whole days with requests do not rule out (module docstring)."""
    period = Period(since, until, levels=KEY_LEVELS)
    days = period.ranges(KEY_DAILY)
    if not days:
        return keys
    partial_days = len(period.ranges(None))
    found: list[str] = []
    for batch in idsets.batches(connection, keys):
        ruled_out = set()
        for key_id, hours in _hours_by_day(connection, batch, days):
            if hours is None:
                continue  # hours not kept for some of its requests: nothing is ruled out
            around = sum(1 for mask in hours.values() if mask.bit_count() >= t.around_clock_min_hours)
            if around + partial_days < t.around_clock_min_days and not _may_be_regular(hours, spend[key_id].values(), t.cadence_max_cv):
                ruled_out.add(key_id)
        found.extend(key for key in batch if key not in ruled_out)  # a key with no whole day's hours is not ruled out
    return found


def _hours_by_day(connection: Connection, keys: list[str], days: list[Range]) -> Iterator[tuple[str, dict[int, int] | None]]:
    """Per key: {day number: its hours with a request}, OR-ed over the key's rows of the day (one per
    item); None when a row counts requests but no hour (written by a replica older than migration
    0012, during an upgrade). PostgreSQL ORs them and sends a row per key; SQLite's are folded here."""
    c = KEY_DAILY.table.c
    where = (any_within(c.bucket, days), idsets.among(connection, c.key_id, keys), c.requests > 0)
    unknown = and_(c.request_hours == 0, c.requests > 0)
    if connection.dialect.name == "postgresql":
        day = cast(func.extract("epoch", c.bucket) / 86400, Integer).label("day")
        per_day = (select(c.key_id, day, func.bit_or(c.request_hours).label("mask"), func.bool_or(unknown).label("unknown"))
                   .where(*where).group_by(c.key_id, day).subquery())  # fmt: skip
        d = per_day.c
        query = select(d.key_id, func.array_agg(d.day), func.array_agg(d.mask), func.bool_or(d.unknown)).group_by(d.key_id)
        for key_id, numbers, masks, missing in connection.execute(query.execution_options(yield_per=5_000)):
            yield key_id, None if missing else dict(zip(numbers, masks))
        return
    rows = connection.execute(select(c.key_id, c.bucket, c.request_hours).where(*where).order_by(c.key_id))
    for key_id, day_rows in groupby(rows, key=lambda row: row.key_id):
        hours: dict[int, int] | None = defaultdict(int)
        for row in day_rows:
            if row.request_hours == 0:
                hours = None
            elif hours is not None:
                hours[row.bucket.toordinal()] |= row.request_hours
        yield key_id, hours


def _may_be_regular(hours: dict[int, int], spend: Collection[Spend], max_cv: float) -> bool:
    requests = sum(s.requests for s in spend)
    first = min((s.first for s in spend if s.first is not None), default=None)
    last = max((s.last for s in spend if s.last is not None), default=None)
    if requests < 2 or first is None or last is None or last <= first:
        return True
    mean = (last - first).total_seconds() / (requests - 1)  # at least the mean interval between requests
    start = min(hours)
    timeline = sum(mask << (24 * (day - start)) for day, mask in hours.items())
    quiet = (len(run) * 3600 for run in bin(timeline)[2:].strip("0").split("1"))  # runs of hours without a request
    excess = sum((seconds - mean) ** 2 for seconds in quiet if seconds > mean)
    return excess <= (requests - 1) * (max_cv * mean) ** 2 * (1 + 1e-9)  # the slack: rounding never rules a key out


def _cadence_from_times(connection: Connection, keys: list[str], since: datetime, until: datetime, t: SignalSettings) -> Iterator[tuple[str, Cadence]]:
    """Each key's cadence from its request times, streamed in order (SQLite)."""
    current: Intervals | None = None
    current_key: str | None = None

    def finish() -> Iterator[tuple[str, Cadence]]:
        if current is not None and current_key is not None:
            gaps = current.gaps
            mean = statistics.fmean(gaps) if gaps else None
            yield current_key, Cadence(
                current.requests, current.first, current.last, len(gaps), mean, statistics.pstdev(gaps) if gaps else None,
                statistics.median(gaps) if gaps else None, len(current.hours),
                sum(1 for hours in current.day_hours.values() if len(hours) >= t.around_clock_min_hours),
            )  # fmt: skip

    for key_id, ts in _requests_by_key(connection, keys, since, until):
        if key_id != current_key:
            yield from finish()
            current, current_key = Intervals(), key_id
        assert current is not None
        if current.last is not None:
            current.gaps.append((ts - current.last).total_seconds())
        current.first = current.first or ts
        current.last = ts
        current.requests += 1
        current.hours.add(ts.hour)
        current.day_hours[ts.date()].add(ts.hour)
    yield from finish()


def _cadence_in_postgres(connection: Connection, keys: list[str], since: datetime, until: datetime, t: SignalSettings) -> Iterator[tuple[str, Cadence]]:
    """The same figures computed by PostgreSQL (the intervals by a window over each key's requests, in
    the order of the (key_id, ts) index): only a row per key comes back, not every request's time."""
    for batch in idsets.batches(connection, keys):
        previous = func.lag(EVENTS.ts).over(partition_by=EVENTS.key_id, order_by=EVENTS.ts)
        day = func.date_trunc("day", EVENTS.ts)
        hour = func.extract("hour", EVENTS.ts)
        # The rank of a request's hour among its day's distinct hours: a day reaches N distinct hours
        # when one of its requests ranks N (so one pass over the requests, no join).
        hour_rank = func.dense_rank().over(partition_by=(EVENTS.key_id, day), order_by=hour)
        requests = (
            select(EVENTS.key_id, EVENTS.ts, func.extract("epoch", EVENTS.ts - previous).label("gap"), day.label("day"), hour.label("hour"),
                   hour_rank.label("hour_rank"))
            .where(*within(EVENTS.ts, since, until), request_clause(EVENTS), idsets.among(connection, EVENTS.key_id, batch))
            .subquery()
        )  # fmt: skip
        r = requests.c
        query = (
            select(r.key_id, func.count().label("requests"), func.min(r.ts).label("first"), func.max(r.ts).label("last"),
                   func.count(r.gap).label("gaps"), func.avg(r.gap).label("mean"), func.stddev_pop(r.gap).label("pstdev"),
                   func.percentile_cont(0.5).within_group(r.gap).label("median"), func.count(distinct(r.hour)).label("hours"),
                   func.count(distinct(r.day)).filter(r.hour_rank >= t.around_clock_min_hours).label("around"))
            .group_by(r.key_id)
        )  # fmt: skip
        for row in connection.execute(query):
            number = lambda value: None if value is None else float(value)  # noqa: E731 (numeric → float, as the times give)
            yield row.key_id, Cadence(int(row.requests), row.first, row.last, int(row.gaps), number(row.mean), number(row.pstdev),
                                      number(row.median), int(row.hours), int(row.around))  # fmt: skip


def _requests_by_key(connection: Connection, keys: list[str], since: datetime, until: datetime) -> Iterator[tuple[str, datetime]]:
    """(key, time) of the keys' requests in the period, by key then time. The keys are bound in batches
    (storage/idsets.py: an organisation has more keys than a statement binds parameters)."""
    for batch in idsets.batches(connection, keys):
        query = (
            select(EVENTS.key_id, EVENTS.ts)
            .where(*within(EVENTS.ts, since, until), request_clause(EVENTS), idsets.among(connection, EVENTS.key_id, batch))
            .order_by(EVENTS.key_id, EVENTS.ts)
        )
        yield from connection.execute(query.execution_options(yield_per=20_000))  # type: ignore[misc]


def _cadence_evidence(run: Cadence, t: SignalSettings) -> dict[str, Any] | None:
    if run.requests < t.cadence_min_requests or not run.gaps or run.mean is None:
        return None
    cv = run.pstdev / run.mean if run.mean > 0 and run.pstdev is not None else None
    reasons = []
    if cv is not None and cv <= t.cadence_max_cv:
        reasons.append("regular_intervals")
    if run.around_days >= t.around_clock_min_days:
        reasons.append("around_the_clock")
    if not reasons:
        return None
    return {
        "requests": run.requests,
        "first": iso(run.first),
        "last": iso(run.last),
        "interval_mean_seconds": rounded(run.mean, 3),
        "interval_median_seconds": rounded(run.median, 3),
        "interval_cv": rounded(cv),
        "distinct_hours": run.distinct_hours,
        "around_the_clock_days": run.around_days,
        "reasons": reasons,
    }
