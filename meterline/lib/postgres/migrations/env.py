"""Alembic's entry: runs the migrations on the connection :func:`migrate` hands it.

meterline applies its migrations itself at start-up (see
:mod:`meterline.lib.postgres.database`); the ``alembic`` command is not
needed to run it, only to write a new revision.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

connection = context.config.attributes["connection"]
assert isinstance(connection, Connection), "run through meterline.lib.postgres.migrate"
context.configure(
    connection=connection,
    target_metadata=None,
    version_table_schema=context.config.attributes["schema"],
    transactional_ddl=True,
)
with context.begin_transaction():
    context.run_migrations()
