"""Monthly partitions of usage_events on PostgreSQL (SQLite keeps one table).

On PostgreSQL `usage_events` is partitioned by range of `ts`, one partition a calendar month (UTC),
named `usage_events_pYYYYMM`, plus a default partition for anything outside them; its primary key is
(id, ts), which a replayed event (same id, same time) still collides with. Each process makes sure
the partitions of the last, this and the next two months exist (at start and every hour), and, with
`recording.retention_months`, drops the raw partitions older than that many months. The rollups and
the spend counters are kept: reports of any period still add up, from whole days and hours.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

log = logging.getLogger("taskproxy.storage")
PARENT = "usage_events"
_NAME = re.compile(rf"^{PARENT}_p(\d{{4}})(\d{{2}})$")
# One process at a time maintains a schema's partitions. Advisory locks are per database, so the lock is
# the schema's: deployments in two schemas of one database (or tests side by side) must not skip each
# other's maintenance, which left a month without its partition and retention undone.
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
    start, end = month_start(month), month_start(month, 1)
    connection.execute(text(
        f"CREATE TABLE IF NOT EXISTS {partition_name(start)} PARTITION OF {PARENT} "
        f"FOR VALUES FROM ('{start:%Y-%m-%d}') TO ('{end:%Y-%m-%d}')"
    ))  # fmt: skip


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
        for ahead in range(-1, 3):
            try:
                with connection.begin_nested():
                    create_month(connection, month_start(now, ahead))
            except DBAPIError as exc:  # rows of that month wait in the default partition: it stays there
                log.warning("could not create the partition of %s: %s", f"{month_start(now, ahead):%Y-%m}", exc.__class__.__name__)
        dropped: list[str] = []
        if retention_months is not None:
            oldest_kept = month_start(now, -retention_months)
            for month in months(connection):
                if month < oldest_kept:
                    connection.execute(text(f"DROP TABLE {partition_name(month)}"))
                    dropped.append(partition_name(month))
    for name in dropped:
        log.info("dropped %s: its raw events are past recording.retention_months (the rollups keep their sums)", name)
    return dropped
