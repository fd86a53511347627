"""PostgreSQL: meterline's transactional store (accounts, API keys, and the
plans, credit ledgers and statements that follow); usage stays in ClickHouse.

Psycopg 3 is the driver: one library serves the blocking callers (the
pipeline's flush handlers run in a worker thread, the CLI, Alembic) and
returns ``NUMERIC`` as :class:`~decimal.Decimal`, so money never passes
through a float.
"""

from meterline.lib.postgres.database import Database, PostgresError, migrate, open_database

__all__ = ["Database", "PostgresError", "migrate", "open_database"]
