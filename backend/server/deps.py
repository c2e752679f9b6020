"""FastAPI dependencies: the shared server state, and the training service where a route needs it."""

from __future__ import annotations

from fastapi import HTTPException, Request

from backend.server.state import ServerState
from backend.training.service import TrainingService


def get_state(request: Request) -> ServerState:
    return request.app.state.tandem


def get_training(request: Request) -> TrainingService:
    training = request.app.state.tandem.training
    if not training:
        raise HTTPException(404, "training is disabled on this server")
    return training
