"""The review queue inside Label Studio: task data fields plus saved Data Manager views.

Scores go into `data.tandem_*` because Label Studio can filter and sort `data.<field>` (as numbers when
the view says so) but answers 500 for `meta.*`. A PATCH of `data` replaces the whole dict, so every
write sends the task's full data back. Tasks annotated since the last run, or no longer picked, lose
their fields — except a random control pick, which keeps `tandem_pick` so the calibration of auto-accept can
tell an unbiased human-verified task from a hard one; the views also filter on "no annotations" so a task leaves
the queue the moment it is done.

Label Studio 1.23's Data Manager has no column order in a view, only hidden columns: every Tandem view hides the
default columns and other data fields, so the thumbnail, rank, reason and scores are the first a reviewer sees.

Auto-accept (`tandem accept`) writes its own fields (`ACCEPT_FIELDS`) and view; its annotations carry
`AUTO_MARKER` in every region's meta so they can be told from human ones and removed exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from label_studio_sdk import LabelStudio

from backend.labelstudio.extra_params import project_extra

PREFIX = "tandem_"
# in the order a reviewer reads them (Label Studio shows data columns in the order it first saw the keys)
FIELDS = ("tandem_rank", "tandem_reason", "tandem_score", "tandem_disagreement", "tandem_uncertainty", "tandem_pick",
          "tandem_run")
NUMBER_FIELDS = ("tandem_score", "tandem_uncertainty", "tandem_disagreement", "tandem_rank")
CONTROL_PICK = "control (random)"
ACCEPT_FIELDS = ("tandem_agreement", "tandem_bound", "tandem_auto", "tandem_spot_check", "tandem_auto_annotation")
ACCEPT_NUMBER_FIELDS = ("tandem_agreement", "tandem_bound", "tandem_spot_check", "tandem_auto_annotation")
AUTO_VIEW = "Tandem: auto-accepted (spot-check)"
DISAGREEMENT_VIEW = "Tandem: disagreements"
AUTO_MARKER = "tandem auto-accept"
# Label Studio's own task columns, hidden in Tandem views (the id stays: it opens the task)
DEFAULT_COLUMNS = ("inner_id", "completed_at", "total_annotations", "cancelled_annotations", "total_predictions",
                   "annotators", "annotations_results", "annotations_ids", "predictions_score",
                   "predictions_model_versions", "predictions_results", "file_upload", "storage_filename", "created_at",
                   "updated_at", "updated_by", "avg_lead_time", "draft_exists", "agreement", "reviewers",
                   "reviewed", "comments", "unresolved_comment_count", "last_comment_updated_at", "ground_truth")


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
        out: dict[str, Any] = {"tandem_rank": self.rank, "tandem_reason": self.reason,
                               "tandem_score": round(float(self.score), 6)}
        if self.disagreement is not None:
            out["tandem_disagreement"] = round(float(self.disagreement), 6)
        out.update(tandem_uncertainty=round(float(self.uncertainty), 6),
                   tandem_pick=CONTROL_PICK if self.control else "active", tandem_run=run)
        return out


def strip_fields(data: Mapping[str, Any], fields: tuple[str, ...] | None = None) -> dict[str, Any]:
    """`data` without Tandem's fields (`fields`: only those; default: every `tandem_*` except auto-accept's)."""
    if fields is None:
        return {k: v for k, v in data.items() if not k.startswith(PREFIX) or k in ACCEPT_FIELDS}
    return {k: v for k, v in data.items() if k not in fields}


TOUCHED_AFTER_S = 1.0  # an annotation updated this long after it was created was saved again by someone


def _seconds(value: Any) -> float | None:
    """Label Studio's timestamps: ISO text in exports and webhooks, datetimes from the SDK."""
    from datetime import datetime

    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str) and value:
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def is_auto_accepted(annotation: Mapping[str, Any]) -> bool:
    """Whether an annotation is `tandem accept`'s, untouched: every region carries the marker in its meta, and
    nobody has saved it since it was written. A person who moves a box in the editor keeps the region's meta
    (and so the marker); the later `updated_at` is what says the annotation is now theirs — trained on,
    evidence, never deleted by `--undo`."""
    result = annotation.get("result") or []
    if not (bool(result) and all(AUTO_MARKER in ((r.get("meta") or {}).get("text") or []) for r in result)):
        return False
    created, updated = _seconds(annotation.get("created_at")), _seconds(annotation.get("updated_at"))
    return created is None or updated is None or updated - created <= TOUCHED_AFTER_S


def hidden_columns(data_keys: Iterable[str] = (), shown: Iterable[str] = ()) -> dict[str, list[str]]:
    """Hide Label Studio's default columns and every data field not in `shown` (the image, Tandem's fields)."""
    shown = set(shown)
    hidden = [f"tasks:{c}" for c in DEFAULT_COLUMNS]
    hidden += [f"tasks:data.{k}" for k in data_keys if k not in shown]
    return {"explore": hidden, "labeling": hidden}


def _view(title: str, order_field: str, order: str = "desc", data_keys: Iterable[str] = (),
          image_keys: Iterable[str] = ()) -> dict[str, Any]:
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
        "hiddenColumns": hidden_columns(data_keys, {*image_keys, *FIELDS[:-1]}),
    }


def view_specs(with_disagreement: bool, data_keys: Iterable[str] = (), image_keys: Iterable[str] = ()
               ) -> list[dict[str, Any]]:
    keys = dict(data_keys=tuple(data_keys), image_keys=tuple(image_keys))
    views = [_view("Tandem: review queue", "tandem_rank", order="asc", **keys),
             _view("Tandem: uncertain", "tandem_uncertainty", **keys)]
    if with_disagreement:
        views.insert(1, _view(DISAGREEMENT_VIEW, "tandem_disagreement", **keys))
    return views


def auto_view_spec(data_keys: Iterable[str] = (), image_keys: Iterable[str] = ()) -> dict[str, Any]:
    """The auto-accepted tasks, the spot-check slice first: a reviewer opens those and confirms the rest is right."""
    return {
        "title": AUTO_VIEW,
        "ordering": ["-tasks:data.tandem_spot_check"],
        "filters": {"conjunction": "and", "items": [
            {"filter": "filter:tasks:data.tandem_agreement", "operator": "greater_or_equal", "type": "Number",
             "value": 0}]},
        "columnsDisplayType": {f"tasks:data.{f}": "Number" for f in ACCEPT_NUMBER_FIELDS},
        "hiddenColumns": hidden_columns(data_keys, {*image_keys, *ACCEPT_FIELDS}),
    }


def data_keys(tasks: Iterable[Mapping[str, Any]]) -> list[str]:
    """Every data field of the tasks, in first-seen order."""
    return list(dict.fromkeys(k for t in tasks for k in (t.get("data") or {})))


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
        self._data_keys = data_keys({"data": d} for d in tasks.values())
        for task_id, data in tasks.items():
            clean = strip_fields(data)
            if task_id in entries:
                self.client.tasks.update(id=str(task_id), data={**clean, **entries[task_id].fields(run)})
                written += 1
                continue
            if data.get("tandem_pick") == CONTROL_PICK:  # kept: calibration prefers unbiased human-verified tasks
                clean["tandem_pick"] = CONTROL_PICK
            if clean != dict(data):
                self.client.tasks.update(id=str(task_id), data=clean)
                cleared += 1
        return {"written": written, "cleared": cleared}

    def image_keys(self) -> list[str]:
        from backend.labeling.config import parse_label_config

        try:
            return list(dict.fromkeys(c.image_key for c in parse_label_config(self.label_config()).controls))
        except Exception:  # a config Tandem cannot read: the image column is simply not singled out
            return []

    def _upsert_view(self, spec: dict[str, Any], existing: Mapping[str, Any]) -> int:
        view = existing.get(spec["title"])
        if view is None:
            view = self.client.views.create(project=self.project_id, data=spec)
        else:
            view = self.client.views.update(id=str(view.id), project=self.project_id, data=spec)
        return view.id

    def _existing_views(self) -> dict[str, Any]:
        return {v.data.get("title"): v for v in self.client.views.list(project=self.project_id) if v.data}

    def ensure_views(self, with_disagreement: bool) -> dict[str, int]:
        """Create or update the saved views by title; a disagreements view left by an earlier run with a second
        opinion is deleted when this run has none (an empty tab reads as "no disagreement"). Returns title -> id."""
        existing = self._existing_views()
        keys = dict(data_keys=getattr(self, "_data_keys", ()), image_keys=self.image_keys())
        ids = {spec["title"]: self._upsert_view(spec, existing) for spec in view_specs(with_disagreement, **keys)}
        if not with_disagreement and DISAGREEMENT_VIEW in existing:
            self.client.views.delete(id=str(existing[DISAGREEMENT_VIEW].id))
        return ids

    # -- auto-accept ------------------------------------------------------------------------------------------
    def write_accepted(self, fields: Mapping[int, Mapping[str, Any]], tasks: Mapping[int, Mapping[str, Any]]
                       ) -> dict[str, int]:
        """Set auto-accept fields on `fields`' tasks and clear them from every other task; creates the view."""
        written = cleared = 0
        self._data_keys = data_keys({"data": d} for d in tasks.values())
        for task_id, data in tasks.items():
            clean = strip_fields(data, ACCEPT_FIELDS)
            if task_id in fields:
                new = {**clean, **fields[task_id]}
                if new != dict(data):
                    self.client.tasks.update(id=str(task_id), data=new)
                written += 1
            elif clean != dict(data):
                self.client.tasks.update(id=str(task_id), data=clean)
                cleared += 1
        return {"written": written, "cleared": cleared}

    def ensure_auto_view(self) -> int:
        return self._upsert_view(auto_view_spec(getattr(self, "_data_keys", ()), self.image_keys()),
                                 self._existing_views())

    def remove_auto_view(self) -> bool:
        """Delete the auto-accept view (when auto-accept is off or undone, an empty tab would read as "nothing
        agreed"); returns whether there was one."""
        view = self._existing_views().get(AUTO_VIEW)
        if view is not None:
            self.client.views.delete(id=str(view.id))
        return view is not None
