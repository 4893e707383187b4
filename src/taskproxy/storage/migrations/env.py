"""Alembic's environment: migrations run on the connection taskproxy hands over (see storage/db.py)."""

from alembic import context

from taskproxy.storage import models

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=models.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
