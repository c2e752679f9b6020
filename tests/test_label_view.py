"""Scoring sees what the backend would pre-annotate: model classes pooled onto the project's labels."""

import numpy as np
import pytest
import supervision as sv

from active_learning.label_view import in_labels
from active_learning.scoring import score_outputs
from backend.labeling.config import parse_label_config
from backend.labeling.label_map import build_label_map
from backend.models.base import ModelOutput

RECT = parse_label_config("""<View><Image name="img" value="$image"/><RectangleLabels name="label" toName="img">
<Label value="Human" predicted_values="person"/><Label value="Dog"/></RectangleLabels></View>""").controls[0]
CHOICES = parse_label_config("""<View><Image name="img" value="$image"/><Choices name="c" toName="img">
<Choice value="Human" predicted_values="person,man"/><Choice value="Dog"/></Choices></View>""").controls[0]
NAMES = [label.result_value for label in RECT.labels]
COCO = ("person", "chair", "dog")


def _boxes(xyxy, conf, names, class_names, class_scores=None):
    ids = np.array([class_names.index(n) for n in names], dtype=int)
    data = {"class_name": np.array(names, dtype=object)}
    if class_scores is not None:
        data["class_scores"] = np.array(class_scores, dtype=float)
    return ModelOutput(detections=sv.Detections(xyxy=np.array(xyxy, float), confidence=np.array(conf, float),
                                                class_id=ids, data=data))


def test_unmapped_classes_are_dropped_and_class_vectors_pooled():
    out = _boxes([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 70, 70]], [0.9, 0.6, 0.4], ["person", "chair", "dog"],
                 list(COCO), [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.1, 0.5]])
    (seen,) = in_labels([out], COCO, build_label_map(RECT, COCO), NAMES)
    det = seen.detections
    assert list(det.data["class_name"]) == ["Human", "Dog"]
    assert det.class_id.tolist() == [0, 1]
    np.testing.assert_allclose(det.confidence, [0.9, 0.4])
    np.testing.assert_allclose(det.data["class_scores"], [[0.7, 0.1], [0.2, 0.5]])  # the chair column is gone


def test_classifier_probabilities_pool_onto_choices():
    labels = build_label_map(CHOICES, ("person", "man", "chair", "dog"))
    (seen,) = in_labels([ModelOutput(probabilities=np.array([0.3, 0.2, 0.4, 0.1]))], ("person", "man", "chair", "dog"),
                        labels, ["Human", "Dog"])
    np.testing.assert_allclose(seen.probabilities, [0.5 / 0.6, 0.1 / 0.6])


@pytest.mark.parametrize("vlm_name", ["Human", "human"])
def test_models_with_differently_named_classes_agree_through_the_labels(vlm_name):
    """A COCO CNN's "person" and a VLM prompted with the project's "Human" on the same box agree."""
    cnn = _boxes([[0, 0, 10, 10]], [0.9], ["person"], list(COCO))
    vlm = _boxes([[0, 0, 10, 10]], [0.9], [vlm_name], [vlm_name, "Dog"])
    raw = score_outputs([cnn], COCO, [vlm], (vlm_name, "Dog"))
    assert raw.disagreement[0] > 0  # by model names alone a person is not a Human: a false class swap

    a = in_labels([cnn], COCO, build_label_map(RECT, COCO), NAMES)
    b = in_labels([vlm], (vlm_name, "Dog"), build_label_map(RECT, (vlm_name, "Dog")), NAMES)
    seen = score_outputs(a, NAMES, b, NAMES)
    assert seen.disagreement[0] == pytest.approx(0.0)
    assert seen.reasons == ["CNN boxes: 1; VLM agrees"]


def test_reasons_name_the_projects_labels_as_spelled():
    labels = build_label_map(CHOICES, COCO)
    seen = in_labels([ModelOutput(probabilities=np.array([0.5, 0.1, 0.4]))], COCO, labels, ["Human", "Dog"])
    table = score_outputs(seen, ["Human", "Dog"], model_names=("yolo", "vlm"))
    assert table.reasons == [f"yolo unsure: Human {5 / 9:.2f}, then Dog {4 / 9:.2f}"]


def test_uncertain_detections_name_the_boxes_to_check():
    out = _boxes([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], [0.95, 0.3, 0.2], ["person", "dog", "person"],
                 list(COCO))
    seen = in_labels([out], COCO, build_label_map(RECT, COCO), NAMES)
    table = score_outputs(seen, NAMES, model_names=("yolo", "vlm"))
    # what the annotator sees (boxes at 0.25 and above) apart from the fainter candidates that also count
    assert table.reasons == ["yolo unsure: 1 of 2 boxes near the 0.25 threshold (Dog 0.30); "
                             "1 candidate just below 0.25, not pre-annotated (Human 0.20)"]
