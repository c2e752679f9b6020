"""One SQLAlchemy engine per database URL, migrated to the newest schema before it is handed out.

`TANDEM_DATABASE_URL` selects the database: by default the SQLite file `TANDEM_HOME/tandem.sqlite3`
(embedded, zero setup; WAL mode and a busy timeout, since the server, its threads, the training worker and
the CLI share it), or PostgreSQL (`postgresql://…`, through psycopg 3) for several replicas.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

_engines: dict[str, Engine] = {}
_lock = threading.Lock()

SQLITE_BUSY_TIMEOUT_S = 30


def default_url(home: Path) -> str:
    return sqlite_url(home / "tandem.sqlite3")


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


def normalise_url(url: str | Path) -> str:
    """A Path is a SQLite file; `postgresql://` and `postgres://` get the psycopg 3 driver."""
    if isinstance(url, Path):
        return sqlite_url(url)
    if "://" not in url:
        return sqlite_url(Path(url))
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def sqlite_file(url: str) -> Path | None:
    """The file behind a SQLite URL (None for other databases and in-memory ones)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def display_url(url: str | Path) -> str:
    """The URL as it may be shown in a message or a log: the password masked."""
    try:
        return make_url(normalise_url(url)).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy can parse: show nothing of it
        return "(an unparseable database URL)"


# what the driver's words mean for the person who must act, first match wins: "is it running?" is wrong advice
# for a file that is damaged, read-only or on a full disk
_ADVICE = (
    (("file is not a database", "malformed", "not a database"),
     "damaged: restore it from a backup, or move it aside and Tandem starts an empty one"),
    (("readonly", "read-only"), "not writable: check the permissions of the file and of its folder"),
    (("unable to open database file",), "cannot be opened: check that its folder exists and is writable (SQLite "
                                        "also writes -wal and -shm files beside it)"),
    (("disk i/o error", "disk is full", "no space left", "file too large"),
     "refusing writes: check free disk space, file-size limits, and that the file (and its -wal and -shm "
     "files beside it) may be written"),
)


def unavailable(exc: BaseException, url: str | Path | None = None) -> str:
    """One line for a database that did not answer or cannot be used (the driver's first line, never a
    traceback), with the advice that fits the driver's reason."""
    cause = getattr(exc, "orig", None) or exc
    text = str(cause).strip()
    first = text.splitlines()[0].strip() if text else type(cause).__name__
    where = f" {display_url(url)}" if url else ""
    lowered = first.lower()
    for words, advice in _ADVICE:
        if any(w in lowered for w in words):
            return f"the database{where} is {advice} ({first}; TANDEM_DATABASE_URL selects it)"
    return f"the database{where} did not answer: {first} (is it running? TANDEM_DATABASE_URL selects it)"


def insert_for(dialect: str):
    """The dialect's own `insert` (its ON CONFLICT clauses differ from Core's): PostgreSQL's or SQLite's."""
    from sqlalchemy.dialects import postgresql, sqlite

    return postgresql.insert if dialect == "postgresql" else sqlite.insert


def engine_for(url: str | Path) -> Engine:
    """Shared per URL and per process; the schema is at the newest revision when it returns."""
    from backend.storage.migrate import upgrade

    url = normalise_url(url)
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _create(url)
            upgrade(engine)
            _engines[url] = engine
        return engine


def _create(url: str) -> Engine:
    if make_url(url).get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
    path = sqlite_file(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():  # it keeps Label Studio tokens (projects.access_token): the owner's alone
            path.touch(mode=0o600)
        else:
            _owners_alone(path)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S})

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(conn, _record) -> None:
        cur = conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
        cur.close()

    @event.listens_for(engine, "handle_error")
    def _reopen_when_readonly(context) -> None:
        # SQLite opens a file it may not write read-only, and such a connection stays so: treated as a lost
        # connection, the pool is emptied and the next statement opens the file again (writable once the
        # operator has mended it), instead of refusing writes until a restart
        if "readonly database" in str(context.original_exception):
            context.is_disconnect = True

    return engine


def _owners_alone(path: Path) -> None:
    """A file made by a release before 0600 (or copied in) is tightened, and said once: it holds tokens."""
    import stat

    info = path.stat()
    if info.st_mode & 0o077 and info.st_uid == os.getuid():
        path.chmod(stat.S_IMODE(info.st_mode) & 0o600)
        logging.getLogger("tandem.storage").warning(
            "%s was readable by other users (mode %o); it holds Label Studio tokens, so it is now the owner's "
            "alone (0600)", path, stat.S_IMODE(info.st_mode))


def dispose(url: str | Path) -> None:
    with _lock:
        engine = _engines.pop(normalise_url(url), None)
    if engine is not None:
        engine.dispose()
