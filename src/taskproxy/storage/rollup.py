"""The usage rollups (`usage_daily`, `usage_hourly`; see models._UsageSums): usage_events summed per UTC
day (and person) and per UTC hour, so that reports read thousands of rows where they would scan millions;
`usage_key_daily`, per UTC day, key, work item and team, for the gaming signals' per-key figures (with
the hours of the day in which the key made requests, for the machine cadence); and
`usage_team_daily`, per UTC day, team and model, for usage by team or model; and `usage_item_totals`,
all time per work item, team and model, for an item's lifetime usage (`LIFETIME`).

They are exact, never an estimate:

- The writer adds to them in the transaction that inserts the events (`add`), counting only the
  events that insert actually wrote: a replayed batch, whose ids exist already, adds nothing.
- Deltas are upserted in key order (hourly, daily, per-key, per-team, then per-item rows), so two replicas writing the same
  rows lock them in the same order and cannot deadlock.
- A reader asking about [since, until) takes the whole days inside it from `usage_daily`, the whole
  hours left at its ends from `usage_hourly` and the partial hours at its edges from the raw events
  (`Period`, `totals`): any boundary, to the microsecond, gives the figures a scan of the raw events
  would, while at most 46 hourly buckets and two partial hours are read below the days.
- `backfill` builds them from the raw events (a database adopted from before migrations, the scale
  benchmark; the migrations that created them froze the same statement).
- A per-key period (`Period(..., levels=KEY_LEVELS)`) takes its whole days from `usage_key_daily` and
  the partial days at its edges from the raw events.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from datetime import datetime, timedelta
import operator
from typing import Any, NamedTuple

from sqlalchemy import Integer, Row, Select, Table, and_, case, cast, column, distinct, func, insert, inspect, literal_column, or_, select, table, true, union_all
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from taskproxy.storage import bulk
from taskproxy.storage.rows import rows
from taskproxy.storage.models import UsageDaily, UsageEvent, UsageHourly, UsageItemTotals, UsageKeyDaily, UsageTeamDaily

# Token counting, Anthropic's and OpenAI's: an event, but not a request, and no AI use (nothing generated).
TOKEN_COUNT_ROUTES = ("/v1/messages/count_tokens", "/v1/responses/input_tokens")


def is_request(attempt: int, route: str) -> bool:
    """What every report calls a request: one a client sent, counted once. Its first attempt (fallbacks
    are more attempts of the same request), and not a token count (Claude Code calls count_tokens
    often; it generates nothing). `request_clause` says the same in SQL."""
    return attempt == 1 and route not in TOKEN_COUNT_ROUTES


def request_clause(events: Any) -> ColumnElement:
    """`is_request` as a condition on the columns `events` of usage_events."""
    return and_(events.attempt == 1, events.route.not_in(TOKEN_COUNT_ROUTES))
EVENTS = UsageEvent.__table__
_E = EVENTS.c
COUNTS = (
    "events", "ok_events", "ok_token_counts", "requests", "first_attempts", "prompt_tokens", "completion_tokens", "total_tokens",
    "cached_tokens", "reasoning_tokens", "unpriced_events",
)  # fmt: skip
TOKENS = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens")


@dataclass(frozen=True)
class Level:
    """One rollup table: its bucket (a UTC day or hour) and its key columns (`bucket` first), or no
    bucket at all (unit None: all time)."""

    unit: str | None  # 'day' | 'hour' (also the unit's name in SQL) | None
    table: Table
    key: tuple[str, ...]
    extra: tuple[str, ...] = ()  # what this table keeps beyond the sums every rollup has (EXTRAS)

    @property
    def size(self) -> timedelta:
        return timedelta(days=1) if self.unit == "day" else timedelta(hours=1)

    def floor(self, ts: datetime) -> datetime:
        hour = ts.replace(minute=0, second=0, microsecond=0)
        return hour.replace(hour=0) if self.unit == "day" else hour

    def ceil(self, ts: datetime) -> datetime:
        start = self.floor(ts)
        return start if start == ts else start + self.size

    def floor_sql(self, column: Any, dialect: str) -> ColumnElement:
        """The bucket of a timestamp column, in the form the column stores (constants inlined: the same
        expression appears in SELECT and GROUP BY)."""
        if dialect == "postgresql":
            return func.date_trunc(literal_column(f"'{self.unit}'"), column)
        # SQLAlchemy stores SQLite datetimes as 'YYYY-MM-DD HH:MM:SS.ffffff'.
        length, rest = (10, "' 00:00:00.000000'") if self.unit == "day" else (13, "':00:00.000000'")
        return func.substr(column, literal_column("1"), literal_column(str(length))).concat(literal_column(rest))

    def next_sql(self, column: Any, dialect: str) -> ColumnElement:
        """The start of the bucket after the one a timestamp column falls in."""
        if dialect == "postgresql":
            return self.floor_sql(column, dialect) + literal_column(f"interval '1 {self.unit}'")
        # From the bucket's start, not the timestamp: SQLite's date functions keep milliseconds, and
        # round a time in an hour's last half millisecond up into the next hour.
        form = "'%Y-%m-%d 00:00:00.000000'" if self.unit == "day" else "'%Y-%m-%d %H:00:00.000000'"
        return func.strftime(literal_column(form), self.floor_sql(column, dialect), literal_column(f"'+1 {self.unit}'"))


DAILY = Level("day", UsageDaily.__table__, ("bucket", "work_item", "team", "model", "owner"))
HOURLY = Level("hour", UsageHourly.__table__, ("bucket", "work_item", "team", "model"))
LEVELS = (DAILY, HOURLY)  # coarsest first
KEY_DAILY = Level("day", UsageKeyDaily.__table__, ("bucket", "key_id", "work_item", "team"), extra=("request_hours",))
KEY_LEVELS = (KEY_DAILY,)  # per key: whole days, then the raw events
TEAM_DAILY = Level("day", UsageTeamDaily.__table__, ("bucket", "team", "model"))
TEAM_LEVELS = (TEAM_DAILY, HOURLY)  # per team or model: whole days, whole hours, then the raw events
ITEM_TOTALS = Level(None, UsageItemTotals.__table__, ("work_item", "team", "model"), extra=("first_answered_ts",))
WRITTEN = (HOURLY, DAILY, KEY_DAILY, TEAM_DAILY, ITEM_TOTALS)  # the order the writer upserts in


# -- the write path -------------------------------------------------------------------------------


def _accumulate(sums: dict[tuple, list], key: tuple, counts: tuple[int, ...], cost: int | None, ts: datetime) -> None:
    row = sums.get(key)
    if row is None:
        sums[key] = [counts, cost, ts, ts]
        return
    row[0] = tuple(map(operator.add, row[0], counts))
    if cost is not None:
        row[1] = cost if row[1] is None else row[1] + cost
    if ts < row[2]:
        row[2] = ts
    elif ts > row[3]:
        row[3] = ts


def deltas(events: Iterable[dict]) -> dict[Level, list[dict]]:
    """What `events` (rows as inserted into usage_events) add to each rollup: one row per key, in key order."""
    hourly: dict[tuple, list] = {}
    daily: dict[tuple, list] = {}
    per_key: dict[tuple, list] = {}
    per_team: dict[tuple, list] = {}
    lifetime: dict[tuple, list] = {}
    hours_of: dict[tuple, int] = defaultdict(int)  # per key row: the hours with a request (`request_hours`)
    answered_from: dict[tuple, datetime] = {}  # per lifetime row: the first answer (`first_answered_ts`)
    for event in events:
        ts = event["ts"]
        hour = ts.replace(minute=0, second=0, microsecond=0)
        first = event.get("attempt", 1) == 1
        cost = event["cost_nanos"]
        ok = 1 if event["status"] < 400 else 0
        counts = (
            1, ok, 1 if ok and event["route"] in TOKEN_COUNT_ROUTES else 0, 1 if is_request(event.get("attempt", 1), event["route"]) else 0,
            1 if first else 0,
            event.get("prompt_tokens", 0), event.get("completion_tokens", 0), event.get("total_tokens", 0),
            event.get("cached_tokens", 0), event.get("reasoning_tokens", 0), 1 if cost is None else 0,
        )  # fmt: skip  (in the order of COUNTS)
        item, team, model = event["work_item"], event["team"] or "", event["model"]
        _accumulate(hourly, (hour, item, team, model), counts, cost, ts)
        _accumulate(daily, (hour.replace(hour=0), item, team, model, event["owner"]), counts, cost, ts)
        key_row = (hour.replace(hour=0), event["key_id"], item, team)
        _accumulate(per_key, key_row, counts, cost, ts)
        hours_of[key_row] |= (1 << ts.hour) if counts[3] else 0  # a request
        _accumulate(per_team, (hour.replace(hour=0), team, model), counts, cost, ts)
        _accumulate(lifetime, (item, team, model), counts, cost, ts)
        if ok and not counts[2]:  # answered, not a token count
            known = answered_from.get((item, team, model))
            if known is None or ts < known:
                answered_from[(item, team, model)] = ts
    found = {}
    for level, sums in ((HOURLY, hourly), (DAILY, daily), (KEY_DAILY, per_key), (TEAM_DAILY, per_team), (ITEM_TOTALS, lifetime)):
        columns = (*level.key, *COUNTS, "cost_nanos", "first_ts", "last_ts")
        found[level] = [dict(zip(columns, (*key, *counts, cost, first, last))) for key, (counts, cost, first, last) in sorted(sums.items())]
    for row in found[KEY_DAILY]:
        row["request_hours"] = hours_of[tuple(row[name] for name in KEY_DAILY.key)]
    for row in found[ITEM_TOTALS]:
        row["first_answered_ts"] = answered_from.get((row["work_item"], row["team"], row["model"]))
    return found


def _merges(level: Level, dialect: str) -> dict[str, str]:
    """How an upsert folds a delta (`excluded`) into a rollup row: SQL per column."""
    table = level.table.name
    least, greatest = ("least", "greatest") if dialect == "postgresql" else ("min", "max")  # SQLite's of two values
    merges = {column: f"{table}.{column} + excluded.{column}" for column in COUNTS}
    merges["cost_nanos"] = f"CASE WHEN excluded.cost_nanos IS NULL THEN {table}.cost_nanos ELSE COALESCE({table}.cost_nanos, 0) + excluded.cost_nanos END"
    merges["first_ts"] = f"{least}({table}.first_ts, excluded.first_ts)"
    merges["last_ts"] = f"{greatest}({table}.last_ts, excluded.last_ts)"
    for name in level.extra:
        merges[name] = EXTRA_MERGES[name].format(table=table, name=name, least=least)
    return merges


def add(connection: Connection, events: Iterable[dict]) -> None:
    """Add `events` (rows the caller has just inserted, in this transaction) to the rollups, from Python
    (SQLite; PostgreSQL adds them in the inserting statement itself: `upserts_over`)."""
    for level, summed in deltas(events).items():  # in WRITTEN order, each in key order: concurrent writers lock alike
        bulk.upsert(connection, level.table, summed, level.key, _merges(level, connection.dialect.name))


def _summed(level: Level, events: Any, dialect: str, stored: dict[str, str] | None = None, extra: tuple[str, ...] | None = None) -> Select:
    """The rows of `level` that the events `events` (columns of usage_events, or of a CTE of its rows)
    make: the sums of `stored` (aggregate name -> column; all of them by default), then the level's extras."""
    stored = _STORED if stored is None else stored
    extra = level.extra if extra is None else extra
    aggregates = _aggregates(events)
    by = {"work_item": events.work_item, "team": func.coalesce(events.team, literal_column("''")), "model": events.model,
          "owner": events.owner, "key_id": events.key_id}  # fmt: skip
    buckets = [] if level.unit is None else [level.floor_sql(events.ts, dialect)]
    keys = [*buckets, *(by[name] for name in level.key if name != "bucket")]
    extras = [EXTRAS[name](events, dialect) for name in extra]
    return select(*keys, *(aggregates[name].raw for name in stored), *extras).group_by(*keys)


def request_hours(events: Any, dialect: str) -> ColumnElement:
    """The hours of the day (bit h: hour h, UTC) in which `events` hold a request: over the events of
    one day, what `usage_key_daily.request_hours` keeps. SQLite has no bitwise aggregate, but the sum of
    distinct powers of two is their OR."""
    if dialect == "postgresql":
        hour = cast(func.extract("hour", events.ts), Integer)
        return func.bit_or(case((request_clause(events), literal_column("1").op("<<")(hour)), else_=0))
    hour = cast(func.strftime(literal_column("'%H'"), events.ts), Integer)
    return func.sum(distinct(case((request_clause(events), literal_column("1").op("<<")(hour)), else_=0)))


EXTRAS: dict[str, Callable[[Any, str], ColumnElement]] = {  # Level.extra: column -> its aggregate
    "request_hours": request_hours,
    "first_answered_ts": lambda events, _dialect: _aggregates(events)["first_answered"].raw,
}
# How an upsert folds an extra's delta into the row: the hours' bits OR-ed (both dialects' `|`); the
# earliest answer kept (LEAST/MIN of two ignore a NULL on PostgreSQL; SQLite's min() answers NULL, hence COALESCE).
EXTRA_MERGES = {
    "request_hours": "{table}.{name} | excluded.{name}",
    "first_answered_ts": "COALESCE({least}({table}.{name}, excluded.{name}), {table}.{name}, excluded.{name})",
}


SOURCE_COLUMNS = ("ts", "work_item", "team", "model", "owner", "key_id", "attempt", "route", "status", *TOKENS, "cost_nanos")


@cache
def upserts_over(source: str) -> tuple[str, ...]:
    """PostgreSQL: the statements that add the events of `source` (the name of a CTE of the rows just
    inserted, with SOURCE_COLUMNS) to each rollup, in WRITTEN order, each level's rows in key order
    (so concurrent writers lock alike). The same sums as `backfill`'s, from the same definitions."""
    dialect = postgresql.dialect()
    events = table(source, *(column(name) for name in SOURCE_COLUMNS)).c
    found = []
    for level in WRITTEN:
        summed = _summed(level, events, "postgresql")
        query = summed.order_by(*(literal_column(str(n + 1)) for n in range(len(level.key))))
        merges = ", ".join(f"{name} = {sql}" for name, sql in _merges(level, "postgresql").items())
        found.append(
            f"INSERT INTO {level.table.name} ({', '.join([*level.key, *_STORED.values(), *level.extra])}) "
            f"{query.compile(dialect=dialect, compile_kwargs={'literal_binds': True})} "
            f"ON CONFLICT ({', '.join(level.key)}) DO UPDATE SET {merges}"
        )  # fmt: skip
    return tuple(found)


def backfill(connection: Connection, levels: Sequence[Level] = WRITTEN) -> None:
    """Fill empty rollups from usage_events, by one INSERT ... SELECT ... GROUP BY each: the sums the
    table has, so that a database at an earlier revision is filled as its writer would have."""
    for level in levels:
        present = {found["name"] for found in inspect(connection).get_columns(level.table.name)}
        stored = {name: column for name, column in _STORED.items() if column in present}
        extra = tuple(name for name in level.extra if name in present)
        query = _summed(level, _E, connection.dialect.name, stored, extra)
        connection.execute(insert(level.table).from_select([*level.key, *stored.values(), *extra], query))


# -- reading: whole days and hours from the rollups, the edges from the raw events -----------------

Range = tuple[datetime | None, datetime | None]  # [low, high); None: unbounded


def within(column: Any, low: datetime | None, high: datetime | None) -> list[Any]:
    """Conditions for low <= column < high (None: unbounded)."""
    clauses = [] if low is None else [column >= low]
    return clauses if high is None else [*clauses, column < high]


def any_within(column: Any, ranges: Sequence[Range]) -> ColumnElement:
    return or_(*(and_(true(), *within(column, low, high)) for low, high in ranges))


def _cover(
    low: datetime | None, high: datetime | None, levels: Sequence[Level], depth: int = 0
) -> list[tuple[Level | None, datetime | None, datetime | None]]:
    if low is not None and high is not None and low >= high:
        return []
    if depth == len(levels):
        return [(None, low, high)]
    level = levels[depth]
    start = None if low is None else level.ceil(low)
    end = None if high is None else level.floor(high)
    if start is not None and end is not None and start >= end:
        return _cover(low, high, levels, depth + 1)  # no whole bucket of this size inside
    left = [] if low is None else _cover(low, start, levels, depth + 1)
    right = [] if high is None else _cover(end, high, levels, depth + 1)
    return [*left, (level, start, end), *right]


@dataclass(frozen=True)
class Period:
    """[since, until), either end open, as the ranges each source answers for: whole days (`DAILY`), the
    whole hours left at the ends (`HOURLY`) and the partial hours at the edges (None: raw events).
    With `levels=KEY_LEVELS`: whole days per key, and the partial days from the raw events."""

    since: datetime | None = None
    until: datetime | None = None
    levels: tuple[Level, ...] = LEVELS

    def ranges(self, level: Level | None) -> list[Range]:
        return [(low, high) for part, low, high in _cover(self.since, self.until, self.levels) if part is level]

    def sources(self) -> list[tuple[Level | None, list[Range]]]:
        return [(level, found) for level in (*self.levels, None) if (found := self.ranges(level))]


ALL_TIME = Period()
# All time from the per-item totals, a row per work item, team and model: for reads `by` and `where`
# those columns alone (an item's lifetime usage), which it answers by index, not across the history.
LIFETIME = Period(levels=(ITEM_TOTALS,))
# All time per key, from its days (by the index on key_id and bucket, 0020).
KEY_ALL_TIME = Period(levels=KEY_LEVELS)


class _Aggregate(NamedTuple):
    raw: Any  # over usage_events
    rollup: Callable[[Any], Any]  # the same over a rollup table's columns
    merge: Callable[[Any], Any] = func.sum  # partial results (a source's each) into one; SUM keeps NULL for "no known price"


def _sum_of(column: str) -> Callable[[Any], Any]:
    return lambda c: func.sum(c[column])


def _aggregates(events: Any = _E) -> dict[str, _Aggregate]:
    """The named aggregates, over the columns `events` (usage_events' by default) and over a rollup's."""
    first = events.attempt == 1
    ok, token_count = events.status < 400, events.route.in_(TOKEN_COUNT_ROUTES)
    found = {
        "attempts": _Aggregate(func.count(), _sum_of("events")),
        "ok": _Aggregate(func.sum(case((ok, 1), else_=0)), _sum_of("ok_events")),
        "ok_token_counts": _Aggregate(func.sum(case((and_(ok, token_count), 1), else_=0)), _sum_of("ok_token_counts")),
        # Answered events that generated something: what makes an item AI-assisted (not a token count).
        "answered": _Aggregate(func.sum(case((and_(ok, ~token_count), 1), else_=0)), lambda c: func.sum(c.ok_events - c.ok_token_counts)),
        # One client request = one first attempt; fallback attempts are events but not more requests, and
        # token counting (Claude Code calls count_tokens often) generates nothing.
        "requests": _Aggregate(func.sum(case((request_clause(events), 1), else_=0)), _sum_of("requests")),
        "first_attempts": _Aggregate(func.sum(case((first, 1), else_=0)), _sum_of("first_attempts")),
    }
    for name in TOKENS:
        found[name] = _Aggregate(func.sum(events[name]), _sum_of(name))
    found["cost_nanos"] = _Aggregate(func.sum(events.cost_nanos), _sum_of("cost_nanos"))  # NULL when no price is known
    found["unpriced_attempts"] = _Aggregate(func.sum(case((events.cost_nanos.is_(None), 1), else_=0)), _sum_of("unpriced_events"))
    found["first_used"] = _Aggregate(func.min(events.ts), lambda c: func.min(c.first_ts), func.min)
    # The per-item totals alone keep it (`first_answered_ts`): read it over LIFETIME.
    found["first_answered"] = _Aggregate(func.min(case((and_(ok, ~token_count), events.ts))), lambda c: func.min(c.first_answered_ts), func.min)
    found["last_used"] = _Aggregate(func.max(events.ts), lambda c: func.max(c.last_ts), func.max)
    return found


# aggregate name -> rollup column, for the backfill
_STORED = {
    "attempts": "events", "ok": "ok_events", "ok_token_counts": "ok_token_counts", "requests": "requests", "first_attempts": "first_attempts",
    **{name: name for name in TOKENS}, "cost_nanos": "cost_nanos", "unpriced_attempts": "unpriced_events",
    "first_used": "first_ts", "last_used": "last_ts",
}  # fmt: skip
FIELDS = tuple(_STORED)


def raw_columns(fields: Sequence[str]) -> list[Any]:
    """The named aggregates over usage_events, labelled (for queries the rollups cannot answer, e.g. per key)."""
    return columns_of(EVENTS, fields)


def columns_of(source: Table, fields: Sequence[str]) -> list[Any]:
    """The named aggregates over `source`, usage_events or a rollup table, labelled by name."""
    aggregates = _aggregates()
    return [(aggregates[name].raw if source is EVENTS else aggregates[name].rollup(source.c)).label(name) for name in fields]


def grouped(
    connection: Connection,
    *,
    by: Sequence[str] = (),
    period: Period = ALL_TIME,
    fields: Sequence[str] = FIELDS,
    where: Callable[[Any], list[Any]] = lambda columns: [],
) -> Iterator[Row]:
    """The named aggregates of the events in `period`, a row per group: the `by` values, then the
    `fields`, each labelled by its name. The sources (`Period.sources`) are added up by the database,
    so a group comes back once, whatever it spans. The arguments are those of `totals`; a team is ''
    for events without one, here (a rollup's key cannot be NULL)."""
    if "day" in by and any(level.unit is None for level in period.levels):
        raise ValueError("the per-item totals (LIFETIME) have no days")
    aggregates = _aggregates()
    parts = []
    for level, ranges in period.sources():
        table = EVENTS if level is None else level.table
        stamp = table.c.ts if level is None else table.c.get("bucket")  # None for LIFETIME, which has no range to check
        keys = [func.date(stamp) if name == "day" else func.coalesce(table.c.team, "") if name == "team" else table.c[name] for name in by]
        columns = [(aggregates[name].raw if level is None else aggregates[name].rollup(table.c)).label(name) for name in fields]
        query = select(*(key.label(name) for key, name in zip(keys, by, strict=True)), *columns).where(any_within(stamp, ranges), *where(table.c))
        parts.append(query.group_by(*keys) if keys else query)
    if not parts:
        return iter(())
    if len(parts) == 1:
        return rows(connection.execute(parts[0]))
    sources = union_all(*parts).subquery()
    keys = [sources.c[name] for name in by]
    query = select(*keys, *(aggregates[name].merge(sources.c[name]).label(name) for name in fields))
    return rows(connection.execute(query.group_by(*keys) if keys else query))


def totals(
    connection: Connection,
    *,
    by: Sequence[str] = (),
    period: Period = ALL_TIME,
    fields: Sequence[str] = FIELDS,
    where: Callable[[Any], list[Any]] = lambda columns: [],
) -> dict[tuple, dict[str, Any]]:
    """The named aggregates of the events in `period`, per group: {group values: {field: value}}.

    `by` names columns every source has (work_item, team, model) or "day" (the UTC date); `where` is
    given each source's columns (`.c`) and returns conditions on them. A team is None for events
    without one, from any source. Groups with no event are absent.
    """
    found: dict[tuple, dict[str, Any]] = {}
    for row in grouped(connection, by=by, period=period, fields=fields, where=where):
        values = row._mapping
        if not by and not any(values[name] for name in fields):
            continue  # an aggregate over no row at all
        key = tuple(None if name == "team" and row[i] == "" else row[i] for i, name in enumerate(by))
        found[key] = {name: values[name] for name in fields}
    return found
