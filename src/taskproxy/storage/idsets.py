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
from typing import Any

from sqlalchemy import String, Text, any_, bindparam, column, func, literal_column, values
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import TypeEngine

_BATCH = {"postgresql": 1_000_000}
_SEPARATOR = "\x1f"  # chr(31), the ASCII unit separator
_IN_LIST_BATCH = 5_000  # SQLite binds at most 32,766 parameters to a statement
ROWS_PER_VALUES = 10_000  # rows of up to three columns in one VALUES list: under SQLite's 32,766 parameters and PostgreSQL's 65,535


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


def values_lists(connection: Connection, name: str, columns: Sequence[tuple[str, TypeEngine]], data: Sequence[tuple]) -> Iterator[Any]:
    """`data` (rows the caller holds: an id with its own moment or range) as VALUES lists of
    ROWS_PER_VALUES rows, each a table `name` with `columns` to join in a statement. Nothing is
    written, so a report runs on a read-only database (a standby) as before."""
    for start in range(0, len(data), ROWS_PER_VALUES):
        found: Any = values(*(column(label, kind) for label, kind in columns), name=name).data(list(data[start : start + ROWS_PER_VALUES]))
        yield found.cte(name) if connection.dialect.name == "sqlite" else found  # SQLite names no VALUES columns in FROM: a CTE does
