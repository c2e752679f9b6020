"""Which parts of a Label Studio labeling config Tandem can fill.

Parsing is label-studio-sdk's `LabelInterface`; this module only selects the image object tags and the
control tags Tandem serves, and turns the rest into errors that name the problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from label_studio_sdk.label_interface import LabelInterface

from backend.errors import ConfigError


class ControlKind(StrEnum):
    RECTANGLE = "rectanglelabels"
    POLYGON = "polygonlabels"
    BRUSH = "brushlabels"  # masks, as Label Studio's RLE (`backend.convert.brush`)
    CHOICES = "choices"


_TAGS = {"RectangleLabels": ControlKind.RECTANGLE, "PolygonLabels": ControlKind.POLYGON,
         "BrushLabels": ControlKind.BRUSH, "Choices": ControlKind.CHOICES}


@dataclass(frozen=True)
class LabelSpec:
    """One `<Label>`/`<Choice>`: `result_value` is what goes into results (the alias when one is set)."""

    result_value: str
    value: str
    alias: str | None
    predicted_values: tuple[str, ...]


@dataclass(frozen=True)
class ControlSpec:
    name: str
    kind: ControlKind
    to_name: str
    image_key: str
    labels: tuple[LabelSpec, ...]

    @property
    def title(self) -> str:
        """How messages name it: "rectanglelabels 'label'"."""
        return f"{self.kind.value} '{self.name}'"


@dataclass(frozen=True)
class LabelingConfig:
    controls: tuple[ControlSpec, ...]
    ignored: tuple[str, ...]  # "TextArea 'notes'" — tags Tandem leaves to the annotator

    def image_keys(self) -> list[str]:
        return sorted({c.image_key for c in self.controls})


def _split(values: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (values or "").split(",") if v.strip())


def parse_label_config(xml: str) -> LabelingConfig:
    """Raise ConfigError when no control is servable, so Label Studio shows the reason on connect."""
    if not xml or not xml.strip():
        raise ConfigError("the labeling config is empty")
    try:
        interface = LabelInterface(xml)
    except Exception as exc:  # the SDK raises bare exceptions on malformed XML
        raise ConfigError(f"the labeling config is not valid XML: {exc}") from exc

    images = {obj.name: obj.value.lstrip("$") for obj in interface.objects if obj.tag == "Image"}
    controls: list[ControlSpec] = []
    ignored: list[str] = []
    for control in interface.controls:
        kind = _TAGS.get(control.tag)
        targets = [t for t in (control.to_name or []) if t in images]
        if kind is None or not targets:
            ignored.append(f"{control.tag} '{control.name}'")
            continue
        labels = tuple(
            LabelSpec(
                result_value=key,
                value=str(tag.attr.get("value", key)),
                alias=tag.attr.get("alias"),
                predicted_values=_split(tag.attr.get("predicted_values")),
            )
            for key, tag in control.labels_attrs.items()
        )
        if not labels:
            raise ConfigError(f"{control.tag} '{control.name}' has no labels")
        controls.append(ControlSpec(control.name, kind, targets[0], images[targets[0]], labels))

    if not images:
        raise ConfigError("the labeling config has no <Image> object tag; Tandem labels images only")
    if not controls:
        found = ", ".join(ignored) or "none"
        raise ConfigError(
            "the labeling config has no control Tandem can fill: it needs RectangleLabels, PolygonLabels, "
            f"BrushLabels or Choices pointing at an <Image> (found: {found})"
        )
    return LabelingConfig(controls=tuple(controls), ignored=tuple(ignored))
