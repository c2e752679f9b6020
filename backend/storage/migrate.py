"""Alembic `upgrade head`, run at start-up by whichever process opens the database first.

Two replicas (or a server and a CLI) may start at once: on PostgreSQL the upgrade runs under a session
advisory lock, on SQLite under an exclusive lock on a file beside the database, and the revision is read
again under the lock, so exactly one process migrates and the others find the schema current.
"""

from __future__ import annotations

import fcntl
import logging
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Connection, Engine, text

MIGRATIONS = Path(__file__).parent / "migrations"
log = logging.getLogger(__name__)
ADVISORY_LOCK_KEY = 0x7A4D_0E4D  # "Tandem" schema lock: one id for every Tandem database


def _config(connection: Connection | None = None):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config()).get_current_head()


def current(connection: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    with _quiet_alembic():  # its import-time plugin lines and per-connection context lines at INFO read as noise
        from alembic import command

        target = head() if revision == "head" else revision
        with engine.connect() as conn:
            if current(conn) == target:
                return
        with _locked(engine) as conn:
            before = current(conn)
            if before != target:
                command.upgrade(_config(conn), revision)
                conn.commit()
                log.info("database schema migrated from %s to %s", before or "empty", target)


@contextmanager
def _quiet_alembic():
    alembic_log = logging.getLogger("alembic")
    level = alembic_log.level
    alembic_log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        alembic_log.setLevel(level)


@contextmanager
def _locked(engine: Engine):
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
            conn.commit()
            try:
                yield conn
            finally:
                conn.rollback()
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": ADVISORY_LOCK_KEY})
                conn.commit()
        return
    from backend.storage.db import sqlite_file

    path = sqlite_file(str(engine.url))
    if path is None:  # in memory: one process by definition
        with engine.connect() as conn:
            yield conn
        return
    with open(path.with_name(path.name + ".migrate-lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with engine.connect() as conn:
                yield conn
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
