"""The model the server is serving right now.

Loading runs in a background thread so /health and /setup answer at once; a failed load leaves the
previously served model in place (or reports the error on /health when there is none).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from backend.errors import ModelLoadError, TandemError
from backend.models.base import ModelAdapter

log = logging.getLogger("tandem.serving")


class ModelHolder:
    def __init__(self, adapter: ModelAdapter | None = None) -> None:
        self._adapter = adapter
        self._ready = threading.Event()
        self._listeners: list[Callable[[ModelAdapter], None]] = []
        self._swap_lock = threading.Lock()
        self.error: str | None = None
        self.loading = False  # a background load is under way (the adapter, if any, is the one before it)
        if adapter is not None:
            self._ready.set()

    def subscribe(self, listener: Callable[[ModelAdapter], None]) -> None:
        """Call `listener` with every adapter this holder serves: the current one now, each later one on swap
        (a model still loading in the background when the server starts is not missed)."""
        with self._swap_lock:
            self._listeners.append(listener)
            current = self._adapter
        if current is not None:
            listener(current)

    @property
    def adapter(self) -> ModelAdapter | None:
        return self._adapter

    @property
    def ready(self) -> bool:
        return self._adapter is not None

    def load_in_background(self, loader: Callable[[], ModelAdapter]) -> threading.Thread:
        self.loading = True

        def run() -> None:
            try:
                adapter = loader()
            except TandemError as exc:
                self.error = str(exc)
                log.error("model load failed, still serving %s: %s", self._adapter and self._adapter.version, exc)
            except Exception as exc:  # noqa: BLE001 - any loader crash must not kill the server
                self.error = f"{type(exc).__name__}: {exc}"
                log.exception("model load crashed")
            else:
                self.swap(adapter)  # subscribers (the registry) hear of it
            finally:
                self.loading = False
                self._ready.set()

        thread = threading.Thread(target=run, name="tandem-model-load", daemon=True)
        thread.start()
        return thread

    def swap(self, adapter: ModelAdapter) -> None:
        """Atomic: in-flight requests keep the adapter they already took."""
        with self._swap_lock:
            self._adapter = adapter
            self.error = None
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(adapter)
            except Exception:  # noqa: BLE001 - a failing listener must not undo the swap
                log.exception("listener of %s failed", adapter.version)

    def wait(self, timeout: float) -> ModelAdapter:
        self._ready.wait(timeout)
        if self._adapter is None:
            raise ModelLoadError(self.error or f"the model is still loading after {timeout:.0f} s; try again")
        return self._adapter
