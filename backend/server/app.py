"""The composition root: builds the shared services, then wires the routers (Label Studio protocol, jobs,
operations). Routes live in `backend.server.routers`; what they share is `ServerState`.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from backend.errors import ConfigError, TandemError
from backend.labelstudio.version_sync import VersionSync
from backend.media.fetch import MediaFetcher
from backend.predict import Predictor, plan_for, registry_task
from backend.registry import Registry
from backend.server.deferred import DeferredPredictions
from backend.server.guard import WEBHOOK_SECRET_HEADER, GuardMiddleware  # noqa: F401 - the header's home
from backend.server.metrics import Metrics, MetricsMiddleware
from backend.server.pool import ModelPool
from backend.server.projects import ProjectServing, load_spec
from backend.server.routers import jobs, ls_protocol, ops, predict_jobs
from backend.server.scoring import ServeTimeScorer
from backend.server.state import ServerState
from backend.serving import ModelHolder
from backend.settings import Settings
from backend.storage.db import unavailable
from backend.storage.outage import OutageLog
from backend.storage.predictions import PredictionRepo
from backend.storage.projects import ProjectRepo
from backend.storage.scores import ScoreRepo
from backend.training.service import TrainingPolicy, TrainingService

log = logging.getLogger("tandem.server")
DATABASE_SAID_EVERY_S = 60.0
RECORD_RETRY_S = 10.0  # a served version the database refused to record is tried again this often

def create_app(
    settings: Settings,
    holder: ModelHolder,
    registry: Registry | None = None,
    training: TrainingService | None | bool = True,
    policy: TrainingPolicy | None = None,
    vlm: ModelHolder | None = None,
) -> FastAPI:
    """`holder` is the default CNN, `vlm` the default second opinion (a VLM or another YOLO); projects may
    bind their own. `training=True` starts the job service (webhook triggers, hot swaps); False serves
    predictions only.
    """
    registry = registry or Registry(settings.database_url)
    if settings.pre_annotator == "vlm" and vlm is None:
        raise ConfigError("TANDEM_PRE_ANNOTATOR=vlm needs a VLM (tandem serve --vlm ID_OR_PATH)")
    vlm = vlm or ModelHolder()
    url = settings.database_url
    predictions, scores, projects = PredictionRepo(url), ScoreRepo(url), ProjectRepo(url)
    pool = ModelPool(lambda spec: load_spec(settings, registry, spec), int(settings.model_memory_gb * 1e9))
    serving = ProjectServing(settings, projects, pool, holder, vlm)
    scorer = ServeTimeScorer(settings, predictions, scores, serving)
    predictor = Predictor(MediaFetcher(settings.media()), store=predictions, on_stored=scorer.on_stored)

    if training is True:
        policy = policy or TrainingPolicy(train_after=settings.train_after, interval_s=settings.train_interval_s,
                                          params=settings.training_params())
        training = TrainingService(settings, holder, registry, policy, vlm_holder=vlm)
    if training:
        def load_promoted(project_id: int) -> None:
            project = serving.state(project_id)
            if project is not None:
                serving.prefetch(project)

        training.on_project_promotion = load_promoted
    state = ServerState(
        settings=settings, registry=registry, predictions=predictions, scores=scores, projects=projects,
        serving=serving, predictor=predictor, deferred=DeferredPredictions(), sync=VersionSync(registry),
        metrics=Metrics(), training=training or None,
        # /predict's own threads: a hop through asyncio's executor costs a third of one through anyio's
        predict_pool=ThreadPoolExecutor(32, thread_name_prefix="tandem-predict"),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.close()

    app = FastAPI(
        title="Tandem",
        version="0.1.0",
        summary="Label Studio ML backend: YOLO and VLM pre-annotations with an active-learning loop",
        lifespan=lifespan,
    )
    app.state.tandem = state
    # the names tests and the demo read
    app.state.settings, app.state.holder, app.state.registry, app.state.sync = settings, holder, registry, state.sync
    app.state.store, app.state.deferred, app.state.vlm = predictions, state.deferred, vlm
    app.state.metrics, app.state.training, app.state.projects = state.metrics, state.training, projects
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    # added last, so outermost: auth and body limits are checked on the headers, before any body is read
    app.add_middleware(GuardMiddleware, basic_auth=settings.basic_auth, webhook_secret=settings.webhook_secret)

    @app.exception_handler(TandemError)
    async def tandem_error(_: Request, exc: TandemError) -> JSONResponse:
        log.warning("%s: %s", type(exc).__name__, exc)
        return JSONResponse({"detail": str(exc), "error": type(exc).__name__}, status_code=exc.status_code)

    @app.exception_handler(StarletteHTTPException)
    async def refused(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """A refusal Label Studio shows as "check the ML backend server console logs": its reason is there."""
        if exc.status_code in (409, 422):
            log.warning("%s %s refused (%s): %s", request.method, request.url.path, exc.status_code,
                        str(exc.detail)[:500])
        return await http_exception_handler(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        """FastAPI's 422, with each offending input cut short: a 1 MB labeling config is not echoed back whole."""
        def short(value):
            text = repr(value)
            return value if len(text) <= 200 else text[:200] + f"… ({len(text)} characters)"

        errors = [{k: (short(v) if k == "input" else v) for k, v in e.items() if k != "ctx"} for e in exc.errors()]
        return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)

    said_at = [-DATABASE_SAID_EVERY_S]

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def database_error(request: Request, exc: Exception) -> JSONResponse:
        """503 with one line (the password masked), not a 500 and a traceback per request."""
        if time.monotonic() - said_at[0] >= DATABASE_SAID_EVERY_S:
            said_at[0] = time.monotonic()
            log.warning("%s answered 503: %s (said at most once a minute)", request.url.path,
                        unavailable(exc, settings.database_url))
        return JSONResponse({"detail": f"{request.url.path}: {unavailable(exc, settings.database_url)}",
                             "error": "DatabaseUnavailable"}, status_code=503)

    unrecorded: dict[str, tuple[str, str, str, str]] = {}  # version -> its row, while the database refuses it
    outages: dict[str, OutageLog] = {}  # per version: said once when refused, once when recorded

    def record(version: str, name: str, task: str, path: str) -> None:
        """Register a served version; a database that refuses the write (down, a read-only file) does not stop
        the serving: the row is written again every RECORD_RETRY_S until it is taken."""
        said = outages.setdefault(version, OutageLog(log, f"serving {version}, but the database does not record "
                                                          "it yet", f"tried again every {RECORD_RETRY_S:.0f} s"))
        try:
            registry.record_served(version, name, task, path)
        except (OperationalError, InterfaceError) as exc:
            first = not unrecorded
            said.failed(exc)
            unrecorded[version] = (version, name, task, path)
            if first:  # one retrying thread, for as long as anything is left to record
                threading.Thread(target=retry_records, name="tandem-record-served", daemon=True).start()
            return
        unrecorded.pop(version, None)
        said.ok()

    def retry_records() -> None:
        while unrecorded:
            time.sleep(RECORD_RETRY_S)
            for row in list(unrecorded.values()):
                record(*row)

    def on_loaded(adapter, second: bool = False) -> None:
        path = getattr(adapter, "path", None) or getattr(adapter, "source", "")
        task = registry_task(adapter)
        if second and not task.startswith("vlm:"):  # other YOLO weights as the second opinion: not a CNN version
            task = f"second:{task}"
        record(adapter.version, adapter.name, task, str(path))

    def check_connected(adapter) -> None:
        """Projects on the default model: say which a newly served default can no longer fill."""
        for project in projects.all():
            if not project.label_config or project.model or project.pre_annotator:
                continue
            try:
                plan_for(adapter, project.label_config, {**settings.label_map, **project.label_map},
                         settings.case_sensitive_labels, {**settings.vlm_prompts, **project.prompts})
            except ConfigError as exc:
                why = str(exc).split("; a project needs")[0]  # the advice is given once, below, for this project
                log.warning("now serving %s by default, which project %s (connected to a server with this "
                            "database) cannot use: %s — bind it a model of its own (tandem models bind --project %s "
                            "--model WEIGHTS, or the backend's extra params {\"model\": ...} in Label Studio)",
                            adapter.version, project.project_id, why, project.project_id)

    # every default served, also one that finishes loading later, is registered
    holder.subscribe(on_loaded)
    vlm.subscribe(lambda adapter: on_loaded(adapter, second=settings.pre_annotator == "cnn"))
    (holder if settings.pre_annotator == "cnn" else vlm).subscribe(check_connected)

    for router in (ls_protocol.router, jobs.router, ops.router):
        app.include_router(router)
    predict_jobs.install(app, state)  # POST /predict-jobs, its counts on /metrics
    return app
