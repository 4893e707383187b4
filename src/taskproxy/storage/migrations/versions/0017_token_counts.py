"""ok_token_counts: of each rollup row's answered events (`ok_events`), the token counts
(`/v1/messages/count_tokens` calls), so that an item is AI-assisted by an answer that generated
something, not by counting tokens, which costs nothing (reports/adoption.py).

The raw events are read once for their answered token counts (writers wait meanwhile, readers do not);
then the column is added with 0 for every row, which on both databases rewrites none, and the rows
whose bucket holds token counts are set (readers of the rollups wait for that part only). Token
counts in raw partitions dropped before this migration (`recording.retention_months`) are not known:
their rows keep 0, as answers.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0017'
down_revision: str | None = '0016'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROLLUPS = ('usage_hourly', 'usage_daily', 'usage_key_daily', 'usage_team_daily', 'usage_item_totals')
# Each rollup's key, as the columns of the per-hour counts below (frozen here, as in 0010 and 0015).
KEYS = {
    'usage_hourly': ('hour', 'work_item', 'team', 'model'),
    'usage_daily': ('day', 'work_item', 'team', 'model', 'owner'),
    'usage_key_daily': ('day', 'key_id', 'work_item', 'team'),
    'usage_team_daily': ('day', 'team', 'model'),
    'usage_item_totals': ('work_item', 'team', 'model'),
}


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == 'postgresql'
    if postgres:  # writers wait from here (an event committed meanwhile would be missed); readers do not
        op.execute('LOCK TABLE usage_events IN SHARE MODE')
    hour = "date_trunc('hour', ts)" if postgres else "substr(ts, 1, 13) || ':00:00.000000'"
    day = "date_trunc('day', ts)" if postgres else "substr(ts, 1, 10) || ' 00:00:00.000000'"
    op.execute(  # the one pass over the events, before any rollup is locked
        f"CREATE TEMPORARY TABLE token_counts_0017 AS SELECT {hour} AS hour, {day} AS day, work_item, coalesce(team, '') AS team, "
        "model, owner, key_id, count(*) AS n FROM usage_events WHERE route = '/v1/messages/count_tokens' AND status < 400 "
        f"GROUP BY {hour}, {day}, work_item, coalesce(team, ''), model, owner, key_id"
    )
    for name in ROLLUPS:  # readers of the rollups wait from here to the commit: a column added, a few rows updated
        op.add_column(name, sa.Column('ok_token_counts', sa.Integer(), nullable=False, server_default='0'))
    for name in ROLLUPS:
        keys = KEYS[name]
        stored = ['bucket' if key in ('hour', 'day') else key for key in keys]
        match = ' AND '.join(f'{name}.{column} = counted.{key}' for column, key in zip(stored, keys))
        op.execute(
            f"UPDATE {name} SET ok_token_counts = counted.n FROM (SELECT {', '.join(keys)}, sum(n) AS n FROM token_counts_0017 "
            f"GROUP BY {', '.join(keys)}) AS counted WHERE {match}"
        )
    op.execute('DROP TABLE token_counts_0017')


def downgrade() -> None:
    for name in ROLLUPS:
        op.drop_column(name, 'ok_token_counts')
