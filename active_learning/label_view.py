"""Model outputs seen through the project's labels, as the backend would pre-annotate them.

`tandem select` ranks what annotators will be shown: a class that maps to no label (a COCO model's
"chair" on a cat/dog project) is dropped, so it adds neither doubt nor disagreement; two models whose
class names differ ("person" and "Human" via predicted_values) compare class-aware; and reasons name the
project's labels. Classes mapped onto one label pool their probability, as the Choices writer does.

The work is `backend.core.labels.LabelSpace`'s (`pooling_matrix`, `to_labels`); these are its older names.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from backend.core.labels import LabelSpace
from backend.core.prediction import Prediction


def pooling_matrix(class_names: Sequence[str], labels: LabelSpace, label_names: Sequence[str]) -> np.ndarray:
    """(C, L) 0/1: column l sums the classes that map onto label l; unmapped classes are all-zero rows."""
    return labels.over(class_names, label_names).pooling_matrix()


def in_labels(
    outputs: Sequence[Prediction], class_names: Sequence[str], labels: LabelSpace, label_names: Sequence[str]
) -> list[Prediction]:
    """`outputs` in the model's `class_names` -> in `label_names` (`LabelSpace.to_labels`)."""
    return labels.over(class_names, label_names).to_labels(outputs)


__all__ = ["in_labels", "pooling_matrix"]
