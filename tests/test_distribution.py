"""The schema stays ready to be distributed by work item (storage/distribution.py): Citus refuses a
unique key that lacks the distribution column, and co-locates only columns of one type. Checked on
the schema the migrations build, so a migration that breaks it fails here."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from taskproxy.storage import distribution
from taskproxy.storage.db import make_engine, upgrade_schema

pytestmark = pytest.mark.postgres

UNIQUE_KEYS = """
SELECT c.relname, i.indexrelid::regclass::text, array_agg(a.attname::text ORDER BY a.attnum)
FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY(i.indkey)
WHERE i.indisunique AND c.relnamespace = current_schema()::regnamespace AND NOT c.relispartition
GROUP BY 1, 2
"""
TABLES = "SELECT relname FROM pg_class WHERE relnamespace = current_schema()::regnamespace AND relkind IN ('r', 'p') AND NOT relispartition"
COLUMN_TYPE = "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = CAST(:table AS regclass) AND attname = :column"


def test_every_unique_key_of_a_distributed_table_holds_its_distribution_column(postgres_url: str) -> None:
    engine = make_engine(postgres_url)
    upgrade_schema(engine)
    with engine.connect() as connection:
        tables = set(connection.execute(text(TABLES)).scalars())
        unique_keys = connection.execute(text(UNIQUE_KEYS)).all()
        types = {table: connection.execute(text(COLUMN_TYPE), {"table": table, "column": column}).scalar_one()
                 for table, column in distribution.DISTRIBUTED.items()}  # fmt: skip
    engine.dispose()

    placed = [*distribution.DISTRIBUTED, *distribution.BY_TEAM, *distribution.REFERENCE, *distribution.ON_COORDINATOR]
    assert sorted(placed) == sorted(tables)  # every table is placed, once: a new one must say where it goes
    spread = {**distribution.DISTRIBUTED, **distribution.BY_TEAM}
    lacking = [(table, index, columns) for table, index, columns in unique_keys if table in spread and spread[table] not in columns]
    assert lacking == []
    assert "usage_events_pkey" in {index for _, index, _ in unique_keys}
    assert len(set(types.values())) == 1, types  # co-located columns are of one type
