"""Predictions into Label Studio in bulk: one `POST /api/projects/{id}/import/predictions` per write
(label-studio-sdk `projects.import_predictions`, Label Studio 1.23), never one call per task."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from backend.batch.predict_job import JobOptions

# The job's largest write in one request: Label Studio 1.23 recounts the whole project's predicted tasks per
# request, so splitting a write adds a recount.
MAX_PER_REQUEST = JobOptions.max_write_batch


class LabelStudioWriter:
    def __init__(self, client, project_id: int) -> None:
        self.client, self.project_id = client, project_id

    def write(self, items: Sequence[tuple[int, Mapping[str, Any]]]) -> int:
        """(task id, Label Studio item with result/score/model_version) -> predictions created."""
        created = 0
        for start in range(0, len(items), MAX_PER_REQUEST):
            part = items[start : start + MAX_PER_REQUEST]
            request = [{"task": tid, "result": item["result"], "score": item.get("score"),
                        "model_version": item["model_version"]} for tid, item in part]
            answer = self.client.projects.import_predictions(self.project_id, request=request,
                                                             request_options={"timeout_in_seconds": 300})
            created += int(getattr(answer, "created", None) or len(part))
        return created

    def drop(self, task_ids: Sequence[int], model_version: str) -> int:
        """Deletes the tasks' predictions of `model_version` (made again under new thresholds, about to be
        imported anew): two requests a task, for the few a threshold change touches."""
        dropped = 0
        for tid in task_ids:
            for prediction in self.client.predictions.list(task=tid):
                if prediction.model_version == model_version and prediction.id is not None:
                    self.client.predictions.delete(prediction.id)
                    dropped += 1
        return dropped
