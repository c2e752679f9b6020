"""Detection and classification sets built from scikit-learn's handwritten digits (real 8×8 scans).

Detection: 1–3 digits pasted at random scales and places onto noisy canvases, with their tight boxes.
Classification: each digit upscaled onto a small canvas with a random offset.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


@dataclass(frozen=True)
class DigitSample:
    image: Image.Image
    boxes: np.ndarray  # (k, 4) xyxy pixels
    labels: np.ndarray  # (k,)
    pixels: np.ndarray  # the first digit's 8×8 scan, flattened (for the non-CNN second opinion)


def _digit_patch(scan: np.ndarray, size: int) -> np.ndarray:
    """8×8 scan (0–16) -> size×size ink intensity in [0, 1]."""
    img = Image.fromarray((scan / 16 * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255


def detection_set(n: int, seed: int, canvas: int = 128, max_digits: int = 3) -> list[DigitSample]:
    digits = load_digits()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        bg = rng.uniform(170, 240)
        arr = np.clip(bg + rng.normal(0, 8, (canvas, canvas, 1)) + np.zeros((1, 1, 3)), 0, 255)
        boxes, labels, taken = [], [], []
        first_pixels = None
        for _ in range(int(rng.integers(1, max_digits + 1)) * 10):
            if len(boxes) >= max_digits:
                break
            size = int(rng.integers(24, 48))
            x, y = (int(v) for v in rng.integers(0, canvas - size, 2))
            if any(x < tx2 and tx1 < x + size and y < ty2 and ty1 < y + size for tx1, ty1, tx2, ty2 in taken):
                continue
            k = int(rng.integers(len(digits.images)))
            ink = _digit_patch(digits.images[k], size)
            ys, xs = np.nonzero(ink > 0.25)
            if len(xs) == 0:
                continue
            color = rng.uniform(0, 90, 3)
            region = arr[y : y + size, x : x + size]
            arr[y : y + size, x : x + size] = region * (1 - ink[..., None]) + color * ink[..., None]
            taken.append((x, y, x + size, y + size))
            boxes.append([x + xs.min(), y + ys.min(), x + xs.max() + 1, y + ys.max() + 1])
            labels.append(int(digits.target[k]))
            if first_pixels is None:
                first_pixels = digits.data[k]
            if len(boxes) >= 1 and rng.random() < 0.4:
                break
        out.append(DigitSample(Image.fromarray(arr.astype(np.uint8)), np.array(boxes, float), np.array(labels),
                               first_pixels))
    return out


def classification_set(seed: int, canvas: int = 32) -> list[DigitSample]:
    """All 1,797 scans, each on its own canvas with a random scale and offset."""
    digits = load_digits()
    rng = np.random.default_rng(seed)
    out = []
    for scan, flat, label in zip(digits.images, digits.data, digits.target, strict=True):
        size = int(rng.integers(20, 29))
        x, y = (int(v) for v in rng.integers(0, canvas - size + 1, 2))
        arr = np.full((canvas, canvas), 255.0)
        ink = _digit_patch(scan, size)
        arr[y : y + size, x : x + size] = 255 * (1 - ink)
        img = Image.fromarray(np.repeat(arr[..., None], 3, 2).astype(np.uint8))
        out.append(DigitSample(img, np.array([[x, y, x + size, y + size]], float), np.array([int(label)]), flat))
    return out
