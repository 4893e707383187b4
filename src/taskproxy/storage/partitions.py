"""Monthly partitions of usage_events on PostgreSQL (SQLite keeps one table).

On PostgreSQL `usage_events` is partitioned by range of `ts`, one partition a calendar month (UTC),
named `usage_events_pYYYYMM`, plus a default partition for anything outside them; its primary key is
(id, ts), which a replayed event (same id, same time) still collides with. Each process makes sure
the partitions of the last, this and the next two months exist (at start and every hour), and, with
`recording.retention_months`, drops the raw partitions older than that many months. The rollups and
the spend counters are kept: reports of any period still add up, from whole days and hours.

Maintenance never holds the writers behind a long report. A report reads in one snapshot for minutes
(hours at an organisation's size), holding its share locks until it ends; a statement wanting an
exclusive lock waits for it, and every insert queues behind that statement. So every statement here
waits at most `LOCK_WAIT_SECONDS` for a lock, or is left for the next round (hourly):
- a month's partition is made as a table of its own and attached, which locks the parent only
  against other schema changes (SHARE UPDATE EXCLUSIVE: reads and inserts go on), and the default
  partition (where that month's rows would wait if it came late: they are moved in first);
- a month past retention is emptied first (TRUNCATE locks that partition alone, so only a report
  reading that month holds it up), then dropped, which needs the parent's exclusive lock: with any
  report open on the events that waits for a quiet moment, its space already given back.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from taskproxy.storage.failures import LOCK_NOT_AVAILABLE, sqlstate
from taskproxy.storage.models import UsageEvent

log = logging.getLogger("taskproxy.storage")
PARENT = "usage_events"
DEFAULT = f"{PARENT}_default"  # rows of a month without its partition (migration 0005)
_NAME = re.compile(rf"^{PARENT}_p(\d{{4}})(\d{{2}})$")
# One process at a time maintains a schema's partitions. Advisory locks are per database, so the lock is
# the schema's: deployments in two schemas of one database (or tests side by side) must not skip each
# other's maintenance, which left a month without its partition and retention undone.
# How long a statement of the maintenance waits for a lock: the inserts queued behind it wait as long.
LOCK_WAIT_SECONDS = 1.0
STATEMENT_SECONDS = 600.0  # and runs at most (moving a late month's rows in from the default partition)
_LOCK = text("SELECT pg_try_advisory_xact_lock(hashtext('taskproxy-partitions:' || current_schema()))")


def try_lock(connection: Connection) -> bool:
    """Take the maintenance lock of the connection's schema for its transaction, if no one holds it."""
    return bool(connection.execute(_LOCK).scalar())


def month_start(at: datetime, add: int = 0) -> datetime:
    index = at.year * 12 + at.month - 1 + add
    return datetime(index // 12, index % 12 + 1, 1)


def partition_name(month: datetime) -> str:
    return f"{PARENT}_p{month:%Y%m}"


def create_month(connection: Connection, month: datetime) -> None:
    """Make `month`'s partition: a table like the parent, the month's rows that waited in the default
    partition moved into it, then attached (its indexes are made as it is). `CREATE TABLE ... PARTITION
    OF` would take the parent's exclusive lock, and either would fail for good with rows of the month
    left in the default partition (a month made late)."""
    start, end = month_start(month), month_start(month, 1)
    name = partition_name(start)
    columns = ", ".join(c.name for c in UsageEvent.__table__.columns)  # named: the default partition's order may differ
    connection.execute(text(f"CREATE TABLE IF NOT EXISTS {name} (LIKE {PARENT} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"))
    connection.execute(text(
        f"WITH waiting AS (DELETE FROM {DEFAULT} WHERE ts >= :start AND ts < :end RETURNING {columns}) "
        f"INSERT INTO {name} ({columns}) SELECT {columns} FROM waiting"
    ), {"start": start, "end": end})  # fmt: skip
    connection.execute(text(f"ALTER TABLE {PARENT} ATTACH PARTITION {name} FOR VALUES FROM ('{start:%Y-%m-%d}') TO ('{end:%Y-%m-%d}')"))


def _within_wait(connection: Connection, statement: str) -> bool:
    """Run `statement` in a savepoint; False if it could not (a lock not granted within the wait, or any
    other refusal, logged): retention is tried again next round, and the months made in this one stay."""
    try:
        with connection.begin_nested():
            connection.execute(text(statement))
    except DBAPIError as exc:
        if sqlstate(exc) != LOCK_NOT_AVAILABLE:
            log.warning("%s failed (tried again in an hour): %s", statement, exc.__class__.__name__)
        return False
    return True


def retire(connection: Connection, past: list[datetime]) -> list[str]:
    """Empty the partitions of the months `past` retention, then drop them; answers those dropped.
    Emptying one waits only for the reports reading that month (those that do are emptied in a later
    round); dropping waits for every report on the events, and the writers behind it: after the first
    that cannot, the rest wait for a later round too."""
    emptied = [month for month in past if _within_wait(connection, f"TRUNCATE {partition_name(month)}")]
    for month in sorted(set(past) - set(emptied)):
        log.warning("%s is past recording.retention_months, but a report is reading that month: it is emptied in a later round",
                    partition_name(month))  # fmt: skip
    dropped = []
    for month in emptied:
        if not _within_wait(connection, f"DROP TABLE {partition_name(month)}"):
            log.info("%s is past recording.retention_months: its events are deleted, its empty table dropped in a later round "
                     "(a report is reading the events)", partition_name(month))  # fmt: skip
            break
        dropped.append(partition_name(month))
    return dropped


def is_partitioned(connection: Connection) -> bool:
    if connection.dialect.name != "postgresql":
        return False
    return bool(connection.execute(text(
        "SELECT 1 FROM pg_partitioned_table p JOIN pg_class c ON c.oid = p.partrelid "
        "WHERE c.relname = :name AND pg_table_is_visible(c.oid)"
    ), {"name": PARENT}).first())  # fmt: skip


def months(connection: Connection) -> list[datetime]:
    """The months that have a partition, oldest first."""
    rows = connection.execute(text(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent "
        "WHERE p.relname = :name AND pg_table_is_visible(p.oid)"
    ), {"name": PARENT}).scalars()  # fmt: skip
    return sorted(datetime(int(m.group(1)), int(m.group(2)), 1) for name in rows if (m := _NAME.match(name)))


def maintain(engine: Engine, now: datetime, retention_months: int | None) -> list[str]:
    """Create the partitions of last month to two months ahead; drop those older than `retention_months`
    full months before this one. Returns the partitions dropped. Nothing on SQLite."""
    with engine.begin() as connection:
        if not is_partitioned(connection):
            return []
        if not try_lock(connection):
            return []  # another process is at it
        connection.execute(text(f"SET LOCAL lock_timeout = {int(LOCK_WAIT_SECONDS * 1000)}"))
        # A DBA's statement_timeout below the lock wait would cancel a statement waiting its turn, and
        # that error would undo the months made in this round: the lock wait bounds them instead.
        connection.execute(text(f"SET LOCAL statement_timeout = {int(STATEMENT_SECONDS * 1000)}"))
        made = set(months(connection))
        for month in (month_start(now, ahead) for ahead in range(-1, 3)):
            if month in made:
                continue
            try:
                with connection.begin_nested():
                    create_month(connection, month)
                made.add(month)
            except DBAPIError as exc:
                due = month <= month_start(now, 1)  # this month's or next month's rows would land in the default partition
                (log.error if due else log.warning)("could not create the partition of %s (tried again in an hour): %s", f"{month:%Y-%m}", _why(exc))
        dropped: list[str] = []
        if retention_months is not None:
            oldest_kept = month_start(now, -retention_months)
            dropped = retire(connection, sorted(m for m in made if m < oldest_kept))
    for name in dropped:
        log.info("dropped %s: its raw events are past recording.retention_months (the rollups keep their sums)", name)
    return dropped


def _why(exc: DBAPIError) -> str:
    if sqlstate(exc) == LOCK_NOT_AVAILABLE:
        return f"a lock not granted within {LOCK_WAIT_SECONDS:g} s"
    return exc.__class__.__name__
