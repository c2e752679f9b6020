"""The review queue inside Label Studio: task data fields plus saved Data Manager views.

Scores go into `data.tandem_*` because Label Studio can filter and sort `data.<field>` (as numbers when
the view says so) but answers 500 for `meta.*`. A PATCH of `data` replaces the whole dict, so every
write sends the task's full data back. Tasks annotated since the last run, or no longer picked, lose
their fields; the views also filter on "no annotations" so a task leaves the queue the moment it is done.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from label_studio_sdk import LabelStudio

from backend.labelstudio.extra_params import project_extra

PREFIX = "tandem_"
FIELDS = ("tandem_score", "tandem_uncertainty", "tandem_disagreement", "tandem_reason", "tandem_pick", "tandem_rank",
          "tandem_run")
NUMBER_FIELDS = ("tandem_score", "tandem_uncertainty", "tandem_disagreement", "tandem_rank")


@dataclass(frozen=True)
class QueueEntry:
    task_id: int
    rank: int
    score: float
    uncertainty: float
    disagreement: float | None
    reason: str
    control: bool

    def fields(self, run: str) -> dict[str, Any]:
        out = {
            "tandem_score": round(float(self.score), 6),
            "tandem_uncertainty": round(float(self.uncertainty), 6),
            "tandem_reason": self.reason,
            "tandem_pick": "control (random)" if self.control else "active",
            "tandem_rank": self.rank,
            "tandem_run": run,
        }
        if self.disagreement is not None:
            out["tandem_disagreement"] = round(float(self.disagreement), 6)
        return out


def strip_fields(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if not k.startswith(PREFIX)}


def _view(title: str, order_field: str, order: str = "desc") -> dict[str, Any]:
    column = f"tasks:data.{order_field}"
    return {
        "title": title,
        "ordering": [("-" if order == "desc" else "") + column],
        "filters": {
            "conjunction": "and",
            "items": [
                {"filter": f"filter:tasks:data.{order_field}", "operator": "greater_or_equal", "type": "Number",
                 "value": 0},
                {"filter": "filter:tasks:total_annotations", "operator": "equal", "type": "Number", "value": 0},
            ],
        },
        "columnsDisplayType": {f"tasks:data.{f}": "Number" for f in NUMBER_FIELDS},
        "hiddenColumns": {"explore": [], "labeling": []},
    }


def view_specs(with_disagreement: bool) -> list[dict[str, Any]]:
    views = [_view("Tandem: review queue", "tandem_rank", order="asc"), _view("Tandem: uncertain", "tandem_uncertainty")]
    if with_disagreement:
        views.insert(1, _view("Tandem: disagreements", "tandem_disagreement"))
    return views


class LabelStudioQueue:
    def __init__(self, client: LabelStudio, project_id: int) -> None:
        self.client = client
        self.project_id = project_id

    def tasks(self) -> list[dict[str, Any]]:
        return [t.model_dump() for t in self.client.tasks.list(project=self.project_id, fields="all")]

    def label_config(self) -> str:
        return self.client.projects.get(id=self.project_id).label_config

    def backend_extra(self, key: str) -> dict[str, str]:
        """extra_params[key] of the project's ML backends: the per-project label_map / prompts /setup is given."""
        return project_extra(self.client, self.project_id, key)

    def write(self, entries: Iterable[QueueEntry], tasks: Mapping[int, Mapping[str, Any]], run: str) -> dict[str, int]:
        """Set fields on picked tasks and clear them elsewhere; returns counts of each."""
        entries = {e.task_id: e for e in entries}
        written = cleared = 0
        for task_id, data in tasks.items():
            clean = strip_fields(data)
            if task_id in entries:
                self.client.tasks.update(id=str(task_id), data={**clean, **entries[task_id].fields(run)})
                written += 1
            elif len(clean) != len(data):
                self.client.tasks.update(id=str(task_id), data=clean)
                cleared += 1
        return {"written": written, "cleared": cleared}

    def ensure_views(self, with_disagreement: bool) -> dict[str, int]:
        """Create or update the saved views by title; returns title -> view id."""
        existing = {v.data.get("title"): v for v in self.client.views.list(project=self.project_id) if v.data}
        ids = {}
        for spec in view_specs(with_disagreement):
            view = existing.get(spec["title"])
            if view is None:
                view = self.client.views.create(project=self.project_id, data=spec)
            else:
                view = self.client.views.update(id=str(view.id), project=self.project_id, data=spec)
            ids[spec["title"]] = view.id
        return ids
