"""usage_events keeps only the indexes a query uses: every event cost the writer an entry in each.

- `ix_usage_events_team_ts` goes: no query has read events by team since the team report moved to
  the rollups (`usage_team_daily`, `usage_hourly`; the partial hours at a period's edges are read by
  `ts`).
- `ix_usage_events_response_id` holds only the events that have a response id (the Responses API's
  responses and their deferred usage): the one query on it asks for an id, and every other event had an entry for its NULL.

On PostgreSQL both apply to every partition of the table. The partial index is built first, under a
name of its own: writers wait while it is built (a scan of the events, not a sort of them: most have
no response id), readers do not. The old indexes are dropped last, which locks the table out to
readers too, but only until the migration commits, at once.

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
    # `if_exists`: bench/seed_org.py drops the events' indexes while it loads them, and may be resumed here.
    if op.get_bind().dialect.name == 'postgresql':
        op.create_index('ix_usage_events_response_id_new', 'usage_events', ['response_id'], postgresql_where=_HAS_RESPONSE_ID)
        op.drop_index('ix_usage_events_response_id', table_name='usage_events', if_exists=True)
        op.execute('ALTER INDEX ix_usage_events_response_id_new RENAME TO ix_usage_events_response_id')
    else:  # SQLite renames no index; a migration has the file to itself
        op.drop_index('ix_usage_events_response_id', table_name='usage_events', if_exists=True)
        op.create_index('ix_usage_events_response_id', 'usage_events', ['response_id'], sqlite_where=_HAS_RESPONSE_ID)
    op.drop_index('ix_usage_events_team_ts', table_name='usage_events', if_exists=True)


def downgrade() -> None:
    op.drop_index('ix_usage_events_response_id', table_name='usage_events')
    op.create_index('ix_usage_events_response_id', 'usage_events', ['response_id'])
    op.create_index('ix_usage_events_team_ts', 'usage_events', ['team', 'ts'])
