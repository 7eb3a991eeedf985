"""Alembic environment: migrations run on the connection ``storage.upgrade`` passes (inside its
transaction, under its lock), never from an alembic.ini."""
from alembic import context

from cds_service.storage import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
