"""Reading the rows of a set of ids (storage/idsets.py), as the reports do for hundreds of thousands of
work items: exactly the rows asked for, whatever the ids hold."""

from __future__ import annotations

from datetime import datetime

from conftest import BOTH_DATABASES
from sqlalchemy import insert, select

from taskproxy.storage import idsets
from taskproxy.storage.db import make_engine, prepare_schema
from taskproxy.storage.models import WorkItem

_W = WorkItem.__table__.c

# Ids a tracker or an older version may have stored: PostgreSQL is sent a batch as one string split on
# the unit separator (chr 31), so ids that hold it, or an empty one, must not be split or lost.
ODD_IDS = ["", "a\x1fb", "\x1f", "comma,id", "quote'id", 'double"id', "brace{id}", "space id", "ünï"]


def _read(engine, ids: list[str]) -> set[str]:  # type: ignore[no-untyped-def]
    found: set[str] = set()
    with engine.connect() as connection:
        for batch in idsets.batches(connection, ids):
            found |= set(connection.execute(select(_W.id).where(idsets.among(connection, _W.id, batch))).scalars())
    return found


@BOTH_DATABASES
def test_a_set_of_ids_reads_exactly_its_rows_whatever_the_ids_hold(database_url: str) -> None:
    engine = make_engine(database_url)
    prepare_schema(engine)
    plain = [f"github:org/repo#{n}" for n in range(12_000)]  # more than one batch of SQLite's
    stored = plain + ODD_IDS
    with engine.begin() as connection:
        now = datetime(2026, 12, 1)
        connection.execute(insert(WorkItem.__table__), [{"id": i, "source": "manual", "status": "open", "created_at": now} for i in stored])
    wanted = plain[::3] + ["a", "b", "a", "missing"]  # "a" and "b" exist only inside "a\x1fb"
    assert _read(engine, wanted) == set(plain[::3])
    assert _read(engine, wanted + ["a\x1fb"]) == set(plain[::3]) | {"a\x1fb"}
    assert _read(engine, ODD_IDS) == set(ODD_IDS)
    assert _read(engine, [""]) == {""}
    assert _read(engine, []) == set()
    engine.dispose()


@BOTH_DATABASES
def test_rows_held_in_python_come_back_as_a_table_exactly_whatever_they_hold(database_url: str) -> None:
    """`rows_table`: the ids and moments the reports join (a carried ticket and its merge), each row
    alone and among others; PostgreSQL is sent each column as one string split on chr 31."""
    from sqlalchemy import DateTime, String

    engine = make_engine(database_url)
    moments = [datetime(2026, 12, 1, 9), datetime(2026, 12, 1, 9, 0, 0, 1), datetime(2026, 12, 1, 23, 59, 59, 999_999)]
    rows = [(item, moments[n % 3]) for n, item in enumerate(["PROJ-1", *ODD_IDS])]
    columns = (("id", String(200)), ("moment", DateTime()))
    with engine.connect() as connection:
        for chunk in ([row] for row in rows):
            table = idsets.rows_table(connection, "moments", columns, chunk)
            assert connection.execute(select(table.c.id, table.c.moment)).all() == chunk
        table = idsets.rows_table(connection, "moments", columns, rows)
        assert sorted(connection.execute(select(table.c.id, table.c.moment)).all()) == sorted(rows)
    engine.dispose()
