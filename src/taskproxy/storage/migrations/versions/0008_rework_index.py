"""An index on work_items.reworked_at: the adoption report finds the items reopened since a period
began by it, not by reading every work item.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index('ix_work_items_reworked_at', 'work_items', ['reworked_at'])


def downgrade() -> None:
    op.drop_index('ix_work_items_reworked_at', table_name='work_items')
