"""first_answered_ts: each work item's first answer that generated something (status < 400, not a
token count), per team and model, in `usage_item_totals`: the adoption report counts an item as
AI-assisted only if AI use began before it was done, and a free token count or a failed request is
not AI use (reports/adoption.py).

The raw events are read once for it (writers wait meanwhile, as in 0017; readers do not). A row some
of whose answers are in raw partitions dropped before this migration (`recording.retention_months`:
fewer answers in the events than the row counts) takes its first event of any kind instead, the
earliest its first answer can have been; NULL stays for "never answered", so a later answer cannot
date AI use that began long before.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0019'
down_revision: str | None = '0018'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':  # writers wait from here (an answer committed meanwhile would be missed)
        op.execute('LOCK TABLE usage_events IN SHARE MODE')
    op.add_column('usage_item_totals', sa.Column('first_answered_ts', sa.DateTime(), nullable=True))
    op.execute(
        "UPDATE usage_item_totals SET first_answered_ts = answered.first FROM (SELECT work_item, coalesce(team, '') AS team, model, "
        "min(ts) AS first, count(*) AS n FROM usage_events WHERE status < 400 AND route <> '/v1/messages/count_tokens' "
        "GROUP BY work_item, coalesce(team, ''), model) AS answered "
        "WHERE usage_item_totals.work_item = answered.work_item AND usage_item_totals.team = answered.team "
        "AND usage_item_totals.model = answered.model AND usage_item_totals.ok_events - usage_item_totals.ok_token_counts <= answered.n"
    )
    op.execute(  # answers the raw events no longer hold: the first event stands in
        "UPDATE usage_item_totals SET first_answered_ts = first_ts WHERE first_answered_ts IS NULL AND ok_events - ok_token_counts > 0"
    )


def downgrade() -> None:
    op.drop_column('usage_item_totals', 'first_answered_ts')
