"""What each connected Label Studio project asked for, and the models bound to it; survives restarts.

`/setup` writes the config, label map, prompts and the credentials Label Studio sent; the backend's extra
params and `tandem models bind` write the bindings. A project with no binding is served the server's
defaults.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import select

from backend.storage.db import engine_for, insert_for
from backend.storage.tables import projects as T


@dataclass(frozen=True)
class ProjectState:
    project_id: int
    hostname: str | None = None
    access_token: str | None = None
    label_config: str | None = None
    label_map: dict[str, str] = field(default_factory=dict)
    prompts: dict[str, str] = field(default_factory=dict)
    model: str | None = None  # weights path, registry version or hub id of the pre-annotating CNN
    second_opinion: str | None = None  # VLM hub id / folder, or another YOLO's weights
    pre_annotator: str | None = None  # "cnn" | "vlm"; None: the server's default
    extra_binding: dict[str, str] = field(default_factory=dict)  # what the extra params named when last applied
    served_model: str | None = None  # the CNN the server last served this project (its binding or the default)
    served_second_opinion: str | None = None  # and the second opinion: what `tandem select` ranks with by default

    def with_changes(self, **changes: Any) -> ProjectState:
        return replace(self, **changes)


_FIELDS = ("hostname", "access_token", "label_config", "model", "second_opinion", "pre_annotator", "served_model",
           "served_second_opinion")


class ProjectRepo:
    def __init__(self, url: str) -> None:
        self.engine = engine_for(url)

    def get(self, project_id: int) -> ProjectState | None:
        if not -(2**63) <= project_id < 2**63:  # no 64-bit database column holds it: no such project
            return None
        with self.engine.connect() as conn:
            row = conn.execute(select(T).where(T.c.project_id == project_id)).mappings().first()
        return _state(row) if row else None

    def count(self) -> int:
        from sqlalchemy import func

        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(T)).scalar_one())

    def all(self) -> list[ProjectState]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(T).order_by(T.c.project_id)).mappings().all()
        return [_state(r) for r in rows]

    def bound(self) -> list[ProjectState]:
        """The projects bound to a model or a second opinion of their own."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(T).where(T.c.model.is_not(None) | T.c.second_opinion.is_not(None))
                                .order_by(T.c.project_id)).mappings().all()
        return [_state(r) for r in rows]

    def save(self, state: ProjectState) -> ProjectState:
        values = {"project_id": state.project_id, **{f: getattr(state, f) for f in _FIELDS},
                  "label_map": json.dumps(state.label_map), "prompts": json.dumps(state.prompts),
                  "extra_binding": json.dumps(state.extra_binding),
                  "updated_at": time.time()}
        insert = insert_for(self.engine.dialect.name)
        stmt = insert(T).values(values)
        stmt = stmt.on_conflict_do_update(index_elements=["project_id"],
                                          set_={k: stmt.excluded[k] for k in values if k != "project_id"})
        with self.engine.begin() as conn:
            conn.execute(stmt)
        return state

    def delete(self, project_id: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(T.delete().where(T.c.project_id == project_id))

    def update(self, project_id: int, **changes: Any) -> ProjectState:
        """Read-modify-write of the fields given; other fields keep their stored values."""
        current = self.get(project_id) or ProjectState(project_id)
        return self.save(current.with_changes(**changes))


def _state(row) -> ProjectState:
    return ProjectState(
        project_id=row["project_id"],
        label_map=json.loads(row["label_map"] or "{}"),
        prompts=json.loads(row["prompts"] or "{}"),
        extra_binding=json.loads(row["extra_binding"] or "{}"),
        **{f: row[f] for f in _FIELDS},
    )
