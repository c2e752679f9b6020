"""Per-project settings kept in Label Studio: the extra params of a project's ML backends.

`/setup` receives them on every connect; commands that run without a /setup (`tandem select`, a training
job) read them here, so a label_map set only in the project's Model settings holds everywhere.
"""

from __future__ import annotations

from typing import Any

from backend.settings import extra_setting


def project_extra(client: Any, project_id: int, key: str) -> dict[str, str]:
    """extra_params[key] merged over the project's ML backends (a label-studio-sdk client)."""
    merged: dict[str, str] = {}
    for backend in client.ml.list(project=project_id):
        merged.update(extra_setting(backend.extra_params, key))
    return merged
