"""Model outputs -> Label Studio result regions, one writer per control tag.

The writers live with the reader in `backend.convert.labelstudio` (both directions of the Label Studio
format in one place); they are re-exported here under the names callers import.
"""

from __future__ import annotations

from backend.convert.labelstudio import (
    WRITERS,
    ChoicesWriter,
    ControlWriter,
    PolygonLabelsWriter,
    RectangleLabelsWriter,
    Region,
    prediction_score,
)

__all__ = [
    "WRITERS",
    "ChoicesWriter",
    "ControlWriter",
    "PolygonLabelsWriter",
    "RectangleLabelsWriter",
    "Region",
    "prediction_score",
]
