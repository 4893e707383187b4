"""usage_item_totals: usage_events summed over all time per work item, team and model, kept by the
writer, so that an item's lifetime usage (the adoption report's completed items, an item's spending
team, an item's view) is read by its key instead of across the daily rollup's history; filled here
from the daily rollup, which holds every event's sums, retained raw partitions or not.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0015'
down_revision: str | None = '0014'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('usage_item_totals',
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
    sa.Column('work_item', sa.String(length=200), nullable=False),
    sa.Column('team', sa.String(length=200), nullable=False),
    sa.Column('model', sa.String(length=200), nullable=False),
    sa.PrimaryKeyConstraint('work_item', 'team', 'model'),
    )
    # Frozen here, as in 0010: sums of the daily rollup's sums; no event is read. On PostgreSQL, writers
    # wait while it runs (a batch committed meanwhile would be in one table and not the other).
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('LOCK TABLE usage_daily IN SHARE MODE')
    op.execute(
        "INSERT INTO usage_item_totals (work_item, team, model, events, ok_events, requests, first_attempts, prompt_tokens, "
        "completion_tokens, total_tokens, cached_tokens, reasoning_tokens, cost_nanos, unpriced_events, first_ts, last_ts) "
        "SELECT work_item, team, model, sum(events), sum(ok_events), sum(requests), sum(first_attempts), sum(prompt_tokens), "
        "sum(completion_tokens), sum(total_tokens), sum(cached_tokens), sum(reasoning_tokens), sum(cost_nanos), sum(unpriced_events), "
        "min(first_ts), max(last_ts) FROM usage_daily GROUP BY work_item, team, model"
    )


def downgrade() -> None:
    op.drop_table('usage_item_totals')
