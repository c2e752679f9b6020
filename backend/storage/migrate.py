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

from backend.errors import TandemError

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


class SchemaTooNew(TandemError):
    """The database was migrated by a newer Tandem: this release must not read or write it."""


def known() -> set[str]:
    from alembic.script import ScriptDirectory

    return {script.revision for script in ScriptDirectory.from_config(_config()).walk_revisions()}


def _require_known(revision: str | None) -> None:
    if revision is not None and revision not in known():
        raise SchemaTooNew(f"this database's schema is at revision {revision}, which this Tandem does not know (it "
                           f"knows up to {head()}): a newer Tandem migrated it. Run one release on every server, "
                           "worker and command that shares the database (docs/upgrading.md)")


def upgrade(engine: Engine, revision: str = "head") -> None:
    with _quiet_alembic():  # its import-time plugin lines and per-connection context lines at INFO read as noise
        from alembic import command

        target = head() if revision == "head" else revision
        with engine.connect() as conn:
            now = current(conn)
            if now == target:
                return
            _require_known(now)
        with _locked(engine) as conn:
            before = current(conn)
            _require_known(before)
            if before != target:
                from sqlalchemy import inspect

                empty = not inspect(conn).get_table_names()
                command.upgrade(_config(conn), revision)
                conn.commit()
                if empty:  # a new database: nothing else used it
                    log.info("database schema created at %s", target)
                else:  # said wherever it ran (a CLI command too): replicas on the older release stop working
                    log.warning("database schema migrated from %s to %s; servers and workers still on an older "
                                "Tandem cannot use it until they are upgraded too (docs/upgrading.md)",
                                before or "before migrations", target)


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
