"""usage rollups: usage_events summed per day (and person) and per hour, work item, team and model,
filled from the events already recorded

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

from taskproxy.storage import rollup

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('usage_daily',
    sa.Column('bucket', sa.DateTime(), nullable=False),
    sa.Column('work_item', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
    sa.Column('team', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
    sa.Column('model', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
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
    sa.Column('owner', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
    sa.PrimaryKeyConstraint('bucket', 'work_item', 'team', 'model', 'owner')
    )
    with op.batch_alter_table('usage_daily', schema=None) as batch_op:
        batch_op.create_index('ix_usage_daily_work_item_bucket', ['work_item', 'bucket'], unique=False)

    op.create_table('usage_hourly',
    sa.Column('bucket', sa.DateTime(), nullable=False),
    sa.Column('work_item', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
    sa.Column('team', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
    sa.Column('model', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
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

    # The events recorded so far, summed as the writer would have. This uses the rollup module of the
    # version being installed; a later migration that changes the rollups' columns must first copy
    # this statement here, as it is then.
    rollup.backfill(op.get_bind())


def downgrade() -> None:
    with op.batch_alter_table('usage_hourly', schema=None) as batch_op:
        batch_op.drop_index('ix_usage_hourly_work_item_bucket')

    op.drop_table('usage_hourly')
    with op.batch_alter_table('usage_daily', schema=None) as batch_op:
        batch_op.drop_index('ix_usage_daily_work_item_bucket')

    op.drop_table('usage_daily')
