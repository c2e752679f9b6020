"""Triggers -> jobs -> promoted versions -> the server swaps models. Lives inside the server process.

- Annotation webhooks are counted per project; after `train_after` new corrections a job is queued.
- START_TRAINING (the Train button), `POST /train`, `tandem train` and the periodic schedule queue one
  directly.
- One job per project at a time: triggers that arrive while one runs coalesce into a single follow-up.
- A watcher notices newly promoted (or rolled-back-to) versions in the registry, loads them in the
  background and swaps them in; a failed load keeps the current model.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from backend.registry import Registry
from backend.serving import ModelHolder
from backend.settings import Settings
from backend.training.jobs import Job, JobStatus, JobStore
from backend.training.runner import LocalRunner, mark_orphans

log = logging.getLogger("tandem.training")

ANNOTATION_EVENTS = {"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED"}


@dataclass
class TrainingPolicy:
    train_after: int = 10  # new corrections before a job is queued automatically
    interval_s: float = 0.0  # periodic retrain of projects with new corrections (0 = off)
    default_runner: str = "local"
    params: dict | None = None


class TrainingService:
    def __init__(
        self,
        settings: Settings,
        holder: ModelHolder,
        registry: Registry,
        policy: TrainingPolicy | None = None,
        loader: Callable[[str], object] | None = None,
        watch_interval_s: float = 1.0,
        vlm_holder: ModelHolder | None = None,
    ) -> None:
        self.settings, self.holder, self.registry = settings, holder, registry
        self.vlm_holder = vlm_holder
        self.policy = policy or TrainingPolicy()
        self.store = JobStore(settings.db_path)
        mark_orphans(self.store)
        self.runner = LocalRunner(settings, self.store, on_done=self._on_done,
                                  max_concurrent=getattr(settings, "max_training_jobs", None))
        self._loader = loader
        self._lock = threading.Lock()
        self._pending: dict[int, str] = {}  # project -> reason of the coalesced follow-up
        self._seen_change = self._latest_change()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._watch, args=(watch_interval_s,), daemon=True,
                                          name="tandem-version-watch")]
        if self.policy.interval_s > 0:
            self._threads.append(threading.Thread(target=self._schedule, daemon=True, name="tandem-train-schedule"))
        for t in self._threads:
            t.start()

    # -- triggers -----------------------------------------------------------------------------------
    def on_webhook(self, action: str, project_id: int | None, key: str | None = None) -> Job | None:
        """`key` names the delivery (annotation id and update time): a repeated one is not counted again."""
        if project_id is None:
            return None
        if action == "START_TRAINING":
            return self.trigger(project_id, "Train button (START_TRAINING)")
        if action in ANNOTATION_EVENTS:
            with self._lock:  # the count lives in TANDEM_HOME: a restart keeps it
                due = self.store.add_correction(project_id, key) >= self.policy.train_after
            if due:
                return self.trigger(project_id, f"{self.policy.train_after} new corrections")
        return None

    def trigger(self, project_id: int, reason: str, runner: str | None = None, model_kind: str = "yolo",
                params: dict | None = None) -> Job:
        """Queue a job, or fold this trigger into the follow-up of the one already active."""
        runner = runner or self.policy.default_runner
        if runner == "modal":
            from infra.modal_runner import require_modal_credentials

            require_modal_credentials()  # a clear error now, not a job that fails a minute later
        with self._lock:
            active = self.store.active(project_id)
            if active:
                self._pending[project_id] = reason
                log.info("project %s: job %s active, '%s' coalesced into the next run", project_id, active[0].id,
                         reason)
                return active[0]
            self.store.reset_corrections(project_id)
            defaults = (self.policy.params or {}) if model_kind == "yolo" else {}  # YOLO's epochs are not LoRA's
            job = self.store.create(project_id, model_kind, runner, reason, {**defaults, **(params or {})})
        self.runner.start(job)  # a local process either way; for "modal" it drives the remote H100
        log.info("project %s: job %s queued (%s, %s runner)", project_id, job.id, reason, runner)
        return job

    def cancel(self, job_id: int) -> bool:
        return self.runner.cancel(job_id)

    def _on_done(self, job: Job) -> None:
        log.info("job %s %s%s", job.id, job.status.value, f": {job.error.splitlines()[0]}" if job.error else "")
        with self._lock:
            follow_up = self._pending.pop(job.project_id, None)
        if follow_up and job.status is not JobStatus.CANCELLED:
            self.trigger(job.project_id, f"coalesced: {follow_up}", runner=job.runner, model_kind=job.model_kind,
                         params=job.params)

    def _schedule(self) -> None:
        while not self._stop.wait(self.policy.interval_s):
            with self._lock:
                due = self.store.projects_with_corrections()
            for project_id in due:
                self.trigger(project_id, "schedule")

    # -- serving the promoted version ---------------------------------------------------------------
    def _latest_change(self) -> float:
        return max((v.promoted_at or 0 for v in self.registry.versions()), default=0.0)

    def _watch(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.check_promotions()
            except Exception:  # noqa: BLE001 - the watcher must outlive any bad row or file
                log.exception("version watcher")

    def check_promotions(self) -> threading.Thread | None:
        change = self._latest_change()
        if change <= self._seen_change:
            return None
        self._seen_change = change
        started = None
        for kind, holder in (("vlm", self.vlm_holder), ("cnn", self.holder)):
            target = self.registry.current(kind)
            current = holder.adapter if holder is not None else None
            if holder is None or target is None or not target.path or (
                    current is not None and current.version == target.version):
                continue
            log.info("serving %s (was %s)", target.version, current.version if current else None)
            loader = self._vlm_loader if kind == "vlm" else (self._loader or self._default_loader)
            started = holder.load_in_background(lambda t=target, f=loader: f(t.path))
        return started

    def _vlm_loader(self, path: str):
        from backend.models.vlm.loader import load_vlm

        return load_vlm(path, device=self.settings.device)

    def _default_loader(self, path: str):
        return self.settings.load_cnn(path)  # served as the first version was: same engine, size, threshold


    def close(self) -> None:
        self._stop.set()
        self.runner.close()
