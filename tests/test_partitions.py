"""Raw events partitioned by month on PostgreSQL: migration 0005 moves an existing table's rows into
monthly partitions, new events land in their month's, and `recording.retention_months` drops old raw
partitions while every report over those months still adds up (from the rollups)."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from datetime import datetime, timedelta

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import func, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from test_rollup import event

from taskproxy.reports.signals import gaming_signals
from taskproxy.reports.usage import usage_grouped
from taskproxy.settings import SignalSettings
from taskproxy.storage import bulk, partitions, repo, rollup
from taskproxy.storage.db import MIGRATIONS, make_engine, upgrade_schema
from taskproxy.storage.failures import database_down
from taskproxy.storage.models import UsageEvent
from taskproxy.timeutil import utcnow

pytestmark = pytest.mark.postgres
MONTHS = [datetime(2026, 8, 1), datetime(2026, 9, 1), datetime(2026, 11, 1)]
NOW = datetime(2026, 12, 15, 12)


def _month_of_events(rng: random.Random, month: datetime, count: int) -> list[dict]:
    """No `/v1/responses/input_tokens` call among them: the rollups are filled below by today's code,
    which counts those as token counts, where the version they stand for counted them as requests
    (migration 0021 corrects that; test_rollup.py upgrades from what that version's writer left)."""
    found = [event(rng, month + timedelta(seconds=rng.randrange(27 * 86400))) for _ in range(count)]
    return [{**row, "route": "/v1/chat/completions"} if row["route"] == "/v1/responses/input_tokens" else row for row in found]


def _raw_count(engine: object, since: datetime, until: datetime) -> int:
    with engine.connect() as connection:  # type: ignore[attr-defined]
        return int(connection.execute(select(func.count()).where(UsageEvent.ts >= since, UsageEvent.ts < until)).scalar_one())


def _per_key_raw(engine: object, since: datetime, until: datetime) -> dict:
    with engine.connect() as connection:  # type: ignore[attr-defined]
        query = (select(UsageEvent.key_id, UsageEvent.work_item, func.count(), func.sum(UsageEvent.cost_nanos), func.sum(UsageEvent.total_tokens))
                 .where(UsageEvent.ts >= since, UsageEvent.ts < until).group_by(UsageEvent.key_id, UsageEvent.work_item))  # fmt: skip
        return {(k, i): (n, cost, tokens) for k, i, n, cost, tokens in connection.execute(query)}


def _per_key(engine: object, since: datetime, until: datetime) -> dict:
    with engine.connect() as connection:  # type: ignore[attr-defined]
        found = rollup.totals(connection, by=("key_id", "work_item"), period=rollup.Period(since, until, levels=rollup.KEY_LEVELS),
                              fields=("attempts", "cost_nanos", "total_tokens"))  # fmt: skip
    return {key: (row["attempts"], row["cost_nanos"], row["total_tokens"]) for key, row in found.items()}


def _spend_signals(engine: object, since: datetime, until: datetime) -> list[dict]:
    """The signals read from per-key spend (not prompt hashes or request times), with their evidence."""
    thresholds = SignalSettings(heavy_spend_min_usd=0.001, unverified_min_usd=0.001)
    report = gaming_signals(engine, since=since, until=until, thresholds=thresholds)  # type: ignore[arg-type]
    # (These keys have no row: their owner is read from their raw events, which retention drops.)
    return [{k: s[k] for k in ("kind", "key_id", "evidence", "work_items")} for s in report["signals"]
            if s["kind"] in ("unverified_spend", "spend_without_completion", "cost_outlier")]  # fmt: skip


def test_the_migration_partitions_recorded_events_and_retention_keeps_the_reports(postgres_url: str) -> None:
    engine = make_engine(postgres_url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0004")  # a database of the version before partitioning ...
    rng = random.Random(3)
    recorded = {month: _month_of_events(rng, month, 300) for month in MONTHS}
    with engine.begin() as connection:  # ... with three months of usage in it, as the writer of that version left them
        for rows in recorded.values():
            bulk.insert_new(connection, UsageEvent.__table__, rows)
        rollup.backfill(connection, rollup.LEVELS)
    august = (MONTHS[0], MONTHS[1])
    before = usage_grouped(engine, "work_item", *august)
    per_key = _per_key_raw(engine, *august)

    assert upgrade_schema(engine)[0] == "0004"
    with engine.connect() as connection:
        assert partitions.is_partitioned(connection)
        assert set(MONTHS) <= set(partitions.months(connection))
        placed = dict(connection.execute(text("SELECT tableoid::regclass::text, count(*) FROM usage_events GROUP BY 1")).all())
    assert placed == {partitions.partition_name(month): 300 for month in MONTHS}  # every row moved, into its month
    assert usage_grouped(engine, "work_item", *august) == before
    assert _per_key(engine, *august) == per_key  # migration 0009 filled the per-key rollup from the events
    spend_signals = _spend_signals(engine, *august)
    assert {s["kind"] for s in spend_signals} == {"unverified_spend", "spend_without_completion"}  # tracked items: none registered

    late = [event(rng, NOW)]
    repo.write_batch(engine, events=late + recorded[MONTHS[2]][:5], rejections=[], new_items=[])  # a new one, and a replay
    partitions.maintain(engine, NOW, retention_months=None)
    with engine.connect() as connection:
        assert partitions.partition_name(datetime(2027, 2, 1)) in {partitions.partition_name(m) for m in partitions.months(connection)}
        where = connection.execute(text("SELECT tableoid::regclass::text FROM usage_events WHERE id = :id"), {"id": late[0]["id"]}).scalar_one()
    assert where == partitions.partition_name(datetime(2026, 12, 1))
    assert _raw_count(engine, MONTHS[2], datetime(2026, 12, 1)) == 300  # the replayed rows are not written twice

    dropped = partitions.maintain(engine, NOW, retention_months=2)  # keep October on: August and September go
    assert sorted(dropped) == [partitions.partition_name(MONTHS[0]), partitions.partition_name(MONTHS[1])]
    assert _raw_count(engine, *august) == 0
    assert usage_grouped(engine, "work_item", *august) == before  # the report of August is whole, from the rollups
    assert _per_key(engine, *august) == per_key  # and so is what the signals read per key
    assert _spend_signals(engine, *august) == spend_signals  # the signals of August read from it, the same
    assert _raw_count(engine, MONTHS[2], datetime(2026, 12, 1)) == 300
    engine.dispose()


def test_maintenance_in_another_schema_of_the_database_does_not_skip_this_ones(postgres_url: str) -> None:
    """Advisory locks are per database: a deployment (or a test) maintaining its partitions in another
    schema made this one skip its own, leaving months without a partition and retention undone."""
    engine = make_engine(postgres_url)
    upgrade_schema(engine)
    with engine.connect() as other, other.begin():
        other.execute(text("SET LOCAL search_path TO public"))
        assert partitions.try_lock(other)
        partitions.maintain(engine, datetime(2031, 1, 15), retention_months=None)
    with engine.connect() as connection:
        made = set(partitions.months(connection))
    assert {datetime(2030, 12, 1), datetime(2031, 1, 1), datetime(2031, 3, 1)} <= made, sorted(made)
    engine.dispose()


def test_sqlite_keeps_one_table(tmp_path: object) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/one.db")
    upgrade_schema(engine)
    assert partitions.maintain(engine, NOW, retention_months=1) == []
    engine.dispose()


def _lock_waits(engine: object) -> int:
    """Statements of this database waiting for a lock right now."""
    with engine.connect() as connection:  # type: ignore[attr-defined]
        return int(connection.execute(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()")).scalar_one())


def _write_as_the_writer_does(engine: Engine, events: list[dict]) -> None:
    """A batch written; one the database cannot take now (`database_down`) written again, as the writer
    replays its spool. A row routed to the default partition while its month was attached is such a
    case (it was refused for itself, in about half of these runs, and set aside)."""
    try:
        repo.write_batch(engine, events=events, rejections=[], new_items=[])
    except SQLAlchemyError as exc:
        if not database_down(exc):
            raise
        repo.write_batch(engine, events=events, rejections=[], new_items=[])


def test_maintenance_never_holds_the_writers_behind_a_long_report(postgres_url: str) -> None:
    """A report reads in one snapshot for minutes (hours at an organisation's size). Creating a month's
    partition, or dropping one past retention, wanted the table's exclusive lock: it queued behind
    the report, and every replica's writes queued behind it until the report ended."""
    engine = make_engine(postgres_url)
    upgrade_schema(engine)
    rng = random.Random(5)
    old = datetime(2031, 1, 1)
    partitions.maintain(engine, datetime(2031, 2, 15), retention_months=None)  # January 2031 to April
    repo.write_batch(engine, events=_month_of_events(rng, old, 3), rejections=[], new_items=[])
    report = engine.connect()
    report.execute(text("BEGIN ISOLATION LEVEL REPEATABLE READ"))  # as a report reads, holding its locks until it ends
    reading = (UsageEvent.ts >= old, UsageEvent.ts < datetime(2031, 5, 1))  # its months have their partitions, as they do up to now
    assert report.execute(select(func.count()).where(*reading)).scalar_one() == 3
    writes: list[str] = []
    try:
        for now, retention in ((datetime(2031, 5, 10), None), (datetime(2031, 5, 10), 2)):  # July's partition is new; January goes
            pool = ThreadPoolExecutor(2)
            maintenance = pool.submit(partitions.maintain, engine, now, retention_months=retention)
            for _ in range(50):  # until it waits for a lock, or is done
                if maintenance.done() or _lock_waits(engine):
                    break
                time.sleep(0.05)
            write = pool.submit(_write_as_the_writer_does, engine, _month_of_events(rng, datetime(2031, 5, 1), 2))
            try:
                write.result(timeout=10)  # the report is still reading
                writes.append("written")
                maintenance.result(timeout=10)
            except FuturesTimeout:
                writes.append("held")
            pool.shutdown(wait=False)
        with engine.connect() as connection:
            made = set(partitions.months(connection))
        assert writes == ["written", "written"]
        assert datetime(2031, 7, 1) in made  # created while the report read
        assert old in made  # the report still reads January: its drop waits for the next round
    finally:
        report.execute(text("COMMIT"))
        report.close()
    assert partitions.partition_name(old) in partitions.maintain(engine, datetime(2031, 5, 10), retention_months=2)  # the report is done
    assert _raw_count(engine, old, datetime(2031, 2, 1)) == 0
    engine.dispose()


def test_a_month_made_late_takes_its_waiting_rows_and_retention_empties_what_no_report_reads(postgres_url: str) -> None:
    """A report whose query has no time bound holds the default partition too, so attaching a month can
    wait past its round; that month's rows then land in the default partition, where they stopped
    every later attach for good. And a drop needs the table's exclusive lock, which any open report
    holds off: the month past retention is emptied meanwhile, which only its own readers hold off."""
    engine = make_engine(postgres_url)
    upgrade_schema(engine)
    rng = random.Random(6)
    partitions.maintain(engine, datetime(2031, 2, 15), retention_months=None)  # January 2031 to April
    repo.write_batch(engine, events=_month_of_events(rng, datetime(2031, 1, 1), 4), rejections=[], new_items=[])
    report = engine.connect()
    report.execute(text("BEGIN ISOLATION LEVEL REPEATABLE READ"))
    report.execute(select(func.count()).where(UsageEvent.key_id == "k1")).scalar_one()  # every partition, the default's too
    try:
        assert partitions.maintain(engine, datetime(2031, 4, 10), retention_months=None) == []  # May: not within the wait
        with engine.connect() as connection:
            assert datetime(2031, 5, 1) not in partitions.months(connection)
        late = _month_of_events(rng, datetime(2031, 5, 1), 3)
        repo.write_batch(engine, events=late, rejections=[], new_items=[])  # into the default partition
    finally:
        report.execute(text("COMMIT"))
        report.close()
    partitions.maintain(engine, datetime(2031, 4, 10), retention_months=None)
    with engine.connect() as connection:
        places = set(connection.execute(text("SELECT tableoid::regclass::text FROM usage_events WHERE id = ANY(:ids)"),
                                        {"ids": [e["id"] for e in late]}).scalars())  # fmt: skip
    assert places == {partitions.partition_name(datetime(2031, 5, 1))}  # moved in as the month was made
    assert _raw_count(engine, datetime(2031, 5, 1), datetime(2031, 6, 1)) == 3

    other_month = engine.connect()
    other_month.execute(text("BEGIN ISOLATION LEVEL REPEATABLE READ"))
    other_month.execute(select(func.count()).where(UsageEvent.ts >= datetime(2031, 5, 1), UsageEvent.ts < datetime(2031, 6, 1))).scalar_one()
    try:
        kept_from = datetime(2031, 3, 1)
        assert partitions.maintain(engine, datetime(2031, 5, 10), retention_months=2) == []  # the drops wait for the report ...
        assert _raw_count(engine, datetime(2026, 1, 1), kept_from) == 0  # ... but January's events are gone already
    finally:
        other_month.execute(text("COMMIT"))
        other_month.close()
    dropped = partitions.maintain(engine, datetime(2031, 5, 10), retention_months=2)
    assert partitions.partition_name(datetime(2031, 1, 1)) in dropped
    engine.dispose()


def test_a_dbas_statement_timeout_does_not_undo_the_months_made_in_a_round(postgres_url: str) -> None:
    """A server's statement_timeout shorter than the lock wait cancelled a drop waiting behind a report,
    and the error rolled back the whole round: the months it had just made too, every hour."""
    engine = make_engine(postgres_url)
    upgrade_schema(engine)
    partitions.maintain(engine, datetime(2031, 2, 15), retention_months=None)
    repo.write_batch(engine, events=_month_of_events(random.Random(7), datetime(2031, 1, 1), 2), rejections=[], new_items=[])
    guarded = make_engine(f"{postgres_url}%20-cstatement_timeout%3D300")
    report = engine.connect()
    report.execute(text("BEGIN ISOLATION LEVEL REPEATABLE READ"))
    report.execute(select(func.count()).where(UsageEvent.ts >= datetime(2031, 1, 1), UsageEvent.ts < datetime(2031, 2, 1))).scalar_one()
    try:
        partitions.maintain(guarded, datetime(2031, 9, 10), retention_months=3)  # January past retention, behind the report
        with engine.connect() as connection:
            made = set(partitions.months(connection))
        assert {datetime(2031, 8, 1), datetime(2031, 9, 1), datetime(2031, 11, 1)} <= made, sorted(made)
    finally:
        report.execute(text("COMMIT"))
        report.close()
        guarded.dispose()
    engine.dispose()


@pytest.mark.postgres
def test_the_carried_tickets_usage_up_to_their_merges_locks_only_the_months_it_reads(postgres_url: str) -> None:
    """The usage of tickets carried by a merge in March reads March's raw hour: a report's snapshot holds
    no lock on the other months, nor on the default partition, which a month being made must lock. Their
    moments come in a VALUES list, which gives the planner no constant to leave the months out by: the
    read bounds itself by its earliest and latest moment (found by a review; with one ticket PostgreSQL
    makes the list constants, so two are needed)."""
    from taskproxy.reports import adoption_data

    engine = make_engine(postgres_url)
    upgrade_schema(engine)
    partitions.maintain(engine, datetime(2031, 2, 15), retention_months=None)  # January to April 2031, and the default
    merge = datetime(2031, 3, 10, 12, 30)
    rng = random.Random(3)
    rows = [event(rng, ts, work_item=item) for ts in (merge - timedelta(days=3), merge - timedelta(minutes=5), merge + timedelta(hours=2)) for item in ("T-1", "T-2")]
    repo.write_batch(engine, events=rows, rejections=[], new_items=[])
    with engine.connect() as report:
        report.execute(text("BEGIN ISOLATION LEVEL REPEATABLE READ"))
        found = adoption_data.usage_up_to_merges(report, {"T-1": merge, "T-2": merge})
        held = sorted(report.execute(text(
            "SELECT c.relname FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
            "WHERE l.pid = pg_backend_pid() AND c.relname LIKE 'usage_events_%' AND c.relkind = 'r'")).scalars())  # fmt: skip
        report.execute(text("COMMIT"))
    engine.dispose()
    assert set(found) == {"T-1", "T-2"} and all(found.values())
    assert held == ["usage_events_p203103"], held


@pytest.mark.postgres
def test_spend_after_a_completion_in_the_middle_of_an_hour_locks_only_the_months_it_reads(postgres_url: str) -> None:
    """The spend after completion splits the hour of each item's completion at the raw events, each item
    its own moment (a column, or a VALUES list for tickets' merges): bounded by the period, the read
    leaves out the other months and the default partition."""
    from taskproxy import registry
    from taskproxy.reports import adoption_data

    engine = make_engine(postgres_url)
    upgrade_schema(engine)
    partitions.maintain(engine, datetime(2031, 2, 15), retention_months=None)
    done = datetime(2031, 3, 10, 12, 30)
    rng = random.Random(5)
    rows = [event(rng, done + timedelta(minutes=m), work_item=item, cost_nanos=1000) for m in (-20, -5, 5, 20) for item in ("D-1", "D-2", "T-1", "T-2")]
    repo.write_batch(engine, events=rows, rejections=[], new_items=[])
    for item in ("D-1", "D-2", "T-1", "T-2"):
        registry.transition(engine, item, "open", source="api", at=datetime(2031, 3, 1), created_at=datetime(2031, 3, 1))
    for item in ("D-1", "D-2"):
        registry.transition(engine, item, "done", source="api", at=done)
    for n, ticket in enumerate(("T-1", "T-2")):
        registry.transition(engine, f"acme/web#{n}", "open", source="github", at=datetime(2031, 3, 2), created_at=datetime(2031, 3, 2))
        registry.transition(engine, f"acme/web#{n}", "done", source="github", at=done, merged=True)
        registry.link(engine, ticket, f"acme/web#{n}", at=done)
    with engine.connect() as report:
        report.execute(text("BEGIN ISOLATION LEVEL REPEATABLE READ"))
        items = adoption_data.load(report, datetime(2031, 3, 1), datetime(2031, 4, 1), stale_after=timedelta(days=14), now=utcnow())
        held = sorted(report.execute(text(
            "SELECT c.relname FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
            "WHERE l.pid = pg_backend_pid() AND c.relname LIKE 'usage_events_%' AND c.relkind = 'r'")).scalars())  # fmt: skip
        report.execute(text("COMMIT"))
    engine.dispose()
    assert all(items[i].spend_after_completion > 0 for i in ("D-1", "D-2")) and all(items[t].spend_after_merge > 0 for t in ("T-1", "T-2"))
    assert held == ["usage_events_p203103"], held
