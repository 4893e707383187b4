"""Engines (one per process, made from the configured URL) and the schema's migrations (alembic,
in `migrations/`): an empty database is migrated at start, one that is behind is refused with the
command that upgrades it."""

from __future__ import annotations

import fcntl
import logging
import math
import os
import re
import socket
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import DisconnectionError, OperationalError

from taskproxy.errors import MigrationBlocked, SchemaBehind
from taskproxy.storage import models
from taskproxy.storage.failures import LOCK_NOT_AVAILABLE, sqlstate

if TYPE_CHECKING:
    from alembic.config import Config

    from taskproxy.settings import ReportSettings


# How every PostgreSQL connection notices a server that vanished without closing it (a failover, a
# host gone, a firewall forgetting the connection): without these a query waits for the kernel,
# 15 minutes and more, and the writer with it, while usage piles up unrecorded. A connection attempt
# gives up after `connect_timeout` s; an idle one (waiting for an answer) is probed after 10 s and
# dropped after 3 unanswered probes 5 s apart; data unacknowledged for 30 s drops it too. Each is
# libpq's parameter, and the URL's query overrides it (`...?keepalives_idle=60`).
CONNECTION_DEFAULTS: dict[str, int] = {
    "connect_timeout": 10, "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}  # fmt: skip


log = logging.getLogger("taskproxy.db")


def application_name(role: str) -> str:
    """How a connection names itself in `pg_stat_activity`: its role (`proxy`, `report`, `listener`),
    host and process, so that a DBA can tell whose connections fill the server (63 bytes at most)."""
    return f"taskproxy-{role} {socket.gethostname()}:{os.getpid()}"[:63]


def connection_defaults(url: URL) -> dict[str, int]:
    """`CONNECTION_DEFAULTS` but those `url` sets itself."""
    return {name: value for name, value in CONNECTION_DEFAULTS.items() if name not in url.query}


def _file_identity(path: Path) -> tuple[int, int] | None:
    try:
        found = path.stat()
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino


def _follow_the_file(engine: Engine, path: Path) -> None:
    """A pooled SQLite connection keeps the file it opened, even once another is put in its place (a
    backup restored, the file removed): before 2026-12-06 every record went on into the old one,
    unseen, `/readyz` ready. A connection whose file is no longer the one at the path is discarded
    when it is next taken from the pool, and a new one opens what is there now."""

    @event.listens_for(engine, "connect")
    def _note_the_file(_dbapi_connection, record) -> None:  # type: ignore[no-untyped-def]
        record.info["file"] = _file_identity(path)

    @event.listens_for(engine, "checkout")
    def _same_file(_dbapi_connection, record, _proxy) -> None:  # type: ignore[no-untyped-def]
        if record.info.get("file") != _file_identity(path):
            log.warning("the database file %s was replaced or removed: connecting to the one there now", path)
            raise DisconnectionError("the SQLite file at the path is not the one this connection opened")


@dataclass(frozen=True)
class ReportSession:
    """What a period report's transactions set for themselves on PostgreSQL (`reports.*`), each with SET
    LOCAL: behind a pooler in transaction mode a session's SET would stay on a server connection that
    other clients use next.

    A report reads in one snapshot for minutes (hours at an organisation's size) and does its
    arithmetic between its queries, by design: a server's or role's `statement_timeout` or
    `idle_in_transaction_session_timeout` (a DBA's guard for the serving connections, or a pooler's
    advice) would end every one of them, every time. A report has its own limit instead; one nobody
    waits for any more is stopped by its process, which cancels its query."""

    work_mem_mb: int = 0  # each sort or hash may use this much before it spills to disk (0: the server's)
    statement_timeout_seconds: float = 0  # how long one of its queries may run (0: no limit)

    @classmethod
    def of(cls, reports: ReportSettings) -> ReportSession:
        return cls(work_mem_mb=reports.work_mem_mb, statement_timeout_seconds=reports.statement_timeout_seconds)

    def statements(self) -> list[str]:
        limit_ms = math.ceil(self.statement_timeout_seconds * 1000)  # up: a limit under a millisecond is not "none" (0)
        # No JIT: a report's statements join tens of thousands of ids to indexes, which the planner costs
        # high enough to compile with inlining and optimization: 5.1 s of a 9.0 s statement on the scale
        # seed was the compiling (docs/scale-runs.md), for a plan of index lookups that runs in ~2 s.
        found = [f"SET LOCAL statement_timeout = {limit_ms}", "SET LOCAL idle_in_transaction_session_timeout = 0", "SET LOCAL jit = off"]
        return [*found, f"SET LOCAL work_mem = '{int(self.work_mem_mb)}MB'"] if self.work_mem_mb else found


def make_engine(database_url: str, *, client_check_ms: int | None = None, report: ReportSession | None = None, role: str = "proxy") -> Engine:
    """`client_check_ms` (PostgreSQL): the server checks that often, while a query of this engine's
    runs, that the client is still there, and ends the query if it is gone (PostgreSQL 14's
    `client_connection_check_interval`; SQLite's queries end with their process: ignored there). For
    processes that may be killed outright mid-query, such as the reports': otherwise the query runs to
    its end for nobody.
    `report` (PostgreSQL): an engine that computes period reports, never the serving one: what each of
    its transactions sets for itself (`ReportSession`). `role`: how its connections name themselves
    otherwise (`application_name`: `proxy`, `cli`)."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        # LIFO: the connection used last is handed out again, so the writer and the periodic reloads
        # keep reusing one or two connections instead of cycling through the pool, each of which
        # would fill a page cache of its own (up to 2 MiB, in this process's memory).
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, pool_use_lifo=True)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            # WAL lets the API read while the writer commits, and lets CLI commands share the file.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        if url.database and url.database != ":memory:" and not url.database.startswith("file:"):
            _follow_the_file(engine, Path(url.database))
        return engine
    if url.drivername in {"postgresql", "postgres"}:
        url = url.set(drivername="postgresql+psycopg")
    # No server-side prepared statements (psycopg prepares a query it has run 5 times on a connection):
    # behind a pooler in transaction mode (PgBouncer's default for large fleets) the next transaction
    # may run on another server connection, where the statement is missing or another client's has
    # the same name, and the query fails. taskproxy's repeated queries are lookups by key, whose
    # planning costs little.
    named = {} if "application_name" in url.query else {"application_name": application_name("report" if report is not None else role)}
    engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5,
                           connect_args={"prepare_threshold": None, **connection_defaults(url), **named})  # fmt: skip
    if client_check_ms is not None:
        # SET after connecting rather than a startup option (`-c ...` in `options`): PgBouncer refuses
        # connections whose startup packet carries options it does not know, and PostgreSQL 13 and older
        # refuse the setting itself. Both should still get their reports, without this safeguard.
        @event.listens_for(engine, "connect")
        def _client_check(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
            _set_client_check(dbapi_connection, client_check_ms)

    if report is not None:
        statements = report.statements()

        @event.listens_for(engine, "begin")
        def _report_session(connection: Connection) -> None:
            for statement in statements:
                connection.exec_driver_sql(statement)

    return engine


@contextmanager
def one_snapshot(engine: Engine) -> Iterator[Connection]:
    """A connection whose statements all see the database as it was at the first: a report that reads
    in several statements while writers commit (a completed item's cost in one, its keys' spend in the
    next) adds up. PostgreSQL's REPEATABLE READ, which cannot fail to serialize a transaction that only
    reads; SQLite's connections keep their default."""
    with engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            connection = connection.execution_options(isolation_level="REPEATABLE READ")
        yield connection


def _set_client_check(dbapi_connection: Any, interval_ms: int) -> None:
    try:
        with dbapi_connection.cursor() as cursor:
            cursor.execute(f"SET client_connection_check_interval = {int(interval_ms)}")
        dbapi_connection.commit()
    except Exception:  # noqa: BLE001  (an older server or a pooler without the setting: reports run without it)
        dbapi_connection.rollback()


def query_canceller(engine: Engine) -> Callable[[], None] | None:
    """A function that cancels, in the database, the queries `engine`'s connections are running; None
    where there is nothing to cancel that way.

    A process that is stopped mid-query leaves its query running on PostgreSQL until it finishes:
    the server notices a client has gone only when it next writes to it. The function asks the
    server to cancel instead (libpq's cancel request, on a connection of its own, so it may be
    called from a signal handler while the query is waited for). SQLite's queries end with their
    process, and a signal handler would wait for the statement to end: None."""
    if engine.dialect.name != "postgresql":
        return None
    live: weakref.WeakSet[Any] = weakref.WeakSet()
    event.listen(engine, "connect", lambda dbapi_connection, _record: live.add(dbapi_connection))

    def cancel() -> None:
        for connection in list(live):
            try:
                connection.cancel_safe(timeout=2)  # psycopg's (3.2+); does nothing on an idle connection
            except Exception:  # noqa: BLE001, S110  (the process is stopping either way; the server ends the query in time)
                pass

    return cancel


MIGRATIONS = Path(__file__).parent / "migrations"
_MIGRATION_LOCK = 7_242_001  # a PostgreSQL advisory lock id: replicas starting together migrate one at a time


# alembic (~10 MiB and a tenth of a second to import) is loaded only to migrate. Starting on a
# database that is up to date needs two facts, read without it: the newest migration's revision,
# from the files, and the database's, from alembic's one-row table. A test keeps both equal to
# what alembic itself answers.
_REVISION = re.compile(r"^(down_)?revision\s*(?::[^=]*)?=\s*['\"]?([\w-]+|None)['\"]?", re.MULTILINE)


def _alembic(connection: Connection | None) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The revision no migration builds on."""
    revisions, parents = set(), set()
    for path in (MIGRATIONS / "versions").glob("*.py"):
        for down, value in _REVISION.findall(path.read_text()):
            (parents if down else revisions).add(value)
    heads = revisions - parents
    if len(heads) != 1:
        raise RuntimeError(f"the migrations in {MIGRATIONS} have {len(heads)} heads: {sorted(heads)}")
    return heads.pop()


def current_revision(connection: Connection) -> str | None:
    if not inspect(connection).has_table("alembic_version"):
        return None
    return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()


def _our_tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names()) & set(models.metadata.tables)


@contextmanager
def _sqlite_migration_lock(engine: Engine) -> Iterator[None]:
    """Processes starting together on one fresh SQLite file migrate it one at a time."""
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:":
        yield
        return
    with open(f"{database}.migrate-lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


UNVERSIONED = (
    "the database has taskproxy's tables but no schema revision (a build from before migrations made it, which no "
    "version since can upgrade); point database_url at a new database"
)


def prepare_schema(engine: Engine) -> None:
    """At start: migrate an empty database; refuse one whose schema is behind this version."""
    head = head_revision()
    with _sqlite_migration_lock(engine):
        with engine.connect() as connection:
            current, tables = current_revision(connection), _our_tables(connection)
        if current == head:
            return
        if current is None and not tables:
            _upgrade(engine, head)
            return
    if current is None:
        raise SchemaBehind(UNVERSIONED)
    raise SchemaBehind(f"the database schema is at revision {current}, this version of taskproxy needs {head}; run `taskproxy db upgrade`")


def upgrade_schema(engine: Engine, *, lock_wait_seconds: float | None = None) -> tuple[str | None, str]:
    """Run the migrations up to this version's head; returns (revision before, revision after).

    Some migrations lock a table against readers (dropping an index, rebuilding a key) for a moment,
    but must first wait for the sessions already reading it: a report's transaction can last minutes,
    and meanwhile every new query on that table queues behind the migration's wait. With
    `lock_wait_seconds` (PostgreSQL's `lock_timeout` for the upgrade; 0: no limit; None: the server's
    own setting), a migration that waits longer than that for any one lock gives up instead: the whole
    upgrade is rolled back, the queue behind it is released, and MigrationBlocked says which statement
    waited."""
    head = head_revision()
    with _sqlite_migration_lock(engine):
        return _upgrade(engine, head, lock_wait_seconds), head


def _upgrade(engine: Engine, head: str, lock_wait_seconds: float | None = None) -> str | None:
    from alembic import command

    before = None
    try:
        with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:lock)"), {"lock": _MIGRATION_LOCK})
                if lock_wait_seconds is not None:  # after the advisory lock: replicas starting together wait their turn for it
                    limit_ms = max(1, round(lock_wait_seconds * 1000)) if lock_wait_seconds > 0 else 0  # 0: no limit
                    connection.execute(text(f"SET LOCAL lock_timeout = {limit_ms}"))
            before = current_revision(connection)
            if before is None and _our_tables(connection):
                raise SchemaBehind(UNVERSIONED)
            if before != head:
                command.upgrade(_alembic(connection), "head")
    except OperationalError as exc:
        if sqlstate(exc) != LOCK_NOT_AVAILABLE:
            raise
        statement = " ".join(str(exc.statement or "").split())[:160]
        waited = f"more than {lock_wait_seconds:g} s" if lock_wait_seconds else "longer than the server's lock_timeout"
        raise MigrationBlocked(
            f"the upgrade waited {waited} for a lock on a table another session is using (a long report, most likely), "
            f"at `{statement}`, and was rolled back: the schema is still at revision {before or 'nothing'}. Run it again "
            "once that session ends (pg_stat_activity lists them), or let it wait longer with --lock-wait SECONDS (0: as "
            "long as it takes; new queries on that table queue behind it meanwhile)"
        ) from None
    return before


def ping(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))
