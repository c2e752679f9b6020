"""Triggers -> jobs -> promoted versions -> the server swaps models. Lives inside the server process.

- Annotation webhooks are counted per project in the database (every replica adds to one count); the one
  caller whose `take_corrections` resets a count that reached `train_after` queues the job.
- START_TRAINING (the Train button), `POST /train`, `tandem train` and the periodic schedule queue one
  directly.
- One job per project at a time, enforced by the database's unique index: a trigger that finds one active
  records itself as that job's follow-up (in the job's row), and whoever sees the job end queues it once.
- A watcher polls the registry for newly promoted (or rolled-back-to) versions — made by this replica or
  any other — loads their weights through the artifact store in the background and swaps them in; a failed
  load keeps the current model. A version promoted into a project's binding starts loading into the model
  pool at once; the project is served it from its first request after the load.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from backend.registry import Registry
from backend.serving import ModelHolder
from backend.settings import Settings
from backend.storage.artifacts import ArtifactStore
from backend.storage.outage import is_unavailable
from backend.training.jobs import ActiveJobExists, Job, JobStatus, JobStore
from backend.training.runner import LocalRunner, reap_abandoned

log = logging.getLogger("tandem.training")

PROMOTED_BINDING_POLL_S = 5.0
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
        self.store = JobStore(settings.database_url)
        self.artifacts = ArtifactStore.from_settings(settings)
        reap_abandoned(self.store)
        self.runner = LocalRunner(settings, self.store, on_done=self._on_done,
                                  max_concurrent=getattr(settings, "max_training_jobs", None))
        self._loader = loader
        # called with a project id when a version was promoted into its binding (or rolled back), so the
        # server starts loading it now rather than at the project's next request (set by create_app)
        self.on_project_promotion: Callable[[int], None] | None = None
        self._promoted_projects: dict[int, float] = {}  # project id -> until when its binding is looked at
        self._lock = threading.Lock()
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
            if key is None:  # Label Studio's deliveries always name their annotation(s): not a correction
                log.info("project %s: %s webhook names no annotation: not counted", project_id, action)
                return None
            self.store.add_correction(project_id, key)  # in the database: restarts and replicas share it
            if self.store.take_corrections(project_id, self.policy.train_after):  # true for one caller only
                return self.trigger(project_id, f"{self.policy.train_after} new corrections", automatic=True)
        return None

    def trigger(self, project_id: int, reason: str, runner: str | None = None, model_kind: str = "yolo",
                params: dict | None = None, automatic: bool = False) -> Job:
        """Queue a job, or fold this trigger into the follow-up of the one already active. An `automatic`
        trigger (corrections counted, schedule) does not replace a follow-up someone asked for: any follow-up
        trains on every correction so far."""
        runner = runner or self.policy.default_runner
        if runner == "modal":
            from infra.modal_runner import require_modal_credentials

            require_modal_credentials()  # a clear error now, not a job that fails a minute later
        if model_kind == "vlm":
            from backend.training.worker import vlm_base

            vlm_base(self.settings, self.registry, project_id)  # likewise: nothing to adapt
        defaults = (self.policy.params or {}) if model_kind == "yolo" else {}  # YOLO's epochs are not LoRA's
        try:
            job = self.store.create(project_id, model_kind, runner, reason, {**defaults, **(params or {})},
                                    kind="train", holder=self.runner.holder, lease_s=self.runner.lease_s)
        except ActiveJobExists as exists:
            active = exists.active
            spec = {"runner": runner, "model_kind": model_kind, "params": params or {}}
            if self.store.set_follow_up(active.id, reason, spec, keep_existing=automatic):
                log.info("project %s: job %s active, '%s' coalesced into the next run", project_id, active.id,
                         reason)
                return self.store.get(active.id) or active
            return self.trigger(project_id, reason, runner, model_kind, params, automatic)  # it ended meanwhile
        try:
            self.store.reset_corrections(project_id)
            self.runner.start(job)  # a local process either way; for "modal" it drives the remote H100
        except Exception as exc:  # noqa: BLE001 - only an unavailable database: the job exists, say so
            if not is_unavailable(exc):
                raise
            log.warning("project %s: job %s was created, but the database stopped answering before it started; a "
                        "runner takes it over once its lease runs out", project_id, job.id)
            return job
        log.info("project %s: job %s queued (%s, %s runner)", project_id, job.id, reason, runner)
        return job

    def cancel(self, job_id: int) -> bool:
        return self.runner.cancel(job_id)

    def _on_done(self, job: Job) -> None:
        said = job.error.splitlines()[0] if job.error else ""
        log.info("job %s %s%s", job.id, job.status.value, f": {said}" if said and said != job.status.value else "")
        # `job` was read after it ended (the reaper, reap_abandoned): its follow-up spec can no longer change
        follow_up = self.store.take_follow_up(job.id)  # once, whichever replica saw it end
        if follow_up and job.status is not JobStatus.CANCELLED:
            # no spec: folded in by a version before 0003 stored the trigger, so run as the job before it
            spec = job.follow_up_spec or {"runner": job.runner, "model_kind": job.model_kind, "params": job.params}
            self.trigger(job.project_id, f"coalesced: {follow_up}", runner=spec["runner"],
                         model_kind=spec["model_kind"], params=spec["params"])

    def _schedule(self) -> None:
        while not self._stop.wait(self.policy.interval_s):
            for project_id in self.store.projects_with_corrections():
                self.trigger(project_id, "schedule", automatic=True)

    # -- serving the promoted version ---------------------------------------------------------------
    def _latest_change(self) -> float:
        return self.registry.latest_promotion()

    def _watch(self, interval: float) -> None:
        from backend.storage.outage import OutageLog

        outage = OutageLog(log, "version watcher")
        while not self._stop.wait(interval):
            try:
                self.check_promotions()
                outage.ok()
            except Exception as exc:  # noqa: BLE001 - the watcher must outlive any bad row or file
                outage.failed(exc)

    def check_promotions(self) -> threading.Thread | None:
        change = self._latest_change()
        previous, self._seen_change = self._seen_change, max(change, self._seen_change)
        if change > previous and self.on_project_promotion is not None:
            now = time.monotonic()
            for v in self.registry.versions():
                if v.project_id is not None and (v.promoted_at or 0) > previous:
                    # a job records the promotion, then the binding: asked again for a few polls
                    self._promoted_projects[v.project_id] = now + PROMOTED_BINDING_POLL_S
        self._load_promoted_bindings()
        if change <= previous:
            return None
        started = None
        for kind, holder in (("vlm", self.vlm_holder), ("cnn", self.holder)):
            target = self.registry.current(kind)
            current = holder.adapter if holder is not None else None
            if holder is None or target is None or not target.path or (
                    current is not None and current.version == target.version):
                continue
            log.info("serving %s (was %s)", target.version, current.version if current else None)
            loader = self._vlm_loader if kind == "vlm" else (self._loader or self._default_loader)
            started = holder.load_in_background(lambda t=target, f=loader: f(str(self.artifacts.local_path(t.path))))
        return started

    def _load_promoted_bindings(self) -> None:
        if self.on_project_promotion is None:
            return
        now = time.monotonic()
        for project_id, until in list(self._promoted_projects.items()):
            if now > until:
                self._promoted_projects.pop(project_id, None)
                continue
            try:
                self.on_project_promotion(project_id)  # a no-op once the bound version is loaded or loading
            except Exception as exc:  # noqa: BLE001 - the next request for the project loads it anyway
                self._promoted_projects.pop(project_id, None)
                log.warning("project %s: could not start loading its promoted version (%s)", project_id, exc)

    def _vlm_loader(self, path: str):
        from backend.models.vlm.loader import load_vlm

        return load_vlm(path, device=self.settings.device)

    def _default_loader(self, path: str):
        return self.settings.load_cnn(path)  # served as the first version was: same engine, size, threshold


    def close(self) -> None:
        self._stop.set()
        self.runner.close()
