"""Masks <-> Label Studio's brush RLE (BrushLabels), through label-studio-sdk's own encoder and decoder.

Label Studio stores a brush region as the run-length encoding of an RGBA image the size of the image as the
annotator sees it (EXIF applied), the mask in every channel; the SDK's `mask2rle` writes it and `decode_rle`
reads it. Tandem never writes the bit format itself: the SDK's encoder is the one Label Studio's editor reads.
Outlines (a YOLO-seg model's polygons) are filled into masks here so any segmenting model fills BrushLabels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ON = 255  # Label Studio's editor draws the alpha channel; the SDK thresholds decoded masks at 128


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """A boolean (H, W) mask -> Label Studio's brush RLE (a list of byte values)."""
    from label_studio_sdk.converter.brush import mask2rle

    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"a brush mask is one (H, W) array, got shape {m.shape}")
    return [int(v) for v in mask2rle(np.where(m.astype(bool), ON, 0).astype(np.uint8))]


def rle_to_mask(rle: Sequence[int], width: int, height: int) -> np.ndarray:
    """Label Studio's brush RLE -> a boolean (height, width) mask; a clear error when the sizes disagree."""
    from label_studio_sdk.converter.brush import decode_rle

    flat = decode_rle(list(rle))
    if flat.size != width * height * 4:
        raise ValueError(f"brush RLE holds {flat.size // 4} pixels, not {width} x {height} = {width * height}")
    return flat.reshape(height, width, 4)[:, :, 3] >= 128


def polygon_to_mask(points: np.ndarray, width: int, height: int) -> np.ndarray:
    """A (K, 2) pixel outline (on pixel edges, as `mask_to_polygon` writes it) -> the boolean mask it encloses:
    the pixels whose centres lie inside."""
    import cv2

    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    out = np.zeros((height, width), dtype=np.uint8)
    if len(pts) >= 3:
        shift = 4  # sub-pixel precision: 1/16 px
        # a pixel (x, y) spans x..x+1, so its centre is x+0.5; cv2 fills by integer pixel centres at x
        fixed = np.round((pts - 0.5) * (1 << shift)).astype(np.int32)
        cv2.fillPoly(out, [fixed], 1, lineType=cv2.LINE_8, shift=shift)
    return out.astype(bool)


def instance_masks(detections, width: int, height: int) -> np.ndarray:
    """(N, H, W) boolean masks of detections: their own `mask` when they carry one at this size, else their
    outlines (`data[POLYGON]`) filled; an instance with neither gets an empty mask."""
    from backend.core.prediction import POLYGON

    n = len(detections)
    if detections.mask is not None and detections.mask.shape[1:] == (height, width):
        return np.asarray(detections.mask, dtype=bool)
    outlines = detections.data.get(POLYGON)
    out = np.zeros((n, height, width), dtype=bool)
    if outlines is not None:
        for i, outline in enumerate(outlines):
            if outline is not None:
                out[i] = polygon_to_mask(outline, width, height)
    return out


__all__ = ["instance_masks", "mask_to_rle", "polygon_to_mask", "rle_to_mask"]
