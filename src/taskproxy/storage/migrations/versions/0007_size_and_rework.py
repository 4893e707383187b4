"""The size of the work (lines, files, story points; history in work_item_sizes) and rework marks
(a merged PR reverted, an item reopened after done) on work_items.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

def _item_columns() -> list[sa.Column]:
    return [
    sa.Column('lines_added', sa.Integer(), nullable=True),
    sa.Column('lines_deleted', sa.Integer(), nullable=True),
    sa.Column('files_changed', sa.Integer(), nullable=True),
    sa.Column('points', sa.Float(), nullable=True),
    sa.Column('reworked_at', sa.DateTime(), nullable=True),
    sa.Column('rework_reason', sa.String(length=16), nullable=True),
    sa.Column('rework_by', sa.String(length=200), nullable=True),
    ]


def upgrade() -> None:
    for column in _item_columns():
        op.add_column('work_items', column)
    op.create_table('work_item_sizes',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('work_item', sa.String(length=200), nullable=False),
    sa.Column('ts', sa.DateTime(), nullable=False),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('delivery_id', sa.String(length=200), nullable=True),
    sa.Column('lines_added', sa.Integer(), nullable=True),
    sa.Column('lines_deleted', sa.Integer(), nullable=True),
    sa.Column('files_changed', sa.Integer(), nullable=True),
    sa.Column('points', sa.Float(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_work_item_sizes_work_item', 'work_item_sizes', ['work_item'])


def downgrade() -> None:
    op.drop_index('ix_work_item_sizes_work_item', table_name='work_item_sizes')
    op.drop_table('work_item_sizes')
    with op.batch_alter_table('work_items') as batch:
        for column in reversed(_item_columns()):
            batch.drop_column(column.name)
