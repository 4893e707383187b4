"""An index on work_item_changes.ts: the adoption report reads the history only of the items changed at
or after the end of its period (for the others the status then is the status now), found by it.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0011'
down_revision: str | None = '0010'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index('ix_work_item_changes_ts', 'work_item_changes', ['ts'])


def downgrade() -> None:
    op.drop_index('ix_work_item_changes_ts', table_name='work_item_changes')
