"""Label Studio tasks -> images -> model adapter -> one prediction per task.

Every task gets exactly one item, in order. A task whose image fails gets `{"error": ...}` with no
`result` key: Label Studio skips it and logs the reason, and the task stays eligible for a retry —
`{"result": []}` would instead mark it predicted.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from backend.errors import ConfigError, MediaError
from backend.labeling.config import ControlSpec, LabelingConfig, parse_label_config
from backend.labeling.label_map import LabelMap, build_label_map
from backend.labeling.results import WRITERS, prediction_score
from backend.media.fetch import LoadedImage, MediaFetcher
from backend.models.base import ModelAdapter

log = logging.getLogger("tandem.predict")

_cached_config = lru_cache(maxsize=64)(parse_label_config)


@dataclass(frozen=True)
class ServingPlan:
    """The controls one model fills for one labeling config, with their label maps."""

    config: LabelingConfig
    controls: tuple[tuple[ControlSpec, LabelMap], ...]

    @property
    def image_keys(self) -> list[str]:
        return sorted({c.image_key for c, _ in self.controls})


def plan_for(
    adapter: ModelAdapter, label_config: str, label_map: Mapping[str, str] | None = None, case_sensitive: bool = False
) -> ServingPlan:
    """Raise ConfigError naming what cannot be served, before any image is fetched."""
    config = _cached_config(label_config)
    servable = [c for c in config.controls if adapter.task in WRITERS[c.kind].tasks]
    if not servable:
        wanted = ", ".join(f"{c.kind.value} '{c.name}'" for c in config.controls)
        raise ConfigError(
            f"model {adapter.name} is a YOLO {adapter.task.value} model and cannot fill {wanted}; "
            "serve a detect model for RectangleLabels, segment for PolygonLabels, classify for Choices"
        )
    maps = tuple((c, build_label_map(c, adapter.class_names, label_map, case_sensitive)) for c in servable)
    return ServingPlan(config=config, controls=maps)


def image_url(task: Mapping[str, Any], key: str) -> str | None:
    data = task.get("data") or {}
    value = data.get(key)
    if value is None:
        value = data.get("$undefined$")  # file uploads before Label Studio renames the key
    return value if isinstance(value, str) else None


class Predictor:
    """Fetches concurrently (I/O-bound), then runs the adapter once over the batch."""

    def __init__(self, fetcher: MediaFetcher, workers: int = 8) -> None:
        self.fetcher = fetcher
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tandem-fetch")

    def _fetch(self, task: Mapping[str, Any], key: str) -> LoadedImage | MediaError:
        try:
            return self.fetcher.load(image_url(task, key) or "", task_id=task.get("id"))
        except MediaError as exc:
            return exc

    def predict(
        self, adapter: ModelAdapter, tasks: Sequence[Mapping[str, Any]], plan: ServingPlan
    ) -> list[dict[str, Any]]:
        version = adapter.version
        keys = plan.image_keys
        jobs = [(i, key) for i in range(len(tasks)) for key in keys]
        loaded = dict(zip(jobs, self._pool.map(lambda j: self._fetch(tasks[j[0]], j[1]), jobs), strict=True))

        good = [j for j in jobs if isinstance(loaded[j], LoadedImage)]
        outputs = dict(zip(good, adapter.predict([loaded[j].image for j in good]), strict=True))

        items: list[dict[str, Any]] = []
        for i, task in enumerate(tasks):
            errors = [str(loaded[(i, k)]) for k in keys if isinstance(loaded[(i, k)], MediaError)]
            if errors:
                log.warning("task %s: %s", task.get("id"), "; ".join(errors))
                items.append({"error": "; ".join(errors), "model_version": version})
                continue
            regions = []
            for control, labels in plan.controls:
                image = loaded[(i, control.image_key)]
                writer = WRITERS[control.kind]
                output = outputs[(i, control.image_key)]
                regions.extend(writer.regions(control, labels, output, adapter.class_names, image.size))
            items.append({"result": regions, "score": prediction_score(regions), "model_version": version})
        return items
