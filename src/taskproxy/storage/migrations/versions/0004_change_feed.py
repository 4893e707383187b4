"""the working set, not the history: a change feed (keys and work items), spend counters per work item
and per team-month kept by the writer (filled here from the daily rollup), indexes on api_keys.team and work_items.updated_at,
leases of shared allowances (a key's requests per minute, item and team budgets, across replicas)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('changes',
    sa.Column('seq', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('kind', sa.String(length=8), nullable=False),
    sa.Column('ref', sa.String(length=200), nullable=False),
    sa.Column('ts', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('seq'),
    sqlite_autoincrement=True,
    )
    with op.batch_alter_table('changes', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_changes_ts'), ['ts'], unique=False)

    op.create_table('spend_counters',
    sa.Column('scope', sa.String(length=8), nullable=False),
    sa.Column('ref', sa.String(length=200), nullable=False),
    sa.Column('period', sa.String(length=7), nullable=False),
    sa.Column('tokens', sa.BigInteger(), nullable=False),
    sa.Column('cost_nanos', sa.BigInteger(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('scope', 'ref', 'period'),
    )
    with op.batch_alter_table('spend_counters', schema=None) as batch_op:
        batch_op.create_index('ix_spend_counters_updated_at', ['updated_at'], unique=False)

    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.create_index('ix_api_keys_team', ['team'], unique=False)
    with op.batch_alter_table('work_items', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_work_items_updated_at'), ['updated_at'], unique=False)

    op.create_table('leases',
    sa.Column('scope', sa.String(length=240), nullable=False),
    sa.Column('window', sa.String(length=32), nullable=False),
    sa.Column('granted', sa.BigInteger(), nullable=False),
    sa.Column('granted_nanos', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('scope', 'window'),
    )
    with op.batch_alter_table('leases', schema=None) as batch_op:
        batch_op.create_index('ix_leases_window', ['window'], unique=False)

    # What has been spent so far, from the daily rollup (which holds every event's tokens and cost).
    month = "to_char(bucket, 'YYYY-MM')" if op.get_bind().dialect.name == 'postgresql' else 'substr(bucket, 1, 7)'
    op.execute(
        "INSERT INTO spend_counters (scope, ref, period, tokens, cost_nanos, updated_at) "
        "SELECT 'item', work_item, '', SUM(total_tokens), COALESCE(SUM(cost_nanos), 0), MAX(last_ts) FROM usage_daily GROUP BY work_item"
    )
    op.execute(
        "INSERT INTO spend_counters (scope, ref, period, tokens, cost_nanos, updated_at) "
        f"SELECT 'team', team, {month}, SUM(total_tokens), COALESCE(SUM(cost_nanos), 0), MAX(last_ts) FROM usage_daily "
        f"WHERE team <> '' GROUP BY team, {month}"
    )


def downgrade() -> None:
    with op.batch_alter_table('work_items', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_work_items_updated_at'))
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_index('ix_api_keys_team')
    op.drop_table('leases')
    op.drop_table('spend_counters')
    op.drop_table('changes')
