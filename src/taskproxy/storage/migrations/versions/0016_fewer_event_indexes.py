"""usage_events keeps only the indexes a query uses: every event cost the writer an entry in each.

- `ix_usage_events_team_ts` goes: no query has read events by team since the team report moved to
  the rollups (`usage_team_daily`, `usage_hourly`; the partial hours at a period's edges are read by
  `ts`).
- `ix_usage_events_response_id` holds only the events that have a response id (the Responses API's
  creates): the one query on it asks for an id, and every other event had an entry for its NULL.

On PostgreSQL both apply to every partition of the table; writers wait while the partial index is built
(a scan of the events, not a sort of them: most have no response id).

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0016'
down_revision: str | None = '0015'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_HAS_RESPONSE_ID = sa.text('response_id IS NOT NULL')


def upgrade() -> None:
    op.drop_index('ix_usage_events_team_ts', table_name='usage_events')
    op.drop_index('ix_usage_events_response_id', table_name='usage_events')
    op.create_index('ix_usage_events_response_id', 'usage_events', ['response_id'],
                    postgresql_where=_HAS_RESPONSE_ID, sqlite_where=_HAS_RESPONSE_ID)  # fmt: skip


def downgrade() -> None:
    op.drop_index('ix_usage_events_response_id', table_name='usage_events')
    op.create_index('ix_usage_events_response_id', 'usage_events', ['response_id'])
    op.create_index('ix_usage_events_team_ts', 'usage_events', ['team', 'ts'])
