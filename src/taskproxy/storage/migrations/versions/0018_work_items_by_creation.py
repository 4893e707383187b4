"""GET /api/work-items lists items newest first a page at a time: an index on (created_at, id) reads
each page where the last one ended, where every page sorted the whole table (2.2 million items on the
seed organisation of docs/scale.md). Writers of work items wait while it is built; readers do not.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-06
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0018'
down_revision: str | None = '0017'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index('ix_work_items_created_at_id', 'work_items', ['created_at', 'id'])


def downgrade() -> None:
    op.drop_index('ix_work_items_created_at_id', table_name='work_items')
