"""One SQLAlchemy engine per database URL: SQLite under TANDEM_HOME by default (embedded, zero setup).

SQLite runs in WAL mode with a busy timeout, since the server, its background threads and the training
worker process share the file. Tables are created on first use; the registry and job tables still live
in `backend.sqlite_db` beside these in the same file.
"""

from __future__ import annotations

import threading
from pathlib import Path

from sqlalchemy import Engine, create_engine, event

from backend.storage.tables import metadata

_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def default_url(home: Path) -> str:
    return f"sqlite:///{(home / 'tandem.db').resolve()}"


def engine_for(url: str) -> Engine:
    """Shared per URL and per process; the tables exist when it returns."""
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            if url.startswith("sqlite"):
                path = url.split("///", 1)[-1]
                if path and path != ":memory:":
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

                @event.listens_for(engine, "connect")
                def _sqlite_pragmas(conn, _record) -> None:
                    cur = conn.cursor()
                    cur.execute("PRAGMA journal_mode=WAL")
                    cur.execute("PRAGMA synchronous=NORMAL")
                    cur.close()
            else:
                engine = create_engine(url, pool_pre_ping=True)
            metadata.create_all(engine)
            _engines[url] = engine
        return engine


def dispose(url: str) -> None:
    with _lock:
        engine = _engines.pop(url, None)
    if engine is not None:
        engine.dispose()
