"""The Label Studio ML backend protocol: /health, /setup, /predict, /webhook, /versions.

Label Studio's timeouts shape it: /health (1 s) and /setup (3 s) never wait for a model (bound models load
in the background); /webhook (1 s) only records the event; /predict runs in a thread pool and returns one
item per task. Everything is per project: its label map, prompts and models come from its binding.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, HTTPException
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from backend.core.text import shortlist
from backend.errors import ConfigError
from backend.labeling.config import ControlKind
from backend.predict import describe, plan_for
from backend.server.deps import get_state
from backend.server.protocol import (
    HealthResponse,
    PredictRequest,
    PredictResponse,
    SetupRequest,
    SetupResponse,
    VersionsResponse,
    WebhookRequest,
    project_id,
)
from backend.server.state import ServerState, extra_params
from backend.settings import extra_setting
from backend.storage.outage import is_unavailable

log = logging.getLogger("tandem.server")
router = APIRouter(tags=["Label Studio protocol"])

PREDICT_WAIT_FOR_MODEL_S = 60.0
BINDING_KEYS = ("model", "second_opinion", "pre_annotator")
# what a refused /setup put back (Label Studio keeps a backend's old settings when the new ones are refused)
RESTORED_ON_REFUSAL = ("hostname", "access_token", "label_config", "label_map", "prompts", *BINDING_KEYS,
                       "extra_binding")


@router.get("/", response_model=HealthResponse, include_in_schema=False)
@router.get("/health", response_model=HealthResponse)
def health(project: int | None = None, state: ServerState = Depends(get_state)) -> HealthResponse:
    """Always 200 while the process serves; `ready` says whether a model is loaded. `?project=ID` reports
    what serves that project (its binding, or the defaults)."""
    served = state.serving.models(project)
    adapter, second = served.lead, served.other
    errors = [state.serving.cnn.error, state.serving.second.error]
    st = state.serving.state(project)
    bound = [spec for spec in ((st.model, st.second_opinion) if st else ()) if spec]
    errors += [state.serving.pool.error(spec) for spec in bound]
    return HealthResponse(
        status="UP",
        ready=adapter is not None,
        model_version=adapter.version if adapter else None,
        model_task=describe(adapter) if adapter else None,
        device=adapter.device if adapter else None,
        engine=getattr(adapter, "engine", None),
        error=next((e for e in errors if e), None),
        pre_annotator=served.pre_annotator,
        second_opinion=second.version if second else None,
        deferred_pending=state.deferred.pending,
        loading=[spec for spec in bound if state.serving.pool.is_loading(spec)],
    )


def _binding(extra: dict[str, Any], settings, before=None, kept: Callable[[str], None] | None = None
             ) -> dict[str, str | None]:
    """model / second_opinion / pre_annotator from the backend's extra params; a wrong role, or a model file
    outside the folders a project may name, is a 422 — unless the project is already bound to that very file
    (a release before the folder rule accepted it: refusing it now only breaks Label Studio's connection, while
    the stored binding serves on)."""
    found = {k: str(extra[k]) for k in BINDING_KEYS if isinstance(extra.get(k), (str, int)) and str(extra[k]).strip()}
    if found.get("pre_annotator") not in (None, "cnn", "vlm"):
        raise HTTPException(422, f"extra params: pre_annotator must be \"cnn\" or \"vlm\" (got {found['pre_annotator']!r})")
    for key in ("model", "second_opinion"):
        if key in found and (why := settings.model_spec_refusal(found[key])):
            if before is not None and found[key] in (before.extra_binding.get(key), getattr(before, key)):
                if kept is not None:
                    kept(why)
                continue
            raise HTTPException(422, f"extra params: {why}")
    return found


def _record_setup(state: ServerState, body: SetupRequest, pid: int, extra: dict[str, Any]):
    """Record the project's /setup (config, credentials, binding); returns (the project now, the one before)."""
    settings = state.settings
    hostname = body.hostname if (body.hostname or "").startswith("http") else None
    changes: dict[str, Any] = {"hostname": hostname, "access_token": body.access_token,
                               "label_map": extra_setting(extra, "label_map"),
                               "prompts": extra_setting(extra, "prompts")}
    before = state.projects.get(pid)
    def kept(why: str) -> None:  # said once per project and file, not at each of Label Studio's frequent /setup
        if state.warn_once((pid, "kept-binding", why)):
            log.warning("project %s: %s; kept, because the project was bound to it before this rule", pid, why)

    binding = _binding(extra, settings, before, kept)
    if before is None and state.projects.count() >= settings.max_projects:  # bounded: /setup names any id
        raise HTTPException(422, f"this server already serves {settings.max_projects} projects "
                                 f"(TANDEM_MAX_PROJECTS); project {pid} was not recorded. `tandem projects forget ID` "
                                 "frees the place of a project deleted in Label Studio")
    # applied when the extra params change, not on every /setup: a retrain's promotion into the project's
    # binding must not be undone by Label Studio re-sending the same extra params
    if before is None or binding != before.extra_binding:
        changes.update({k: binding.get(k) for k in BINDING_KEYS}, extra_binding=binding)
    if body.schema_:
        changes["label_config"] = body.schema_
    project = state.projects.update(pid, **changes)
    state.serving.prefetch(project)
    return project, before


@router.post("/setup", response_model=SetupResponse)
def setup(body: SetupRequest, state: ServerState = Depends(get_state)) -> SetupResponse:
    """Answers from what is loaded (Label Studio waits 3 s); a config the model cannot fill is a 422."""
    settings = state.settings
    pid = project_id(body.project)
    if pid is None and body.project is not None:  # Label Studio sends "12.1795428881"; nothing else is recorded
        raise HTTPException(422, f"project {str(body.project)[:40]!r} is not a Label Studio project id (an integer "
                                 "from 0 to 2^63-1, as \"12\" or \"12.1795428881\")")
    try:
        extra = extra_params(body.extra_params)
    except ValueError as exc:
        raise HTTPException(422, f"the ML backend's extra params are not valid JSON ({exc}); fix them in the "
                                 "project's Model settings") from exc
    for key in ("label_map", "prompts"):
        if key in extra and not isinstance(extra[key], dict):
            raise HTTPException(422, f"extra params: {key} must be an object of names (got "
                                     f"{type(extra[key]).__name__})")
    label_map = {**settings.label_map, **extra_setting(extra, "label_map")}
    prompts = {**settings.vlm_prompts, **extra_setting(extra, "prompts")}
    project = before = None
    if pid is not None:
        try:
            project, before = _record_setup(state, body, pid, extra)
        except Exception as exc:  # noqa: BLE001 - only an unavailable database: answer from what is loaded
            if not is_unavailable(exc):
                raise
            # the last one read (reading it says the database is down, once per outage); recorded next time
            project = before = state.serving.state(pid)
    served = state.serving.models(pid, project)
    adapter = served.lead
    if adapter is None:
        last = state.registry.last_served(settings.pre_annotator)
        return SetupResponse(model_version=last.version if last else "loading")
    if body.schema_:
        try:
            plan = plan_for(adapter, body.schema_, label_map, settings.case_sensitive_labels, prompts)  # cached
        except ConfigError:
            if pid is not None and before is None:  # refused: Label Studio connects nothing, so neither do we
                state.projects.delete(pid)
            elif pid is not None and project is not before:  # nor does it keep refused settings: the last stand
                state.projects.update(pid, **{k: getattr(before, k) for k in RESTORED_ON_REFUSAL})
            raise
        if state.warn_once((pid, plan.fingerprint, None)):  # said once per project and config
            if left := plan.unserved_controls():
                log.warning("project %s: %s fills %s only; left to the annotator: %s", pid, adapter.name,
                            shortlist(c.control.title for c in plan.controls), shortlist(left))
        for planned in plan.controls:
            if planned.labels.ignored and state.warn_once((pid, plan.fingerprint, planned.control.name, "map")):
                log.warning("project %s: %s: left out, the other classes still map (fix the label_map in the "
                            "backend's extra params or TANDEM_LABEL_MAP)", pid, shortlist(planned.labels.ignored, 3, "; "))
        for control, classes in plan.unmapped_choice_classes().items():
            if state.warn_once((pid, plan.fingerprint, control, "classes")):
                log.warning("project %s: %s's class(es) %s map to no choice of '%s': an image it sees as one of "
                            "them gets no pre-annotation there (map one with predicted_values=\"…\" on a <Choice> "
                            "or TANDEM_LABEL_MAP)", pid, adapter.name, shortlist(classes), control)
        choices = {p.control.name for p in plan.controls if p.control.kind == ControlKind.CHOICES}
        for control, (labels, classes) in plan.unserved_labels().items():
            if state.warn_once((pid, plan.fingerprint, control)):  # Label Studio calls /setup often
                log.warning("project %s: label(s) %s of '%s' match none of %s's classes (%s) and will not be "
                            "pre-annotated; map one with predicted_values=\"…\" on its %s or TANDEM_LABEL_MAP", pid,
                            shortlist(labels), control, adapter.name, shortlist(classes),
                            "<Choice>" if control in choices else "<Label>")
    if pid is not None:  # what serves the project now (a restart may have changed the defaults): select reads it
        state.serving.record_served(pid, served)
    state.schedule_sync(pid, adapter.version)
    return SetupResponse(model_version=adapter.version)


def _require_room(state: ServerState, pid: int) -> None:
    """A /predict naming a project that never connected records it (what served it, its stored predictions),
    so it is bounded as /setup is; with the database down it is answered from memory and records nothing."""
    try:
        full = state.projects.count() >= state.settings.max_projects
    except Exception as exc:  # noqa: BLE001 - only an unavailable database
        if not is_unavailable(exc):
            raise
        return
    if full:
        raise HTTPException(422, f"this server already serves {state.settings.max_projects} projects "
                                 f"(TANDEM_MAX_PROJECTS) and project {pid} never connected: not predicted. `tandem projects "
                                 "forget ID` frees the place of a project deleted in Label Studio")


@router.post("/predict", response_model=PredictResponse)
async def predict(body: PredictRequest, state: ServerState = Depends(get_state)) -> Response:
    """One item per task, in order, from the project's own models. The answer is built as JSON here:
    re-validating the items through the response model would cost more than the rest of the overhead."""
    settings = state.settings
    deadline = time.monotonic() + settings.predict_budget_s
    if not body.label_config:
        raise HTTPException(422, "label_config is required")
    pid = project_id(body.project)
    project = state.serving.state(pid)
    if pid is not None and project is None:
        _require_room(state, pid)
    adapter = state.serving.models(pid, project).lead or await run_in_threadpool(
        state.serving.wait_lead, pid, PREDICT_WAIT_FOR_MODEL_S)
    label_map = {**settings.label_map, **(project.label_map if project else {})}
    prompts = {**settings.vlm_prompts, **(project.prompts if project else {})}
    # off the event loop: a large labeling config takes a while to parse (it is cached after)
    plan = await run_in_threadpool(plan_for, adapter, body.label_config, label_map, settings.case_sensitive_labels,
                                   prompts, min_confidence=settings.conf)
    chosen = state.predictor_for(pid)

    def overflow(rest):
        return state.deferred.submit(chosen, rest, plan, pid, "pre-annotation")  # the tasks it had no room for

    results = await asyncio.get_running_loop().run_in_executor(
        state.predict_pool, chosen.predict, body.tasks, plan, deadline, overflow, pid)
    for item in results:
        state.metrics.predictions.labels(adapter.version, "ok" if "result" in item else "error").inc()
    served = state.serving.models(pid, project)
    second = served.other
    if second is not None and pid is not None:
        try:
            second_plan = plan_for(second, body.label_config, label_map, settings.case_sensitive_labels, prompts,
                                   min_confidence=settings.conf)
        except ConfigError as exc:
            log.info("second opinion %s skipped for project %s: %s", second.version, pid, exc)
        else:
            state.deferred.submit(chosen, body.tasks, second_plan, pid, "second-opinion")
    if pid is not None:
        await run_in_threadpool(state.serving.record_served, pid, served)
    state.schedule_sync(pid, adapter.version)
    return Response(json.dumps({"results": results, "model_version": adapter.version}),
                    media_type="application/json")


@router.post("/webhook")
def webhook(body: WebhookRequest, state: ServerState = Depends(get_state)) -> dict[str, Any]:
    """Label Studio gives annotation webhooks 1 s and ignores the answer: record and queue, never train here."""
    pid = project_id(body.project)
    state.registry.record_event(pid, body.action)
    if body.only_auto_accepted() and not state.settings.train_auto_accepted:  # `tandem accept`'s own writes are no
        return {"status": "ok", "action": body.action, "counted": False}  # correction: no job would learn from them
    job = state.training.on_webhook(body.action, pid, key=body.event_key()) if state.training else None
    return {"status": "ok", "action": body.action, **({"job": job.id} if job else {})}


@router.get("/versions", response_model=VersionsResponse)
def versions(project: int | None = None, state: ServerState = Depends(get_state)) -> VersionsResponse:
    """Versions served, promoted (and so served within seconds) or bound to a project (served to it), not
    candidates the gate rejected; `?project=ID`: those of that project (its own retrains and what is bound
    to it) and the server-wide ones."""
    every = state.registry.versions()
    found = [v for v in every if v.served_at or v.promoted_at or v.status == "bound"]
    if project is not None:
        st = state.serving.state(project)
        bound = {found_.version for spec in ((st.model, st.second_opinion) if st else ())
                 if spec and (found_ := state.registry.resolve(spec))}
        # what serves it is listed whatever its status (a version the gate rejected, promoted by hand)
        listed = {v.version for v in found}
        found = [v for v in every if v.version in bound or (v.version in listed and v.project_id in (None, project))]
    return VersionsResponse(versions=[v.version for v in found])
