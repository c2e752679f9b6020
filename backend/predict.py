"""Label Studio tasks -> images -> model adapter(s) -> one prediction per task, within a time budget.

Every task gets exactly one item, in order. A task whose image fails gets `{"error": ...}` with no
`result` key: Label Studio skips it and logs the reason, and the task stays eligible for a retry —
`{"result": []}` would instead mark it predicted.

Label Studio waits 100 s for /predict and sends every selected task in one call, while a VLM on a CPU
takes seconds per image. So tasks are predicted in chunks sized from the measured time per image, and
when the next chunk would pass the deadline the rest are handed to a background worker: they answer
"still computing" now (skipped, not marked predicted) and come from the prediction store on the next
"Retrieve predictions".
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from backend.errors import ConfigError, MediaError
from backend.labeling.config import ControlSpec, LabelingConfig, parse_label_config
from backend.labeling.label_map import LabelMap, build_label_map
from backend.labeling.results import WRITERS, prediction_score
from backend.media.fetch import LoadedImage, MediaFetcher
from backend.models.base import ModelAdapter, ModelTask
from backend.models.vlm.base import OpenVocabularyModel, Vocabulary
from backend.prediction_store import PredictionStore, fingerprint

log = logging.getLogger("tandem.predict")

_cached_config = lru_cache(maxsize=64)(parse_label_config)
TASK_PREFERENCE = (ModelTask.DETECT, ModelTask.SEGMENT, ModelTask.CLASSIFY)


def served_tasks(adapter: ModelAdapter | OpenVocabularyModel) -> frozenset[ModelTask]:
    return adapter.tasks if isinstance(adapter, OpenVocabularyModel) else frozenset({adapter.task})


def describe(adapter: ModelAdapter | OpenVocabularyModel) -> str:
    return "+".join(sorted(t.value for t in served_tasks(adapter)))


def registry_task(adapter: ModelAdapter | OpenVocabularyModel) -> str:
    """The registry's task column; "vlm:" keeps VLM versions apart from the CNN's (`ModelVersion.kind`)."""
    return ("vlm:" if isinstance(adapter, OpenVocabularyModel) else "") + describe(adapter)


@dataclass(frozen=True)
class PlannedControl:
    control: ControlSpec
    labels: LabelMap
    adapter: ModelAdapter  # for a VLM: the model bound to this control's labels


@dataclass(frozen=True)
class ServingPlan:
    """The controls one model fills for one labeling config, and a fingerprint of everything asked."""

    config: LabelingConfig
    controls: tuple[PlannedControl, ...]
    version: str
    name: str
    fingerprint: str

    @property
    def image_keys(self) -> list[str]:
        return sorted({c.control.image_key for c in self.controls})

    def unserved_controls(self) -> list[str]:
        """Tags of the config this model leaves to the annotator: ones of another task, and ones Tandem never fills."""
        served = {planned.control.name for planned in self.controls}
        return [c.title for c in self.config.controls if c.name not in served] + list(self.config.ignored)

    def unserved_labels(self) -> dict[str, tuple[list[str], list[str]]]:
        """{control: (its labels no model class maps to, the classes)}: labels annotators will always draw."""
        out = {}
        for planned in self.controls:
            served = set(planned.labels.by_class.values())
            missing = [lab.result_value for lab in planned.control.labels if lab.result_value not in served]
            if missing:
                out[planned.control.name] = (missing, list(planned.adapter.class_names))
        return out


def plan_for(
    adapter: ModelAdapter | OpenVocabularyModel,
    label_config: str,
    label_map: Mapping[str, str] | None = None,
    case_sensitive: bool = False,
    prompts: Mapping[str, str] | None = None,
) -> ServingPlan:
    """Raise ConfigError naming what cannot be served, before any image is fetched.

    A YOLO model fills the controls its task fits, mapping its classes onto their labels. A VLM is bound to
    each control it can fill, with that control's labels as its vocabulary (`prompts` rewords a label).
    """
    config = _cached_config(label_config)
    tasks = served_tasks(adapter)
    planned: list[PlannedControl] = []
    for control in config.controls:
        task = next((t for t in TASK_PREFERENCE if t in tasks and t in WRITERS[control.kind].tasks), None)
        if task is None:
            continue
        bound = adapter
        if isinstance(adapter, OpenVocabularyModel):
            bound = adapter.bind(task, Vocabulary.from_labels([lab.value for lab in control.labels], prompts))
        labels = build_label_map(control, bound.class_names, label_map, case_sensitive)
        planned.append(PlannedControl(control, labels, bound))
    if not planned:
        wanted = ", ".join(c.title for c in config.controls)
        kind = "VLM" if isinstance(adapter, OpenVocabularyModel) else "YOLO"
        raise ConfigError(
            f"model {adapter.name} is a {kind} {describe(adapter)} model and cannot fill {wanted}; "
            "serve a detect model for RectangleLabels, segment for PolygonLabels, classify for Choices (the starter: "
            "tandem serve --starter-task segment or classify)"
        )
    fp = fingerprint(label_config, dict(label_map or {}), dict(prompts or {}), case_sensitive)
    return ServingPlan(config, tuple(planned), adapter.version, adapter.name, fp)


def image_url(task: Mapping[str, Any], key: str) -> str | None:
    data = task.get("data") or {}
    value = data.get(key)
    if value is None:
        value = data.get("$undefined$")  # file uploads before Label Studio renames the key
    return value if isinstance(value, str) else None


def still_computing(version: str, done: int, total: int) -> dict[str, Any]:
    return {
        "error": f"Tandem is still computing this prediction ({done} of {total} finished within the time budget); "
                 "run Retrieve predictions again in a minute",
        "model_version": version,
    }


class Predictor:
    """Fetches concurrently (I/O-bound), then runs each adapter once per chunk of images."""

    def __init__(self, fetcher: MediaFetcher, workers: int = 8, store: PredictionStore | None = None,
                 max_chunk: int = 64) -> None:
        self.fetcher = fetcher
        self.store = store
        self.max_chunk = max_chunk
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tandem-fetch")
        self._seconds_per_task: dict[str, float] = {}  # model version -> running estimate

    def _fetch(self, task: Mapping[str, Any], key: str) -> LoadedImage | MediaError:
        try:
            return self.fetcher.load(image_url(task, key) or "", task_id=task.get("id"))
        except MediaError as exc:
            return exc

    def _keys(self, tasks: Sequence[Mapping[str, Any]], plan: ServingPlan) -> list[tuple[int, str, str] | None]:
        """Store keys; a task without an id (Label Studio's test call) is never cached."""
        keys = []
        for task in tasks:
            tid = task.get("id")
            urls = [image_url(task, k) for k in plan.image_keys]
            keys.append((int(tid), plan.version, fingerprint(plan.fingerprint, urls)) if isinstance(tid, int) else None)
        return keys

    def predict_chunk(self, tasks: Sequence[Mapping[str, Any]], plan: ServingPlan) -> list[dict[str, Any]]:
        keys = plan.image_keys
        jobs = [(i, key) for i in range(len(tasks)) for key in keys]
        if len(jobs) == 1:  # a task being opened: no thread hop
            loaded = {jobs[0]: self._fetch(tasks[0], jobs[0][1])}
        else:
            loaded = dict(zip(jobs, self._pool.map(lambda j: self._fetch(tasks[j[0]], j[1]), jobs), strict=True))

        outputs: dict[tuple[int, int, str], Any] = {}
        for c_idx, planned in enumerate(plan.controls):
            good = [i for i in range(len(tasks)) if isinstance(loaded[(i, planned.control.image_key)], LoadedImage)]
            images = [loaded[(i, planned.control.image_key)].image for i in good]
            for i, out in zip(good, planned.adapter.predict(images) if images else [], strict=True):
                outputs[(c_idx, i, planned.control.image_key)] = out

        items: list[dict[str, Any]] = []
        for i, task in enumerate(tasks):
            errors = [str(loaded[(i, k)]) for k in keys if isinstance(loaded[(i, k)], MediaError)]
            if errors:
                log.warning("task %s: %s", task.get("id"), "; ".join(errors))
                items.append({"error": "; ".join(errors), "model_version": plan.version})
                continue
            regions = []
            for c_idx, planned in enumerate(plan.controls):
                image = loaded[(i, planned.control.image_key)]
                writer = WRITERS[planned.control.kind]
                output = outputs[(c_idx, i, planned.control.image_key)]
                regions.extend(writer.regions(planned.control, planned.labels, output, planned.adapter.class_names,
                                              image.size))
            items.append({"result": regions, "score": prediction_score(regions), "model_version": plan.version})
        return items

    def predict(
        self,
        tasks: Sequence[Mapping[str, Any]],
        plan: ServingPlan,
        deadline: float | None = None,
        on_overflow: Callable[[list[Mapping[str, Any]]], None] | None = None,
        project_id: int | None = None,
        role: str = "pre-annotation",
    ) -> list[dict[str, Any]]:
        """One item per task. `deadline` is a time.monotonic() value; tasks past it go to `on_overflow`."""
        keys = self._keys(tasks, plan)
        items: list[dict[str, Any] | None] = [None] * len(tasks)
        if self.store is not None:
            cached = self.store.get_many([k for k in keys if k is not None])
            for i, key in enumerate(keys):
                if key in cached:
                    items[i] = cached[key]
        todo = [i for i, item in enumerate(items) if item is None]
        done = 0
        while done < len(todo):
            per_task = self._seconds_per_task.get(plan.version)
            size = self.max_chunk if per_task is None else max(1, min(self.max_chunk, int(2.0 / max(per_task, 1e-4))))
            if deadline is not None:
                left = deadline - time.monotonic()
                if per_task is None:
                    size = min(size, 4)  # learn the speed on a few tasks first
                else:
                    size = min(size, math.floor(left / per_task))
                if done > 0 and (size < 1 or left <= 0):  # the first chunk always runs: every call makes progress
                    break
                size = max(size, 1)
            chunk = todo[done : done + size]
            started = time.monotonic()
            chunk_items = self.predict_chunk([tasks[i] for i in chunk], plan)
            took = (time.monotonic() - started) / len(chunk)
            self._seconds_per_task[plan.version] = took if per_task is None else 0.5 * per_task + 0.5 * took
            for i, item in zip(chunk, chunk_items, strict=True):
                items[i] = item
            self._save([(keys[i], items[i]) for i in chunk], plan, project_id, role)
            done += len(chunk)
        rest = todo[done:]
        if rest:
            log.info("%s: %d of %d tasks left for the background after the time budget", plan.version, len(rest),
                     len(tasks))
            for i in rest:
                items[i] = still_computing(plan.version, len(tasks) - len(rest), len(tasks))
            if on_overflow is not None:
                on_overflow([tasks[i] for i in rest])
        return items  # type: ignore[return-value]

    def _save(self, pairs, plan: ServingPlan, project_id: int | None, role: str) -> None:
        if self.store is None:
            return
        rows = [(key[0], key[1], key[2], project_id, plan.name, role, item)
                for key, item in pairs if key is not None and "result" in item]
        if rows:
            self.store.put_many_later(rows)
