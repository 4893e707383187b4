"""Engines: one per process, made from the configured URL."""

from __future__ import annotations

from sqlalchemy import Column, Table, event, inspect, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.schema import CreateColumn
from sqlmodel import SQLModel, create_engine

from taskproxy.errors import SchemaBehind

from taskproxy.storage import models  # noqa: F401  (registers the tables on SQLModel.metadata)


def make_engine(database_url: str) -> Engine:
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            # WAL lets the API read while the writer commits, and lets CLI commands share the file.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    if url.drivername in {"postgresql", "postgres"}:
        url = url.set(drivername="postgresql+psycopg")
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


def _missing(engine: Engine) -> tuple[list[Table], list[tuple[Table, Column]]]:
    inspector = inspect(engine)
    present = set(inspector.get_table_names())
    tables = [t for t in SQLModel.metadata.sorted_tables if t.name not in present]
    columns = [
        (table, column)
        for table in SQLModel.metadata.sorted_tables
        if table.name in present
        for column in table.columns
        if column.name not in {c["name"] for c in inspector.get_columns(table.name)}
    ]
    return tables, columns


def prepare_schema(engine: Engine) -> None:
    """At start: create the schema in an empty database; refuse one made by an older version."""
    tables, columns = _missing(engine)
    if len(tables) == len(SQLModel.metadata.sorted_tables):
        create_schema(engine)
        return
    if tables or columns:
        names = [t.name for t in tables] + [f"{t.name}.{c.name}" for t, c in columns]
        raise SchemaBehind(f"the database schema is behind this version of taskproxy (missing: {', '.join(names[:6])}); run `taskproxy db upgrade`")


def upgrade_schema(engine: Engine) -> list[str]:
    """Add the tables and columns this version needs; returns what was added."""
    tables, columns = _missing(engine)
    create_schema(engine)
    added = [t.name for t in tables]
    with engine.begin() as connection:
        for table, column in columns:
            ddl = CreateColumn(column).compile(dialect=engine.dialect)
            default = column.default.arg if column.default is not None and not callable(column.default.arg) else None
            if not column.nullable and default is None:
                raise SchemaBehind(f"cannot add {table.name}.{column.name}: it has no default")
            suffix = f" DEFAULT {int(default) if isinstance(default, bool) else default!r}" if default is not None else ""
            connection.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {ddl}{suffix}"))
            added.append(f"{table.name}.{column.name}")
    return added


def create_schema(engine: Engine) -> None:
    """Create missing tables. Several workers may do this at once on a fresh database: create_all
    checks, then creates, so another process can create a table in between; try again then."""
    for attempt in range(5):
        try:
            SQLModel.metadata.create_all(engine)
            return
        except (OperationalError, ProgrammingError, IntegrityError) as exc:
            if "already exists" not in str(exc).lower() and "duplicate" not in str(exc).lower() or attempt == 4:
                raise


def ping(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))
