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

import numpy as np

from backend.errors import ConfigError, MediaError
from backend.labeling.config import ControlKind, ControlSpec, LabelingConfig, parse_label_config
from backend.labeling.label_map import LabelMap, build_label_map
from backend.labeling.results import WRITERS, prediction_score
from backend.media.fetch import INVALID_TASK_PREFIX, LoadedImage, MediaFetcher
from backend.models.base import Capability, Model, ModelAdapter, ModelTask, Vocabulary, bind, is_promptable, tasks_of
from backend.core.prediction import Prediction, Role
from backend.core.text import clip
from backend.storage.outage import OutageLog, is_unavailable
from backend.storage.predictions import PredictionRepo, PredictionRow, fingerprint

log = logging.getLogger("tandem.predict")

_cached_config = lru_cache(maxsize=64)(parse_label_config)
TASK_PREFERENCE = (ModelTask.DETECT, ModelTask.SEGMENT, ModelTask.CLASSIFY)
DOWNLOAD_GRACE_S = 30.0  # past /predict's budget (60 s by default) and within Label Studio's 100 s


def served_tasks(adapter: Model) -> frozenset[ModelTask]:
    """The tasks a model can fill, read from its capabilities."""
    return tasks_of(adapter)


def describe(adapter: Model) -> str:
    return "+".join(sorted(t.value for t in served_tasks(adapter)))


def registry_task(adapter: Model) -> str:
    """The registry's task column; "vlm:" keeps promptable (open-vocabulary) versions apart from the CNN's
    (`ModelVersion.kind`)."""
    return ("vlm:" if is_promptable(adapter) else "") + describe(adapter)


@dataclass(frozen=True)
class PlannedControl:
    control: ControlSpec
    labels: LabelMap
    adapter: ModelAdapter  # for a VLM: the model bound to this control's labels

    @property
    def label_names(self) -> list[str]:
        return [label.result_value for label in self.control.labels]

    def in_labels(self, outputs: Sequence[Prediction], version: str, role: str) -> list[Prediction]:
        """The model's outputs pooled onto this control's labels, as stored and scored."""
        from active_learning.label_view import in_labels

        names = tuple(self.label_names)
        return [p.with_meta(class_names=names, model_version=version, role=role)
                for p in in_labels(outputs, self.adapter.class_names, self.labels, names)]


@dataclass(frozen=True)
class ServingPlan:
    """The controls one model fills for one labeling config, and a fingerprint of everything asked."""

    config: LabelingConfig
    controls: tuple[PlannedControl, ...]
    version: str
    name: str
    fingerprint: str
    min_confidence: float = 0.0  # boxes below it are stored (for scoring) but not shown to annotators
    made_with: str = ""  # the thresholds its items are made under: a stored item made under others is redone
    unmatched: tuple[str, ...] = ()  # controls of the model's task whose labels match none of its classes

    @property
    def image_keys(self) -> list[str]:
        return sorted({c.control.image_key for c in self.controls})

    def decode_side(self, key: str) -> int | None:
        """The longer side every model reading image `key` resizes it to (`adapter.decode_side`), so that a large
        JPEG may be decoded smaller; None when one of them needs the whole image."""
        sides = [getattr(p.adapter, "decode_side", None) for p in self.controls if p.control.image_key == key]
        return max(sides) if sides and all(sides) else None

    def unserved_controls(self) -> list[str]:
        """Tags of the config this model leaves to the annotator: ones of another task, and ones Tandem never fills."""
        served = {planned.control.name for planned in self.controls}
        return [c.title + (" (none of its labels matches a model class)" if c.name in self.unmatched else "")
                for c in self.config.controls if c.name not in served] + list(self.config.ignored)

    def unmapped_choice_classes(self) -> dict[str, list[str]]:
        """{Choices control: the classifier's classes that map to none of its labels}: an image the model sees
        as one of them gets no pre-annotation there (`pool_choice`)."""
        out = {}
        for planned in self.controls:
            if planned.control.kind == ControlKind.CHOICES:
                unmapped = [c for c in planned.adapter.class_names if planned.labels.label(c) is None]
                if unmapped:
                    out[planned.control.name] = unmapped
        return out

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
    adapter: Model,
    label_config: str,
    label_map: Mapping[str, str] | None = None,
    case_sensitive: bool = False,
    prompts: Mapping[str, str] | None = None,
    min_confidence: float = 0.0,
) -> ServingPlan:
    """Raise ConfigError naming what cannot be served, before any image is fetched.

    A YOLO model fills the controls its task fits, mapping its classes onto their labels. A VLM is bound to
    each control it can fill, with that control's labels as its vocabulary (`prompts` rewords a label).
    """
    config = _cached_config(label_config)
    tasks = served_tasks(adapter)
    planned: list[PlannedControl] = []
    unmatched: list[tuple[str, str]] = []  # (control, why): of the model's task, but no label matches a class
    for control in config.controls:
        task = next((t for t in TASK_PREFERENCE if t in tasks and t in WRITERS[control.kind].tasks), None)
        if task is None:
            continue
        vocabulary = Vocabulary.from_labels([lab.value for lab in control.labels], prompts)
        bound: ModelAdapter = bind(adapter, task, vocabulary)  # a promptable model asks about this control's labels
        try:
            labels = build_label_map(control, bound.class_names, label_map, case_sensitive)
        except ConfigError as exc:  # another control may still be served: this one is left to the annotator
            unmatched.append((control.name, str(exc)))
            continue
        planned.append(PlannedControl(control, labels, bound))
    if not planned and unmatched:
        raise ConfigError(unmatched[0][1])
    if not planned:
        wanted = ", ".join(c.title for c in config.controls)
        kind = "VLM" if is_promptable(adapter) else "YOLO"
        raise ConfigError(
            f"model {adapter.name} is a {kind} {describe(adapter)} model and cannot fill {wanted}; "
            "a project needs a detect model for RectangleLabels, segment for PolygonLabels, classify for Choices: "
            "bind this project its own (tandem models bind --project ID --model WEIGHTS, or the backend's extra "
            "params {\"model\": ...}; `tandem train-starter --task segment|classify` makes one), or serve one "
            "by default (tandem serve --model WEIGHTS)"
        )
    fp = fingerprint(label_config, dict(label_map or {}), dict(prompts or {}), case_sensitive)
    return ServingPlan(config, tuple(planned), adapter.version, adapter.name, fp, min_confidence,
                       made_with(adapter, min_confidence), tuple(name for name, _ in unmatched))


def made_with(adapter: Model, min_confidence: float) -> str:
    """A stamp of what shapes a model's items besides its weights: the serving threshold and a VLM's own
    thresholds (a zero-shot detector's, SAM 3's). It is not part of the store's key, which the two models of a
    task share by design (the scorer pairs them by it): the serving cache checks it instead."""
    found: dict[str, Any] = {"min_confidence": min_confidence}
    options = getattr(adapter, "options", None)
    if options is not None and hasattr(options, "__dataclass_fields__"):
        found.update({k: v for k, v in vars(options).items() if k != "batch_size" and isinstance(v, (int, float))})
    for name in ("threshold", "text_threshold", "iou", "max_det"):
        value = getattr(adapter, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            found[name] = value
    return fingerprint(found)


def image_url(task: Mapping[str, Any], key: str) -> str | None:
    data = task.get("data") if isinstance(task, Mapping) else None
    if not isinstance(data, Mapping):
        return None
    value = data.get(key)
    if value is None:
        value = data.get("$undefined$")  # file uploads before Label Studio renames the key
    if value is None:
        return INVALID_TASK_PREFIX + (f"the task's data has no {key!r} field (the labeling config's image reads "
                                      f"${key})")
    if not isinstance(value, str):  # the fetcher says why, per task, instead of "no image URL"
        return INVALID_TASK_PREFIX + f"the task's data.{key} must be an image URL (text), not {type(value).__name__}"
    return value


def not_queued(version: str, project_id: int | None) -> dict[str, Any]:
    """A task past the time budget that the full background queue could not take: nothing computes it."""
    where = f" --project {project_id}" if project_id is not None else ""
    return {"error": "not predicted: past the time budget, and Tandem's background queue is full; `tandem "
                     f"predict{where}` predicts a whole project as a job", "model_version": version}


def still_computing(version: str, done: int, total: int) -> dict[str, Any]:
    return {
        "error": f"Tandem is still computing this prediction ({done} of {total} finished within the time budget); "
                 "run Retrieve predictions again in a minute",
        "model_version": version,
    }


class Predictor:
    """Fetches concurrently (I/O-bound), then runs each adapter once per chunk of images."""

    def __init__(self, fetcher: MediaFetcher, workers: int = 8, store: PredictionRepo | None = None,
                 max_chunk: int = 64, on_stored: Callable[[list[PredictionRow]], None] | None = None) -> None:
        self.fetcher = fetcher
        self.store = store
        self._outage = OutageLog(log, "reading stored predictions (predicting instead)")
        self.max_chunk = max_chunk
        self.on_stored = on_stored  # called on the store's writer thread once rows are written (scoring)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tandem-fetch")
        self._seconds_per_task: dict[str, float] = {}  # model version -> running estimate

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    def _fetch(self, task: Mapping[str, Any], key: str, deadline: float | None = None,
               min_side: int | None = None) -> LoadedImage | MediaError:
        try:
            return self.fetcher.load(image_url(task, key) or "", task_id=task.get("id"), deadline=deadline,
                                     min_side=min_side)
        except MediaError as exc:
            return exc

    def _keys(self, tasks: Sequence[Mapping[str, Any]], plan: ServingPlan) -> list[tuple[int, str, str] | None]:
        return [task_key(task, plan) for task in tasks]

    def predict_chunk(self, tasks: Sequence[Mapping[str, Any]], plan: ServingPlan) -> list[dict[str, Any]]:
        return [item for item, _ in self.predict_typed(tasks, plan)]

    def predict_typed(self, tasks: Sequence[Mapping[str, Any]], plan: ServingPlan, role: str = Role.PRE_ANNOTATION,
                      embed: bool = False, deadline: float | None = None
                      ) -> list[tuple[dict[str, Any], dict[str, Prediction]]]:
        """Per task: the Label Studio item and {control: Prediction in the control's labels} ({} on error).
        `embed` adds the model's image embedding to the first control's predictions (for diversity)."""
        keys = plan.image_keys
        sides = {key: plan.decode_side(key) for key in keys}
        jobs = [(i, key) for i in range(len(tasks)) for key in keys]
        if len(jobs) == 1:  # a task being opened: no thread hop
            loaded = {jobs[0]: self._fetch(tasks[0], jobs[0][1], deadline, sides[jobs[0][1]])}
        else:
            loaded = dict(zip(jobs, self._pool.map(lambda j: self._fetch(tasks[j[0]], j[1], deadline, sides[j[1]]),
                                                   jobs), strict=True))

        outputs: dict[tuple[int, int, str], Any] = {}
        for c_idx, planned in enumerate(plan.controls):
            good = [i for i in range(len(tasks)) if isinstance(loaded[(i, planned.control.image_key)], LoadedImage)]
            images = [loaded[(i, planned.control.image_key)].image for i in good]
            for i, out in zip(good, planned.adapter.predict(images) if images else [], strict=True):
                # an image decoded smaller (LoadedImage.scale): its boxes back in the whole image's pixels
                outputs[(c_idx, i, planned.control.image_key)] = out.scaled(*loaded[(i, planned.control.image_key)].scale)

        typed: dict[tuple[int, int], Prediction] = {}
        for c_idx, planned in enumerate(plan.controls):
            idx = [i for i in range(len(tasks)) if (c_idx, i, planned.control.image_key) in outputs]
            pooled = planned.in_labels([outputs[(c_idx, i, planned.control.image_key)] for i in idx], plan.version,
                                       role)
            if embed and c_idx == 0 and idx and Capability.EMBED in getattr(planned.adapter, "capabilities", ()):
                vectors = planned.adapter.embed([loaded[(i, planned.control.image_key)].image for i in idx])
                pooled = [p.with_meta(embedding=np.asarray(v, dtype=np.float32)) for p, v in zip(pooled, vectors,
                                                                                                  strict=True)]
            typed.update({(c_idx, i): p for i, p in zip(idx, pooled, strict=True)})

        items: list[tuple[dict[str, Any], dict[str, Prediction]]] = []
        for i, task in enumerate(tasks):
            errors = [str(loaded[(i, k)]) for k in keys if isinstance(loaded[(i, k)], MediaError)]
            if errors:
                said = clip("; ".join(errors), 500)  # a data: URI or a huge URL is not repeated whole
                log.warning("task %s: %s", task.get("id") if isinstance(task, Mapping) else None, said)
                items.append(({"error": said, "model_version": plan.version}, {}))
                continue
            regions = []
            for c_idx, planned in enumerate(plan.controls):
                image = loaded[(i, planned.control.image_key)]
                writer = WRITERS[planned.control.kind]
                output = shown(outputs[(c_idx, i, planned.control.image_key)], plan.min_confidence)
                regions.extend(writer.regions(planned.control, planned.labels, output, planned.adapter.class_names,
                                              image.size))
            controls = {planned.control.name: typed[(c_idx, i)] for c_idx, planned in enumerate(plan.controls)}
            items.append(({"result": regions, "score": prediction_score(regions), "model_version": plan.version},
                          controls))
        return items

    def predict(
        self,
        tasks: Sequence[Mapping[str, Any]],
        plan: ServingPlan,
        deadline: float | None = None,
        on_overflow: Callable[[list[Mapping[str, Any]]], Sequence[Mapping[str, Any]] | None] | None = None,
        project_id: int | None = None,
        role: str = "pre-annotation",
        embed: bool = False,
    ) -> list[dict[str, Any]]:
        """One item per task. `deadline` is a time.monotonic() value; tasks past it go to `on_overflow`, which
        returns those it could not take."""
        keys = self._keys(tasks, plan)
        items: list[dict[str, Any] | None] = [None] * len(tasks)
        if self.store is not None:
            cached = self._stored([k for k in keys if k is not None], plan.made_with or None)
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
            # a download may run past the budget by a grace (the first chunk always runs), never past Label Studio's
            fetch_deadline = None if deadline is None else deadline + DOWNLOAD_GRACE_S
            chunk_items = self.predict_typed([tasks[i] for i in chunk], plan, role, embed, fetch_deadline)
            took = (time.monotonic() - started) / len(chunk)
            self._seconds_per_task[plan.version] = took if per_task is None else 0.5 * per_task + 0.5 * took
            for i, (item, _) in zip(chunk, chunk_items, strict=True):
                items[i] = item
            self._save([(keys[i], typed) for i, typed in zip(chunk, chunk_items, strict=True)], plan, project_id, role)
            done += len(chunk)
        rest = todo[done:]
        if rest:
            log.info("%s: %d of %d tasks left for the background after the time budget", plan.version, len(rest),
                     len(tasks))
            for i in rest:
                items[i] = still_computing(plan.version, len(tasks) - len(rest), len(tasks))
            if on_overflow is not None:
                refused = {id(t) for t in on_overflow([tasks[i] for i in rest]) or ()}
                for i in rest:
                    if id(tasks[i]) in refused:
                        items[i] = not_queued(plan.version, project_id)
        return items  # type: ignore[return-value]

    def _stored(self, keys: list, made_with: str | None = None) -> dict:
        """Stored items by key; none while the database does not answer (the tasks are predicted instead)."""
        try:
            found = self.store.get_items(keys, made_with)
        except Exception as exc:  # noqa: BLE001 - only an unavailable database is passed over
            if not is_unavailable(exc):
                raise
            self._outage.failed(exc)
            return {}
        self._outage.ok()
        return found

    def _save(self, pairs, plan: ServingPlan, project_id: int | None, role: str) -> None:
        if self.store is None:
            return
        rows = [PredictionRow(key[0], key[1], key[2], project_id, plan.name, str(role), item, controls,
                              plan.made_with or None)
                for key, (item, controls) in pairs if key is not None and "result" in item]
        if rows:
            self.store.put_many_later(rows, then=self.on_stored)


def shown(output: Prediction, min_confidence: float) -> Prediction:
    """What annotators see: the boxes at or above the serving threshold (fainter candidates stay stored)."""
    det = output.detections
    if not min_confidence or det is None or det.confidence is None or not len(det):
        return output
    keep = det.confidence >= min_confidence
    return output if keep.all() else output.with_meta(detections=det[keep])


def task_key(task: Mapping[str, Any], plan: ServingPlan) -> tuple[int, str, str] | None:
    """The store key of a task under a plan; a task without an id (Label Studio's test call) is never cached.
    The fingerprint depends on the plan's config, label map and prompts and the task's image URLs, not on the
    model: both models' predictions of one task share it."""
    tid = task.get("id") if isinstance(task, Mapping) else None
    if not isinstance(tid, int) or isinstance(tid, bool) or not 0 <= tid < 2**63:
        return None
    urls = [image_url(task, k) for k in plan.image_keys]
    return (tid, plan.version, fingerprint(plan.fingerprint, urls))
