"""Models shared between projects: each loaded once, in the background, evicted least-recently-used.

A project's binding names a model by a spec — a weights path, a registry version, a VLM hub id or
folder. The pool loads each spec once (so two projects bound to one version share it), keeps loading off
the request path (`/setup` must answer within Label Studio's 3 s), and when the estimated size of what
is loaded passes the memory budget (`TANDEM_MODEL_MEMORY_GB`) drops the least recently used model that
no request holds. A failed load is remembered with its error; the project keeps being served what it
had, and an `ensure` after `retry_after_s` retries (a file fixed or copied in meanwhile is picked up).
Before then the error stands, so `/health` shows it rather than a "loading" every poll restarts, and a
load that keeps failing the same way is logged with its traceback once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend.errors import ModelLoadError, TandemError

log = logging.getLogger("tandem.pool")

Loader = Callable[[str], Any]  # spec -> adapter (YoloAdapter or OpenVocabularyModel)


@dataclass
class _Entry:
    adapter: Any = None
    error: str | None = None
    loading: threading.Event | None = None
    size: int = 0
    used_at: float = 0.0
    failed_at: float = 0.0  # when the last load failed (monotonic); 0: it did not
    last_error: str | None = None  # the last load's error, kept across retries (`error` is cleared by one)


def estimate_bytes(adapter: Any) -> int:
    """Parameters of a torch model where one is reachable, else the weight files' size on disk."""
    for attr in ("model", "_model"):
        model = getattr(adapter, attr, None)
        inner = getattr(model, "model", model)
        params = getattr(inner, "parameters", None)
        if callable(params):
            try:
                return int(sum(p.numel() * p.element_size() for p in params()))
            except Exception:  # noqa: BLE001 - an estimate only
                pass
    path = Path(str(getattr(adapter, "path", "") or getattr(adapter, "source", "") or ""))
    if path.is_file():
        return path.stat().st_size * 2
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return 0


class ModelPool:
    def __init__(self, loader: Loader, budget_bytes: int, on_loaded: Callable[[Any], None] | None = None,
                 retry_after_s: float = 30.0) -> None:
        self._loader = loader
        self.budget_bytes = budget_bytes
        self.retry_after_s = retry_after_s
        self._on_loaded = on_loaded
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def ensure(self, spec: str) -> Any | None:
        """The loaded adapter for `spec`, or None while it loads (a load is started if none runs)."""
        with self._lock:
            entry = self._entries.get(spec)
            if entry is not None and entry.adapter is not None:
                entry.used_at = time.monotonic()
                self._entries.move_to_end(spec)
                return entry.adapter
            if entry is not None and entry.loading is not None:
                return None
            if entry is not None and entry.error and time.monotonic() - entry.failed_at < self.retry_after_s:
                return None  # failed a moment ago: the error stands until the retry is due
            entry = entry or _Entry()
            entry.loading, entry.error = threading.Event(), None
            self._entries[spec] = entry
        threading.Thread(target=self._load, args=(spec, entry), name="tandem-pool-load", daemon=True).start()
        return None

    def get(self, spec: str, timeout: float) -> Any:
        """Wait up to `timeout` seconds for `spec`; ModelLoadError with the reason when it cannot be had."""
        adapter = self.ensure(spec)
        if adapter is not None:
            return adapter
        with self._lock:
            entry = self._entries.get(spec)
            event = entry.loading if entry else None
        if event is not None:
            event.wait(timeout)
        with self._lock:
            entry = self._entries.get(spec)
            if entry is not None and entry.adapter is not None:
                entry.used_at = time.monotonic()
                return entry.adapter
            error = entry.error if entry else None
        raise ModelLoadError(error or f"model {spec} is still loading after {timeout:.0f} s; try again")

    def is_loading(self, spec: str) -> bool:
        with self._lock:
            entry = self._entries.get(spec)
            return entry is not None and entry.adapter is None and entry.loading is not None

    def error(self, spec: str) -> str | None:
        with self._lock:
            entry = self._entries.get(spec)
            return entry.error if entry else None

    def last_error(self, spec: str) -> str | None:
        """Why the last load of `spec` failed, also while a retry runs (None once one succeeded)."""
        with self._lock:
            entry = self._entries.get(spec)
            return entry.last_error if entry and entry.adapter is None else None

    def put(self, spec: str, adapter: Any) -> None:
        """An adapter loaded elsewhere (the server's defaults, a hot swap)."""
        with self._lock:
            self._entries[spec] = _Entry(adapter=adapter, size=estimate_bytes(adapter), used_at=time.monotonic())
            self._entries.move_to_end(spec)
            self._evict(keep=spec)

    def loaded(self) -> dict[str, Any]:
        with self._lock:
            return {spec: e.adapter for spec, e in self._entries.items() if e.adapter is not None}

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.size for e in self._entries.values() if e.adapter is not None)

    def _load(self, spec: str, entry: _Entry) -> None:
        started = time.monotonic()
        before = entry.last_error
        try:
            adapter = self._loader(spec)
        except TandemError as exc:
            error = str(exc)
            log.error("%s", error if spec in error else f"could not load {spec}: {error}")
            adapter = None
        except Exception as exc:  # noqa: BLE001 - a loader crash must not kill the server
            error = f"could not load {spec}: {type(exc).__name__}: {exc}"
            if error == before:  # the same failure again: its traceback was logged the first time
                log.error("%s", error)
            else:
                log.exception("loading %s crashed", spec)
            adapter = None
        else:
            error = None
        with self._lock:
            entry.adapter, entry.error, entry.last_error = adapter, error, error
            entry.failed_at = time.monotonic() if error else 0.0
            if adapter is not None:
                entry.size, entry.used_at = estimate_bytes(adapter), time.monotonic()
                self._entries.move_to_end(spec)
                self._evict(keep=spec)
            event, entry.loading = entry.loading, None
        if event is not None:
            event.set()
        if adapter is not None:
            log.info("loaded %s as %s in %.1f s", spec, adapter.version, time.monotonic() - started)
            if self._on_loaded is not None:
                try:
                    self._on_loaded(adapter)
                except Exception:  # noqa: BLE001 - a listener must not undo a load
                    log.exception("listener of %s failed", spec)

    def _evict(self, keep: str) -> None:
        """Least recently used first, never `keep`; in-flight requests keep their own reference."""
        total = sum(e.size for e in self._entries.values() if e.adapter is not None)
        for spec in list(self._entries):
            if total <= self.budget_bytes:
                break
            entry = self._entries[spec]
            if spec == keep or entry.adapter is None:
                continue
            log.info("evicting %s (%.0f MB) to stay within the %.1f GB model budget", spec, entry.size / 1e6,
                     self.budget_bytes / 1e9)
            total -= entry.size
            del self._entries[spec]
