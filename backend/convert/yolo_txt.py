"""YOLO dataset label files <-> pixels: one line per object, `class cx cy w h` or `class x1 y1 x2 y2 ...`,
all normalised by the image size (what ultralytics trains on). Writing and reading, vectorised.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import supervision as sv

from backend.core.prediction import POLYGON, Prediction


def box_lines(xyxy: np.ndarray, class_id: Sequence[int] | np.ndarray, size: tuple[int, int]) -> list[str]:
    """Pixel boxes -> detect lines.

    Args:
        xyxy: (N, 4) pixel corners.
        class_id: (N,) dataset class ids.
        size: (width, height) of the image.

    Returns:
        N lines `"<id> <cx> <cy> <w> <h>"`, normalised to the image, six decimals, not clipped.
    """
    b = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    w, h = size
    rows = np.column_stack([(b[:, 0] + b[:, 2]) / 2 / w, (b[:, 1] + b[:, 3]) / 2 / h, (b[:, 2] - b[:, 0]) / w,
                            (b[:, 3] - b[:, 1]) / h])
    return [f"{int(c)} {cx:.6f} {cy:.6f} {bw:.6f} {bh:.6f}" for c, (cx, cy, bw, bh) in zip(class_id, rows, strict=True)]


def polygon_lines(outlines: Sequence[np.ndarray | None], class_id: Sequence[int] | np.ndarray,
                  size: tuple[int, int]) -> list[str]:
    """Pixel outlines -> segment lines; outlines that are None or under 3 points are left out.

    Args:
        outlines: N arrays of (K, 2) pixel points, or None.
        class_id: (N,) dataset class ids.
        size: (width, height) of the image.

    Returns:
        One line `"<id> <x1> <y1> <x2> <y2> ..."` per outline kept, normalised and clipped to [0, 1].
    """
    scale = np.array(size, dtype=np.float64)
    lines = []
    for outline, c in zip(outlines, class_id, strict=True):
        if outline is None or len(outline) < 3:
            continue
        pts = np.clip(np.asarray(outline, dtype=np.float64).reshape(-1, 2) / scale, 0, 1)
        lines.append(f"{int(c)} " + " ".join(f"{x:.6f} {y:.6f}" for x, y in pts))
    return lines


def to_lines(prediction: Prediction, size: tuple[int, int], segment: bool = False) -> list[str]:
    """A prediction's detections -> the lines of its label file.

    Args:
        prediction: detections in pixels whose `class_id` are dataset class ids.
        size: (width, height) of the image.
        segment: write outlines (`data[POLYGON]`) instead of boxes.

    Returns:
        The label file's lines (empty when there are no detections).
    """
    det = prediction.detections
    if det is None or len(det) == 0:
        return []
    if segment:
        return polygon_lines(det.data.get(POLYGON, [None] * len(det)), det.class_id, size)
    return box_lines(det.xyxy, det.class_id, size)


def read_detections(label_file: Path, size: tuple[int, int]) -> sv.Detections:
    """A label file -> pixel boxes with class ids; a polygon line becomes its bounding box.

    Args:
        label_file: the `.txt` file; a missing or empty file is an image without objects.
        size: (width, height) of the image.

    Returns:
        `sv.Detections` with float `xyxy` and `class_id` (no confidence), empty when there are no lines.
    """
    path = Path(label_file)
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    if not rows:
        return sv.Detections.empty()
    w, h = size
    boxes = np.empty((len(rows), 4))
    for i, row in enumerate(rows):
        vals = np.array(row[1:], dtype=float)
        if len(vals) == 4:
            cx, cy, bw, bh = vals
            boxes[i] = [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]
        else:
            xs, ys = vals[0::2] * w, vals[1::2] * h
            boxes[i] = [xs.min(), ys.min(), xs.max(), ys.max()]
    return sv.Detections(xyxy=boxes, class_id=np.array([int(r[0]) for r in rows]))


__all__ = ["box_lines", "polygon_lines", "read_detections", "to_lines"]
