"""usage_team_daily: usage_events summed per UTC day, team and model, kept by the writer, for usage by
team or model (`/api/usage?group_by=team|model`: a few rows per team and day instead of one per item
and person); filled here from the events recorded so far.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0010'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('usage_team_daily',
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
    sa.Column('team', sa.String(length=200), nullable=False),
    sa.Column('model', sa.String(length=200), nullable=False),
    sa.PrimaryKeyConstraint('bucket', 'team', 'model'),
    )
    # From the daily rollup, which holds every event's sums (frozen here, as in 0002): no event is read.
    op.execute(
        "INSERT INTO usage_team_daily (bucket, team, model, events, ok_events, requests, first_attempts, prompt_tokens, "
        "completion_tokens, total_tokens, cached_tokens, reasoning_tokens, cost_nanos, unpriced_events, first_ts, last_ts) "
        "SELECT bucket, team, model, sum(events), sum(ok_events), sum(requests), sum(first_attempts), sum(prompt_tokens), "
        "sum(completion_tokens), sum(total_tokens), sum(cached_tokens), sum(reasoning_tokens), sum(cost_nanos), sum(unpriced_events), "
        "min(first_ts), max(last_ts) FROM usage_daily GROUP BY bucket, team, model"
    )


def downgrade() -> None:
    op.drop_table('usage_team_daily')
