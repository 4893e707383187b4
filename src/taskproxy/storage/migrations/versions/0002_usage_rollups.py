"""usage rollups: usage_events summed per day (and person) and per hour, work item, team and model,
filled from the events already recorded

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('usage_daily',
    sa.Column('bucket', sa.DateTime(), nullable=False),
    sa.Column('work_item', sa.String(length=200), nullable=False),
    sa.Column('team', sa.String(length=200), nullable=False),
    sa.Column('model', sa.String(length=200), nullable=False),
    sa.Column('events', sa.Integer(), nullable=False),
    sa.Column('ok_events', sa.Integer(), nullable=False),
    sa.Column('requests', sa.Integer(), nullable=False),
    sa.Column('first_attempts', sa.Integer(), nullable=False),
    sa.Column('prompt_tokens', sa.BigInteger(), nullable=False),
    sa.Column('completion_tokens', sa.BigInteger(), nullable=False),
    sa.Column('total_tokens', sa.BigInteger(), nullable=False),
    sa.Column('cached_tokens', sa.BigInteger(), nullable=False),
    sa.Column('reasoning_tokens', sa.BigInteger(), nullable=False),
    sa.Column('cost_usd', sa.Float(), nullable=True),
    sa.Column('unpriced_events', sa.Integer(), nullable=False),
    sa.Column('first_ts', sa.DateTime(), nullable=False),
    sa.Column('last_ts', sa.DateTime(), nullable=False),
    sa.Column('owner', sa.String(length=200), nullable=False),
    sa.PrimaryKeyConstraint('bucket', 'work_item', 'team', 'model', 'owner')
    )
    with op.batch_alter_table('usage_daily', schema=None) as batch_op:
        batch_op.create_index('ix_usage_daily_work_item_bucket', ['work_item', 'bucket'], unique=False)

    op.create_table('usage_hourly',
    sa.Column('bucket', sa.DateTime(), nullable=False),
    sa.Column('work_item', sa.String(length=200), nullable=False),
    sa.Column('team', sa.String(length=200), nullable=False),
    sa.Column('model', sa.String(length=200), nullable=False),
    sa.Column('events', sa.Integer(), nullable=False),
    sa.Column('ok_events', sa.Integer(), nullable=False),
    sa.Column('requests', sa.Integer(), nullable=False),
    sa.Column('first_attempts', sa.Integer(), nullable=False),
    sa.Column('prompt_tokens', sa.BigInteger(), nullable=False),
    sa.Column('completion_tokens', sa.BigInteger(), nullable=False),
    sa.Column('total_tokens', sa.BigInteger(), nullable=False),
    sa.Column('cached_tokens', sa.BigInteger(), nullable=False),
    sa.Column('reasoning_tokens', sa.BigInteger(), nullable=False),
    sa.Column('cost_usd', sa.Float(), nullable=True),
    sa.Column('unpriced_events', sa.Integer(), nullable=False),
    sa.Column('first_ts', sa.DateTime(), nullable=False),
    sa.Column('last_ts', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('bucket', 'work_item', 'team', 'model')
    )
    with op.batch_alter_table('usage_hourly', schema=None) as batch_op:
        batch_op.create_index('ix_usage_hourly_work_item_bucket', ['work_item', 'bucket'], unique=False)

    # The events recorded so far, summed as the writer of this revision did (the statement is frozen
    # here: later revisions change the rollups' columns).
    bind = op.get_bind()
    for table, unit, owner in (('usage_daily', 'day', True), ('usage_hourly', 'hour', False)):
        if bind.dialect.name == 'postgresql':
            bucket = f"date_trunc('{unit}', ts)"
        else:
            bucket = "substr(ts, 1, 10) || ' 00:00:00.000000'" if unit == 'day' else "substr(ts, 1, 13) || ':00:00.000000'"
        keys = f"{bucket}, work_item, COALESCE(team, ''), model" + (", owner" if owner else "")
        op.execute(
            f"INSERT INTO {table} (bucket, work_item, team, model{', owner' if owner else ''}, events, ok_events, requests, "
            "first_attempts, prompt_tokens, completion_tokens, total_tokens, cached_tokens, reasoning_tokens, cost_usd, "
            f"unpriced_events, first_ts, last_ts) SELECT {keys}, count(*), "
            "sum(CASE WHEN status < 400 THEN 1 ELSE 0 END), "
            "sum(CASE WHEN attempt = 1 AND route != '/v1/messages/count_tokens' THEN 1 ELSE 0 END), "
            "sum(CASE WHEN attempt = 1 THEN 1 ELSE 0 END), sum(prompt_tokens), sum(completion_tokens), sum(total_tokens), "
            "sum(cached_tokens), sum(reasoning_tokens), sum(cost_usd), sum(CASE WHEN cost_usd IS NULL THEN 1 ELSE 0 END), "
            f"min(ts), max(ts) FROM usage_events GROUP BY {keys}"
        )


def downgrade() -> None:
    with op.batch_alter_table('usage_hourly', schema=None) as batch_op:
        batch_op.drop_index('ix_usage_hourly_work_item_bucket')

    op.drop_table('usage_hourly')
    with op.batch_alter_table('usage_daily', schema=None) as batch_op:
        batch_op.drop_index('ix_usage_daily_work_item_bucket')

    op.drop_table('usage_daily')
