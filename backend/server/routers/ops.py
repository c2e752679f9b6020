"""Operations: Prometheus metrics (requests, predictions, jobs, the background queue, loaded models)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from backend.server.deps import get_state
from backend.server.state import ServerState
from backend.training.jobs import totals_by_status

router = APIRouter(tags=["operations"])


@router.get("/metrics", include_in_schema=False)
def prometheus(state: ServerState = Depends(get_state)) -> Response:
    metrics = state.metrics
    metrics.ready.set(1 if state.serving.models(None).lead is not None else 0)
    loaded = state.serving.pool.loaded()
    metrics.project_loaded.clear()  # a project deleted or unbound since the last scrape leaves no series
    for project in state.projects.bound():
        for role, spec in (("model", project.model), ("second_opinion", project.second_opinion)):
            if spec:
                metrics.project_loaded.labels(str(project.project_id), role).set(1 if spec in loaded else 0)
    metrics.deferred.set(state.deferred.pending)
    metrics.pool_models.set(len(loaded))
    metrics.pool_bytes.set(state.serving.pool.used_bytes)
    if state.training:
        per_project = state.training.store.counts_by_project(kind="train")  # predict jobs have their own gauge
        counts = totals_by_status(per_project)
        for status in ("queued", "running", "succeeded", "failed", "cancelled"):
            metrics.jobs.labels(status).set(counts.get(status, 0))
        metrics.project_jobs.clear()
        for (project, status), n in per_project.items():
            metrics.project_jobs.labels(str(project), status).set(n)
    return metrics.render()
