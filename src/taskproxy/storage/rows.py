"""Reading a large result: rows taken from the driver a batch at a time.

Iterating a SQLAlchemy result asks the driver for one row at a time, and psycopg checks its cursor's
state on each call (about a microsecond a row); `fetchmany` converts a batch in one call. The reports
read a million rows and more per query (`bench/scale.py`), so their large reads go through `rows`.
On PostgreSQL the whole result is in the client's memory either way (no server-side cursor is opened).
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain
from typing import Any

from sqlalchemy.engine import Result, ScalarResult

BATCH = 10_000


def rows(result: Result[Any] | ScalarResult[Any]) -> Iterator[Any]:
    """The rows (or scalars) of `result`, fetched BATCH at a time."""
    return chain.from_iterable(result.partitions(BATCH))
