"""A pull request merged into a branch other than its repository's default one is a step of the work, not
its outcome: it lands with the pull request of that branch. Work items keep a pull request's source
branch and, for such a merge, the branch it went into, each by an index (stacks.py).

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0023'
down_revision: str | None = '0022'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('work_items', sa.Column('branch', sa.String(length=200), nullable=True))
    op.add_column('work_items', sa.Column('merged_into', sa.String(length=200), nullable=True))
    op.create_index('ix_work_items_branch', 'work_items', ['branch'])
    op.create_index('ix_work_items_merged_into', 'work_items', ['merged_into'])


def downgrade() -> None:
    op.drop_index('ix_work_items_merged_into', table_name='work_items')
    op.drop_index('ix_work_items_branch', table_name='work_items')
    with op.batch_alter_table('work_items') as batch:
        batch.drop_column('merged_into')
        batch.drop_column('branch')
