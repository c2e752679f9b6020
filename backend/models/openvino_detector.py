"""A lean OpenVINO pipeline for YOLO detection on CPU.

Ultralytics drives an OpenVINO export through its generic predictor: a BGR flip, a float copy and a
layout transpose in numpy, then NMS, then a second NMS here to recover each box's class vector. This
pipeline feeds the RGB uint8 image straight in (OpenVINO's PrePostProcessor does the conversion inside
the compiled graph), pads only to the stride (a dynamic-shape export), and runs NMS once, keeping the
class vectors of the boxes it keeps. Letterbox and box scaling follow ultralytics' arithmetic exactly, so
the parity check at export time compares like with like.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import supervision as sv
import torch
import torchvision

from backend.core.prediction import CLASS_NAME, CLASS_SCORES
from backend.models.base import ModelOutput

PAD_VALUE = 114
MAX_WH = 7680  # ultralytics' per-class offset for class-aware NMS in one call
MAX_NMS = 30000


@dataclass(frozen=True)
class Letterbox:
    """Where the image went inside the network input: per-axis gain and the top-left padding."""

    gain_x: float
    gain_y: float
    left: int
    top: int


def letterbox(image: np.ndarray, imgsz: int, stride: int = 32, square: bool = False) -> tuple[np.ndarray, Letterbox]:
    """Resize to fit `imgsz` keeping the aspect ratio, then pad to a multiple of `stride` (or to the full
    square, for a fixed-shape export)."""
    h, w = image.shape[:2]
    r = min(imgsz / h, imgsz / w)
    new_w, new_h = max(round(w * r), 1), max(round(h * r), 1)
    dw, dh = imgsz - new_w, imgsz - new_h
    if not square:
        dw, dh = dw % stride, dh % stride
    dw, dh = dw / 2, dh / 2
    if (new_w, new_h) != (w, h):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    top, bottom, left, right = round(dh - 0.1), round(dh + 0.1), round(dw - 0.1), round(dw + 0.1)
    if top or bottom or left or right:
        image = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    return np.ascontiguousarray(image), Letterbox(new_w / w, new_h / h, left, top)


def decode(raw: np.ndarray, box: Letterbox, size: tuple[int, int], conf: float, iou: float, max_det: int,
           class_names: tuple[str, ...]) -> ModelOutput:
    """One image's (4 + nc, anchors) output -> detections in original pixels, with each box's class vector."""
    scores = raw[4:]
    best = scores.max(axis=0)
    idx = np.flatnonzero(best > conf)
    idx = idx[np.argsort(-best[idx], kind="stable")[:MAX_NMS]]
    cx, cy, bw, bh = raw[:4, idx]
    xyxy = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)
    vectors = scores[:, idx].T
    class_id = vectors.argmax(axis=1) if len(idx) else np.zeros(0, dtype=np.int64)
    confidence = best[idx]
    if len(idx):
        offset = torch.from_numpy((xyxy + (class_id * MAX_WH)[:, None]).astype(np.float32))
        keep = torchvision.ops.nms(offset, torch.from_numpy(confidence.astype(np.float32)), iou)[:max_det].numpy()
        xyxy, vectors, class_id, confidence = xyxy[keep], vectors[keep], class_id[keep], confidence[keep]
    w, h = size
    xyxy = (xyxy - [box.left, box.top, box.left, box.top]) / [box.gain_x, box.gain_y, box.gain_x, box.gain_y]
    xyxy = np.clip(xyxy, 0, [w, h, w, h])
    return ModelOutput(candidate_peak=float(best.max()) if best.size else 0.0, detections=sv.Detections(
        xyxy=xyxy.astype(np.float64),
        confidence=confidence.astype(np.float64),
        class_id=class_id.astype(int),
        data={CLASS_NAME: np.array([class_names[i] for i in class_id], dtype=object),
              CLASS_SCORES: vectors.astype(np.float64).reshape(len(class_id), len(class_names))},
    ))


class OpenVinoDetector:
    """Compiled once; `predict` takes RGB uint8 arrays. Not thread-safe: the adapter holds a lock."""

    def __init__(self, model_dir: Path, class_names: tuple[str, ...], imgsz: int, stride: int = 32) -> None:
        import openvino as ov
        from openvino.preprocess import PrePostProcessor

        core = ov.Core()
        xml = next(Path(model_dir).glob("*.xml"))
        model = core.read_model(xml)
        self.square = not model.input().get_partial_shape()[2].is_dynamic
        ppp = PrePostProcessor(model)
        ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
        ppp.input().preprocess().convert_element_type(ov.Type.f32).scale(255.0)
        ppp.input().model().set_layout(ov.Layout("NCHW"))
        compiled = core.compile_model(ppp.build(), "CPU", {"PERFORMANCE_HINT": "LATENCY"})
        self._request = compiled.create_infer_request()
        self.class_names, self.imgsz, self.stride = class_names, imgsz, stride

    def predict(self, images: list[np.ndarray], conf: float, iou: float, max_det: int = 300) -> list[ModelOutput]:
        outputs = []
        for image in images:
            padded, box = letterbox(image, self.imgsz, self.stride, self.square)
            raw = self._request.infer({0: padded[None]}, share_inputs=True)[0][0]
            outputs.append(decode(raw, box, (image.shape[1], image.shape[0]), conf, iou, max_det, self.class_names))
        return outputs
