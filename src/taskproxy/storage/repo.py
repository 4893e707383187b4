"""Reads and writes of single records: keys, work items, raw events. Aggregates live in `reports/`.

Every function here is blocking; async callers run them in a worker thread.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

from sqlalchemy import Row, Select, Table, or_, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.sql.expression import Executable
from sqlalchemy.engine import Connection, Engine

from taskproxy.storage import background, bulk, changes, rollup, spend
from taskproxy.timeutil import utcnow
from taskproxy.workitems import COMPLETED
from taskproxy.storage.models import ApiKey, AuditEntry, Rejection, UsageEvent, WorkItem, WorkItemLink

WARM_ROWS_PER_READ = 1000  # a process's caches are filled from rows read this many at a time


# Every change to a key notes it in the change feed, in its own transaction (storage/changes.py).
# Rows are read as plain `Row`s (attributes by column name), not mapped to objects: nothing here
# needs an object, and the ORM would cost every process its memory (storage/models.py).
_KEYS = ApiKey.__table__
_ITEMS = WorkItem.__table__


def insert_key(engine: Engine, key: dict[str, Any]) -> Row:
    """Insert a key row (`key`: its columns) and answer it as read back."""
    with engine.begin() as connection:
        connection.execute(_KEYS.insert().values(**key))
        changes.note(connection, changes.KEY, [key["id"]], utcnow())
        return connection.execute(select(_KEYS).where(_KEYS.c.id == key["id"])).one()


def list_keys(engine: Engine) -> list[Row]:
    with engine.connect() as connection:
        return list(connection.execute(select(_KEYS).order_by(_KEYS.c.created_at)))


def admin_owners(engine: Engine) -> list[str]:
    """Who administers this proxy: the owners of its live admin keys (what a developer is shown)."""
    keys = _KEYS.c
    with engine.connect() as connection:
        return sorted(connection.execute(select(keys.owner).where(keys.role == "admin", keys.revoked_at.is_(None)).distinct()).scalars())


def newest_live_keys(engine: Engine, limit: int) -> Iterator[Row]:
    """What a process holds of its newest keys, read a thousand at a time. Read in parts, the 20,000
    keys and 20,000 items a process starts with take 15.9 MiB, against 17.4 read whole (measured)."""
    keys = _KEYS.c
    query = (select(keys.key_hash, keys.id, keys.owner, keys.team, keys.role, keys.bound_work_item, keys.bound_until)
             .where(keys.revoked_at.is_(None)).order_by(keys.created_at.desc()).limit(limit))  # fmt: skip
    with engine.connect() as connection:
        yield from connection.execution_options(yield_per=WARM_ROWS_PER_READ).execute(query)


def keys_by_id(engine: Engine, key_ids: Iterable[str]) -> list[Row]:
    wanted = sorted(key_ids)
    with engine.connect() as connection:
        return [key for start in range(0, len(wanted), 5000)
                for key in connection.execute(select(_KEYS).where(_KEYS.c.id.in_(wanted[start : start + 5000])))]  # fmt: skip


def get_key(engine: Engine, key_id: str) -> Row | None:
    with engine.connect() as connection:
        return connection.execute(select(_KEYS).where(_KEYS.c.id == key_id)).first()


def find_key_by_hash(engine: Engine, key_hash: str) -> Row | None:
    with engine.connect() as connection:
        return connection.execute(select(_KEYS).where(_KEYS.c.key_hash == key_hash)).first()


def revoke_key(engine: Engine, key_id: str, when: datetime) -> Row | None:
    """Revoke a key (a key revoked already keeps its time); answers the key, or None if there is none."""
    with engine.begin() as connection:
        if connection.execute(update(_KEYS).where(_KEYS.c.id == key_id, _KEYS.c.revoked_at.is_(None)).values(revoked_at=when)).rowcount:
            changes.note(connection, changes.KEY, [key_id], when)
        return connection.execute(select(_KEYS).where(_KEYS.c.id == key_id)).first()


def set_binding(engine: Engine, key_id: str, work_item: str | None, until: datetime | None) -> None:
    with engine.begin() as connection:
        connection.execute(
            update(_KEYS).where(_KEYS.c.id == key_id).values(bound_work_item=work_item, bound_until=until)
        )
        changes.note(connection, changes.KEY, [key_id], utcnow())


def get_work_item(engine: Engine, item_id: str) -> Row | None:
    with engine.connect() as connection:
        return connection.execute(select(_ITEMS).where(_ITEMS.c.id == item_id)).first()


def list_work_items(engine: Engine, *, status: str | None = None, team: str | None = None, after: tuple[datetime, str] | None = None,
                    limit: int = 1000) -> list[Row]:  # fmt: skip
    """The items matching the filters, newest first (creation, then id), from after the item `after`."""
    conditions = [*_matching((_ITEMS.c.status, status), (_ITEMS.c.team, team)), *_after(_ITEMS.c.created_at, _ITEMS.c.id, after)]
    query = select(_ITEMS).where(*conditions).order_by(_ITEMS.c.created_at.desc(), _ITEMS.c.id).limit(limit)
    with engine.connect() as connection:
        return list(connection.execute(query))


def completed_ids(since: datetime, until: datetime | None) -> Select:
    """The ids of the items completed in [since, until) (None: from `since` on; `workitems.completed_in`), by the completed_at index."""
    w = WorkItem.__table__.c
    return select(w.id).where(w.status == COMPLETED, *rollup.within(w.completed_at, since, until))


def list_audit(engine: Engine, *, since: datetime | None = None, until: datetime | None = None, limit: int = 100) -> list[Row]:
    query = select(AuditEntry.__table__).where(*rollup.within(AuditEntry.ts, since, until)).order_by(AuditEntry.ts.desc()).limit(limit)
    with engine.connect() as connection:
        return list(connection.execute(query))


def list_events(engine: Engine, *, work_item: str | None = None, key_id: str | None = None, since: datetime | None = None,
                until: datetime | None = None, after: tuple[datetime, str] | None = None, limit: int = 100) -> list[Row]:  # fmt: skip
    """The events matching the filters, newest first (time, then id), from after the event `after` (the
    (ts, id) of the last one of a page before): each page is read by index, however deep."""
    e = UsageEvent.__table__.c
    conditions = [*_matching((e.work_item, work_item), (e.key_id, key_id)), *rollup.within(e.ts, since, until), *_after(e.ts, e.id, after)]
    query = select(UsageEvent.__table__).where(*conditions).order_by(e.ts.desc(), e.id).limit(limit)
    with engine.connect() as connection:
        return list(connection.execute(query))


def _after(moment: Any, row_id: Any, after: tuple[datetime, str] | None) -> list[Any]:
    """Rows after `after` in the order newest first, then by id: a page's next. `moment <= ...` first,
    so that an index on the moment (alone or after a filter's column) bounds the scan."""
    if after is None:
        return []
    return [moment <= after[0], or_(moment < after[0], row_id > after[1])]


def _matching(*pairs: tuple[Any, Any]) -> list[Any]:
    """column == value for each pair whose value is given (a filter left empty matches everything)."""
    return [column == value for column, value in pairs if value]


def insert_ignoring_duplicates(dialect: str, table: Table) -> Executable:
    """INSERT that skips rows whose primary key exists (executed with a list of rows: executemany)."""
    if dialect == "postgresql":
        return postgresql_insert(table).on_conflict_do_nothing()
    if dialect == "sqlite":
        return sqlite_insert(table).on_conflict_do_nothing()
    raise NotImplementedError(f"unsupported database dialect {dialect!r}")  # pragma: no cover


def link_items(connection: Connection, rows: Iterable[tuple[str, str, str, datetime]]) -> None:
    """Record (item, linked, kind, at) links: a ticket and the merged pull request it led to (`merged_pr`),
    a pull request and its revert (`reverted_by`). Recording one twice is harmless."""
    values = [{"work_item": item, "linked": linked, "kind": kind, "ts": at} for item, linked, kind, at in rows]
    if values:
        connection.execute(insert_ignoring_duplicates(connection.dialect.name, WorkItemLink.__table__), values)


def write_batch(
    engine: Engine,
    *,
    events: list[dict],
    rejections: list[dict],
    new_items: Iterable[dict],
    audit: list[dict] = (),  # type: ignore[assignment]
) -> None:
    """Commit one batch atomically. Re-writing a batch (a replay) changes nothing: ids are primary keys,
    and the rollups and spend counters count only the events this insert wrote (RETURNING names them)."""
    dialect = engine.dialect.name
    now = utcnow()
    items = sorted(new_items, key=lambda item: item["id"])  # replicas registering the same items lock them in one order
    with engine.begin() as connection:
        if audit:
            connection.execute(insert_ignoring_duplicates(dialect, AuditEntry.__table__), list(audit))
        if items:
            # Only the items this insert wrote are changes: a batch written twice (a late commit, then
            # its replay) notes nothing the second time. Ids met in requests: the timer will do (no wake).
            registered = bulk.insert_new(connection, WorkItem.__table__, items)
            changes.note(connection, changes.ITEM, (item["id"] for item in registered), now, wake=False)
        if events and dialect == "postgresql":  # one statement: the events, their rollups and counters
            derived = [*rollup.upserts_over("new"), spend.upsert_over("new")]
            bulk.insert_new_with(connection, UsageEvent.__table__, events, returning=rollup.SOURCE_COLUMNS, derived=derived, params=(now,))
        elif events:
            inserted = bulk.insert_new(connection, UsageEvent.__table__, events)
            rollup.add(connection, inserted)
            spend.add(connection, inserted, now)
        if events:
            background.note(connection, events)  # the background responses owed, and those settled
        if rejections:
            connection.execute(insert_ignoring_duplicates(dialect, Rejection.__table__), rejections)


def replace_key_hash(engine: Engine, key_id: str, key_hash: str, prefix: str) -> None:
    with engine.begin() as connection:
        connection.execute(
            update(_KEYS).where(_KEYS.c.id == key_id).values(key_hash=key_hash, prefix=prefix, revoked_at=None)
        )
        changes.note(connection, changes.KEY, [key_id], utcnow())
