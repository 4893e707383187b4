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
    # revision counts it); SQLite has no bitwise aggregate, and the sum of distinct powers of two is their OR.
    bind = op.get_bind()
    if bind.dialect.name == 'postgresql':
        bucket, hours = "date_trunc('day', ts)", "bit_or(CASE WHEN {request} THEN 1 << CAST(extract(hour FROM ts) AS integer) ELSE 0 END)"
    else:
        bucket = "substr(ts, 1, 10) || ' 00:00:00.000000'"
        hours = "sum(DISTINCT CASE WHEN {request} THEN 1 << CAST(strftime('%H', ts) AS INTEGER) ELSE 0 END)"
    request = "attempt = 1 AND route != '/v1/messages/count_tokens'"
    op.execute(
        f"UPDATE usage_key_daily SET request_hours = found.hours FROM (SELECT {bucket} AS bucket, key_id, work_item, "
        f"COALESCE(team, '') AS team, {hours.format(request=request)} AS hours FROM usage_events WHERE {request} "
        "GROUP BY 1, 2, 3, 4) AS found WHERE usage_key_daily.bucket = found.bucket AND usage_key_daily.key_id = found.key_id "
        "AND usage_key_daily.work_item = found.work_item AND usage_key_daily.team = found.team"
    )


def downgrade() -> None:
    op.drop_column('usage_key_daily', 'request_hours')
