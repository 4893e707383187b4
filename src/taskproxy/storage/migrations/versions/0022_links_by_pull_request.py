"""The tickets a pull request came out of are read by an index on `work_item_links.linked`: a revert
marks them as rework too (registry.py), and a work item's view lists them. Both scanned every link of
the organisation. Writes of links wait while the index is built; readers do not.

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-06
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0022'
down_revision: str | None = '0021'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index('ix_work_item_links_linked', 'work_item_links', ['linked'])


def downgrade() -> None:
    op.drop_index('ix_work_item_links_linked', table_name='work_item_links')
