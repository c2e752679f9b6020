"""Label Studio results <-> `Prediction`, both directions, for the control tags Tandem fills.

Reading (`from_results`) turns a control's regions — an annotation or a stored prediction — into a
`Prediction` in pixels: rectangles, polygons and brush masks become detections, choices a probability vector. It is
how annotations become training targets (`training/export.py`, `training/vlm_examples.py`), the demo's
truth and the tests' truth. Writing is one `ControlWriter` per tag (`WRITERS[kind].regions(...)`), which
`to_results` wraps for a prediction already in the control's labels.

Label Studio stores image regions in percent of the image as the annotator sees it (EXIF applied), so
sizes are always those of the EXIF-transposed image.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import supervision as sv

from backend.core.labels import LabelSpace, pool_choice
from backend.core.prediction import CLASS_NAME, POLYGON, Prediction
from backend.labeling.config import ControlKind, ControlSpec
from backend.labeling.geometry import (
    percent_to_points,
    percent_xywh_to_xyxy,
    points_to_percent,
    xyxy_to_percent_xywh,
)
from backend.models.base import ModelTask

Region = dict[str, Any]


# -- reading: Label Studio regions -> Prediction ---------------------------------------------------------------------


def from_results(
    results: Sequence[Mapping[str, Any]],
    control: ControlSpec | ControlKind,
    size: tuple[int, int] | None = None,
    label_names: Sequence[str] | None = None,
    unknown: Literal["skip", "raise"] = "skip",
) -> Prediction:
    """One control's regions of a Label Studio result -> a `Prediction` in pixels.

    Args:
        results: a result list (an annotation's or a prediction's `result`); regions of other controls and
            of other tag types are ignored.
        control: the control to read; a bare `ControlKind` reads the regions of that tag from every control.
        size: (width, height) of the image in pixels; None takes each region's own
            `original_width`/`original_height`. Not used for choices.
        label_names: the names `class_id` indexes (and the columns of `probabilities`); None uses the
            control's result values in config order (required when `control` is a `ControlKind`).
        unknown: what to do with a region whose label is not in `label_names`: "skip" it (the default: an
            annotation made before a label was removed from the config), or "raise" a ValueError.

    Returns:
        For rectangles and polygons, `detections` with pixel `xyxy`, `confidence` (the region's "score",
        1.0 where it has none, as an annotation), `class_id` into `label_names`, `data[CLASS_NAME]`, and for
        polygons `data[POLYGON]` ((K, 2) pixel outlines; `xyxy` is their bounding box); brushes `mask`
        ((N, H, W) bool, decoded from the RLE), their outline and extent. A region's first
        label is used; regions without a label or without area (rectangles with width or height <= 0,
        polygons under 3 points) are skipped. For choices, `probabilities` over `label_names`: each chosen
        label carries its region's score (1.0 for an annotation; a score of 0 as the smallest positive
        float, so the choice is kept), the others 0, so writing it back gives the same region; None when no
        known choice was made. `class_names` is `tuple(label_names)`.

    Raises:
        ValueError: `unknown="raise"` and a label is not in `label_names`; no size is known for a region.
    """
    if isinstance(control, ControlSpec):
        kind, name = control.kind, control.name
        names = tuple(label_names) if label_names is not None else tuple(lab.result_value for lab in control.labels)
    else:
        kind, name = ControlKind(control), None
        if label_names is None:
            raise ValueError("label_names are needed to read regions of every control")
        names = tuple(label_names)
    index = {n: i for i, n in enumerate(names)}
    key = kind.value

    picked: list[tuple[Mapping[str, Any], list[int], float]] = []  # (region value, label ids, score)
    sizes: list[tuple[float, float]] = []
    for region in results:
        if region.get("type") != key or (name is not None and region.get("from_name") != name):
            continue
        value = region.get("value") or {}
        ids = []
        for label in value.get(key) or []:
            if label in index:
                ids.append(index[label])
            elif unknown == "raise":
                raise ValueError(f"{key} '{region.get('from_name')}': label {label!r} is not one of {', '.join(names)}")
        if not ids:
            continue
        score = region.get("score")
        picked.append((value, ids, 1.0 if score is None else float(score)))
        if kind is not ControlKind.CHOICES:
            sizes.append(_size_of(region, size))

    if kind is ControlKind.CHOICES:
        if not picked:
            return Prediction(class_names=names)
        probabilities = np.zeros(len(names))
        for _, ids, score in picked:  # a score of 0 still marks the choice (as the smallest positive float)
            probabilities[ids] = np.maximum(probabilities[ids], max(score, np.finfo(float).tiny))
        return Prediction(probabilities=probabilities, class_names=names)
    if kind is ControlKind.RECTANGLE:
        return Prediction(detections=_rectangles(picked, sizes, names), class_names=names)
    if kind is ControlKind.BRUSH:
        return Prediction(detections=_brushes(picked, sizes, names), class_names=names)
    return Prediction(detections=_polygons(picked, sizes, names), class_names=names)


def unknown_labels(results: Sequence[Mapping[str, Any]], control: ControlSpec) -> list[str]:
    """The labels `control`'s regions carry that its config does not have (renamed or removed since they were
    saved), each once, in order. `from_results` skips such regions; a training export must not, or the object
    they outline would be trained as background."""
    known = {lab.result_value for lab in control.labels}
    key = control.kind.value
    found: dict[str, None] = {}
    for region in results:
        if region.get("type") == key and region.get("from_name") == control.name:
            for label in (region.get("value") or {}).get(key) or []:
                if label not in known:
                    found[str(label)] = None
    return list(found)


def _size_of(region: Mapping[str, Any], size: tuple[int, int] | None) -> tuple[float, float]:
    if size is not None:
        return float(size[0]), float(size[1])
    if region.get("original_width") and region.get("original_height"):
        return float(region["original_width"]), float(region["original_height"])
    raise ValueError(f"region {region.get('id')!r} has no original_width/original_height; pass the image size")


def _detections(xyxy: np.ndarray, picked, names: tuple[str, ...], keep: np.ndarray, **data: Any) -> sv.Detections:
    ids = np.array([p[1][0] for p in picked], dtype=int).reshape(-1)[keep]
    return sv.Detections(
        xyxy=xyxy[keep].reshape(-1, 4),
        confidence=np.array([p[2] for p in picked], dtype=float).reshape(-1)[keep],
        class_id=ids,
        data={CLASS_NAME: np.array([names[i] for i in ids], dtype=object), **{k: v[keep] for k, v in data.items()}},
    )


def _rectangles(picked, sizes, names) -> sv.Detections:
    xywh = np.array([[float(v.get(k, 0.0)) for k in ("x", "y", "width", "height")] for v, _, _ in picked]).reshape(-1, 4)
    wh = np.array(sizes, dtype=float).reshape(-1, 2)
    xyxy = percent_xywh_to_xyxy(xywh, wh[:, 0], wh[:, 1])
    keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
    return _detections(xyxy, picked, names, keep)


def _polygons(picked, sizes, names) -> sv.Detections:
    outlines = np.empty(len(picked), dtype=object)
    xyxy = np.zeros((len(picked), 4))
    keep = np.zeros(len(picked), dtype=bool)
    for i, ((value, _, _), (w, h)) in enumerate(zip(picked, sizes, strict=True)):
        points = value.get("points") or []
        if len(points) < 3:
            continue
        outlines[i] = percent_to_points(np.asarray(points, dtype=float), w, h)
        xyxy[i] = [*outlines[i].min(axis=0), *outlines[i].max(axis=0)]
        keep[i] = True
    return _detections(xyxy, picked, names, keep, **{POLYGON: outlines})


def _brushes(picked, sizes, names) -> sv.Detections:
    """Brush regions -> detections with `mask` (decoded by the SDK), their extent as `xyxy` and their outline as
    `data[POLYGON]`; regions without an RLE or with an empty mask are skipped."""
    from backend.convert.brush import rle_to_mask
    from backend.labeling.geometry import mask_to_polygon

    if len({(int(w), int(h)) for w, h in sizes}) > 1:
        raise ValueError("brush regions of one image must share its size")
    w, h = (int(v) for v in sizes[0]) if sizes else (0, 0)
    masks = np.zeros((len(picked), h, w), dtype=bool)
    for i, (value, _, _) in enumerate(picked):
        if value.get("rle"):
            masks[i] = rle_to_mask(value["rle"], w, h)
    keep = masks.reshape(len(picked), h * w).any(axis=1)
    xyxy = np.zeros((len(picked), 4))
    outlines = np.empty(len(picked), dtype=object)
    for i in np.flatnonzero(keep):
        ys, xs = np.nonzero(masks[i])
        xyxy[i] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]  # pixel corners: the mask's own extent
        outlines[i] = mask_to_polygon(masks[i])
    det = _detections(xyxy, picked, names, keep, **{POLYGON: outlines})
    det.mask = masks[keep]
    return det


# -- writing: Prediction -> Label Studio regions, one writer per control tag ----------------------------------------


def _region_id() -> str:
    return uuid.uuid4().hex[:10]


class ControlWriter:
    """Writes one control tag's regions; `tasks` are the model tasks that can fill it."""

    kind: ClassVar[ControlKind]
    tasks: ClassVar[frozenset[ModelTask]]

    def regions(
        self, control: ControlSpec, labels: LabelSpace, output: Prediction, class_names: Sequence[str],
        size: tuple[int, int],
    ) -> list[Region]:
        """Regions for one image.

        Args:
            control: the control the regions are for.
            labels: maps `output`'s class names onto the control's labels; classes that map to none are dropped.
            output: one image's prediction, in pixels.
            class_names: the names `output.probabilities` is aligned with (a classifier's classes).
            size: (width, height) of the image as the annotator sees it.

        Returns:
            Label Studio result regions, coordinates in percent, each with its score.
        """
        raise NotImplementedError

    @staticmethod
    def _base(control: ControlSpec, kind: ControlKind, size: tuple[int, int] | None, score: float) -> Region:
        region: Region = {"id": _region_id(), "from_name": control.name, "to_name": control.to_name, "type": kind.value}
        if size is not None:
            region.update(original_width=size[0], original_height=size[1], image_rotation=0)
        region["score"] = round(float(score), 6)
        return region


class RectangleLabelsWriter(ControlWriter):
    kind = ControlKind.RECTANGLE
    tasks = frozenset({ModelTask.DETECT, ModelTask.SEGMENT})

    def regions(self, control, labels, output, class_names, size):
        det = output.detections
        if det is None or len(det) == 0:
            return []
        pct = xyxy_to_percent_xywh(det.xyxy, *size)
        out = []
        for i, name in enumerate(det.data[CLASS_NAME]):
            label = labels(name)
            if label is None or pct[i, 2] <= 0 or pct[i, 3] <= 0:
                continue
            region = self._base(control, self.kind, size, det.confidence[i])
            x, y, w, h = (round(float(v), 4) for v in pct[i])
            region["value"] = {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": [label]}
            out.append(region)
        return out


class PolygonLabelsWriter(ControlWriter):
    kind = ControlKind.POLYGON
    tasks = frozenset({ModelTask.SEGMENT})

    def regions(self, control, labels, output, class_names, size):
        det = output.detections
        if det is None or len(det) == 0 or POLYGON not in det.data:
            return []
        out = []
        for i, name in enumerate(det.data[CLASS_NAME]):
            label = labels(name)
            outline = det.data[POLYGON][i]
            if label is None or outline is None or len(outline) < 3:
                continue
            region = self._base(control, self.kind, size, det.confidence[i])
            points = np.round(points_to_percent(outline, *size), 3).tolist()
            region["value"] = {"points": points, "closed": True, "polygonlabels": [label]}
            out.append(region)
        return out


class BrushLabelsWriter(ControlWriter):
    """Each instance's mask as Label Studio's brush RLE (the SDK's encoder); a model that gives outlines only
    (YOLO-seg) has them filled, so any segmenting model fills BrushLabels."""

    kind = ControlKind.BRUSH
    tasks = frozenset({ModelTask.SEGMENT})

    def regions(self, control, labels, output, class_names, size):
        from backend.convert.brush import instance_masks, mask_to_rle

        det = output.detections
        if det is None or len(det) == 0 or (det.mask is None and POLYGON not in det.data):
            return []
        masks = instance_masks(det, *size)
        out = []
        for i, name in enumerate(det.data[CLASS_NAME]):
            label = labels(name)
            if label is None or not masks[i].any():
                continue
            region = self._base(control, self.kind, size, det.confidence[i])
            region["value"] = {"format": "rle", "rle": mask_to_rle(masks[i]), "brushlabels": [label]}
            out.append(region)
        return out


class ChoicesWriter(ControlWriter):
    """The top choice, scored by the summed probability of the classes mapped onto it; none when a class
    mapped to no label outweighs every label (`pool_choice`: the model says "none of these")."""

    kind = ControlKind.CHOICES
    tasks = frozenset({ModelTask.CLASSIFY})

    def regions(self, control, labels, output, class_names, size):
        if output.probabilities is None:
            return []
        pool = labels.over(class_names, [label.result_value for label in control.labels]).pooling_matrix()
        _, outside = pool_choice(output.probabilities, pool)
        if outside or not pool.any():
            return []
        summed = np.clip(np.asarray(output.probabilities, dtype=float), 0, None) @ pool  # the score: not renormalised
        best = int(np.argmax(summed))
        region = self._base(control, self.kind, None, float(summed[best]))  # a choice is about the whole image: no size
        region["value"] = {"choices": [control.labels[best].result_value]}
        return [region]


WRITERS: dict[ControlKind, ControlWriter] = {
    w.kind: w for w in (RectangleLabelsWriter(), PolygonLabelsWriter(), BrushLabelsWriter(), ChoicesWriter())
}


def to_results(
    prediction: Prediction,
    control: ControlSpec,
    size: tuple[int, int] | None = None,
    labels: LabelSpace | None = None,
    class_names: Sequence[str] | None = None,
) -> list[Region]:
    """A `Prediction` -> the control's Label Studio result regions (`WRITERS[control.kind]`).

    Args:
        prediction: one image's prediction, in pixels.
        control: the control to write.
        size: (width, height) of the image as the annotator sees it; needed for rectangles and polygons.
        labels: maps the prediction's class names onto the control's labels; None when the prediction is
            already in the control's labels (`LabelSpace.to_labels`, `from_results`).
        class_names: the names `prediction.probabilities` is aligned with; None uses `prediction.class_names`.

    Returns:
        The regions, in percent, each with a fresh id and its score.

    Raises:
        ValueError: a rectangle or polygon control without `size`.
    """
    if size is None and control.kind is not ControlKind.CHOICES:
        raise ValueError(f"{control.title}: regions in percent need the image size")
    names = tuple(class_names) if class_names is not None else prediction.class_names
    return WRITERS[control.kind].regions(control, labels or LabelSpace.of_control(control), prediction, names,
                                         size or (0, 0))


def prediction_score(regions: Sequence[Region]) -> float:
    """Task-level score = mean region score; Label Studio sorts the "Prediction score" column by it."""
    scores = [r["score"] for r in regions if "score" in r]
    return round(float(np.mean(scores)), 6) if scores else 0.0


__all__ = [
    "WRITERS",
    "BrushLabelsWriter",
    "ChoicesWriter",
    "ControlWriter",
    "PolygonLabelsWriter",
    "RectangleLabelsWriter",
    "Region",
    "from_results",
    "prediction_score",
    "to_results",
    "unknown_labels",
]
