"""The one prediction type every model returns, every writer reads, and the store keeps.

A `Prediction` is one image's answer from one model, in pixels of the image as the annotator sees it
(EXIF applied). Detections are supervision's `Detections` (the lingua franca): xyxy, confidence,
class_id, `mask` for instance masks, and `data` under the field names below, never string literals.
A classifier fills `probabilities` instead, aligned with `class_names`.

`to_record` / `from_record` serialise it to JSON-able dicts exactly (numeric arrays travel as raw bytes
with their dtype and shape, masks bit-packed), so a stored prediction is read back as a `Prediction`,
not as Label Studio JSON.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from dataclasses import MISSING, dataclass, field, fields, replace
from enum import StrEnum
from typing import Any

import numpy as np
import supervision as sv
from supervision.config import CLASS_NAME_DATA_FIELD

CLASS_NAME = CLASS_NAME_DATA_FIELD  # data field: (N,) object array of class names, aligned with class_id
CLASS_SCORES = "class_scores"  # data field: (N, C) float, each kept box's score for every class
POLYGON = "polygon"  # data field: (N,) object array of (K, 2) float pixel outlines, None where absent

RECORD_VERSION = 1
_DETECTION_FIELDS = fields(sv.Detections)


class Role(StrEnum):
    """What a stored prediction was for: shown to annotators, or the other model family's opinion."""

    PRE_ANNOTATION = "pre-annotation"
    SECOND_OPINION = "second-opinion"


@dataclass(frozen=True)
class Prediction:
    """One image's prediction from one model.

    `candidate_peak` is a detector's highest class score over all candidates before the confidence
    threshold: an image with no kept box still ranks for review by how near it came to one.
    `class_names` names the columns of `probabilities` and `class_scores` (and the ids of `class_id`);
    adapters may leave it empty and rely on their own `class_names`.
    """

    detections: sv.Detections | None = None
    probabilities: np.ndarray | None = None
    candidate_peak: float | None = None
    class_names: tuple[str, ...] = ()
    embedding: np.ndarray | None = None
    model_version: str | None = None
    role: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # JSON-able details a family wants kept (e.g. prompts)

    @property
    def is_classification(self) -> bool:
        return self.probabilities is not None

    def with_meta(self, **changes: Any) -> Prediction:
        return replace(self, **changes)

    def scaled(self, sx: float, sy: float) -> Prediction:
        """Boxes and outlines in pixels `sx`, `sy` times larger: from an image decoded smaller to the whole image.
        Masks have no such exact mapping: a model whose output holds them reads the whole image instead."""
        det = self.detections
        if det is None or len(det) == 0 or (sx, sy) == (1.0, 1.0):
            return self
        if det.mask is not None:
            raise ValueError("a prediction with masks cannot be rescaled; decode the whole image for this model")
        factor = np.array([sx, sy, sx, sy], dtype=np.float64)
        data = dict(det.data)
        if POLYGON in data:
            outlines = np.empty(len(data[POLYGON]), dtype=object)
            for i, p in enumerate(data[POLYGON]):
                outlines[i] = None if p is None else np.asarray(p, np.float64) * factor[:2]
            data[POLYGON] = outlines
        return replace(self, detections=sv.Detections(xyxy=np.asarray(det.xyxy, np.float64) * factor, mask=None,
                                                      confidence=det.confidence, class_id=det.class_id,
                                                      tracker_id=det.tracker_id, data=data))

    def to_record(self) -> dict[str, Any]:
        """A JSON-able dict from which `from_record` rebuilds an equal Prediction."""
        record: dict[str, Any] = {"v": RECORD_VERSION, "class_names": list(self.class_names)}
        for key in ("model_version", "role"):
            if getattr(self, key) is not None:
                record[key] = getattr(self, key)
        if self.candidate_peak is not None:
            record["candidate_peak"] = float(self.candidate_peak)
        if self.probabilities is not None:
            record["probabilities"] = _pack(self.probabilities)
        if self.embedding is not None:
            record["embedding"] = _pack(self.embedding)
        if self.extra:
            record["extra"] = self.extra
        if self.detections is not None:
            record["detections"] = _detections_record(self.detections)
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any], embedding: bool = True) -> Prediction:
        """`embedding=False` skips decoding a stored embedding (scoring never reads it)."""
        if record.get("v") != RECORD_VERSION:
            raise ValueError(f"unknown prediction record version {record.get('v')!r}")
        return cls(
            detections=_detections_from(record["detections"]) if "detections" in record else None,
            probabilities=_unpack(record["probabilities"]) if "probabilities" in record else None,
            candidate_peak=record.get("candidate_peak"),
            class_names=tuple(record.get("class_names", ())),
            embedding=_unpack(record["embedding"]) if embedding and "embedding" in record else None,
            model_version=record.get("model_version"),
            role=record.get("role"),
            extra=record.get("extra", {}),
        )


@dataclass(frozen=True)
class DetectionColumns:
    """Many images' stored detections as flat columns, for scoring without building a Prediction each: image i
    owns rows offsets[i]:offsets[i + 1]. Holds exactly what `active_learning.scoring` reads of a detection
    (boxes, confidence, class names, class vectors, candidate peak); masks, polygons and embeddings stay unread."""

    xyxy: np.ndarray  # (M, 4) float64
    confidence: np.ndarray  # (M,) float64
    class_name: list[str]  # (M,)
    class_scores: np.ndarray | None  # (M, C), None unless every image with boxes has them
    offsets: np.ndarray  # (N + 1,)
    candidate_peak: np.ndarray  # (N,) NaN where a record has none

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)


def detection_columns(records: Iterable[dict[str, Any]]) -> DetectionColumns:
    """Records (as `to_record` writes them, parsed) -> DetectionColumns (`ColumnsBuilder`)."""
    builder = ColumnsBuilder()
    for record in records:
        builder.add(record)
    return builder.build()


class ColumnsBuilder:
    """Stored detection records -> DetectionColumns, decoded column-wise: each field's bytes of every image joined and
    read by NumPy once, instead of a Prediction and an `sv.Detections` per image. `add` keeps only bytes and
    strings of a record, so the caller can parse a row, add it and drop it (no parsed dict kept alive).

    Equal to what scoring reads from `Prediction.from_record(r)` of each record: an image with no box keeps none
    of its columns, boxes and confidences as float64, class vectors concatenated as NumPy would.
    """

    def __init__(self) -> None:
        self.counts: list[int] = []
        self.peaks: list[float] = []
        self.xyxy: list[bytes] = []
        self.xyxy_types: list[str] = []
        self.conf: list[bytes] = []
        self.conf_types: list[str] = []
        self.names: list[str] = []
        self.vectors: list[tuple[bytes, str, tuple[int, ...]]] = []
        self.every_vector = True

    def __len__(self) -> int:
        return len(self.counts)

    def add(self, record: dict[str, Any]) -> None:
        if record.get("v") != RECORD_VERSION:
            raise ValueError(f"unknown prediction record version {record.get('v')!r}")
        det = record.get("detections")
        k = 0 if det is None else int(det["xyxy"]["shape"][0])  # len(sv.Detections)
        if k and "confidence" not in det:
            raise ValueError("stored detections without confidences cannot be scored")
        peak = record.get("candidate_peak")
        self.peaks.append(np.nan if peak is None else peak)
        self.counts.append(k)
        if k == 0:
            return
        a2b = binascii.a2b_base64
        box, conf = det["xyxy"], det["confidence"]
        self.xyxy.append(a2b(box["b64"]))
        self.xyxy_types.append(box["dtype"])
        self.conf.append(a2b(conf["b64"]))
        self.conf_types.append(conf["dtype"])
        data = det.get("data", {})
        self.names.extend(data[CLASS_NAME]["strings"])
        vec = data.get(CLASS_SCORES)
        if vec is None or "b64" not in vec or not vec["shape"] or not vec["shape"][0]:
            self.every_vector = False
        elif self.every_vector:
            self.vectors.append((a2b(vec["b64"]), vec["dtype"], tuple(vec["shape"])))

    def build(self) -> DetectionColumns:
        offsets = np.zeros(len(self.counts) + 1, dtype=np.int64)
        np.cumsum(self.counts, out=offsets[1:])
        total = int(offsets[-1])
        if len(self.names) != total:
            raise ValueError(f"stored detections name {len(self.names)} classes for {total} boxes")
        return DetectionColumns(
            xyxy=_joined(self.xyxy, self.xyxy_types).astype(float).reshape(total, 4),
            confidence=_joined(self.conf, self.conf_types).astype(float).reshape(total),
            class_name=self.names,
            class_scores=_joined_rows(self.vectors) if self.every_vector and self.vectors else None,
            offsets=offsets,
            candidate_peak=np.asarray(self.peaks, dtype=float),
        )


def _joined(raws: list[bytes], dtypes: list[str]) -> np.ndarray:
    """One array from many arrays' raw bytes; read piece by piece only where their dtypes differ."""
    if len(set(dtypes)) <= 1:
        return np.frombuffer(b"".join(raws), dtype=np.dtype(dtypes[0]) if dtypes else float)
    return np.concatenate([np.frombuffer(r, dtype=np.dtype(d)) for r, d in zip(raws, dtypes, strict=True)])


def _joined_rows(vectors: list[tuple[bytes, str, tuple[int, ...]]]) -> np.ndarray:
    """(k_i, C) arrays stacked as `np.concatenate(...).reshape(-1, C)` would (C of the first), bytes joined when
    all share one dtype and one width."""
    width = vectors[0][2][1] if len(vectors[0][2]) > 1 else 1
    if len({d for _, d, _ in vectors}) == 1 and all(len(s) == 2 and s[1] == width for _, _, s in vectors):
        return np.frombuffer(b"".join(r for r, _, _ in vectors), dtype=np.dtype(vectors[0][1])).reshape(-1, width).copy()
    pieces = [np.frombuffer(r, dtype=np.dtype(d)).reshape(s) for r, d, s in vectors]
    return np.concatenate(pieces).reshape(-1, width)


def empty_detections(with_class_names: bool = True) -> sv.Detections:
    det = sv.Detections.empty()
    if with_class_names:
        det.data[CLASS_NAME] = np.array([], dtype=object)
    return det


def _pack(array: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(array)
    return {"dtype": a.dtype.str, "shape": list(a.shape), "b64": base64.b64encode(a.tobytes()).decode("ascii")}


def _unpack(packed: dict[str, Any]) -> np.ndarray:
    raw = base64.b64decode(packed["b64"])
    return np.frombuffer(raw, dtype=np.dtype(packed["dtype"])).reshape(packed["shape"]).copy()


def _detections_record(det: sv.Detections) -> dict[str, Any]:
    out: dict[str, Any] = {"xyxy": _pack(det.xyxy)}
    if det.confidence is not None:
        out["confidence"] = _pack(det.confidence)
    if det.class_id is not None:
        out["class_id"] = _pack(det.class_id)
    if det.mask is not None:
        mask = np.asarray(det.mask, dtype=bool)
        out["mask"] = {"shape": list(mask.shape), "bits": base64.b64encode(np.packbits(mask.reshape(-1))).decode()}
    data: dict[str, Any] = {}
    for key, value in det.data.items():
        value = np.asarray(value) if not isinstance(value, np.ndarray) else value
        if key == POLYGON or value.dtype == object and key != CLASS_NAME:
            data[key] = {"polygons": [None if p is None else _pack(np.asarray(p)) for p in value]}
        elif value.dtype == object or value.dtype.kind in "US":
            data[key] = {"strings": [str(v) for v in value]}
        else:
            data[key] = _pack(value)
    out["data"] = data
    return out


def _detections_from(rec: dict[str, Any]) -> sv.Detections:
    xyxy = _unpack(rec["xyxy"])
    mask = None
    if "mask" in rec:
        shape = rec["mask"]["shape"]
        bits = np.frombuffer(base64.b64decode(rec["mask"]["bits"]), dtype=np.uint8)
        mask = np.unpackbits(bits, count=int(np.prod(shape))).astype(bool).reshape(shape)
    data: dict[str, Any] = {}
    for key, value in rec.get("data", {}).items():
        if "polygons" in value:
            arr = np.empty(len(value["polygons"]), dtype=object)
            for i, p in enumerate(value["polygons"]):
                arr[i] = None if p is None else _unpack(p)
            data[key] = arr
        elif "strings" in value:
            data[key] = np.array(value["strings"], dtype=object)
        else:
            data[key] = _unpack(value)
    values = {"xyxy": xyxy, "mask": mask, "confidence": _unpack(rec["confidence"]) if "confidence" in rec else None,
              "class_id": _unpack(rec["class_id"]) if "class_id" in rec else None, "data": data}
    return _trusted_detections(values)


def _trusted_detections(values: dict[str, Any]) -> sv.Detections:
    """sv.Detections without re-running its field validation: a record holds only detections that passed it when
    they were made (decoding 100k stored predictions spent a tenth of its time validating them again)."""
    det = object.__new__(sv.Detections)
    for f in _DETECTION_FIELDS:
        if f.name in values:
            value = values[f.name]
        elif f.default is not MISSING:
            value = f.default
        else:
            value = f.default_factory()
        object.__setattr__(det, f.name, value)
    return det


__all__ = ["CLASS_NAME", "CLASS_SCORES", "POLYGON", "ColumnsBuilder", "DetectionColumns", "Prediction", "Role",
           "detection_columns", "empty_detections"]
