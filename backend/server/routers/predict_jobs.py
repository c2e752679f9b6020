"""Whole-project pre-annotation over HTTP: start a predict job, follow its counts, cancel it.

The server only records the job and starts `tandem predict --job ID` as its own process (its memory and its
CPU are the job's, not the server's); that process claims the job with a lease and writes its counts
(done / failed / remaining) back to the job row, which any replica reads.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException
from pydantic import BaseModel, Field

from backend.batch.records import ActiveJobExists, PredictJobs, new_holder_id
from backend.server.deps import get_state
from backend.server.metrics import PredictJobCollector, ReportCollector, reports_dir
from backend.server.protocol import Id
from backend.server.state import ServerState
from backend.storage.artifacts import ArtifactStore
from backend.training.runner import LOG_EVERY_S, log_path, publish_log

log = logging.getLogger("tandem.server")
router = APIRouter(tags=["predict jobs"])


class PredictJobRequest(BaseModel):
    project: Id
    model: str | None = Field(None, max_length=1000, description="Weights, registry version or VLM; default: "
                                                                 "what serves the project.")
    runner: Literal["local", "modal"] = "local"
    concurrency: int = Field(4, ge=1, le=64, description="Parallel image fetches.")
    batch: int = Field(16, ge=1, le=512, description="Tasks per chunk.")
    engine: Literal["auto", "pipeline", "adapter"] = Field(
        "auto", description="pipeline: YOLO detect/segment decoded on the GPU from the images' bytes; adapter: the "
                            "served adapter; auto: the pipeline on CUDA where it applies.")


def _records(state: ServerState) -> PredictJobs:
    return PredictJobs(state.settings.database_url)


def _spawn(state: ServerState, job_id: int, body: PredictJobRequest, handed_by: str | None) -> None:
    settings = state.settings
    argv = [sys.executable, "-m", "backend.cli", "predict", "--project", str(body.project), "--job", str(job_id),
            "--runner", body.runner, "--concurrency", str(body.concurrency), "--batch", str(body.batch), "--engine", body.engine, "--quiet"]
    if body.model:
        argv += ["--model", body.model]
    path = log_path(settings.home, job_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **settings.to_env(), **({"TANDEM_PREDICT_HANDED_BY": handed_by} if handed_by else {})}
    with open(path, "ab") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    artifacts, published = ArtifactStore.from_settings(settings), {}

    def reap() -> None:  # collects the process; one that died before finishing its job fails it, with its log
        while True:  # meanwhile its log goes to the artifact store, as a training job's does
            try:
                code = proc.wait(timeout=LOG_EVERY_S)
                break
            except subprocess.TimeoutExpired:
                publish_log(artifacts, path, job_id, published)
        publish_log(artifacts, path, job_id)
        records = _records(state)
        job = records.get(job_id)
        holder = job.holder or "" if job else ""
        if job is not None and job.status.active and (holder == handed_by or holder.split(":")[1:2] == [str(proc.pid)]):
            tail = path.read_text(errors="replace")[-2000:] if path.exists() else ""
            records.finish(job_id, "failed", error=f"the predict process exited with {code}: {tail}")

    threading.Thread(target=reap, name=f"tandem-predict-job-{job_id}", daemon=True).start()


def _require_project(pair: tuple[str, str], project: int) -> None:
    """A project Label Studio does not have is refused now, not recorded as a job that fails a second later."""
    from label_studio_sdk import LabelStudio
    from label_studio_sdk.core.api_error import ApiError

    from backend.labelstudio.errors import describe

    try:
        LabelStudio(base_url=pair[0], api_key=pair[1], timeout=10).projects.get(project)
    except ApiError as exc:
        if exc.status_code == 404:
            raise HTTPException(404, f"Label Studio at {pair[0]} has no project {project}") from exc
        raise HTTPException(422, f"could not check project {project} in Label Studio: {describe(exc, pair[0])}") from exc
    except Exception as exc:  # noqa: BLE001 - Label Studio unreachable: said now, in one line
        raise HTTPException(422, f"could not check project {project} in Label Studio: {describe(exc, pair[0])}") from exc


@router.post("/predict-jobs")
def start(body: PredictJobRequest, state: ServerState = Depends(get_state)) -> dict[str, Any]:
    """Pre-annotate every task of the project lacking a prediction for the current version, in a process of
    its own; follow it at `GET /jobs/{id}` (or `/predict-jobs/{id}`). One job per project: a live one is a
    409 naming it; one whose runner died is taken over."""
    if body.runner == "modal":
        from infra.modal_runner import require_modal_credentials

        require_modal_credentials("infra/modal_predict.py")
    if body.model and (why := state.settings.model_spec_refusal(body.model)):
        raise HTTPException(422, why)
    pair = state.credentials(body.project)
    if pair is None or not pair[1]:  # said now, not by a process that fails a second later
        raise HTTPException(422, f"no Label Studio credentials for project {body.project}: set LABEL_STUDIO_URL and "
                                 "LABEL_STUDIO_API_KEY, or connect the project to this server first")
    from backend.batch.runner import model_spec

    model_spec(state.settings, body.project, body.model)  # a ConfigError (422) when nothing serves the project
    _require_project(pair, body.project)
    records = _records(state)
    handed_by: str | None = new_holder_id()  # the job is born held: no other replica starts it meanwhile
    try:
        job = records.create(body.project, body.runner, body.model_dump(), holder=handed_by)
    except ActiveJobExists as exc:
        if records.resumable(body.project) is None:
            raise HTTPException(409, f"predict job {exc.active.id} is already {exc.active.status.value} on project "
                                     f"{body.project}") from exc
        job, handed_by = exc.active, None  # its runner is gone: a new one takes it over
    _spawn(state, job.id, body, handed_by)
    return records.get(job.id).public()  # type: ignore[union-attr]


@router.get("/predict-jobs")
def list_jobs(project: int | None = None, state: ServerState = Depends(get_state)) -> list[dict[str, Any]]:
    return [j.public() for j in _records(state).list(project)]


@router.get("/predict-jobs/{job_id}")
def get_job(job_id: int, state: ServerState = Depends(get_state)) -> dict[str, Any]:
    job = _records(state).get(job_id)
    if job is None:
        raise HTTPException(404, f"no predict job {job_id}")
    return job.public()


@router.post("/predict-jobs/{job_id}/cancel")
def cancel(job_id: int, state: ServerState = Depends(get_state)) -> dict[str, Any]:
    """The runner stops after the chunk in hand; what it stored stays stored (a later job continues)."""
    records = _records(state)
    if not records.cancel(job_id):
        raise HTTPException(409, f"predict job {job_id} is not queued or running")
    return records.get(job_id).public()  # type: ignore[union-attr]


def install(app: FastAPI, state: ServerState) -> None:
    """The routes, and on /metrics the jobs' counts (read from the job rows at each scrape) and the latest
    `tandem report` of each project (edit rates, minutes saved, auto-accept)."""
    app.include_router(router)
    records = _records(state)
    state.metrics.registry.register(PredictJobCollector(records.recent))
    state.metrics.registry.register(ReportCollector(reports_dir(state.settings.home)))
