"""usage_key_daily: usage_events summed per UTC day, key, work item and team, kept by the writer, for
the gaming signals' per-key figures (they keep working when raw partitions are dropped); filled here
from the events recorded so far. usage_events' index on key_id becomes (key_id, ts): a key's events
in a period are one index range, however long its history.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('usage_key_daily',
    sa.Column('bucket', sa.DateTime(), nullable=False),
    sa.Column('events', sa.Integer(), nullable=False),
    sa.Column('ok_events', sa.Integer(), nullable=False),
    sa.Column('requests', sa.Integer(), nullable=False),
    sa.Column('first_attempts', sa.Integer(), nullable=False),
    sa.Column('prompt_tokens', sa.BigInteger(), nullable=False),
    sa.Column('completion_tokens', sa.BigInteger(), nullable=False),
    sa.Column('total_tokens', sa.BigInteger(), nullable=False),
    sa.Column('cached_tokens', sa.BigInteger(), nullable=False),
    sa.Column('reasoning_tokens', sa.BigInteger(), nullable=False),
    sa.Column('cost_nanos', sa.BigInteger(), nullable=True),
    sa.Column('unpriced_events', sa.Integer(), nullable=False),
    sa.Column('first_ts', sa.DateTime(), nullable=False),
    sa.Column('last_ts', sa.DateTime(), nullable=False),
    sa.Column('key_id', sa.String(length=32), nullable=False),
    sa.Column('work_item', sa.String(length=200), nullable=False),
    sa.Column('team', sa.String(length=200), nullable=False),
    sa.PrimaryKeyConstraint('bucket', 'key_id', 'work_item', 'team'),
    )
    op.create_index('ix_usage_key_daily_work_item_bucket', 'usage_key_daily', ['work_item', 'bucket'])

    # The events recorded so far, summed as the writer of this revision does (frozen here, as in 0002).
    bind = op.get_bind()
    bucket = "date_trunc('day', ts)" if bind.dialect.name == 'postgresql' else "substr(ts, 1, 10) || ' 00:00:00.000000'"
    keys = f"{bucket}, key_id, work_item, COALESCE(team, '')"
    op.execute(
        "INSERT INTO usage_key_daily (bucket, key_id, work_item, team, events, ok_events, requests, first_attempts, prompt_tokens, "
        "completion_tokens, total_tokens, cached_tokens, reasoning_tokens, cost_nanos, unpriced_events, first_ts, last_ts) "
        f"SELECT {keys}, count(*), sum(CASE WHEN status < 400 THEN 1 ELSE 0 END), "
        "sum(CASE WHEN attempt = 1 AND route != '/v1/messages/count_tokens' THEN 1 ELSE 0 END), "
        "sum(CASE WHEN attempt = 1 THEN 1 ELSE 0 END), sum(prompt_tokens), sum(completion_tokens), sum(total_tokens), "
        "sum(cached_tokens), sum(reasoning_tokens), sum(cost_nanos), sum(CASE WHEN cost_nanos IS NULL THEN 1 ELSE 0 END), "
        f"min(ts), max(ts) FROM usage_events GROUP BY {keys}"
    )

    # On PostgreSQL the index of the partitioned table makes one on every partition.
    op.create_index('ix_usage_events_key_id_ts', 'usage_events', ['key_id', 'ts'])
    op.drop_index('ix_usage_events_key_id', table_name='usage_events')


def downgrade() -> None:
    op.create_index('ix_usage_events_key_id', 'usage_events', ['key_id'])
    op.drop_index('ix_usage_events_key_id_ts', table_name='usage_events')
    op.drop_index('ix_usage_key_daily_work_item_bucket', table_name='usage_key_daily')
    op.drop_table('usage_key_daily')
