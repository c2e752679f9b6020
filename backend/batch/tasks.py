"""A Label Studio project's tasks, a page at a time (bounded memory on 100k-task projects)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from backend.core.read_ahead import read_ahead

PAGE_SIZE = 500


@dataclass(frozen=True)
class TaskRef:
    """What the job needs of a task: its id and data (the image URLs), and which model versions Label Studio
    already holds a prediction of (so a task stored but not yet written is written, not predicted again)."""

    id: int
    data: dict[str, Any]
    versions: frozenset[str]

    def as_task(self) -> dict[str, Any]:
        return {"id": self.id, "data": self.data}


def _versions(value: Any) -> frozenset[str]:
    if isinstance(value, str):
        return frozenset(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, (list, tuple)):
        return frozenset(str(v) for v in value)
    return frozenset()


class LabelStudioTasks:
    """Reads through the label-studio-sdk's pager: one request per page, one page held at a time."""

    def __init__(self, client, project_id: int, page_size: int = PAGE_SIZE) -> None:
        self.client, self.project_id, self.page_size = client, project_id, page_size

    def label_config(self) -> str:
        return self.client.projects.get(self.project_id).label_config

    def count(self) -> int:
        project = self.client.projects.get(self.project_id)
        return int(getattr(project, "task_number", None) or 0)

    def pages(self) -> Iterator[list[TaskRef]]:
        """A page at a time; the next is requested while the job works on this one (two pages held at most)."""
        return read_ahead(self._pages())

    def _pages(self) -> Iterator[list[TaskRef]]:
        page: list[TaskRef] = []
        # only the three fields: Label Studio computes every other column of its data manager per task otherwise
        for task in self.client.tasks.list(project=self.project_id, page_size=self.page_size,
                                           include="id,data,predictions_model_versions"):
            page.append(TaskRef(int(task.id), dict(task.data or {}), _versions(task.predictions_model_versions)))
            if len(page) >= self.page_size:
                yield page
                page = []
        if page:
            yield page

