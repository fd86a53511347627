"""A pool of PostgreSQL connections in meterline's schema, migrated before use.

Migrations are Alembic revisions (``migrations/versions``), applied at
start-up by whichever process starts first: each process takes one advisory
lock, so two starting at once apply them one after the other, and the
second finds nothing left to do.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from meterline.lib.settings import PostgresSettings

__all__ = ["MIGRATIONS", "Database", "PostgresError", "migrate", "open_database"]

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
#: pg_advisory_xact_lock key of the migrations (any fixed number; "meterline" in ASCII)
_MIGRATION_LOCK = 0x6D657465726C696E


class PostgresError(RuntimeError):
    """PostgreSQL cannot be reached, or refused meterline's schema."""


def _where(url: str) -> str:
    """host:port/db of a URL, without its password, for messages."""
    info = psycopg.conninfo.conninfo_to_dict(url)
    return f"{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"


def migrate(url: str, schema: str) -> list[str]:
    """Bring ``schema`` to the newest revision; returns the revisions applied."""
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    # SQLAlchemy only carries Alembic's statements, over psycopg's own connection
    engine = create_engine(
        "postgresql+psycopg://", creator=lambda: psycopg.connect(url), poolclass=NullPool
    )
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["schema"] = schema
    try:
        with engine.begin() as connection:
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
            connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
            connection.execute(text(f'SET LOCAL search_path TO "{schema}"'))
            before = MigrationContext.configure(
                connection, opts={"version_table_schema": schema}
            ).get_current_revision()
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
            after = MigrationContext.configure(
                connection, opts={"version_table_schema": schema}
            ).get_current_revision()
    except Exception as exc:
        raise PostgresError(f"cannot migrate PostgreSQL at {_where(url)}: {exc}") from exc
    finally:
        engine.dispose()
    if before != after:
        log.info("PostgreSQL schema %s migrated from %s to %s", schema, before, after)
        return _revisions_between(before, after)
    return []


def _revisions_between(before: str | None, after: str | None) -> list[str]:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    scripts = ScriptDirectory.from_config(config)
    upper = after or "base"
    return [s.revision for s in scripts.iterate_revisions(upper, before or "base")][::-1]


class Database:
    """Connections to one PostgreSQL database, with meterline's schema first on the path.

    Blocking, like the warehouse: async callers use ``asyncio.to_thread``.
    """

    def __init__(self, url: str, settings: PostgresSettings) -> None:
        self.url = url
        self.schema = settings.schema_name
        self.where = _where(url)
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=settings.pool_size,
            kwargs={
                "options": f"-c search_path={self.schema}",
                "connect_timeout": max(1, round(settings.connect_timeout_s)),
            },
            timeout=settings.connect_timeout_s,
            open=False,
            name=f"meterline-{self.schema}",
        )
        self._timeout = settings.connect_timeout_s

    def open(self) -> Database:
        try:
            self._pool.open(wait=True, timeout=self._timeout)
        except PoolTimeout as exc:
            self._pool.close()
            raise PostgresError(f"PostgreSQL at {self.where} does not answer: {exc}") from exc
        return self

    @contextlib.contextmanager
    def transaction(self) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
        """A connection in a transaction: committed when the block ends, else rolled back."""
        try:
            with self._pool.connection() as connection:
                yield connection
        except PoolTimeout as exc:
            raise PostgresError(f"PostgreSQL at {self.where} does not answer: {exc}") from exc
        except psycopg.OperationalError as exc:
            raise PostgresError(f"PostgreSQL at {self.where}: {exc}") from exc

    def rows(self, query: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """One statement in a transaction of its own; its rows as dicts."""
        with self.transaction() as connection:
            cursor = connection.cursor(row_factory=dict_row)
            return cursor.execute(query, params).fetchall()

    def answers(self) -> bool:
        try:
            with self.transaction() as connection:
                connection.execute("SELECT 1")
            return True
        except (PostgresError, psycopg.Error):
            return False

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_database(url: str, settings: PostgresSettings) -> Database:
    """The migrated database, its pool open."""
    migrate(url, settings.schema_name)
    return Database(url, settings).open()
