"""Which models serve which Label Studio project.

Each project may bind its own CNN (`model`), second opinion (a VLM or another YOLO) and pre-annotator
role, through the ML backend's extra params in Label Studio or `tandem models bind`; a retrain on a
project promotes into that project's binding. A project with no binding is served the server's default
models (`tandem serve --model/--second-opinion`), which a server-wide promotion hot-swaps.

Bound models come from the shared `ModelPool`. While a newly bound version loads, the project keeps
being served the model it had: a hot swap never leaves a gap, and a load that fails keeps the last good one.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend.errors import ModelLoadError
from backend.models.vlm.base import OpenVocabularyModel
from backend.server.pool import ModelPool
from backend.serving import ModelHolder
from backend.settings import Settings
from backend.storage.outage import OutageLog, is_unavailable
from backend.storage.projects import ProjectRepo, ProjectState

log = logging.getLogger("tandem.projects")
MAX_REMEMBERED = 10_000  # project states kept for an outage (the server serves at most TANDEM_MAX_PROJECTS)

YOLO_SUFFIXES = (".pt", ".onnx", ".torchscript", ".engine", ".xml")


def spec_of(adapter: Any) -> str | None:
    """The spec that loads this adapter again: a YOLO's weights path, a VLM's folder or hub id."""
    inner = adapter if isinstance(adapter, OpenVocabularyModel) else getattr(adapter, "model", None)  # BoundModel
    for candidate in (adapter, inner):
        for attr in ("path", "source"):
            value = getattr(candidate, attr, None)
            if value:
                return str(value)
    return None


def is_cnn_spec(path: str) -> bool:
    p = Path(path).expanduser()
    return p.suffix in YOLO_SUFFIXES or path.endswith("_openvino_model") or (p.is_file() and not p.is_dir())


@dataclass(frozen=True)
class ServedModels:
    """What serves one project right now. `cnn` and `second` are None while loading (or when absent)."""

    cnn: Any
    second: Any
    pre_annotator: str
    cnn_spec: str | None
    second_spec: str | None

    @property
    def lead(self) -> Any:
        return self.cnn if self.pre_annotator == "cnn" else self.second

    @property
    def other(self) -> Any:
        return self.second if self.pre_annotator == "cnn" else self.cnn


class ProjectServing:
    def __init__(self, settings: Settings, projects: ProjectRepo, pool: ModelPool, cnn: ModelHolder,
                 second: ModelHolder) -> None:
        self.settings, self.projects, self.pool = settings, projects, pool
        self.cnn, self.second = cnn, second
        self._last: dict[tuple[int, str], Any] = {}  # (project, role) -> the adapter it was served last
        self._served: dict[int, tuple[str | None, str | None]] = {}
        self._states: dict[int, ProjectState] = {}  # the last state read per project, for a database outage
        self._outage = OutageLog(log, "reading project state (serving from the last one read)")
        self._fell_back: set[tuple[int | None, str]] = set()  # (project, bound spec) already said to fall back
        self._lock = threading.Lock()

    def state(self, project_id: int | None) -> ProjectState | None:
        """The project's state; while the database does not answer, the last one read (serving goes on)."""
        if project_id is None:
            return None
        try:
            state = self.projects.get(project_id)
        except Exception as exc:  # noqa: BLE001 - only an unavailable database falls back
            if not is_unavailable(exc):
                raise
            self._outage.failed(exc)
            with self._lock:
                return self._states.get(project_id)
        self._outage.ok()
        with self._lock:
            if state is None:
                self._states.pop(project_id, None)
            else:
                self._states[project_id] = state
                while len(self._states) > MAX_REMEMBERED:
                    self._states.pop(next(iter(self._states)))
        return state

    def models(self, project_id: int | None, state: ProjectState | None = None) -> ServedModels:
        """Non-blocking: bound models still loading are started, and meanwhile the last ones are used."""
        state = state if state is not None else self.state(project_id)
        pre = (state.pre_annotator if state and state.pre_annotator else None) or self.settings.pre_annotator
        cnn, cnn_spec = self._role(project_id, "cnn", state.model if state else None, self.cnn)
        second, second_spec = self._role(project_id, "second", state.second_opinion if state else None, self.second)
        return ServedModels(cnn, second, pre, cnn_spec, second_spec)

    def _role(self, project_id: int | None, role: str, spec: str | None, default: ModelHolder) -> tuple[Any, str | None]:
        if not spec:
            adapter = default.adapter
            return adapter, spec_of(adapter) if adapter is not None else None
        adapter = self.pool.ensure(spec)
        key = (project_id or 0, role)
        with self._lock:
            if adapter is not None:
                self._last[key] = adapter
            else:
                adapter = self._last.get(key)
                served = self._served.get(project_id or 0)
                if adapter is None and served is not None and default.adapter is not None and \
                        served[0 if role == "cnn" else 1] == spec_of(default.adapter):
                    adapter = default.adapter  # bound only now (a first promotion): the default served it until now
        if adapter is None and default.adapter is not None and (error := self.pool.last_error(spec)):
            # nothing of this project's loaded since the start, and its bound model cannot load (its file gone or
            # damaged): the server's default serves it meanwhile, rather than a 503 on every request
            fallback = spec_of(default.adapter)
            with self._lock:
                first = (project_id, spec) not in self._fell_back
                if len(self._fell_back) >= MAX_REMEMBERED:
                    self._fell_back.clear()
                self._fell_back.add((project_id, spec))
            if first:
                log.warning("project %s: its %s %s does not load (%s); the server's default %s serves it until it "
                            "does (tandem models bind --project %s, or tandem models rollback --project %s)",
                            project_id, "model" if role == "cnn" else "second opinion", spec, error,
                            getattr(default.adapter, "version", fallback), project_id, project_id)
            return default.adapter, fallback
        return adapter, spec

    def wait_lead(self, project_id: int | None, timeout: float) -> Any:
        """The project's pre-annotator, waiting up to `timeout` s for a first load; ModelLoadError otherwise."""
        served = self.models(project_id)
        if served.lead is not None:
            return served.lead
        state = self.state(project_id)
        role_spec = (state.model if served.pre_annotator == "cnn" else state.second_opinion) if state else None
        if role_spec:
            try:
                return self.pool.get(role_spec, timeout)
            except ModelLoadError:  # it failed while we waited: the default serves, as `models` says
                fallback = self.models(project_id).lead
                if fallback is None:
                    raise
                return fallback
        holder = self.cnn if served.pre_annotator == "cnn" else self.second
        return holder.wait(timeout)

    def prefetch(self, state: ProjectState) -> None:
        """Start loading a project's bound models now (from /setup: it must answer within 3 s)."""
        for spec in (state.model, state.second_opinion):
            if spec:
                self.pool.ensure(spec)

    def record_served(self, project_id: int, served: ServedModels) -> None:
        """Remember what served a project (its binding or the defaults): `tandem select` ranks with the same."""
        pair = (served.cnn_spec, served.second_spec)
        with self._lock:
            if self._served.get(project_id) == pair:
                return
            self._served[project_id] = pair
        # a default still loading after a restart (a VLM takes minutes) is not "none": keep what was recorded
        changes = {field: spec for field, spec, holder in (("served_model", pair[0], self.cnn),
                                                           ("served_second_opinion", pair[1], self.second))
                   if spec is not None or not holder.loading}
        if changes:
            try:
                self.projects.update(project_id, **changes)
            except Exception as exc:  # noqa: BLE001 - a record for `tandem select`: tried again on the next call
                if not is_unavailable(exc):
                    raise
                with self._lock:
                    self._served.pop(project_id, None)


def load_spec(settings: Settings, registry, spec: str, vlm_options: dict | None = None) -> Any:
    """A binding's spec -> a loaded adapter: a registry version (its weights), YOLO weights, or a VLM."""
    version = registry.resolve(spec) if registry is not None else None
    path = version.path if version is not None and version.path else spec
    if version is not None and version.path:  # an artifact URL (weights another replica made): fetched once here
        from backend.storage.artifacts import localise

        path = localise(settings, path)
    kind = version.kind if version is not None else ("cnn" if is_cnn_spec(path) else "vlm")
    if kind in ("cnn", "second"):  # "second": YOLO weights served as a second opinion
        return settings.load_cnn(path)
    from backend.models.vlm.loader import load_vlm

    return load_vlm(path, device=settings.device, **(vlm_options or {}))
