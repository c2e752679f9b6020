"""Boxes of many images in flat arrays, so scoring 100k images is array work, not Python loops."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ImageBoxes:
    """One image's boxes from one model: pixel xyxy, confidence, class id, optional class distributions."""

    xyxy: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    class_probs: np.ndarray | None = None

    @classmethod
    def empty(cls, num_classes: int | None = None) -> ImageBoxes:
        probs = np.zeros((0, num_classes)) if num_classes else None
        return cls(np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=int), probs)

    def __len__(self) -> int:
        return len(self.scores)


@dataclass(frozen=True)
class BoxBatch:
    """Image i owns rows offsets[i]:offsets[i + 1] of every array."""

    xyxy: np.ndarray  # (M, 4)
    scores: np.ndarray  # (M,)
    labels: np.ndarray  # (M,)
    offsets: np.ndarray  # (N + 1,)
    class_probs: np.ndarray | None = None  # (M, K)

    @classmethod
    def from_images(cls, images: Sequence[ImageBoxes]) -> BoxBatch:
        counts = np.array([len(im) for im in images], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        nonempty = [im for im in images if len(im)]
        have_probs = bool(nonempty) and all(im.class_probs is not None for im in nonempty)
        width = nonempty[0].class_probs.shape[1] if have_probs else 0
        return cls(
            xyxy=np.concatenate([np.asarray(im.xyxy, float).reshape(-1, 4) for im in images]) if images else np.zeros((0, 4)),
            scores=np.concatenate([np.asarray(im.scores, float) for im in images]) if images else np.zeros(0),
            labels=np.concatenate([np.asarray(im.labels, int) for im in images]) if images else np.zeros(0, int),
            offsets=offsets,
            class_probs=np.concatenate([im.class_probs for im in nonempty]).reshape(-1, width) if have_probs else None,
        )

    @property
    def num_images(self) -> int:
        return len(self.offsets) - 1

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def image_index(self) -> np.ndarray:
        """For each box, the image it belongs to."""
        return np.repeat(np.arange(self.num_images), self.counts)

    def image(self, i: int) -> ImageBoxes:
        s, e = self.offsets[i], self.offsets[i + 1]
        probs = self.class_probs[s:e] if self.class_probs is not None else None
        return ImageBoxes(self.xyxy[s:e], self.scores[s:e], self.labels[s:e], probs)


def segment_max(values: np.ndarray, offsets: np.ndarray, empty: float = 0.0) -> np.ndarray:
    """Per-image max of a flat per-box array; `empty` for images without boxes."""
    counts = np.diff(offsets)
    out = np.full(len(counts), empty, dtype=float)
    nonempty = counts > 0
    if values.size:
        out[nonempty] = np.maximum.reduceat(values, offsets[:-1][nonempty])
    return out


def segment_sum(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    index = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    return np.bincount(index, weights=values, minlength=len(offsets) - 1).astype(float)  # int when no boxes at all
