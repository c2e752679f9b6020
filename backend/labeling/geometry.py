"""Pixel ↔ Label Studio percent coordinates, vectorised.

Label Studio stores image regions in percent (0–100) of the image *as displayed*, i.e. after the
browser applied EXIF orientation; callers pass the size of the EXIF-transposed image.
"""

from __future__ import annotations

import numpy as np


def xyxy_to_percent_xywh(xyxy: np.ndarray, width: int, height: int) -> np.ndarray:
    """(N, 4) pixel corners -> (N, 4) percent [x, y, width, height] of the top-left corner, clipped to the image."""
    boxes = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    scale = np.array([width, height, width, height], dtype=np.float64)
    clipped = np.clip(boxes, 0, scale)
    pct = clipped / scale * 100.0
    return np.column_stack([pct[:, 0], pct[:, 1], pct[:, 2] - pct[:, 0], pct[:, 3] - pct[:, 1]])


def percent_xywh_to_xyxy(xywh: np.ndarray, width: int | np.ndarray, height: int | np.ndarray) -> np.ndarray:
    """Inverse of `xyxy_to_percent_xywh` (for annotations coming back from Label Studio), not clipped.

    `width` and `height` are the image's size, or (N,) arrays with each box's own image size.
    """
    pct = np.asarray(xywh, dtype=np.float64).reshape(-1, 4)
    x1 = pct[:, 0] * width / 100.0
    y1 = pct[:, 1] * height / 100.0
    return np.column_stack([x1, y1, x1 + pct[:, 2] * width / 100.0, y1 + pct[:, 3] * height / 100.0])


def points_to_percent(points: np.ndarray, width: int, height: int) -> np.ndarray:
    """(K, 2) pixel points -> (K, 2) percent points, clipped to the image."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    scale = np.array([width, height], dtype=np.float64)
    return np.clip(pts, 0, scale) / scale * 100.0


def percent_to_points(points: np.ndarray, width: int, height: int) -> np.ndarray:
    """(K, 2) percent points -> (K, 2) pixel points: the inverse of `points_to_percent`, not clipped."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return pts * np.array([width, height], dtype=np.float64) / 100.0


def mask_to_polygon(mask: np.ndarray, tolerance: float = 1.0) -> np.ndarray | None:
    """A boolean (H, W) mask -> the (K, 2) pixel outline of its largest part, simplified (Douglas-Peucker,
    `tolerance` px), or None when it has no part of 3 points. Outlines follow pixel edges (OpenCV traces pixel
    centres, so the outline is grown by half a pixel): a filled polygon then covers the mask it came from."""
    import cv2

    m = np.ascontiguousarray(np.asarray(mask, dtype=np.uint8))
    if not m.any():
        return None
    # trace on a 2x upsampled mask so the outline sits on pixel edges, not pixel centres
    big = cv2.resize(m, (m.shape[1] * 2, m.shape[0] * 2), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(big, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    largest = max(contours, key=cv2.contourArea)
    simplified = cv2.approxPolyDP(largest, 2 * tolerance, True).reshape(-1, 2).astype(np.float64)
    if len(simplified) < 3:
        return None
    return (simplified + 0.5) / 2.0
