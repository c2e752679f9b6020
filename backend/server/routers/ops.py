"""Operations: Prometheus metrics (requests, predictions, jobs, the background queue, loaded models)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from backend.server.deps import get_state
from backend.server.state import ServerState

router = APIRouter(tags=["operations"])


@router.get("/metrics", include_in_schema=False)
def prometheus(state: ServerState = Depends(get_state)) -> Response:
    metrics = state.metrics
    metrics.ready.set(1 if state.serving.models(None).lead is not None else 0)
    metrics.deferred.set(state.deferred.pending)
    metrics.pool_models.set(len(state.serving.pool.loaded()))
    metrics.pool_bytes.set(state.serving.pool.used_bytes)
    if state.training:
        counts = state.training.store.counts(kind="train")  # predict jobs have their own gauge
        for status in ("queued", "running", "succeeded", "failed", "cancelled"):
            metrics.jobs.labels(status).set(counts.get(status, 0))
    return metrics.render()
