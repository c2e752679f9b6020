"""A database that stops answering is one log line when it goes and one when it is back, not a traceback per
try: the server's loops (the version watcher, the job reaper, the prediction writer) retry every second."""

from __future__ import annotations

import logging
import threading
import time

REPEAT_S = 300.0  # a long outage is said again this often


def is_unavailable(exc: BaseException) -> bool:
    """The database did not answer (down, unreachable, locked): SQLAlchemy's OperationalError / InterfaceError."""
    from sqlalchemy.exc import InterfaceError, OperationalError

    return isinstance(exc, (OperationalError, InterfaceError))


class OutageLog:
    def __init__(self, logger: logging.Logger, what: str, meanwhile: str = "retrying") -> None:
        self.logger, self.what, self.meanwhile = logger, what, meanwhile
        self.down_since: float | None = None
        self._said = 0.0
        self._lock = threading.Lock()

    def failed(self, exc: BaseException) -> None:
        """Log a failure: an unavailable database once per outage (and every REPEAT_S); anything else in full."""
        if not is_unavailable(exc):
            self.logger.error("%s", self.what, exc_info=exc)
            return
        from backend.storage.db import unavailable

        now = time.monotonic()
        with self._lock:
            first = self.down_since is None
            if first:
                self.down_since = now
            if not first and now - self._said < REPEAT_S:
                return
            self._said = now
        self.logger.warning("%s: %s; %s%s", self.what, unavailable(exc), self.meanwhile,
                            "" if first else f" (down for {now - self.down_since:.0f} s)")

    def ok(self) -> None:
        with self._lock:
            if self.down_since is None:
                return
            took, self.down_since = time.monotonic() - self.down_since, None
        self.logger.warning("%s: the database answers again (after %.0f s)", self.what, took)
