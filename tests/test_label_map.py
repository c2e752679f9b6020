import pytest

from backend.errors import ConfigError
from backend.labeling.config import parse_label_config
from backend.labeling.label_map import build_label_map

XML = """<View><Image name="img" value="$image"/>
<RectangleLabels name="label" toName="img"><Label value="Car" predicted_values="truck,bus"/>
<Label value="Person" alias="P"/><Label value="Dog"/></RectangleLabels></View>"""
CONTROL = parse_label_config(XML).controls[0]


def test_case_insensitive_value_alias_and_predicted_values():
    m = build_label_map(CONTROL, ["car", "PERSON", "bus", "cat", "p"])
    assert m("car") == "Car"
    assert m("PERSON") == "P"  # results carry the alias
    assert m("bus") == "Car"
    assert m("p") == "P"
    assert m("cat") is None


def test_case_sensitive_mode():
    m = build_label_map(CONTROL, ["car", "Dog"], case_sensitive=True)
    assert m("car") is None and m("Dog") == "Dog"


def test_explicit_mapping_wins():
    m = build_label_map(CONTROL, ["car", "puppy"], explicit={"car": "Dog", "puppy": "dog"})
    assert m("car") == "Dog" and m("puppy") == "Dog"


def test_explicit_mapping_to_unknown_label_is_left_out_and_said_or_an_error_when_nothing_maps():
    """A label renamed since the map was written: the other classes still map, and the entry is named."""
    m = build_label_map(CONTROL, ["car", "cow"], explicit={"cow": "Horse"})
    assert m("car") == "Car" and m("cow") is None
    assert m.ignored == ("label mapping 'cow' -> 'Horse': control 'label' has no label 'Horse' "
                         "(labels: 'Car', 'P', 'Dog')",)
    with pytest.raises(ConfigError, match="has no label 'Horse'"):
        build_label_map(CONTROL, ["cow"], explicit={"cow": "Horse"})
    with pytest.raises(ConfigError, match=r"the label map's key\(s\) 'sqaure' are not classes of the model\. So none"):
        build_label_map(CONTROL, ["square"], explicit={"sqaure": "Dog"})  # a typo in the key


def test_no_overlap_is_an_error_that_names_both_sides():
    with pytest.raises(ConfigError, match=r"square, circle.*Car, P, Dog"):
        build_label_map(CONTROL, ["square", "circle"])
