"""usage_key_daily.request_hours: the UTC hours of the day in which a key made requests (bit h for hour
h), kept by the writer, so that the machine-cadence signal finds a key's quiet hours without reading its
events; filled here from the events recorded so far (days whose raw events were dropped keep 0).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0012'
down_revision: str | None = '0011'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('usage_key_daily', sa.Column('request_hours', sa.Integer(), server_default='0', nullable=False))

    # A request is a first attempt that is not a token count (frozen here, as the writer of this
    # revision counts it).
    request = "attempt = 1 AND route != '/v1/messages/count_tokens'"
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(
            "UPDATE usage_key_daily SET request_hours = found.hours FROM (SELECT date_trunc('day', ts) AS bucket, key_id, work_item, "
            f"COALESCE(team, '') AS team, bit_or(1 << CAST(extract(hour FROM ts) AS integer)) AS hours FROM usage_events WHERE {request} "
            "GROUP BY 1, 2, 3, 4) AS found WHERE usage_key_daily.bucket = found.bucket AND usage_key_daily.key_id = found.key_id "
            "AND usage_key_daily.work_item = found.work_item AND usage_key_daily.team = found.team"
        )
        return
    # SQLite (a correlated subquery: UPDATE ... FROM needs 3.33): no bitwise aggregate, but the sum of
    # distinct powers of two is their OR. Times are text, 'YYYY-MM-DD HH:MM:SS.ffffff'.
    op.execute(
        "UPDATE usage_key_daily SET request_hours = COALESCE((SELECT sum(DISTINCT 1 << CAST(strftime('%H', e.ts) AS INTEGER)) "
        "FROM usage_events AS e WHERE e.key_id = usage_key_daily.key_id AND e.work_item = usage_key_daily.work_item "
        "AND COALESCE(e.team, '') = usage_key_daily.team AND substr(e.ts, 1, 10) = substr(usage_key_daily.bucket, 1, 10) "
        f"AND {request}), 0)"
    )


def downgrade() -> None:
    op.drop_column('usage_key_daily', 'request_hours')
