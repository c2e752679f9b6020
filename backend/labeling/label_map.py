"""Mapping model class names onto a control's labels.

Order of precedence: an explicit mapping from the user, then a label's `predicted_values`, then its
value or alias compared case-insensitively (or exactly, when asked). Classes that map to nothing are
dropped: a COCO model on a two-label project predicts only those two labels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from backend.errors import ConfigError
from backend.labeling.config import ControlSpec


@dataclass(frozen=True)
class LabelMap:
    control: str
    by_class: Mapping[str, str]  # model class name -> result value

    def __call__(self, class_name: str) -> str | None:
        return self.by_class.get(class_name)


def build_label_map(
    control: ControlSpec,
    class_names: Sequence[str],
    explicit: Mapping[str, str] | None = None,
    case_sensitive: bool = False,
) -> LabelMap:
    """Raise ConfigError when no model class reaches any label: predictions would all be empty."""

    def norm(s: str) -> str:
        return s if case_sensitive else s.strip().lower()

    by_result = {label.result_value: label for label in control.labels}
    lookup: dict[str, str] = {}
    for label in control.labels:  # weakest first, so stronger rules overwrite
        for name in (label.alias, label.value):
            if name:
                lookup.setdefault(norm(name), label.result_value)
    for label in control.labels:
        for name in label.predicted_values:
            lookup[norm(name)] = label.result_value

    explicit = dict(explicit or {})
    by_value = {norm(label.value): label.result_value for label in control.labels}
    for model_name, target in explicit.items():
        resolved = target if target in by_result else by_value.get(norm(target))
        if resolved is None:
            raise ConfigError(
                f"label mapping {model_name!r} -> {target!r}: control '{control.name}' has no label {target!r} "
                f"(labels: {', '.join(by_result)})"
            )
        lookup[norm(model_name)] = resolved

    mapping = {name: lookup[norm(name)] for name in class_names if norm(name) in lookup}
    if not mapping:
        raise ConfigError(
            f"none of the model's classes ({', '.join(list(class_names)[:12])}) matches a label of control "
            f"'{control.name}' ({', '.join(by_result)}); add predicted_values=\"...\" to the labels or set a "
            "label_map (TANDEM_LABEL_MAP or the backend's extra_params)"
        )
    return LabelMap(control=control.name, by_class=mapping)
