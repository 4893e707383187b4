"""The background responses whose usage is still owed (`background_responses`): the proxy reads each
from the provider itself when no client reads it back. Filled from the deferred creates of the last
day that no event has settled yet.

Revision ID: 0024
Revises: 0023
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0024'
down_revision: str | None = '0023'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'background_responses',
        sa.Column('response_id', sa.String(length=200), primary_key=True),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('next_check', sa.DateTime(), nullable=False),
        sa.Column('checks', sa.Integer(), nullable=False),
    )
    op.create_index('ix_background_responses_next_check', 'background_responses', ['next_check'])
    # The creates of the last day still owed (older ones the provider may no longer hold): read by the
    # index on response_id, whose events are the Responses API's alone.
    op.execute(sa.text(
        "INSERT INTO background_responses (response_id, created_at, next_check, checks) "
        "SELECT d.response_id, MIN(d.ts), MIN(d.ts), 0 FROM usage_events d "
        "WHERE d.response_id IS NOT NULL AND d.usage_source = 'deferred' AND d.ts >= :since "
        "AND NOT EXISTS (SELECT 1 FROM usage_events s WHERE s.response_id = d.response_id AND s.usage_source <> 'deferred') "
        "GROUP BY d.response_id"
    ).bindparams(since=_a_day_ago()))


def _a_day_ago():  # type: ignore[no-untyped-def]
    from datetime import datetime, timedelta, timezone

    return datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(days=1)


def downgrade() -> None:
    op.drop_index('ix_background_responses_next_check', table_name='background_responses')
    op.drop_table('background_responses')
