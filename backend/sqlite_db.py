"""One SQLite file under TANDEM_HOME, shared by the registry, the job store and the prediction store.

Autocommit connections in WAL mode (the server, its background threads and the training worker process
read and write the same file), with explicit IMMEDIATE transactions for writes, serialised per object.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path


class SqliteDb:
    def __init__(self, db_path: Path, schema: str, timeout: float = 30.0) -> None:
        db_path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None, timeout=timeout)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.executescript(schema)
        self._lock = threading.Lock()

    @contextmanager
    def _tx(self):
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def close(self) -> None:
        self._conn.close()
