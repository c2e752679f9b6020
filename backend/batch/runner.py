"""Wires a predict job for one project from Tandem's settings and state, as the server would serve it: the
project's bound model (or `--model`), its label map and prompts, its Label Studio credentials. Used by
`tandem predict` and by the process `POST /predict-jobs` starts."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from backend.batch.bulk_write import LabelStudioWriter
from backend.batch.predict_job import Cancelled, JobOptions, PredictJob
from backend.batch.records import ActiveJobExists, Job, PredictJobs, Progress, new_holder_id
from backend.batch.tasks import LabelStudioTasks
from backend.errors import ConfigError
from backend.media.policy import setup_credentials
from backend.predict import ServingPlan, plan_for
from backend.settings import Settings

log = logging.getLogger("tandem.batch")


@dataclass(frozen=True)
class Prepared:
    plan: ServingPlan
    adapter: Any
    spec: str
    url: str
    token: str


def model_spec(settings: Settings, project_id: int, model: str | None = None) -> str:
    """`--model`, else what serves the project: its binding for its pre-annotator role, else what the server
    last served it, else the default the registry last served."""
    from backend.registry import Registry
    from backend.storage.projects import ProjectRepo

    if model:
        return model
    state = ProjectRepo(settings.database_url).get(project_id)
    pre = (state.pre_annotator if state and state.pre_annotator else None) or settings.pre_annotator
    if state is not None:
        bound = state.model if pre == "cnn" else state.second_opinion
        served = state.served_model if pre == "cnn" else state.served_second_opinion
        if bound or served:
            return bound or served  # type: ignore[return-value]
    last = Registry(settings.database_url).last_served("cnn" if pre == "cnn" else None)
    if last is not None and last.path:
        return last.path
    if pre == "vlm" and settings.vlm:
        return settings.vlm
    raise ConfigError(f"project {project_id} has no bound model and this TANDEM_HOME served none: pass --model "
                      "WEIGHTS (or bind one: tandem models bind)")


def prepare(settings: Settings, project_id: int, model: str | None = None, client=None) -> Prepared:
    """Loads the model and plans the project's labeling config exactly as /predict does (same keys)."""
    from label_studio_sdk import LabelStudio

    from backend.registry import Registry
    from backend.server.projects import load_spec
    from backend.storage.projects import ProjectRepo

    state = ProjectRepo(settings.database_url).get(project_id)
    pair = setup_credentials(settings.label_studio_url, settings.label_studio_api_key,
                             state.hostname if state else None, state.access_token if state else None)
    if pair is None or not pair[1]:
        raise ConfigError("set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (or connect the project to `tandem serve` "
                          "once, so its /setup credentials are known)")
    url, token = pair
    client = client or LabelStudio(base_url=url, api_key=token)
    label_config = client.projects.get(project_id).label_config  # a wrong id fails here, before a model loads
    spec = model_spec(settings, project_id, model)
    adapter = load_spec(settings, Registry(settings.database_url), spec)
    plan = plan_for(adapter, label_config, {**settings.label_map, **(state.label_map if state else {})},
                    settings.case_sensitive_labels, {**settings.vlm_prompts, **(state.prompts if state else {})},
                    min_confidence=settings.conf)
    return Prepared(plan, adapter, spec, url, token)


def _show_version(settings: Settings, client, project_id: int, result: Progress) -> None:
    """A job run with what serves the project makes its version the project's `model_version` (Label Studio's
    score column and sorting count only that version's predictions): the server would otherwise set it only
    at the project's next /predict or /setup."""
    if not result.done or not result.model_version:
        return
    from backend.labelstudio.errors import describe
    from backend.labelstudio.version_sync import show_version
    from backend.registry import Registry

    try:
        show_version(client, Registry(settings.database_url), project_id, result.model_version)
    except Exception as exc:  # noqa: BLE001 - the predictions are in; the version follows at the next /predict
        log.warning("project %s: could not set model_version to %s (%s); the server sets it at the project's next "
                    "/predict", project_id, result.model_version, describe(exc, settings.label_studio_url))


def open_job(records: PredictJobs, project_id: int, runner: str, params: dict[str, Any], holder: str,
             job_id: int | None = None, handed_by: str | None = None) -> Job:
    """The job to run, claimed under `holder`: `job_id`, else the project's job whose runner is gone (taken
    over), else a new one. A live runner's job is an error naming it: two runners never work one project."""
    if job_id is not None:
        job = records.get(job_id)
        if job is None:
            raise ConfigError(f"no predict job {job_id}")
    else:
        job = records.resumable(project_id)
        if job is None:
            try:
                created = records.create(project_id, runner, params, holder=holder)
                records.store.start(created.id)
                return records.get(created.id)  # type: ignore[return-value]
            except ActiveJobExists as exc:
                job = exc.active
    if not records.claim(job.id, holder, handed_by):
        current = records.get(job.id) or job
        raise ConfigError(f"predict job {job.id} on project {project_id} is {current.status.value}"
                          + (f", held by {current.holder} until {time.strftime('%H:%M:%S', time.localtime(current.lease_until))}"
                             if current.status.active and current.holder and current.lease_until else ""))
    return records.get(job.id)  # type: ignore[return-value]


def run_project(settings: Settings, project_id: int, *, model: str | None = None, options: JobOptions = JobOptions(),
                runner: str = "local", job_id: int | None = None,
                on_progress: Callable[[Progress], None] | None = None,
                on_job: Callable[[Job], None] | None = None, handed_by: str | None = None,
                engine: str = "auto") -> tuple[Job, Progress]:
    """Claim (or create) the job, run it to the end, record the outcome. Raises what stopped it.
    `engine` (local runner): pipeline (GPU decode from bytes), adapter, or auto (backend/batch/gpu_engine.py)."""
    from label_studio_sdk import LabelStudio

    from backend.batch.gpu_engine import ENGINES, choose_engine, pipeline_chunk_predictor, pipeline_for
    from backend.media.fetch import MediaFetcher
    from backend.storage.predictions import PredictionRepo

    if engine not in ENGINES:
        raise ConfigError(f"unknown predict engine {engine!r}: {', '.join(ENGINES)}")
    if runner == "modal":  # refused before a model loads or a job opens
        from infra.modal_runner import require_modal_credentials

        require_modal_credentials("infra/modal_predict.py")
    records = PredictJobs(settings.database_url)
    params = {"model": model, "concurrency": options.concurrency, "batch": options.batch, "engine": engine}
    holder = new_holder_id()
    # A job the caller did not name is opened only once the project and model are known to work: a wrong
    # project id or an unreachable Label Studio leaves no failed record behind. A named job (the server's, or
    # `--job`) exists already, so what stops it is recorded on it.
    prepared = prepare(settings, project_id, model) if job_id is None else None
    job = open_job(records, project_id, runner, params, holder, job_id, handed_by)
    if on_job:
        on_job(job)
    log.info("predict job %s on project %s (%s)", job.id, project_id, holder)
    last_write = [0.0]
    lost = [False]
    shown_start = [False]

    def progress(p: Progress) -> None:
        now = time.monotonic()
        first = not shown_start[0] and p.done + p.failed > 0  # the first finished chunk shows at once: it runs
        # the counts and the lease, twice a second at most
        if now - last_write[0] >= 0.5 or p.remaining == 0 or first:
            lost[0] = not records.set_progress(job.id, holder, p.as_dict()) or lost[0]
            last_write[0] = now
            shown_start[0] = shown_start[0] or p.done + p.failed > 0
        if on_progress:
            on_progress(p)

    def cancelled() -> bool:  # cancelled, or the lease was taken by another runner: stop after this chunk
        return lost[0]

    store = pipeline = None
    try:
        prepared = prepared or prepare(settings, project_id, model)
        client = LabelStudio(base_url=prepared.url, api_key=prepared.token)
        media = settings.media()
        media.label_studio_url, media.api_key = prepared.url, prepared.token
        store = PredictionRepo(settings.database_url)
        fetcher = MediaFetcher(media)
        if runner == "modal":
            from infra.modal_predict import modal_chunk_predictor

            chunk, encoded = modal_chunk_predictor(prepared.plan, prepared.spec, job.id), False
        elif choose_engine(engine, prepared.adapter) == "pipeline":
            pipeline = pipeline_for(prepared.adapter, media.max_pixels)
            chunk, encoded = pipeline_chunk_predictor(prepared.plan, pipeline, options.role), True
        else:
            chunk, encoded = None, False
        log.info("predict job %s: %s engine", job.id, "GPU pipeline" if pipeline is not None else runner + " adapter")
        work = PredictJob(prepared.plan, LabelStudioTasks(client, project_id), fetcher, store,
                          LabelStudioWriter(client, project_id), project_id, options, progress, cancelled, chunk,
                          encoded=encoded)
        result = work.run()
        fetcher.close()
        if model is None:  # what serves the project, not a one-off `--model`
            _show_version(settings, client, project_id, result)
    except Cancelled:
        log.warning("predict job %s stopped: cancelled, or its lease was taken", job.id)
        return records.get(job.id), work.progress  # type: ignore[return-value]
    except BaseException as exc:
        from backend.labelstudio.errors import describe  # one line: an SDK error's text carries the session cookie

        records.finish(job.id, "failed", error=describe(exc, settings.label_studio_url))
        raise
    finally:
        if store is not None:
            store.close()
        if pipeline is not None:
            pipeline.close()
    records.set_progress(job.id, holder, result.as_dict())
    records.finish(job.id, "succeeded")
    return records.get(job.id), result  # type: ignore[return-value]
