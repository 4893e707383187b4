"""Every unique key of a table that a distributed PostgreSQL would spread by work item includes the
work item (storage/distribution.py): usage_events' primary key becomes (id, ts, work_item), the
status and size histories' (id, work_item). Citus refuses a unique key without the distribution
column; with these, distributing the tables is configuration. Nothing changes on SQLite.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-04
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0014'
down_revision: str | None = '0013'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (table, the primary key before, after). The work item goes last: usage_events' ids begin with
# their time, so its key's index still grows at one edge (docs/scale.md, the writer).
KEYS = [('usage_events', 'id, ts', 'id, ts, work_item'),
        ('work_item_changes', 'id', 'id, work_item'),
        ('work_item_sizes', 'id', 'id, work_item')]  # fmt: skip


def _rekey(index: int) -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    for table, before, after in KEYS:
        columns = (before, after)[index]
        # One statement: the table never stands without a key, and a partitioned table's partitions follow.
        op.execute(f'ALTER TABLE {table} DROP CONSTRAINT {table}_pkey, ADD CONSTRAINT {table}_pkey PRIMARY KEY ({columns})')


def upgrade() -> None:
    _rekey(1)


def downgrade() -> None:
    _rekey(0)
