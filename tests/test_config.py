import pytest

from backend.errors import ConfigError
from backend.labeling.config import ControlKind, parse_label_config

RECT = """<View><Image name="img" value="$image"/>
<RectangleLabels name="label" toName="img"><Label value="Car" predicted_values="car,automobile"/>
<Label value="Person" alias="P"/></RectangleLabels>
<TextArea name="notes" toName="img"/></View>"""


def test_finds_image_control_and_labels():
    cfg = parse_label_config(RECT)
    assert len(cfg.controls) == 1
    control = cfg.controls[0]
    assert (control.name, control.kind, control.to_name, control.image_key) == (
        "label", ControlKind.RECTANGLE, "img", "image")
    car, person = control.labels
    assert car.predicted_values == ("car", "automobile")
    assert person.result_value == "P" and person.value == "Person"
    assert cfg.ignored == ("TextArea 'notes'",)


def test_several_controls_and_images():
    xml = """<View><Image name="a" value="$left"/><Image name="b" value="$right"/>
    <Choices name="cls" toName="a"><Choice value="ok"/><Choice value="bad"/></Choices>
    <PolygonLabels name="poly" toName="b"><Label value="x"/></PolygonLabels></View>"""
    cfg = parse_label_config(xml)
    assert [(c.kind, c.image_key) for c in cfg.controls] == [(ControlKind.CHOICES, "left"), (ControlKind.POLYGON, "right")]
    assert cfg.image_keys() == ["left", "right"]


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("", "empty"),
        ("<View><Image name='i' value='$i'/>", "not valid XML"),
        ("<View><Text name='t' value='$t'/><Choices name='c' toName='t'><Choice value='a'/></Choices></View>", "no <Image>"),
        ("<View><Image name='i' value='$i'/><TextArea name='t' toName='i'/></View>", "TextArea 't'"),
        ("<View><Image name='i' value='$i'/><KeyPointLabels name='k' toName='i'><Label value='a'/></KeyPointLabels></View>",
         "KeyPointLabels 'k'"),
    ],
)
def test_unservable_configs_name_the_problem(xml, message):
    with pytest.raises(ConfigError, match=message):
        parse_label_config(xml)


def test_extra_setting_reads_a_dict_or_its_json_text_and_nothing_else():
    from backend.settings import extra_setting

    assert extra_setting({"label_map": {"car": "Car", "n": 1}}, "label_map") == {"car": "Car", "n": "1"}
    assert extra_setting('{"prompts": {"Car": "a red car"}}', "prompts") == {"Car": "a red car"}
    assert extra_setting("not json", "label_map") == {}
    assert extra_setting({"label_map": ["car"]}, "label_map") == {}
    assert extra_setting(None, "label_map") == {}


def test_settings_name_a_value_tandem_cannot_run_with(monkeypatch):
    import torch

    from backend.errors import SettingsError
    from backend.settings import Settings

    for overrides, words in ((dict(conf=2.0), "conf: Input should be less than or equal to 1"),
                             (dict(engine="bogus"), "engine: Input should be 'auto', 'openvino', 'int8' or 'torch'"),
                             (dict(pre_annotator="both"), "pre_annotator")):
        with pytest.raises(SettingsError, match=words):
            Settings.from_env(**overrides)
    monkeypatch.setenv("TANDEM_TRAIN_AFTER", "ten")
    with pytest.raises(SettingsError, match="invalid environment variable .* 'ten'"):
        Settings.from_env()
    monkeypatch.delenv("TANDEM_TRAIN_AFTER")
    assert Settings.from_env(device="cpu", conf=0.0).conf == 0.0
    if not torch.cuda.is_available():  # a GPU nobody has fails at start, not as a 500 on every /predict
        with pytest.raises(SettingsError, match="asks for a CUDA GPU but torch sees none"):
            Settings.from_env(device="cuda:0")
