"""Monthly partitions of usage_events on PostgreSQL (SQLite keeps one table).

On PostgreSQL `usage_events` is partitioned by range of `ts`, one partition a calendar month (UTC),
named `usage_events_pYYYYMM`, plus a default partition for anything outside them; its primary key is
(id, ts), which a replayed event (same id, same time) still collides with. Each process makes sure
the partitions of the last, this and the next two months exist (at start and every hour), and, with
`recording.retention_months`, drops the raw partitions older than that many months. The rollups and
the spend counters are kept: reports of any period still add up, from whole days and hours.

Maintenance never holds the writers behind a long report. A report reads in one snapshot for minutes
(hours at an organisation's size), holding its share lock on the table until it ends; a statement
wanting the table's exclusive lock waits for it, and every insert queues behind that statement. So a
month's partition is made as a table of its own and attached, which locks the parent only against
other schema changes (PostgreSQL's SHARE UPDATE EXCLUSIVE: reads and inserts go on), and dropping a
partition, which must have the exclusive lock, waits at most `LOCK_WAIT_SECONDS`, or is left for the
next round: retention can wait an hour, the writers cannot.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from taskproxy.storage.failures import LOCK_NOT_AVAILABLE, sqlstate

log = logging.getLogger("taskproxy.storage")
PARENT = "usage_events"
_NAME = re.compile(rf"^{PARENT}_p(\d{{4}})(\d{{2}})$")
# One process at a time maintains a schema's partitions. Advisory locks are per database, so the lock is
# the schema's: deployments in two schemas of one database (or tests side by side) must not skip each
# other's maintenance, which left a month without its partition and retention undone.
# How long a statement of the maintenance waits for a lock: the inserts queued behind it wait as long.
LOCK_WAIT_SECONDS = 1.0
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
    """Make `month`'s partition: a table like the parent, then attached (its indexes are made as it is,
    on an empty table). `CREATE TABLE ... PARTITION OF` would take the parent's exclusive lock."""
    start, end = month_start(month), month_start(month, 1)
    name = partition_name(start)
    connection.execute(text(f"CREATE TABLE IF NOT EXISTS {name} (LIKE {PARENT} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"))
    connection.execute(text(f"ALTER TABLE {PARENT} ATTACH PARTITION {name} FOR VALUES FROM ('{start:%Y-%m-%d}') TO ('{end:%Y-%m-%d}')"))


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
        made = set(months(connection))
        for month in (month_start(now, ahead) for ahead in range(-1, 3)):
            if month in made:
                continue
            try:
                with connection.begin_nested():
                    create_month(connection, month)
            except DBAPIError as exc:  # rows of that month wait in the default partition until a later round
                log.warning("could not create the partition of %s (tried again in an hour): %s", f"{month:%Y-%m}", _why(exc))
        dropped: list[str] = []
        if retention_months is not None:
            oldest_kept = month_start(now, -retention_months)
            for month in sorted(made):
                if month >= oldest_kept:
                    break
                try:
                    with connection.begin_nested():
                        connection.execute(text(f"DROP TABLE {partition_name(month)}"))
                except DBAPIError as exc:
                    if sqlstate(exc) != LOCK_NOT_AVAILABLE:
                        raise
                    log.warning("%s is past recording.retention_months but a long report is reading it: dropped in a later round",
                                partition_name(month))  # fmt: skip
                    break  # the older ones first: the same report reads the rest, most likely
                dropped.append(partition_name(month))
    for name in dropped:
        log.info("dropped %s: its raw events are past recording.retention_months (the rollups keep their sums)", name)
    return dropped


def _why(exc: DBAPIError) -> str:
    if sqlstate(exc) == LOCK_NOT_AVAILABLE:
        return f"a lock not granted within {LOCK_WAIT_SECONDS:g} s"
    return exc.__class__.__name__
