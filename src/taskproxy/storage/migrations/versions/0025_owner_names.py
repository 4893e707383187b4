"""Keys' owners in one form (privacy.owner_name: NFKC, whitespace runs as one space, none at the ends),
as new keys are stored, and each key's person (`api_keys.person`, privacy.person_of: that form, case
folded), which the privacy floor counts: an owner typed with a no-break or ideographic space, or in
another case than ASCII's, counted as a person apart, so a one-person team could pass the floor.
One read of the keys; only those whose owner changes have it rewritten.

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
    from taskproxy.privacy import owner_name, person_of

    op.add_column('api_keys', sa.Column('person', sa.String(length=800), nullable=True))
    connection = op.get_bind()
    keys = sa.table('api_keys', sa.column('id', sa.String), sa.column('owner', sa.String), sa.column('person', sa.String))
    rows = []
    for key_id, owner in connection.execute(sa.select(keys.c.id, keys.c.owner)):
        name = owner_name(owner)
        name = name if 0 < len(name) <= 200 else owner  # the column's width (compatibility forms can be longer)
        rows.append({"key": key_id, "name": name, "person": person_of(name) or name})
    for start in range(0, len(rows), 10_000):
        connection.execute(keys.update().where(keys.c.id == sa.bindparam("key")).values(owner=sa.bindparam("name"), person=sa.bindparam("person")),
                           rows[start : start + 10_000])  # fmt: skip
    with op.batch_alter_table('api_keys') as batch:
        batch.alter_column('person', existing_type=sa.String(length=800), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table('api_keys') as batch:
        batch.drop_column('person')
