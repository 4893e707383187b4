"""The usage rollups (storage/rollup.py) against the raw events they sum, on SQLite and PostgreSQL.

The expected figures are computed here in plain Python from the rows of usage_events (or, for the
spend after completion, by the raw-events query the report used before the rollup existed), never
with the rollup module's helpers.
"""

from __future__ import annotations

import random
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from conftest import BOTH_DATABASES
from sqlalchemy import and_, case, column, func, insert, select
from sqlalchemy import table as sa_table
from sqlalchemy.engine import Engine

from taskproxy import registry
from taskproxy.money import usd
from taskproxy.reports import adoption_data
from taskproxy.reports.usage import usage_grouped
from taskproxy.storage import repo, rollup, spend_after
from taskproxy.storage.batch import Record
from taskproxy.storage.db import MIGRATIONS, head_revision, make_engine, upgrade_schema
from taskproxy.storage.models import SpendCounter, UsageEvent, UsageItemTotals, WorkItem
from taskproxy.storage.writer import BatchWriter
from taskproxy.timeutil import iso, utcnow

T0 = datetime(2026, 3, 2, 8)
COUNT_TOKENS = ("/v1/messages/count_tokens", "/v1/responses/input_tokens")  # token counts, Anthropic's and OpenAI's


@dataclass
class Row:
    """A recorded event as the writer takes it (anything with to_record())."""

    row: dict

    def to_record(self) -> Record:
        return Record("event", self.row)


def event(rng: random.Random, ts: datetime, **fields: Any) -> dict:
    prompt, completion = rng.randint(0, 3000), rng.randint(0, 900)
    model = rng.choice(["gpt-4o-mini", "claude-sonnet", "local-llama"])
    row = {
        "id": uuid.uuid4().hex, "ts": ts, "key_id": f"k{rng.randrange(6)}", "owner": f"p{rng.randrange(6)}",
        "team": rng.choice([None, "web", "data"]), "work_item": rng.choice(["A-1", "A-2", "B-7", "acme/web#3"]),
        "attribution_source": "header", "route": rng.choice(["/v1/chat/completions"] * 4 + list(COUNT_TOKENS)),
        "model": model, "upstream_model": model, "provider": "openai", "status": rng.choice([200] * 8 + [429, 500]),
        "error": None, "attempt": rng.choice([1, 1, 1, 2]), "stream": rng.random() < 0.5, "prompt_tokens": prompt,
        "completion_tokens": completion, "total_tokens": prompt + completion, "cached_tokens": rng.randint(0, 50),
        "cache_write_tokens": 0, "reasoning_tokens": rng.randint(0, 30), "est_prompt_tokens": prompt, "usage_source": "provider",
        "cost_nanos": None if model == "local-llama" else rng.choice([0, prompt * 3000 + completion * 15000]),
        "latency_ms": 12.5, "ttfb_ms": None, "prompt_hash": None, "user_agent": "test", "prompt_text": None, "completion_text": None,
    }  # fmt: skip
    return {**row, **fields}


def events(rng: random.Random, count: int) -> list[dict]:
    """Over three days, some on exact hours and some a microsecond either side of one."""
    found = []
    for _ in range(count):
        ts = T0 + timedelta(seconds=rng.randint(0, 3 * 86400), microseconds=rng.choice([0, rng.randrange(10**6)]))
        if rng.random() < 0.1:
            ts = ts.replace(minute=0, second=0, microsecond=0) + rng.choice([timedelta(0), timedelta(microseconds=-1), timedelta(microseconds=1)])
        found.append(event(rng, ts))
    return found


def raw_rows(engine: Engine) -> list[Any]:
    with engine.connect() as connection:
        return connection.execute(select(UsageEvent.__table__)).all()


def group_by(rows: list[Any], unit: str) -> dict[tuple, dict[str, Any]]:
    """What a rollup must hold, summed here in Python from the raw rows (the daily one per person too)."""
    found: dict[tuple, dict[str, Any]] = {}
    for e in rows:
        hour = e.ts.replace(minute=0, second=0, microsecond=0)
        key: tuple = (hour.replace(hour=0) if unit == "day" else hour, e.work_item, e.team or "", e.model)
        if unit == "day":
            key += (e.owner,)
        elif unit == "key":
            key = (hour.replace(hour=0), e.key_id, e.work_item, e.team or "")
        elif unit == "team":
            key = (hour.replace(hour=0), e.team or "", e.model)
        elif unit == "item":  # all time
            key = (e.work_item, e.team or "", e.model)
        s = found.setdefault(key, defaultdict(int, cost_nanos=None, first_ts=e.ts, last_ts=e.ts))
        s["events"] += 1
        s["ok_events"] += e.status < 400
        s["ok_token_counts"] += e.status < 400 and e.route in COUNT_TOKENS
        s["requests"] += e.attempt == 1 and e.route not in COUNT_TOKENS
        s["first_attempts"] += e.attempt == 1
        for name in ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens"):
            s[name] += getattr(e, name)
        s["unpriced_events"] += e.cost_nanos is None
        if e.cost_nanos is not None:
            s["cost_nanos"] = (s["cost_nanos"] or 0) + e.cost_nanos
        s["first_ts"], s["last_ts"] = min(s["first_ts"], e.ts), max(s["last_ts"], e.ts)
        if unit == "key":  # the hours of the day with a request
            s["request_hours"] |= (1 << e.ts.hour) if e.attempt == 1 and e.route not in COUNT_TOKENS else 0
        if unit == "item":  # the first answer that generated something
            answered = e.status < 400 and e.route not in COUNT_TOKENS
            s.setdefault("first_answered_ts", None)
            if answered and (s["first_answered_ts"] is None or e.ts < s["first_answered_ts"]):
                s["first_answered_ts"] = e.ts
    return {k: dict(v) for k, v in found.items()}


def stored(engine: Engine, level: rollup.Level) -> dict[tuple, dict[str, Any]]:
    with engine.connect() as connection:
        rows = connection.execute(select(level.table)).all()
    return {tuple(r._mapping[k] for k in level.key): {k: v for k, v in r._mapping.items() if k not in level.key} for r in rows}


def assert_rollups_match(engine: Engine) -> None:
    rows = raw_rows(engine)
    for level in rollup.WRITTEN:
        unit = {rollup.KEY_DAILY: "key", rollup.TEAM_DAILY: "team", rollup.ITEM_TOTALS: "item"}.get(level, level.unit)
        expected, actual = group_by(rows, unit), stored(engine, level)
        assert set(actual) == set(expected), level.unit
        for key, sums in expected.items():
            assert actual[key] == sums, (level.unit, key)  # exact: money is whole nano-dollars
    assert stored_spend(engine) == spend_of(rows)


def spend_of(rows: list[Any]) -> dict[tuple[str, str, str], tuple[int, int]]:
    """The spend counters budgets read, computed from the raw events: per item, and per team and month."""
    found: dict[tuple[str, str, str], tuple[int, int]] = {}
    for e in rows:
        scopes = [("item", e.work_item, "")] + ([("team", e.team, e.ts.strftime("%Y-%m"))] if e.team else [])
        for scope in scopes:
            tokens, nanos = found.get(scope, (0, 0))
            found[scope] = (tokens + e.total_tokens, nanos + (e.cost_nanos or 0))
    return found


def stored_spend(engine: Engine) -> dict[tuple[str, str, str], tuple[int, int]]:
    with engine.connect() as connection:
        rows = connection.execute(select(SpendCounter.scope, SpendCounter.ref, SpendCounter.period, SpendCounter.tokens, SpendCounter.cost_nanos))
        return {(r[0], r[1], r[2]): (r[3], r[4]) for r in rows}


@BOTH_DATABASES
def test_the_rollup_is_the_raw_events_grouped_after_writes_and_replays(database_url: str, tmp_path: Path) -> None:
    engine = make_engine(database_url)
    upgrade_schema(engine)
    rng = random.Random(11)
    first = events(rng, 1500)
    writer = BatchWriter(engine, flush_interval=0.02, batch_size=97, spool_path=tmp_path / "spool.jsonl")
    writer.start()
    for row in first:
        writer.submit(Row(row))
    writer.close()
    assert writer.committed == len(first)
    assert_rollups_match(engine)
    before = [stored(engine, level) for level in rollup.WRITTEN]

    # A replayed batch (the spool writes a batch again after an ambiguous failure) adds nothing ...
    repo.write_batch(engine, events=first[:300], rejections=[], new_items=[])
    assert [stored(engine, level) for level in rollup.WRITTEN] == before
    # ... and one that mixes written and new events, one of them twice, adds the new ones once.
    fresh = events(rng, 40)
    repo.write_batch(engine, events=first[300:340] + fresh + [fresh[0]], rejections=[], new_items=[])
    assert len(raw_rows(engine)) == len(first) + len(fresh)
    assert_rollups_match(engine)
    engine.dispose()


@BOTH_DATABASES
def test_a_batch_that_fails_after_its_events_are_inserted_keeps_none_of_them_and_its_replay_counts_them(database_url: str) -> None:
    """A disk error on the rollups after the events' insert (found by a review): on SQLite the insert's
    savepoint was the transaction, and its release committed the events alone; the replay found them,
    and no rollup, nor any budget's counter, ever counted them."""
    import sqlite3

    from sqlalchemy import event as sa_event

    engine = make_engine(database_url)
    upgrade_schema(engine)
    batch = events(random.Random(5), 50)
    failing = {"on": True}

    @sa_event.listens_for(engine, "before_cursor_execute")
    def disk_error(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if failing["on"] and "usage_daily" in statement and statement.lstrip().upper().startswith(("INSERT", "WITH")):
            raise sqlite3.OperationalError("disk I/O error")

    if engine.dialect.name == "sqlite":  # PostgreSQL writes a batch in one statement: fail that one
        try:
            repo.write_batch(engine, events=batch, rejections=[], new_items=[])
        except Exception:  # noqa: BLE001  (the writer spools the batch)
            pass
        assert raw_rows(engine) == []
    failing["on"] = False
    repo.write_batch(engine, events=batch, rejections=[], new_items=[])  # the spool's replay
    assert len(raw_rows(engine)) == 50
    assert_rollups_match(engine)
    engine.dispose()


def as_recorded_by_0001(row: dict) -> dict:
    """An event row as revision 0001 stored it: cost in USD as a float, no estimated fields."""
    old = {k: v for k, v in row.items() if k not in ("cost_nanos", "estimated_fields", "provider_error")}
    return {**old, "cost_usd": None if row["cost_nanos"] is None else row["cost_nanos"] / 1e9}


@BOTH_DATABASES
def test_the_migrations_fill_the_rollup_and_carry_money_over_exactly(database_url: str) -> None:
    engine = make_engine(database_url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    rows = events(random.Random(5), 800)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")  # a database of the version before the rollup ...
        old_events = sa_table("usage_events", *(column(name) for name in as_recorded_by_0001(rows[0])))
        connection.execute(insert(old_events), [as_recorded_by_0001(row) for row in rows])  # ... with usage in it
    assert upgrade_schema(engine) == ("0001", head_revision())
    with engine.connect() as connection:
        migrated = dict(connection.execute(select(UsageEvent.id, UsageEvent.cost_nanos)).all())
    assert migrated == {row["id"]: row["cost_nanos"] for row in rows}  # USD floats became the same whole nano-dollars
    assert_rollups_match(engine)
    engine.dispose()


@BOTH_DATABASES
def test_migration_0019_dates_each_items_first_answer_and_never_later_than_it_was(database_url: str) -> None:
    """Answers in raw events dropped before 0019 (retention) cannot be dated: the row's first event stands
    in, the earliest its first answer can have been; NULL is left for "never answered", so that a later
    answer cannot make AI use that began long ago look as if it began after the item was done."""
    engine = make_engine(database_url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    day = timedelta(days=1)
    rows = [event(random.Random(n), T0 + n * day, work_item=item, team="web", model="m", status=status, route="/v1/chat/completions", attempt=1)
            for n, (item, status) in enumerate([("KEPT-1", 500), ("KEPT-1", 200), ("KEPT-1", 200), ("GONE-1", 200), ("GONE-1", 200),
                                                 ("NONE-1", 500)])]  # fmt: skip
    upgrade_schema(engine)
    repo.write_batch(engine, events=rows, rejections=[], new_items=[])
    with engine.begin() as connection:  # the database as 0019 finds it, GONE-1's first answer in a month retention dropped
        connection.execute(UsageEvent.__table__.delete().where(UsageEvent.id == rows[3]["id"]))
        config.attributes["connection"] = connection
        command.downgrade(config, "0018")
    assert upgrade_schema(engine) == ("0018", head_revision())
    with engine.connect() as connection:
        found = dict(connection.execute(select(UsageItemTotals.work_item, UsageItemTotals.first_answered_ts)).all())
    assert found == {"KEPT-1": rows[1]["ts"], "GONE-1": rows[3]["ts"], "NONE-1": None}
    engine.dispose()


def raw_totals(rows: list[Any], since: datetime | None, until: datetime | None, by: str) -> dict[Any, dict[str, Any]]:
    found: dict[Any, dict[str, Any]] = {}
    for e in rows:
        if (since is not None and e.ts < since) or (until is not None and e.ts >= until):
            continue
        s = found.setdefault(getattr(e, by), {"attempts": 0, "requests": 0, "total_tokens": 0, "cost_nanos": None, "unpriced_attempts": 0, "first_used": e.ts, "last_used": e.ts})
        s["attempts"] += 1
        s["requests"] += e.attempt == 1 and e.route not in COUNT_TOKENS
        s["total_tokens"] += e.total_tokens
        s["unpriced_attempts"] += e.cost_nanos is None
        s["cost_nanos"] = s["cost_nanos"] if e.cost_nanos is None else (s["cost_nanos"] or 0) + e.cost_nanos
        s["first_used"], s["last_used"] = min(s["first_used"], e.ts), max(s["last_used"], e.ts)
    return found


def boundaries(rng: random.Random) -> list[tuple[datetime | None, datetime | None]]:
    hour = timedelta(hours=1)
    found: list[tuple[datetime | None, datetime | None]] = [
        (None, None), (T0, None), (None, T0 + 30 * hour), (T0 + 5 * hour, T0 + 6 * hour),  # open ends, one whole hour
        (T0 + 5 * hour + timedelta(minutes=10), T0 + 5 * hour + timedelta(minutes=50)),  # inside one hour
        (T0 + 5 * hour + timedelta(minutes=10), T0 + 6 * hour + timedelta(minutes=5)),  # two partial hours, no whole one
    ]  # fmt: skip
    for _ in range(12):
        since = T0 + timedelta(seconds=rng.randint(-3600, 3 * 86400), microseconds=rng.randrange(10**6))
        found.append((since, since + timedelta(seconds=rng.randint(1, 2 * 86400), microseconds=rng.randrange(10**6))))
    return found


@BOTH_DATABASES
def test_period_totals_equal_a_scan_of_the_raw_events_at_any_boundary(database_url: str) -> None:
    engine = make_engine(database_url)
    upgrade_schema(engine)
    rng = random.Random(23)
    repo.write_batch(engine, events=events(rng, 2000), rejections=[], new_items=[])
    rows = raw_rows(engine)
    for since, until in boundaries(rng):
        for by in ("work_item", "team", "model"):
            expected = raw_totals(rows, since, until, by)
            actual = {row[by]: row for row in usage_grouped(engine, by, since, until)}  # type: ignore[arg-type]
            assert set(actual) == set(expected), (since, until, by)
            for key, figures in expected.items():
                got = actual[key]
                assert (got["attempts"], got["requests"], got["total_tokens"], got["unpriced_attempts"]) == (
                    figures["attempts"], figures["requests"], figures["total_tokens"], figures["unpriced_attempts"]
                ), (since, until, key)  # fmt: skip
                assert got["cost_usd"] == usd(figures["cost_nanos"])  # exact, at any boundary
                assert (got["first_used"], got["last_used"]) == (iso(figures["first_used"]), iso(figures["last_used"]))
        # Per key (what the signals read): whole days from usage_key_daily, the partial days from the raw events.
        expected = raw_totals(rows, since, until, "key_id")
        with engine.connect() as connection:
            per_key = rollup.totals(connection, by=("key_id",), period=rollup.Period(since, until, levels=rollup.KEY_LEVELS),
                                    fields=tuple(next(iter(expected.values()), {"attempts": 0})))  # fmt: skip
        assert {key: figures for (key,), figures in per_key.items()} == expected, (since, until)
    engine.dispose()


@BOTH_DATABASES
def test_a_keys_own_usage_is_its_events_per_item_and_outlives_their_retention(database_url: str) -> None:
    """`GET /api/me/usage` per item: read from the per-key days (by the key, 0020), it equals a scan of
    the key's raw events; it read those events themselves, all of them on every call, and lost what
    `recording.retention_months` dropped."""
    from taskproxy.reports.usage import usage_for_key

    engine = make_engine(database_url)
    upgrade_schema(engine)
    repo.write_batch(engine, events=events(random.Random(29), 1500), rejections=[], new_items=[])
    rows = raw_rows(engine)
    seen = {}
    for key in sorted({row.key_id for row in rows}):
        expected = raw_totals([row for row in rows if row.key_id == key], None, None, "work_item")
        seen[key], used = usage_for_key(engine, key)
        got = {entry["work_item"]: entry for entry in seen[key]}
        assert set(got) == set(expected) and used == len(expected), key
        latest, _ = usage_for_key(engine, key, limit=2)  # a long history: the items used last, and how many there were
        assert latest == seen[key][:2]
        for item, figures in expected.items():
            assert (got[item]["attempts"], got[item]["requests"], got[item]["total_tokens"], got[item]["unpriced_attempts"]) == (
                figures["attempts"], figures["requests"], figures["total_tokens"], figures["unpriced_attempts"]), (key, item)  # fmt: skip
            assert got[item]["cost_usd"] == usd(figures["cost_nanos"])
            assert (got[item]["first_used"], got[item]["last_used"]) == (iso(figures["first_used"]), iso(figures["last_used"]))
        assert [entry["last_used"] for entry in seen[key]] == sorted((entry["last_used"] for entry in seen[key]), reverse=True)
    with engine.begin() as connection:  # retention drops the raw months; the rollups stay
        connection.execute(UsageEvent.__table__.delete())
    assert {key: usage_for_key(engine, key)[0] for key in seen} == seen
    engine.dispose()


def spend_after_completion_by_raw_scan(engine: Engine, since: datetime, until: datetime) -> dict[str, int]:
    """The report's query before the rollup: events in the period later than a done/closed item's completed_at."""
    e, w = UsageEvent.__table__.c, WorkItem.__table__.c
    after = and_(w.status.in_(("done", "closed")), e.ts > w.completed_at)
    query = (
        select(e.work_item, func.sum(case((after, e.cost_nanos), else_=None)))
        .select_from(UsageEvent.__table__.join(WorkItem.__table__, w.id == e.work_item))
        .where(e.ts >= since, e.ts < until)
        .group_by(e.work_item)
    )
    with engine.connect() as connection:
        return {item: int(cost) for item, cost in connection.execute(query) if cost}


@BOTH_DATABASES
def test_spend_after_completion_splits_the_day_and_hour_of_completion_exactly(database_url: str) -> None:
    engine = make_engine(database_url)
    upgrade_schema(engine)
    rng = random.Random(31)
    completed = {  # done or closed in the middle of an hour, at midnight, a microsecond after an hour, and in its last
        # half millisecond (which SQLite's date functions round up to the next hour)
        "A-1": T0 + timedelta(hours=30, minutes=25, seconds=7), "A-2": T0 + timedelta(hours=16),
        "B-7": T0 + timedelta(hours=44, microseconds=1), "acme/web#3": T0 + timedelta(hours=15, microseconds=-300),
    }  # fmt: skip
    rows = events(rng, 1500)
    for item, at in completed.items():  # events around the moment of completion, on it, and 100 µs after it
        rows += [event(rng, at + timedelta(seconds=s), work_item=item, cost_nanos=10_000_000 * (n + 1)) for n, s in enumerate((-1, 0, 0.0001, 1, 59, 1800, -1800))]
    repo.write_batch(engine, events=rows, rejections=[], new_items=[])
    for item, at in completed.items():
        registry.transition(engine, item, "open", source="api", at=T0 - timedelta(days=1), created_at=T0 - timedelta(days=1))
        registry.transition(engine, item, "done" if item != "A-2" else "closed", source="api", at=at)
    registry.transition(engine, "C-9", "in_progress", source="api", at=T0)  # registered, never completed
    hour = timedelta(hours=1)
    periods = [(T0 - hour, T0 + 4 * 24 * hour), (T0 + 30 * hour + timedelta(minutes=26), T0 + 50 * hour)] + [
        (since, until) for since, until in boundaries(rng) if since is not None and until is not None
    ]  # fmt: skip
    for since, until in periods:
        with engine.connect() as connection:
            items = adoption_data.load(connection, since, until, stale_after=timedelta(days=14), now=utcnow())
        actual = {i.id: i.spend_after_completion for i in items.values() if i.spend_after_completion}
        expected = spend_after_completion_by_raw_scan(engine, since, until)
        assert actual == expected, (since, until)
    engine.dispose()


@BOTH_DATABASES
def test_usage_up_to_each_items_own_moment_is_a_scan_of_its_events_up_to_it(database_url: str) -> None:
    """The usage a merged PR carries of each of its tickets: per ticket and model, its events up to the
    merge, each ticket its own moment, read in one statement from days, hours and the raw hour."""
    engine = make_engine(database_url)
    upgrade_schema(engine)
    rng = random.Random(47)
    rows = events(rng, 2000)
    moments = {  # mid-hour, midnight, an hour's first microsecond, its last, and before the others' events
        "A-1": T0 + timedelta(hours=30, minutes=25, seconds=7), "A-2": T0 + timedelta(hours=16),
        "B-7": T0 + timedelta(hours=44, microseconds=1), "acme/web#3": T0 + timedelta(hours=51, microseconds=-1),
        "C-9": T0 - timedelta(days=2),  # its own events only
    }  # fmt: skip
    for item, at in moments.items():  # events on the moment, and either side of it
        rows += [event(rng, at + timedelta(microseconds=s), work_item=item) for s in (-1, 0, 0, 1, -10**6, 59 * 10**6)]
    repo.write_batch(engine, events=rows, rejections=[], new_items=[])
    with engine.connect() as connection:
        found = {(item, model): (int(a), int(ans or 0), None if cost is None else int(cost), int(tok or 0))
                 for item, model, a, ans, cost, tok in spend_after.usage_up_to(connection, sorted(moments.items()))}  # fmt: skip
    expected: dict[tuple[str, str], tuple[int, int, int | None, int]] = {}
    for row in raw_rows(engine):
        if row.ts > moments[row.work_item]:
            continue
        attempts, answered, cost, tokens = expected.get((row.work_item, row.model), (0, 0, None, 0))
        answered += row.status < 400 and row.route not in COUNT_TOKENS
        cost = cost if row.cost_nanos is None else (cost or 0) + row.cost_nanos
        expected[(row.work_item, row.model)] = (attempts + 1, answered, cost, tokens + row.total_tokens)
    assert found == expected and {item for item, _ in found} == set(moments)
    engine.dispose()
