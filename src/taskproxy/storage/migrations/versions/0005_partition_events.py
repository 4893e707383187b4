"""usage_events partitioned by month on PostgreSQL (primary key (id, ts), a partition per calendar
month and a default one); the rows already recorded are moved into them. Nothing changes on SQLite.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from collections.abc import Sequence
from datetime import datetime

from alembic import op
from sqlalchemy import text

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXES = {'ix_usage_events_ts': 'ts', 'ix_usage_events_key_id': 'key_id', 'ix_usage_events_work_item_ts': 'work_item, ts',
           'ix_usage_events_team_ts': 'team, ts'}  # fmt: skip


def _month(at: datetime, add: int = 0) -> datetime:
    index = at.year * 12 + at.month - 1 + add
    return datetime(index // 12, index % 12 + 1, 1)


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != 'postgresql':
        return
    op.execute('ALTER TABLE usage_events RENAME TO usage_events_unpartitioned')
    op.execute('ALTER TABLE usage_events_unpartitioned RENAME CONSTRAINT usage_events_pkey TO usage_events_unpartitioned_pkey')
    for name in INDEXES:
        op.execute(f'ALTER INDEX IF EXISTS {name} RENAME TO {name}_unpartitioned')
    op.execute('CREATE TABLE usage_events (LIKE usage_events_unpartitioned INCLUDING DEFAULTS) PARTITION BY RANGE (ts)')
    op.execute('ALTER TABLE usage_events ADD CONSTRAINT usage_events_pkey PRIMARY KEY (id, ts)')
    for name, columns in INDEXES.items():
        op.execute(f'CREATE INDEX {name} ON usage_events ({columns})')
    op.execute('CREATE TABLE usage_events_default PARTITION OF usage_events DEFAULT')
    now = bind.execute(text("SELECT now() AT TIME ZONE 'UTC'")).scalar_one()
    first = bind.execute(text('SELECT min(ts) FROM usage_events_unpartitioned')).scalar() or now
    month, last = _month(first), _month(now, 2)
    while month <= last:
        following = _month(month, 1)
        op.execute(f"CREATE TABLE usage_events_p{month:%Y%m} PARTITION OF usage_events FOR VALUES FROM ('{month:%Y-%m-%d}') TO ('{following:%Y-%m-%d}')")
        month = following
    op.execute('INSERT INTO usage_events SELECT * FROM usage_events_unpartitioned')
    op.execute('DROP TABLE usage_events_unpartitioned')


def downgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    op.execute('ALTER TABLE usage_events RENAME TO usage_events_partitioned')
    for name in INDEXES:
        op.execute(f'ALTER INDEX IF EXISTS {name} RENAME TO {name}_partitioned')
    op.execute('ALTER TABLE usage_events_partitioned RENAME CONSTRAINT usage_events_pkey TO usage_events_partitioned_pkey')
    op.execute('CREATE TABLE usage_events (LIKE usage_events_partitioned INCLUDING DEFAULTS)')
    op.execute('ALTER TABLE usage_events ADD CONSTRAINT usage_events_pkey PRIMARY KEY (id)')
    for name, columns in INDEXES.items():
        op.execute(f'CREATE INDEX {name} ON usage_events ({columns})')
    op.execute('INSERT INTO usage_events SELECT * FROM usage_events_partitioned')
    op.execute('DROP TABLE usage_events_partitioned')
