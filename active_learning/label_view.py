"""Model outputs seen through the project's labels, as the backend would pre-annotate them.

`tandem select` ranks what annotators will be shown: a class that maps to no label (a COCO model's
"chair" on a cat/dog project) is dropped, so it adds neither doubt nor disagreement; two models whose
class names differ ("person" and "Human" via predicted_values) compare class-aware; and reasons name the
project's labels. Classes mapped onto one label pool their probability, as the Choices writer does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from backend.labeling.label_map import LabelMap
from backend.models.base import ModelOutput


def pooling_matrix(class_names: Sequence[str], labels: LabelMap, label_names: Sequence[str]) -> np.ndarray:
    """(C, L) 0/1: column l sums the classes that map onto label l; unmapped classes are all-zero rows."""
    column = {name: j for j, name in enumerate(label_names)}
    m = np.zeros((len(class_names), len(label_names)))
    for i, name in enumerate(class_names):
        target = labels(name)
        if target in column:
            m[i, column[target]] = 1.0
    return m


def in_labels(
    outputs: Sequence[ModelOutput], class_names: Sequence[str], labels: LabelMap, label_names: Sequence[str]
) -> list[ModelOutput]:
    pool = pooling_matrix(class_names, labels, label_names)
    column = {name: j for j, name in enumerate(label_names)}
    out = []
    for o in outputs:
        if o.probabilities is not None:
            p = np.asarray(o.probabilities, dtype=float) @ pool
            total = p.sum()
            out.append(replace(o, probabilities=p / total if total > 0 else p))
            continue
        det = o.detections
        if det is None or len(det) == 0:
            out.append(o)
            continue
        ids = [column.get(labels(str(n))) for n in det.data["class_name"]]
        kept = det[np.array([j is not None for j in ids], dtype=bool)]
        kept.class_id = np.array([j for j in ids if j is not None], dtype=int)
        kept.data["class_name"] = np.array([label_names[j] for j in kept.class_id], dtype=object)
        if "class_scores" in kept.data and len(kept):
            kept.data["class_scores"] = np.asarray(kept.data["class_scores"], dtype=float) @ pool
        out.append(replace(o, detections=kept))
    return out


__all__ = ["in_labels", "pooling_matrix"]
