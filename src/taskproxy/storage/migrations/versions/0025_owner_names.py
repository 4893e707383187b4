"""Keys' owners in one form (privacy.owner_name: NFKC, whitespace runs as one space, none at the ends),
as new keys are stored: an owner typed with a no-break or ideographic space counted as a person apart,
so a one-person team could pass the privacy floor. Only the keys whose owner changes are written.

Revision ID: 0025
Revises: 0024
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0025'
down_revision: str | None = '0024'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    from taskproxy.privacy import owner_name

    connection = op.get_bind()
    keys = sa.table('api_keys', sa.column('id', sa.String), sa.column('owner', sa.String))
    changed = [{"key": key_id, "name": owner_name(owner) or owner} for key_id, owner in connection.execute(sa.select(keys.c.id, keys.c.owner))
               if (owner_name(owner) or owner) != owner]  # fmt: skip
    if changed:
        connection.execute(keys.update().where(keys.c.id == sa.bindparam("key")).values(owner=sa.bindparam("name")), changed)


def downgrade() -> None:
    pass  # the owners' former spellings are not kept: they named the same people
