"""Reading the rows of a set of ids (work items, keys) that the caller holds in Python.

On PostgreSQL a batch of ids is bound as one string, the ids joined by the ASCII unit separator, that
the database splits into an array (`id = ANY(string_to_array(:ids, chr(31)))`): one statement for up to
a million ids, which the planner matches by hash in one pass over the table. A batch of `IN (...)`
lists costs one bound parameter per id: 5,000 to a statement made a report over 690,000 items spend
17 s in round trips and binding. Arrays of 100,000 ids took 3 s, but psycopg dumps a list element by
element in Python, and each batch of a large set scanned the table again (docs/scale-runs.md). No id holds
a control character (workitems.py refuses them; keys and hashes are hex): a batch that would is bound
as an array instead. SQLite has no arrays: `IN (...)` lists, under its limit on parameters.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import String, Text, any_, bindparam, cast, column, func, literal_column, values
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import TypeEngine

_BATCH = {"postgresql": 1_000_000}
_SEPARATOR = "\x1f"  # chr(31), the ASCII unit separator
_IN_LIST_BATCH = 5_000  # SQLite binds at most 32,766 parameters to a statement


def batch_size(connection: Connection) -> int:
    """How many ids this database takes to one statement."""
    return _BATCH.get(connection.dialect.name, _IN_LIST_BATCH)


def batches(connection: Connection, ids: Iterable[str]) -> Iterator[list[str]]:
    """`ids`, sorted, in batches of the size this database takes to one statement."""
    ordered = sorted(set(ids))
    size = batch_size(connection)
    for start in range(0, len(ordered), size):
        yield ordered[start : start + size]


def among(connection: Connection, column: Any, batch: list[str]) -> ColumnElement:
    """`column` is one of `batch` (a batch from `batches`)."""
    if connection.dialect.name == "postgresql":
        joined = _SEPARATOR.join(batch)
        if joined.count(_SEPARATOR) == len(batch) - 1 and "" not in batch:  # else the split would not give `batch` back
            return column == any_(func.string_to_array(bindparam(None, joined, type_=Text()), literal_column("chr(31)")))
        return column == any_(bindparam(None, batch, type_=ARRAY(String())))
    return column.in_(batch)  # type: ignore[no-any-return]


# Rows bound to one statement: SQLite's VALUES list of up to three columns stays under its 32,766 parameters.
_ROWS_PER_TABLE = {"postgresql": 100_000}
_VALUES_ROWS = 10_000


def rows_table(connection: Connection, name: str, columns: Sequence[tuple[str, TypeEngine]], data: Sequence[tuple]) -> Any:
    """`data` (rows the caller holds: an id with its own moment or range; a chunk from `tables`) as a
    table `name` with `columns`, to join in a statement. Nothing is written, so a report runs on a
    read-only database (a standby) as before. On PostgreSQL each column is bound as one string that
    the database splits and casts to an array, the arrays unnested side by side: a VALUES list of
    10,000 rows took SQLAlchemy 3.4 s to compile and bind, for a statement that ran in 0.5 s (the
    carried tickets of the scale seed, docs/scale-runs.md). SQLite takes a VALUES list, named by a CTE."""
    if connection.dialect.name != "postgresql":
        return values(*(column(label, kind) for label, kind in columns), name=name).data(list(data)).cte(name)
    arrays = []
    for values_of, (_, kind) in zip(list(zip(*data)) if data else [() for _ in columns], columns, strict=True):
        texts = [value.isoformat(sep=" ") if isinstance(value, datetime) else value for value in values_of]
        if all(isinstance(value, str) and value and _SEPARATOR not in value for value in texts):  # '' alone would split to no element
            joined = func.string_to_array(bindparam(None, _SEPARATOR.join(texts), type_=Text()), literal_column("chr(31)"))
            arrays.append(cast(joined, ARRAY(kind)))
        else:
            arrays.append(bindparam(None, list(values_of), type_=ARRAY(kind)))
    return func.unnest(*arrays).table_valued(*(column(label, kind) for label, kind in columns)).render_derived(name=name)


def tables(connection: Connection, name: str, columns: Sequence[tuple[str, TypeEngine]], data: Sequence[tuple]) -> Iterator[tuple[Sequence[tuple], Any]]:
    """`data` in chunks of the rows this database takes to one statement, each with its `rows_table`."""
    size = _ROWS_PER_TABLE.get(connection.dialect.name, _VALUES_ROWS)
    for start in range(0, len(data), size):
        chunk = data[start : start + size]
        yield chunk, rows_table(connection, name, columns, chunk)
