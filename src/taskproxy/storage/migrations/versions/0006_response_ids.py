"""usage_events.response_id: the Responses API's id of what an attempt created, so that reading it back
by id goes to the same model for the same person.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A nullable column without a default: no partition is rewritten on PostgreSQL.
    op.add_column('usage_events', sa.Column('response_id', sa.String(length=200), nullable=True))
    op.create_index('ix_usage_events_response_id', 'usage_events', ['response_id'])


def downgrade() -> None:
    op.drop_index('ix_usage_events_response_id', table_name='usage_events')
    op.drop_column('usage_events', 'response_id')
