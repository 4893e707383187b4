"""A key's own usage (`GET /api/me/usage`, `taskproxy me`) is read from the per-key daily rollup by an
index on (key_id, bucket), and its refused requests by one on (key_id, ts): it read every raw event
the key ever sent, and every refusal of every key, on every call. Writes of those tables wait while
the indexes are built; readers do not.

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-06
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0020'
down_revision: str | None = '0019'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index('ix_usage_key_daily_key_id_bucket', 'usage_key_daily', ['key_id', 'bucket'])
    op.create_index('ix_rejections_key_id_ts', 'rejections', ['key_id', 'ts'])


def downgrade() -> None:
    op.drop_index('ix_rejections_key_id_ts', table_name='rejections')
    op.drop_index('ix_usage_key_daily_key_id_bucket', table_name='usage_key_daily')
