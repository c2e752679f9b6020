"""Everything the routes share, built once by `create_app` and handed to them through `deps.get_state`."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from backend.labelstudio.version_sync import SyncRequest, VersionSync
from backend.media.fetch import MediaFetcher
from backend.media.policy import setup_credentials
from backend.predict import Predictor
from backend.registry import Registry
from backend.server.deferred import DeferredPredictions
from backend.server.metrics import Metrics
from backend.server.projects import ProjectServing
from backend.settings import Settings
from backend.storage.predictions import PredictionRepo
from backend.storage.projects import ProjectRepo
from backend.storage.scores import ScoreRepo
from backend.training.service import TrainingService

log = logging.getLogger("tandem.server")

MAX_FALLBACK_PREDICTORS = 16  # Label Studio hosts named by /setup, each with its own fetcher
MAX_WARNED = 4096  # (project, config, control) warnings said once


@dataclass
class ServerState:
    settings: Settings
    registry: Registry
    predictions: PredictionRepo
    scores: ScoreRepo
    projects: ProjectRepo
    serving: ProjectServing
    predictor: Predictor
    deferred: DeferredPredictions
    sync: VersionSync
    metrics: Metrics
    training: TrainingService | None
    predict_pool: ThreadPoolExecutor
    fallback: OrderedDict[tuple[str, str | None], Predictor] = field(default_factory=OrderedDict)
    warned: OrderedDict[tuple, None] = field(default_factory=OrderedDict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def credentials(self, project_id: int | None) -> tuple[str, str | None] | None:
        """Label Studio's URL and key for a project: the configured ones; without LABEL_STUDIO_URL, the hostname
        its /setup sent with the token that same /setup sent (never the configured key: see SECURITY.md)."""
        state = self.serving.state(project_id)  # the last one read while the database does not answer
        return setup_credentials(self.settings.label_studio_url, self.settings.label_studio_api_key,
                                 state.hostname if state else None, state.access_token if state else None)

    def predictor_for(self, project_id: int | None) -> Predictor:
        """Without LABEL_STUDIO_URL, media comes from the hostname and token Label Studio sent to /setup."""
        if self.settings.label_studio_url or project_id is None:
            return self.predictor
        pair = self.credentials(project_id)
        if pair is None:
            return self.predictor
        with self.lock:
            if pair in self.fallback:
                self.fallback.move_to_end(pair)
                return self.fallback[pair]
            media = self.settings.media()
            media.label_studio_url, media.api_key = pair
            predictor = Predictor(MediaFetcher(media), store=self.predictions, on_stored=self.predictor.on_stored)
            self.fallback[pair] = predictor
            while len(self.fallback) > MAX_FALLBACK_PREDICTORS:  # bounded: /setup may name any number of hosts
                _, evicted = self.fallback.popitem(last=False)
                evicted.fetcher.close()
            return predictor

    def warn_once(self, key: tuple) -> bool:
        """True the first time `key` is seen (bounded: the oldest keys are forgotten first)."""
        with self.lock:
            if key in self.warned:
                return False
            self.warned[key] = None
            while len(self.warned) > MAX_WARNED:
                self.warned.popitem(last=False)
            return True

    def schedule_sync(self, project_id: int | None, version: str) -> None:
        if project_id is None:
            return
        pair = self.credentials(project_id)
        if pair and pair[1]:
            self.sync.schedule(SyncRequest(project_id, version, pair[0], pair[1]))

    def close(self) -> None:
        self.predict_pool.shutdown(wait=True)
        self.deferred.close()
        self.sync.close()
        self.predictor.fetcher.close()
        self.predictions.close()
        for extra in self.fallback.values():
            extra.fetcher.close()
        if self.training:
            self.training.close()


def extra_params(extra: Any) -> dict[str, Any]:
    """The backend's extra params as a dict (Label Studio sends a dict, or its JSON text).

    Text that is not JSON raises ValueError: Label Studio passes its "Extra params" box on as typed, and a typo
    there must be refused, not read as "no settings"."""
    import json

    if isinstance(extra, str):
        extra = json.loads(extra) if extra.strip() else {}
    return extra if isinstance(extra, dict) else {}
