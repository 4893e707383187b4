"""Reading the rows of a set of ids (work items, keys) that the caller holds in Python.

On PostgreSQL a batch of ids is bound as one array parameter (`id = ANY(:ids)`): one statement for up
to 100,000 ids, which the planner joins by hash. A batch of `IN (...)` lists costs one bound parameter
per id: 5,000 to a statement made a report over 690,000 items spend 17 s in round trips and binding
where the arrays take 3 (bench/scale.py, docs/scale.md). SQLite has no arrays: `IN (...)` lists,
under its limit on parameters.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from sqlalchemy import String, any_, bindparam
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

_BATCH = {"postgresql": 100_000}
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
        return column == any_(bindparam(None, batch, type_=ARRAY(String())))
    return column.in_(batch)  # type: ignore[no-any-return]
