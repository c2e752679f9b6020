"""The FastAPI app Label Studio talks to: /health, /setup, /predict, /webhook, /versions.

Label Studio's timeouts shape it: /health (1 s) and /setup (3 s) never touch the model; /webhook (1 s)
only records the event; /predict runs in the thread pool and returns one item per task.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from backend.errors import ConfigError, TandemError
from backend.labelstudio.version_sync import SyncRequest, VersionSync
from backend.media.fetch import MediaFetcher
from backend.models.base import ModelAdapter
from backend.predict import Predictor, describe, plan_for, registry_task
from backend.prediction_store import PredictionStore
from backend.registry import Registry
from backend.server.deferred import DeferredPredictions
from backend.server.metrics import Metrics, MetricsMiddleware
from backend.server.protocol import (
    HealthResponse,
    PredictRequest,
    PredictResponse,
    SetupRequest,
    SetupResponse,
    TrainRequest,
    VersionsResponse,
    WebhookRequest,
    project_id,
)
from backend.serving import ModelHolder
from backend.settings import Settings, extra_setting
from backend.training.runner import log_path, tail
from backend.training.service import TrainingPolicy, TrainingService

log = logging.getLogger("tandem.server")

PREDICT_WAIT_FOR_MODEL_S = 60.0


WEBHOOK_SECRET_HEADER = "X-Tandem-Webhook-Secret"


def _auth_dependency(settings: Settings):
    """Basic auth on every route when set. Label Studio's annotation webhooks cannot send basic auth, so
    /webhook also takes a shared secret header (add it to the project webhook's headers)."""
    expected = settings.basic_auth
    secret = settings.webhook_secret
    security = HTTPBasic(auto_error=False)

    async def check(request: Request, credentials: HTTPBasicCredentials | None = Depends(security)) -> None:
        """Async: it does no I/O, and a sync dependency would cost every request a thread-pool hop."""
        if request.url.path == "/webhook" and secret is not None:
            given = request.headers.get(WEBHOOK_SECRET_HEADER, "")
            if secrets.compare_digest(given.encode(), secret.encode()):
                return
            if expected is None:
                raise HTTPException(status.HTTP_401_UNAUTHORIZED, f"{WEBHOOK_SECRET_HEADER} header required")
        if expected is None:
            return
        ok = credentials is not None and (
            secrets.compare_digest(credentials.username.encode(), expected[0].encode())
            & secrets.compare_digest(credentials.password.encode(), expected[1].encode())
        )
        if not ok:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "basic auth required", {"WWW-Authenticate": "Basic"})

    return check


def _merged(base: dict[str, str], extra: Any, key: str) -> dict[str, str]:
    """A setting from the environment, overridden per project by the backend's extra_params[key]."""
    return {**base, **extra_setting(extra, key)}


def create_app(
    settings: Settings,
    holder: ModelHolder,
    registry: Registry | None = None,
    training: TrainingService | None | bool = True,
    policy: TrainingPolicy | None = None,
    vlm: ModelHolder | None = None,
) -> FastAPI:
    """`training=True` starts the job service (webhook triggers, hot swaps); False serves predictions only.

    `holder` is the CNN (retraining swaps it), `vlm` the vision-language model; `settings.pre_annotator` says
    whose predictions Label Studio receives, and the other one's go to the prediction store.
    """
    registry = registry or Registry(settings.db_path)
    fetcher = MediaFetcher(settings.media())
    store = PredictionStore(settings.db_path)
    deferred = DeferredPredictions()
    fallback: dict[tuple[str, str], Predictor] = {}  # (hostname, token) from /setup -> its own fetcher
    sync = VersionSync(registry)
    predictor = Predictor(fetcher, store=store)
    # /predict's own threads: a hop through asyncio's executor costs a third of one through anyio's
    predict_pool = ThreadPoolExecutor(32, thread_name_prefix="tandem-predict")
    if settings.pre_annotator == "vlm" and vlm is None:
        raise ConfigError("TANDEM_PRE_ANNOTATOR=vlm needs a VLM (tandem serve --vlm ID_OR_PATH)")
    vlm = vlm or ModelHolder()
    lead, other = (holder, vlm) if settings.pre_annotator == "cnn" else (vlm, holder)
    setups: dict[int, tuple[str | None, str | None]] = {}  # project -> (hostname, legacy token) from /setup
    label_maps: dict[int, dict[str, str]] = {}  # project -> label_map from the backend's extra_params
    prompt_maps: dict[int, dict[str, str]] = {}  # project -> VLM prompts from the backend's extra_params
    schemas: dict[int, str] = {}  # project -> labeling config from its last /setup

    if training is True:
        policy = policy or TrainingPolicy(train_after=settings.train_after, interval_s=settings.train_interval_s,
                                          params=settings.training_params())
        training = TrainingService(settings, holder, registry, policy, vlm_holder=vlm)
    training = training or None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        predict_pool.shutdown(wait=True)
        deferred.close()
        sync.close()
        fetcher.close()
        store.close()
        for extra in fallback.values():
            extra.fetcher.close()
        if training:
            training.close()

    app = FastAPI(
        title="Tandem",
        version="0.1.0",
        summary="Label Studio ML backend: YOLOv8 and VLM pre-annotations with an active-learning loop",
        # no dependency at all when nothing is checked: resolving one costs every request about 0.1 ms
        dependencies=[Depends(_auth_dependency(settings))] if settings.basic_auth or settings.webhook_secret else [],
        lifespan=lifespan,
    )
    app.state.settings, app.state.holder, app.state.registry, app.state.sync = settings, holder, registry, sync
    app.state.store, app.state.deferred, app.state.vlm = store, deferred, vlm
    metrics = Metrics()
    app.state.metrics = metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    @app.exception_handler(TandemError)
    async def tandem_error(_: Request, exc: TandemError) -> JSONResponse:
        log.warning("%s: %s", type(exc).__name__, exc)
        return JSONResponse({"detail": str(exc), "error": type(exc).__name__}, status_code=exc.status_code)

    def schedule_sync(pid: int | None, version: str) -> None:
        if pid is None:
            return
        hostname, token = setups.get(pid, (None, None))
        url = settings.label_studio_url or hostname
        key = settings.label_studio_api_key or token
        if url and key:
            sync.schedule(SyncRequest(pid, version, url, key))

    def predictor_for(pid: int | None) -> Predictor:
        """Without LABEL_STUDIO_URL, media comes from the hostname and legacy token Label Studio sent to /setup."""
        if settings.label_studio_url or pid not in setups:
            return predictor
        hostname, token = setups[pid]
        if not hostname:
            return predictor
        key = (hostname, token or "")
        if key not in fallback:
            media = settings.media()
            media.label_studio_url, media.api_key = hostname.rstrip("/"), settings.label_studio_api_key or token
            fallback[key] = Predictor(MediaFetcher(media), store=store)
        return fallback[key]

    def on_loaded(adapter: ModelAdapter) -> None:
        path = getattr(adapter, "path", None) or getattr(adapter, "source", "")
        registry.record_served(adapter.version, adapter.name, registry_task(adapter), str(path))

    def check_connected(adapter: ModelAdapter) -> None:
        """One server serves one model to every project: say which a newly served one can no longer fill."""
        for pid, schema in list(schemas.items()):
            try:
                plan_for(adapter, schema, label_maps.get(pid, settings.label_map), settings.case_sensitive_labels,
                         prompt_maps.get(pid, settings.vlm_prompts))
            except ConfigError as exc:
                log.warning("now serving %s, which project %s (connected here) cannot use: %s — its predictions "
                            "and /setup fail until it gets a server of its own (tandem serve --port, TANDEM_HOME) "
                            "or this one serves a model with its labels again", adapter.version, pid, exc)

    app.state.training = training
    for served in (holder, vlm):  # every version served, also one that finishes loading later, is registered
        served.subscribe(on_loaded)
    lead.subscribe(check_connected)

    @app.get("/", response_model=HealthResponse, include_in_schema=False)
    @app.get("/health", response_model=HealthResponse)
    def health() -> HealthResponse:
        """Always 200 while the process serves; `ready` says whether a model is loaded."""
        adapter, second = lead.adapter, other.adapter
        return HealthResponse(
            status="UP",
            ready=adapter is not None,
            model_version=adapter.version if adapter else None,
            model_task=describe(adapter) if adapter else None,
            device=adapter.device if adapter else None,
            engine=getattr(adapter, "engine", None),
            error=lead.error or other.error,
            pre_annotator=settings.pre_annotator,
            second_opinion=second.version if second else None,
            deferred_pending=deferred.pending,
        )

    warned: set[tuple] = set()  # (project, config fingerprint, control): each unserved label is said once

    @app.post("/setup", response_model=SetupResponse)
    def setup(body: SetupRequest) -> SetupResponse:
        """Answers from memory (Label Studio waits 3 s); a config the model cannot fill is a 422."""
        pid = project_id(body.project)
        label_map = _label_map(body.extra_params)
        if pid is not None:
            setups[pid] = (body.hostname if (body.hostname or "").startswith("http") else None, body.access_token)
            label_maps[pid] = label_map
            prompt_maps[pid] = _prompts(body.extra_params)
            if body.schema_:
                schemas[pid] = body.schema_
        adapter = lead.adapter
        if adapter is None:
            last = registry.last_served(settings.pre_annotator)
            return SetupResponse(model_version=last.version if last else "loading")
        if body.schema_:
            plan = plan_for(adapter, body.schema_, label_map, settings.case_sensitive_labels, _prompts(body.extra_params))
            if (pid, plan.fingerprint, None) not in warned:  # said once per project and config
                warned.add((pid, plan.fingerprint, None))
                if left := plan.unserved_controls():
                    log.warning("project %s: %s fills %s only; left to the annotator: %s", pid, adapter.name,
                                ", ".join(c.control.title for c in plan.controls), ", ".join(left))
            for control, (labels, classes) in plan.unserved_labels().items():
                if (pid, plan.fingerprint, control) not in warned:  # Label Studio calls /setup often
                    warned.add((pid, plan.fingerprint, control))
                    log.warning("project %s: label(s) %s of '%s' match none of %s's classes (%s) and will not be "
                                "pre-annotated; map one with predicted_values=\"…\" on its <Label> or "
                                "TANDEM_LABEL_MAP", pid, ", ".join(labels), control, adapter.name, ", ".join(classes))
        schedule_sync(pid, adapter.version)
        return SetupResponse(model_version=adapter.version)

    def _prompts(extra: Any) -> dict[str, str]:
        """Per-label VLM prompts: TANDEM_VLM_PROMPTS, then the backend's extra_params {"prompts": {...}}."""
        return _merged(settings.vlm_prompts, extra, "prompts")

    def _label_map(extra: Any) -> dict[str, str]:
        return _merged(settings.label_map, extra, "label_map")

    @app.post("/predict", response_model=PredictResponse)
    async def predict(body: PredictRequest) -> Response:
        """One item per task, in order. The answer is built as JSON here: re-validating the items through
        the response model would cost more than the rest of the request's overhead together."""
        deadline = time.monotonic() + settings.predict_budget_s
        adapter = lead.adapter or await run_in_threadpool(lead.wait, PREDICT_WAIT_FOR_MODEL_S)
        if not body.label_config:
            raise HTTPException(422, "label_config is required")
        pid = project_id(body.project)
        label_map = label_maps.get(pid, settings.label_map) if pid is not None else settings.label_map
        prompts = prompt_maps.get(pid, settings.vlm_prompts) if pid is not None else settings.vlm_prompts
        plan = plan_for(adapter, body.label_config, label_map, settings.case_sensitive_labels, prompts)
        chosen = predictor_for(pid)

        def overflow(rest) -> None:
            deferred.submit(chosen, rest, plan, pid, "pre-annotation")

        results = await asyncio.get_running_loop().run_in_executor(
            predict_pool, chosen.predict, body.tasks, plan, deadline, overflow, pid)
        for item in results:
            metrics.predictions.labels(adapter.version, "ok" if "result" in item else "error").inc()
        second = other.adapter
        if second is not None and pid is not None:
            try:
                second_plan = plan_for(second, body.label_config, label_map, settings.case_sensitive_labels, prompts)
            except ConfigError as exc:
                log.info("second opinion %s skipped for project %s: %s", second.version, pid, exc)
            else:
                deferred.submit(chosen, body.tasks, second_plan, pid, "second-opinion")
        schedule_sync(pid, adapter.version)
        return Response(json.dumps({"results": results, "model_version": adapter.version}),
                        media_type="application/json")

    @app.post("/webhook")
    def webhook(body: WebhookRequest) -> dict[str, Any]:
        """Label Studio gives annotation webhooks 1 s and ignores the answer: record and queue, never train here."""
        pid = project_id(body.project)
        registry.record_event(pid, body.action)
        job = training.on_webhook(body.action, pid) if training else None
        return {"status": "ok", "action": body.action, **({"job": job.id} if job else {})}

    def _training() -> TrainingService:
        if not training:
            raise HTTPException(404, "training is disabled on this server")
        return training

    @app.post("/train")
    def train(body: TrainRequest) -> dict[str, Any]:
        """Queue a fine-tune job for a project (coalesces with an active one)."""
        job = _training().trigger(body.project, body.reason, runner=body.runner, model_kind=body.model,
                                  params=body.params)
        return job.public()

    @app.get("/jobs")
    def jobs(project: int | None = None) -> list[dict[str, Any]]:
        return [j.public() for j in _training().store.list(project)]

    @app.get("/jobs/{job_id}")
    def job(job_id: int) -> dict[str, Any]:
        found = _training().store.get(job_id)
        if found is None:
            raise HTTPException(404, f"no job {job_id}")
        return found.public()

    @app.get("/jobs/{job_id}/logs", response_class=PlainTextResponse)
    def job_logs(job_id: int, lines: int = 200) -> str:
        if _training().store.get(job_id) is None:
            raise HTTPException(404, f"no job {job_id}")
        return tail(log_path(settings.home, job_id), lines)

    @app.post("/jobs/{job_id}/cancel")
    def cancel(job_id: int) -> dict[str, Any]:
        if not _training().cancel(job_id):
            raise HTTPException(409, f"job {job_id} is not queued or running")
        return _training().store.get(job_id).public()

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        metrics.ready.set(1 if lead.ready else 0)
        metrics.deferred.set(deferred.pending)
        if training:
            for status in ("queued", "running", "succeeded", "failed", "cancelled"):
                metrics.jobs.labels(status).set(training.store.counts().get(status, 0))
        return metrics.render()

    @app.get("/versions", response_model=VersionsResponse)
    def versions() -> VersionsResponse:
        # served or promoted (and so served within seconds): not candidates the gate rejected
        return VersionsResponse(versions=[v.version for v in registry.versions() if v.served_at or v.promoted_at])

    return app
