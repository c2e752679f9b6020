"""The wire contract with Label Studio 1.23 (see README: "Protocol"). Unknown fields are kept, never refused."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


def project_id(project: Any) -> int | None:
    """Label Studio sends "12.1795428881" (id.created_at) in /setup and /predict, and an object in webhooks."""
    if isinstance(project, dict):
        project = project.get("id")
    if project is None:
        return None
    try:
        return int(str(project).split(".")[0])
    except ValueError:
        return None


class SetupRequest(_Open):
    project: str | None = None
    schema_: str | None = Field(default=None, alias="schema")
    hostname: str | None = None
    access_token: str | None = Field(default=None, repr=False)
    extra_params: Any = None


class SetupResponse(BaseModel):
    model_version: str


class PredictParams(_Open):
    login: str | None = None
    password: str | None = Field(default=None, repr=False)
    context: Any = None


class PredictRequest(_Open):
    tasks: list[dict[str, Any]]
    label_config: str | None = None
    project: str | None = None
    params: PredictParams | None = None


class PredictResponse(BaseModel):
    results: list[dict[str, Any]]
    model_version: str


class WebhookRequest(_Open):
    action: str
    project: Any = None


class TrainRequest(BaseModel):
    project: int
    runner: str = Field(default="local", pattern="^(local|modal)$")
    model: str = Field(default="yolo", pattern="^(yolo|vlm)$")
    reason: str = "POST /train"
    params: dict[str, Any] = Field(default_factory=dict)


class HealthResponse(BaseModel):
    status: str
    model_class: str = "Tandem"
    ready: bool
    model_version: str | None = None
    model_task: str | None = None
    device: str | None = None
    engine: str | None = None  # torch | openvino | openvino-int8 for YOLO; None for a VLM
    error: str | None = None
    pre_annotator: str | None = None  # cnn | vlm: whose predictions Label Studio receives
    second_opinion: str | None = None  # the other model's version, kept in TANDEM_HOME for disagreement
    deferred_pending: int = 0  # tasks still being predicted in the background


class VersionsResponse(BaseModel):
    versions: list[str]
