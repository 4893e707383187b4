"""Bulk inserts for the writer's hot path: rows sent to the driver as plain values, one statement per batch.

SQLAlchemy's executemany of dicts cost the writer about 0.3 CPU seconds per 10,000 events on either
database (bind processing per value), and with RETURNING on psycopg six times that (a multi-row
statement of several hundred kilobytes, parsed again by the driver for every batch).
Here the statement text depends only on the table, and values go to the driver unprocessed: on
PostgreSQL one array per column, unnested by the server (binary parameters, one statement); on SQLite
tuples to the driver's executemany. Both are executed with `exec_driver_sql`, so errors still arrive
as SQLAlchemy exceptions and a dropped connection is still recognised (the writer spools on those).
`bench/write_path.py` measures the difference.

Values are stored exactly as SQLAlchemy would store them: SQLite datetimes as
'YYYY-MM-DD HH:MM:SS.ffffff' text, which is what every comparison in SQL relies on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from itertools import chain
from operator import itemgetter
from typing import Any

from sqlalchemy import DateTime, Float, Table
from sqlalchemy.engine import Connection

_SQLITE_MAX_VARIABLES = 32_766  # SQLite >= 3.32; a chunk of rows never binds more


def _defaults(table: Table) -> dict[str, Any]:
    """Scalar column defaults, for rows that lack a column (a spool written by an older version)."""
    return {c.name: c.default.arg for c in table.columns if c.default is not None and not callable(c.default.arg)}


def _columns(table: Table, rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The table's columns that the rows carry (or that have a default)."""
    present = set(rows[0]) | set(_defaults(table))
    return [c.name for c in table.columns if c.name in present]


def _tuples(table: Table, columns: list[str], rows: Sequence[Mapping[str, Any]]) -> list[tuple]:
    """The rows' values in column order (itemgetter: no Python call per value)."""
    take = itemgetter(*columns) if len(columns) > 1 else lambda row: (row[columns[0]],)
    defaults = _defaults(table)
    found = []
    for row in rows:
        try:
            found.append(take(row))
        except KeyError:  # a row without a column that has a default
            found.append(tuple(row.get(name, defaults.get(name)) for name in columns))
    return found


def _postgresql_arrays(connection: Connection, table: Table, columns: list[str], rows: Sequence[Mapping[str, Any]]) -> tuple[str, tuple]:
    """`SELECT * FROM unnest(...)` over one array per column, and those arrays (binary parameters)."""
    kinds = [table.c[name].type for name in columns]
    arrays = [list(column) for column in zip(*_tuples(table, columns, rows), strict=True)]
    for n, kind in enumerate(kinds):
        if isinstance(kind, Float):  # an int among the floats would make psycopg choose another array type
            arrays[n] = [None if v is None else float(v) for v in arrays[n]]
    types = [f"%b::{kind.compile(dialect=connection.dialect)}[]" for kind in kinds]
    return f"SELECT * FROM unnest({', '.join(types)})", tuple(arrays)


def _sqlite_rows(table: Table, columns: list[str], rows: Sequence[Mapping[str, Any]]) -> list[tuple]:
    """The rows as parameter tuples, datetimes as SQLAlchemy stores them: 'YYYY-MM-DD HH:MM:SS.ffffff'."""
    width = len(columns)
    flat = list(chain.from_iterable(_tuples(table, columns, rows)))
    for n, name in enumerate(columns):
        if isinstance(table.c[name].type, DateTime):
            flat[n::width] = [v.isoformat(" ", "microseconds") if isinstance(v, datetime) else v for v in flat[n::width]]
    return list(zip(*[iter(flat)] * width, strict=True))


def _insert(table: Table, columns: list[str]) -> str:
    return f"INSERT INTO {table.name} ({', '.join(columns)}) "


def insert_new(connection: Connection, table: Table, rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Insert `rows`, skipping those whose primary key (one column) exists; answers the rows written,
    in order, each once (a repeated row is written once)."""
    if not rows:
        return []
    (key,) = [c.name for c in table.primary_key.columns]
    columns = _columns(table, rows)
    head, tail = _insert(table, columns), f" ON CONFLICT DO NOTHING RETURNING {key}"
    if connection.dialect.name == "postgresql":
        source, arrays = _postgresql_arrays(connection, table, columns, rows)
        written = set(connection.exec_driver_sql(head + source + tail, arrays).scalars())
    elif connection.dialect.name == "sqlite":
        values = _sqlite_rows(table, columns, rows)
        placeholders = "(" + ", ".join("?" * len(columns)) + ")"
        # Usually every row is new: executemany (SQLite's cheapest form) says so by its count. When some
        # existed (a replay), undo it and insert again with RETURNING, which names the rows written.
        # The savepoint must sit inside a transaction: Python's sqlite3 begins one only before a DML
        # statement, so a savepoint that came first was the transaction, and its release committed the
        # rows on their own: a batch that failed after it (its rollups, a disk error) kept its events,
        # and the replay, finding them, counted them in no rollup and no budget.
        if not connection.connection.dbapi_connection.in_transaction:  # type: ignore[union-attr]
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        savepoint = connection.begin_nested()
        if connection.exec_driver_sql(f"{head}VALUES {placeholders} ON CONFLICT DO NOTHING", values).rowcount == len(rows):
            savepoint.commit()
            return list(rows)
        savepoint.rollback()
        written = set()
        per_chunk = max(1, _SQLITE_MAX_VARIABLES // len(columns))
        for start in range(0, len(values), per_chunk):
            chunk = values[start : start + per_chunk]
            sql = head + "VALUES " + ", ".join([placeholders] * len(chunk)) + tail
            written.update(connection.exec_driver_sql(sql, tuple(chain.from_iterable(chunk))).scalars())
    else:  # pragma: no cover
        raise NotImplementedError(f"unsupported database dialect {connection.dialect.name!r}")
    if len(written) == len(rows):
        return list(rows)
    found = []
    for row in rows:
        if row[key] in written:
            written.discard(row[key])
            found.append(row)
    return found


def insert_new_with(
    connection: Connection, table: Table, rows: Sequence[Mapping[str, Any]], *, returning: Sequence[str], derived: Sequence[str], params: tuple = ()
) -> int:
    """PostgreSQL: `insert_new`, and in the same statement the `derived` statements, which read `new`:
    the rows this insert wrote, with the `returning` columns (data-modifying CTEs: a row that existed
    reaches none of them, and nothing crosses the network twice). `params` fill the placeholders of
    `derived`, in order. Answers how many rows were written."""
    if not rows:
        return 0
    columns = _columns(table, rows)
    source, arrays = _postgresql_arrays(connection, table, columns, rows)
    steps = [f"new AS ({_insert(table, columns)}{source} ON CONFLICT DO NOTHING RETURNING {', '.join(returning)})"]
    steps += [f"derived_{n} AS ({sql})" for n, sql in enumerate(derived)]
    return int(connection.exec_driver_sql(f"WITH {', '.join(steps)} SELECT count(*) FROM new", (*arrays, *params)).scalar_one())


def upsert(connection: Connection, table: Table, rows: Sequence[Mapping[str, Any]], key: Sequence[str], updates: Mapping[str, str]) -> None:
    """Insert `rows`, or where a row with the same `key` exists, set its columns to `updates`
    (SQL over the table's and `excluded`'s columns). Rows are written in the order given."""
    if not rows:
        return
    columns = _columns(table, rows)
    changes = ", ".join(f"{name} = {expression}" for name, expression in updates.items())
    tail = f" ON CONFLICT ({', '.join(key)}) DO UPDATE SET {changes}"
    if connection.dialect.name == "postgresql":
        source, arrays = _postgresql_arrays(connection, table, columns, rows)
        connection.exec_driver_sql(_insert(table, columns) + source + tail, arrays)
    else:
        placeholders = "(" + ", ".join("?" * len(columns)) + ")"
        connection.exec_driver_sql(f"{_insert(table, columns)}VALUES {placeholders}{tail}", _sqlite_rows(table, columns, rows))
