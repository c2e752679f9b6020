"""Training jobs over HTTP: queue one, list, follow, read the log, cancel. Any job, on any project."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import PlainTextResponse

from backend.server.deps import get_state, get_training
from backend.server.protocol import TrainRequest
from backend.server.state import ServerState
from backend.training.runner import job_log
from backend.training.service import TrainingService

router = APIRouter(tags=["jobs"])


@router.post("/train")
def train(body: TrainRequest, training: TrainingService = Depends(get_training)) -> dict[str, Any]:
    """Queue a fine-tune job for a project (coalesces with an active one)."""
    job = training.trigger(body.project, body.reason, runner=body.runner, model_kind=body.model, params=body.params)
    return job.public()


@router.get("/jobs")
def jobs(project: int | None = None, training: TrainingService = Depends(get_training)) -> list[dict[str, Any]]:
    return [j.public() for j in training.store.list(project)]


@router.get("/jobs/{job_id}")
def job(job_id: int, training: TrainingService = Depends(get_training)) -> dict[str, Any]:
    found = training.store.get(job_id)
    if found is None:
        raise HTTPException(404, f"no job {job_id}")
    return found.public()


@router.get("/jobs/{job_id}/logs", response_class=PlainTextResponse)
def job_logs(job_id: int, lines: int = 200, training: TrainingService = Depends(get_training),
             state: ServerState = Depends(get_state)) -> str:
    if training.store.get(job_id) is None:
        raise HTTPException(404, f"no job {job_id}")
    return job_log(state.settings, job_id, lines)


@router.post("/jobs/{job_id}/cancel")
def cancel(job_id: int, training: TrainingService = Depends(get_training)) -> dict[str, Any]:
    if not training.cancel(job_id):
        raise HTTPException(409, f"job {job_id} is not queued or running")
    return training.store.get(job_id).public()
