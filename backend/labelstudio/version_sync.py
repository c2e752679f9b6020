"""Keep each project's `model_version` equal to the version Tandem serves.

Label Studio's "Prediction score" column and score sorting only count predictions whose version equals
`project.model_version`, which connecting a backend sets to the backend's *title*. Label Studio also
rejects a `model_version` no stored prediction carries yet, so the PATCH is retried in the background
until the predictions of the current /predict call have been saved.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

from label_studio_sdk import LabelStudio

from backend.labelstudio.errors import describe
from backend.registry import Registry
from backend.storage.outage import is_unavailable

log = logging.getLogger("tandem.sync")


@dataclass(frozen=True)
class SyncRequest:
    project_id: int
    version: str
    url: str
    api_key: str


def show_version(client: LabelStudio, registry: Registry, project_id: int, version: str) -> None:
    """Set the project's `model_version` (Label Studio answers 400 until a prediction carrying it is stored)."""
    project = client.projects.get(id=project_id)
    if project.model_version != version:
        client.projects.update(id=project_id, model_version=version)
    registry.record_synced(project_id, version)
    log.info("project %s now shows model_version %s", project_id, version)


class VersionSync:
    def __init__(self, registry: Registry, delays: tuple[float, ...] = (0.5, 1, 2, 4, 8, 15)) -> None:
        self._registry = registry
        self._delays = delays
        self._queue: queue.Queue[SyncRequest | None] = queue.Queue()
        self._pending: set[tuple[int, str]] = set()
        self._warned: set[tuple[int, str]] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="tandem-version-sync", daemon=True)
        self._thread.start()

    def schedule(self, request: SyncRequest) -> None:
        key = (request.project_id, request.version)
        try:
            if self._registry.synced_version(request.project_id) == request.version:
                return
        except Exception as exc:  # noqa: BLE001 - the database does not answer: tried again on the next call
            if not is_unavailable(exc):
                raise
            return
        with self._lock:
            if key in self._pending:
                return
            self._pending.add(key)
        self._queue.put(request)

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """For tests and shutdown: True once nothing is pending."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._pending:
                    return True
            time.sleep(0.1)
        return False

    def close(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        while (request := self._queue.get()) is not None:
            try:
                self._sync(request)
            finally:
                with self._lock:
                    self._pending.discard((request.project_id, request.version))

    def _sync(self, req: SyncRequest) -> None:
        client = LabelStudio(base_url=req.url, api_key=req.api_key, timeout=10)
        for delay in (0.0, *self._delays):
            time.sleep(delay)
            try:  # record_synced needs the database: an outage is retried like Label Studio's 400
                show_version(client, self._registry, req.project_id, req.version)
                return
            except Exception as exc:  # 400 until a prediction with this version is stored; network errors
                last = exc
        # one line, once per version: the SDK's own text carries Label Studio's session cookie
        level = logging.INFO if (req.project_id, req.version) in self._warned else logging.WARNING
        self._warned.add((req.project_id, req.version))
        log.log(level, "could not set project %s model_version to %s yet (%s); retried on the next /predict — "
                "Label Studio takes a version once predictions carrying it are stored", req.project_id, req.version,
                describe(last, req.url))
