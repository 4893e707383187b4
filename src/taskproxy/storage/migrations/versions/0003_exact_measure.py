"""an exact measure: token counts in BIGINT, money in whole nano-dollars, which usage fields were
estimated and the provider's in-stream error, refusals counted per minute, tracker events ordered per
tracker, merged PRs final, notes on status changes

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TOKEN_COLUMNS = ('prompt_tokens', 'completion_tokens', 'total_tokens', 'cached_tokens', 'cache_write_tokens', 'reasoning_tokens',
                 'est_prompt_tokens')  # fmt: skip
ROLLUPS = ('usage_daily', 'usage_hourly')


def _cost_to_nanos(table: str) -> None:
    with op.batch_alter_table(table, schema=None) as batch_op:
        batch_op.add_column(sa.Column('cost_nanos', sa.BigInteger(), nullable=True))
    op.execute(f'UPDATE {table} SET cost_nanos = CAST(ROUND(cost_usd * 1000000000) AS BIGINT) WHERE cost_usd IS NOT NULL')
    with op.batch_alter_table(table, schema=None) as batch_op:
        batch_op.drop_column('cost_usd')


def upgrade() -> None:
    with op.batch_alter_table('usage_events', schema=None) as batch_op:
        for column in TOKEN_COLUMNS:
            batch_op.alter_column(column, type_=sa.BigInteger(), existing_type=sa.Integer(), existing_nullable=False)
        batch_op.add_column(sa.Column('estimated_fields', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('provider_error', sa.String(length=64), nullable=True))
    _cost_to_nanos('usage_events')
    op.execute("UPDATE usage_events SET estimated_fields = 'prompt_tokens,completion_tokens' WHERE usage_source = 'estimated'")
    for table in ROLLUPS:
        _cost_to_nanos(table)

    with op.batch_alter_table('rejections', schema=None) as batch_op:
        batch_op.add_column(sa.Column('count', sa.Integer(), nullable=False, server_default='1'))

    with op.batch_alter_table('work_items', schema=None) as batch_op:
        batch_op.alter_column('budget_tokens', type_=sa.BigInteger(), existing_type=sa.Integer(), existing_nullable=True)
        batch_op.add_column(sa.Column('tracker', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('tracker_event_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('merged_at', sa.DateTime(), nullable=True))
    # What the old rule compared tracker events with, kept for the items a tracker changed last.
    op.execute("UPDATE work_items SET tracker = source, tracker_event_at = updated_at WHERE source IN ('github', 'jira', 'linear')")

    with op.batch_alter_table('work_item_changes', schema=None) as batch_op:
        batch_op.add_column(sa.Column('note', sa.Text(), nullable=True))


def _cost_to_usd(table: str) -> None:
    with op.batch_alter_table(table, schema=None) as batch_op:
        batch_op.add_column(sa.Column('cost_usd', sa.Float(), nullable=True))
    op.execute(f'UPDATE {table} SET cost_usd = cost_nanos / 1000000000.0 WHERE cost_nanos IS NOT NULL')
    with op.batch_alter_table(table, schema=None) as batch_op:
        batch_op.drop_column('cost_nanos')


def downgrade() -> None:
    with op.batch_alter_table('work_item_changes', schema=None) as batch_op:
        batch_op.drop_column('note')
    with op.batch_alter_table('work_items', schema=None) as batch_op:
        batch_op.drop_column('merged_at')
        batch_op.drop_column('tracker_event_at')
        batch_op.drop_column('tracker')
        batch_op.alter_column('budget_tokens', type_=sa.Integer(), existing_type=sa.BigInteger(), existing_nullable=True)
    with op.batch_alter_table('rejections', schema=None) as batch_op:
        batch_op.drop_column('count')
    for table in ROLLUPS:
        _cost_to_usd(table)
    _cost_to_usd('usage_events')
    with op.batch_alter_table('usage_events', schema=None) as batch_op:
        batch_op.drop_column('provider_error')
        batch_op.drop_column('estimated_fields')
        for column in TOKEN_COLUMNS:
            batch_op.alter_column(column, type_=sa.Integer(), existing_type=sa.BigInteger(), existing_nullable=False)
