"""LabelSpace: model classes onto a control's labels, by hand-computed cases (the rules, pooling, vocabulary)."""

import numpy as np
import pytest
import supervision as sv

from active_learning.label_view import in_labels, pooling_matrix
from backend.core.labels import LabelSpace, pool_choice
from backend.core.prediction import CLASS_NAME, CLASS_SCORES, Prediction
from backend.errors import ConfigError
from backend.labeling.config import parse_label_config
from backend.labeling.label_map import LabelMap, build_label_map
from backend.models.base import Vocabulary

CONTROL = parse_label_config("""<View><Image name="img" value="$image"/>
<RectangleLabels name="label" toName="img"><Label value="Car" predicted_values="truck,bus"/>
<Label value="Person" alias="P"/><Label value="Dog"/></RectangleLabels></View>""").controls[0]
LABELS = ("Car", "P", "Dog")  # result values: Person is written as its alias


def test_rules_in_order_of_precedence():
    space = LabelSpace.build(CONTROL, ["car", "PERSON", "p", "bus", "truck", "cat", " dog "])
    assert space.label_names == LABELS and space.control == "label"
    assert space.by_class == {"car": "Car", "PERSON": "P", "p": "P", "bus": "Car", "truck": "Car", " dog ": "Dog"}
    assert space.label("cat") is None and space("bus") == "Car"  # callable, as LabelMap was


def test_predicted_values_beat_a_labels_own_name_and_explicit_beats_both():
    control = parse_label_config("""<View><Image name="img" value="$image"/><RectangleLabels name="l" toName="img">
    <Label value="Dog"/><Label value="Pet" predicted_values="dog"/></RectangleLabels></View>""").controls[0]
    assert LabelSpace.build(control, ["dog"]).label("dog") == "Pet"  # predicted_values over the value "Dog"
    assert LabelSpace.build(control, ["dog"], explicit={"dog": "Dog"}).label("dog") == "Dog"
    assert LabelSpace.build(control, ["DOG"], explicit={"dog": "dog"}).label("DOG") == "Dog"  # case-insensitive both sides


def test_case_sensitive_compares_exactly():
    space = LabelSpace.build(CONTROL, ["car", "Car", "Dog", "dog"], case_sensitive=True)
    assert space.by_class == {"Car": "Car", "Dog": "Dog"}


def test_errors_keep_their_messages():
    with pytest.raises(ConfigError, match=r"label mapping 'cow' -> 'Horse': control 'label' has no label 'Horse' "
                                          r"\(labels: 'Car', 'P', 'Dog'\)\. So none of the model's classes \(cow\)"):
        LabelSpace.build(CONTROL, ["cow"], explicit={"cow": "Horse"})
    with pytest.raises(ConfigError, match=r"none of the model's classes \(square, circle\) matches a label of "
                                          r"control 'label' \(Car, P, Dog\)"):
        LabelSpace.build(CONTROL, ["square", "circle"])


def test_label_map_is_the_label_space():
    m = build_label_map(CONTROL, ["bus", "p"])
    assert LabelMap is LabelSpace and isinstance(m, LabelSpace)
    assert m == LabelSpace.build(CONTROL, ["bus", "p"])


def test_pooling_matrix_hand_computed():
    space = LabelSpace.build(CONTROL, ["bus", "chair", "person", "truck", "dog"])
    expected = np.array([[1, 0, 0],   # bus -> Car
                         [0, 0, 0],   # chair -> nothing
                         [0, 1, 0],   # person -> P
                         [1, 0, 0],   # truck -> Car
                         [0, 0, 1]])  # dog -> Dog
    np.testing.assert_array_equal(space.pooling_matrix(), expected)
    np.testing.assert_array_equal(pooling_matrix(space.class_names, space, LABELS), expected)  # the old name
    # other columns: only the labels listed, in their order
    np.testing.assert_array_equal(space.over(["truck", "dog"], ["Dog", "Car"]).pooling_matrix(), [[0, 1], [1, 0]])


def test_class_ids_index_the_label_columns():
    space = LabelSpace.build(CONTROL, ["bus", "chair", "dog"])
    assert space.class_ids() == {"bus": 0, "dog": 2}
    assert space.over(space.class_names, ["Dog", "Horse"]).class_ids() == {"dog": 0}  # Car is not a column there


def test_by_name_is_case_insensitive_and_never_raises():
    space = LabelSpace.by_name(["Square", "CIRCLE", "chair"], ["square", "circle", "triangle"])
    assert space.class_ids() == {"Square": 0, "CIRCLE": 1}
    assert LabelSpace.by_name(["chair"], ["square"]).class_ids() == {}


def test_of_control_maps_each_result_value_onto_itself():
    space = LabelSpace.of_control(CONTROL)
    assert space.class_names == space.label_names == LABELS
    assert [space.label(n) for n in ("Car", "P", "Person", "car")] == ["Car", "P", None, None]  # exact


def test_to_labels_detections_hand_computed():
    classes = ("bus", "chair", "person", "truck")
    det = sv.Detections(
        xyxy=np.array([[0, 0, 10, 10], [5, 5, 9, 9], [20, 20, 30, 30], [1, 2, 3, 4]], float),
        confidence=np.array([0.9, 0.8, 0.7, 0.6]), class_id=np.array([0, 1, 2, 3]),
        data={CLASS_NAME: np.array(classes, dtype=object),
              CLASS_SCORES: np.array([[0.5, 0.1, 0.2, 0.2], [0.1, 0.8, 0.1, 0.0], [0.1, 0.1, 0.7, 0.1],
                                      [0.3, 0.0, 0.1, 0.6]])})
    space = LabelSpace.build(CONTROL, classes)
    (seen,) = space.to_labels([Prediction(detections=det, model_version="v1")])
    assert seen.class_names == LABELS and seen.model_version == "v1"
    assert list(seen.detections.data[CLASS_NAME]) == ["Car", "P", "Car"]  # the chair box is dropped
    assert seen.detections.class_id.tolist() == [0, 1, 0]
    np.testing.assert_allclose(seen.detections.xyxy, [[0, 0, 10, 10], [20, 20, 30, 30], [1, 2, 3, 4]])
    np.testing.assert_allclose(seen.detections.confidence, [0.9, 0.7, 0.6])
    # columns Car (bus + truck), P (person), Dog (nothing): the chair column is gone
    np.testing.assert_allclose(seen.detections.data[CLASS_SCORES], [[0.7, 0.2, 0], [0.2, 0.7, 0], [0.9, 0.1, 0]])
    assert list(det.data[CLASS_NAME]) == list(classes)  # the input is not changed


def test_to_labels_without_class_names_reads_class_ids():
    det = sv.Detections(xyxy=np.array([[0, 0, 1, 1], [0, 0, 2, 2]], float), confidence=np.array([0.5, 0.4]),
                        class_id=np.array([1, 0]))
    (seen,) = LabelSpace.build(CONTROL, ("chair", "dog")).to_labels([Prediction(detections=det)])
    assert seen.detections.class_id.tolist() == [2] and list(seen.detections.data[CLASS_NAME]) == ["Dog"]


def test_to_labels_probabilities_pool_and_renormalise():
    space = LabelSpace.build(CONTROL, ("bus", "chair", "truck", "person"))
    seen, empty = space.to_labels([Prediction(probabilities=np.array([0.4, 0.3, 0.1, 0.2])),
                                   Prediction(detections=sv.Detections.empty())])
    np.testing.assert_allclose(seen.probabilities, [0.5 / 0.7, 0.2 / 0.7, 0.0])  # Car (bus + truck) beats chair
    assert len(empty.detections) == 0 and seen.class_names == empty.class_names == LABELS


def test_to_labels_reads_an_answer_outside_the_labels_as_unsure():
    """An unmapped class (chair 0.5) outweighs every label (Car 0.3): renormalising would call Car a sure 0.6;
    the unmapped mass is spread evenly over the labels instead."""
    space = LabelSpace.build(CONTROL, ("bus", "chair", "truck", "person"))
    outside, only = space.to_labels([Prediction(probabilities=np.array([0.2, 0.5, 0.1, 0.2])),
                                     Prediction(probabilities=np.array([0.0, 1.0, 0.0, 0.0]))])
    np.testing.assert_allclose(outside.probabilities, [0.3 + 0.5 / 3, 0.2 + 0.5 / 3, 0.5 / 3])
    np.testing.assert_allclose(only.probabilities, [1 / 3, 1 / 3, 1 / 3])
    assert outside.extra["outside_labels"] == only.extra["outside_labels"] == "chair"  # what it saw, for reasons
    pooled, said = pool_choice(np.array([0.2, 0.5, 0.1, 0.2]), space.pooling_matrix())
    assert said and np.allclose(pooled, outside.probabilities)
    assert not pool_choice(np.array([0.4, 0.3, 0.1, 0.2]), space.pooling_matrix())[1]


def test_in_labels_delegates():
    classes = ("bus", "person")
    out = Prediction(detections=sv.Detections(xyxy=np.array([[0, 0, 4, 4]], float), confidence=np.array([0.5]),
                                              class_id=np.array([1]),
                                              data={CLASS_NAME: np.array(["person"], dtype=object)}))
    space = LabelSpace.build(CONTROL, classes)
    (a,), (b,) = in_labels([out], classes, space, LABELS), space.to_labels([out])
    assert a.class_names == b.class_names == LABELS and a.detections == b.detections


def test_vocabulary_names_are_label_values_and_prompts_match_case_insensitively():
    names, prompts = LabelSpace.vocabulary(CONTROL, {"person": "a human being", "DOG": "a dog, any breed"})
    assert names == ("Car", "Person", "Dog")  # values, not the alias: what prompts are keyed by
    assert prompts == ("Car", "a human being", "a dog, any breed")
    assert LabelSpace.vocabulary(["Cat"]) == (("Cat",), ("Cat",))


@pytest.mark.parametrize("prompts", [None, {}, {"square": "a box"}, {"CIRCLE": "a round thing", "x": "y"}])
def test_vocabulary_agrees_with_the_vlm_vocabulary(prompts):
    """models/base.py's Vocabulary.from_labels does the same lookup; this keeps the two from drifting."""
    labels = ["Square", "circle", "Triangle"]
    vocab = Vocabulary.from_labels(labels, prompts)
    assert LabelSpace.vocabulary(labels, prompts) == (vocab.names, vocab.prompts)


def test_a_config_with_thousands_of_labels_gives_a_message_a_person_can_read():
    """A 5,000-label config that matches no class: the refusal names a few labels and counts the rest, instead
    of a line of tens of kilobytes in Label Studio's error panel and the server's log."""
    from backend.core.text import clip, shortlist
    from backend.labeling.config import parse_label_config

    labels = "".join(f'<Label value="Species {i:04d}"/>' for i in range(5000))
    control = parse_label_config(f'<View><Image name="image" value="$image"/><RectangleLabels name="label" '
                                 f'toName="image">{labels}</RectangleLabels></View>').controls[0]
    with pytest.raises(ConfigError) as refused:
        LabelSpace.build(control, [f"class{i}" for i in range(80)],
                         explicit={f"class{i}": f"Nope {i}" for i in range(40)})
    said = str(refused.value)
    assert len(said) < 3000, len(said)
    assert "'Species 0000', 'Species 0001'" in said and "… and 4988 more" in said  # 12 shown, the rest counted
    assert "class0, class1" in said and "… and 68 more" in said  # the model's 80 classes
    assert "label mapping 'class0' -> 'Nope 0'" in said and "… and 37 more" in said  # 3 of 40 stale entries

    assert shortlist(["a", "b", "c"], 2) == "a, b, … and 1 more" and shortlist(["a", "b"], 2) == "a, b"
    assert clip("x" * 10, 4) == "xxxx… (10 characters)" and clip("short", 10) == "short"
