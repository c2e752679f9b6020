"""The wire contract with Label Studio 1.23 (see README: "Protocol"). Unknown fields are kept, never refused.

Sizes are bounded (a labeling config, a webhook action, ids within SQLite's 64-bit integers), and each task of a
/predict is read on its own: a task that is not an object, whose `data` is not an object or whose id is not a
64-bit integer becomes that task's error, never a 422 or a 500 for the batch (see `read_task`).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from backend.media.fetch import INVALID_TASK_PREFIX

MAX_ID = 2**63 - 1  # SQLite's INTEGER; a larger id made every store lookup an OverflowError (a 500)
MAX_LABEL_CONFIG_CHARS = 1_000_000  # real configs are kilobytes; parsing 50 MB held the server for 50 s
MAX_ACTION_CHARS = 64
Id = Annotated[int, Field(ge=0, le=MAX_ID)]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


def project_id(project: Any) -> int | None:
    """Label Studio sends "12.1795428881" (id.created_at) in /setup and /predict, and an object in webhooks."""
    if isinstance(project, dict):
        project = project.get("id")
    if project is None:
        return None
    if isinstance(project, bool):
        return None
    text = str(project)
    if len(text) > 64:
        return None
    try:
        value = int(text.split(".")[0])
    except ValueError:
        return None
    return value if 0 <= value <= MAX_ID else None


def read_task(task: Any) -> dict[str, Any]:
    """One /predict task as the predictor may use it; a malformed one becomes a task whose only image is an error
    message (the fetcher reports it as that task's error), so the rest of the batch is predicted as usual."""
    if not isinstance(task, dict):
        return _invalid(None, f"the task is a {type(task).__name__}, not an object")
    tid = task.get("id")
    if tid is not None and (isinstance(tid, bool) or not isinstance(tid, int) or not 0 <= tid <= MAX_ID):
        return _invalid(None, f"the task id {str(tid)[:40]!r} is not an integer from 0 to 2^63-1")
    if not isinstance(task.get("data"), dict):
        return _invalid(tid, f"its data is a {type(task.get('data')).__name__}, not an object")
    return task


def _invalid(tid: int | None, why: str) -> dict[str, Any]:
    return {"id": tid, "data": {"$undefined$": INVALID_TASK_PREFIX + why}}


class SetupRequest(_Open):
    project: str | None = Field(default=None, max_length=64)
    schema_: str | None = Field(default=None, alias="schema", max_length=MAX_LABEL_CONFIG_CHARS)
    hostname: str | None = Field(default=None, max_length=2048)
    access_token: str | None = Field(default=None, repr=False, max_length=8192)
    extra_params: Any = None


class SetupResponse(BaseModel):
    model_version: str


class PredictParams(_Open):
    login: str | None = None
    password: str | None = Field(default=None, repr=False)
    context: Any = None


class PredictRequest(_Open):
    tasks: list[Any]  # each one read by `read_task`: one malformed task is that task's error
    label_config: str | None = Field(default=None, max_length=MAX_LABEL_CONFIG_CHARS)
    project: str | None = Field(default=None, max_length=64)
    params: PredictParams | None = None

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, tasks: list[Any]) -> list[dict[str, Any]]:
        return [read_task(t) for t in tasks]


class PredictResponse(BaseModel):
    results: list[dict[str, Any]]
    model_version: str


class WebhookRequest(_Open):
    action: str = Field(max_length=MAX_ACTION_CHARS, pattern=r"^[A-Za-z0-9_.:-]+$")
    project: Any = None

    def annotations(self) -> list[dict]:
        """The annotation(s) the payload carries (`annotation`, or `annotations` for a bulk delete)."""
        extra = self.model_extra or {}
        found = extra.get("annotations") if isinstance(extra.get("annotations"), list) else [extra.get("annotation")]
        return [a for a in found if isinstance(a, dict)]

    def event_key(self) -> str | None:
        """What names this delivery (the action, the annotation(s) and their update time), so that a repeated
        delivery is counted once toward auto-retrain; None when the payload names no annotation."""
        parts = [f"{a.get('id')}@{a.get('updated_at')}" for a in self.annotations()[:100] if a.get("id") is not None]
        return f"{self.action}:{','.join(sorted(str(p)[:80] for p in parts))}"[:200] if parts else None

    def only_auto_accepted(self) -> bool:
        """Whether every annotation the payload carries was written by `tandem accept` (its marker on every
        region): no person corrected anything."""
        from active_learning.queue import is_auto_accepted

        found = self.annotations()
        return bool(found) and all(is_auto_accepted(a) for a in found)


class TrainRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    project: Id
    runner: str = Field(default="local", pattern="^(local|modal)$")
    model: str = Field(default="yolo", pattern="^(yolo|vlm)$")
    reason: str = Field(default="POST /train", max_length=200)
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_keys(self) -> TrainRequest:
        """Label Studio's legacy /train also sends the tasks and the config (not used: the job exports them);
        any other key is a mistake said, not a default silently used (`{"epochs": 30}` belongs in params)."""
        unknown = sorted(set(self.model_extra or {}) - {"annotations", "label_config"})
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}: training options go under params, e.g. "
                             f'{{"project": {self.project}, "params": {{"{unknown[0]}": …}}}}')
        return self


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
    loading: list[str] = []  # ?project=ID: its bound models still loading (`ready` turns true once they are in)


class VersionsResponse(BaseModel):
    versions: list[str]
