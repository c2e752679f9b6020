"""Mapping model class names onto a control's labels: `backend.core.labels.LabelSpace` under its older names.

Order of precedence: an explicit mapping from the user, then a label's `predicted_values`, then its
value or alias compared case-insensitively (or exactly, when asked). Classes that map to nothing are
dropped: a COCO model on a two-label project predicts only those two labels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from backend.core.labels import LabelSpace
from backend.labeling.config import ControlSpec

LabelMap = LabelSpace  # `labels(class_name)`, `.by_class`, `.control`: what callers used before LabelSpace


def build_label_map(
    control: ControlSpec,
    class_names: Sequence[str],
    explicit: Mapping[str, str] | None = None,
    case_sensitive: bool = False,
) -> LabelMap:
    """Raise ConfigError when no model class reaches any label: predictions would all be empty."""
    return LabelSpace.build(control, class_names, explicit, case_sensitive)


__all__ = ["LabelMap", "build_label_map"]
