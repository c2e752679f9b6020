"""Generative VLMs' box formats -> pixel boxes of the original image, each with its character span.

Pure functions on strings. The span says which generated characters produced a box, so its
pseudo-confidence can be read from exactly those tokens' probabilities (`token_confidence`).

Formats (each family's own, as trained):
  Florence-2   `label<loc_x0><loc_y0><loc_x1><loc_y1>` — 1000 bins, x first; a repeated phrase may omit the label
  PaliGemma    `<locY0><locX0><locY1><locX1> label ; ...` — 1024 bins, **y first**
  Qwen2.5-VL   JSON `[{"bbox_2d": [x0, y0, x1, y1], "label": ...}]` in pixels of the *resized* input
  Qwen3-VL     the same JSON in 0..1000 relative coordinates
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np


class BoxFormat(StrEnum):
    """How a generative family writes boxes (each family declares its own in `backend.models.families`)."""

    FLORENCE2 = "florence2"
    PALIGEMMA = "paligemma"
    QWEN_PIXELS = "qwen_pixels"  # pixels of the image as resized by the processor (Qwen2-VL, Qwen2.5-VL)
    QWEN_1000 = "qwen_1000"  # 0..1000 relative coordinates (Qwen3-VL)


@dataclass(frozen=True)
class GroundedBox:
    label: str
    xyxy: tuple[float, float, float, float]
    span: tuple[int, int]


_SPECIAL = re.compile(r"</?s>|<pad>|<eos>|<bos>|<\|im_end\|>|<\|endoftext\|>|<end_of_utterance>")
_FLORENCE = re.compile(r"([^<]*(?:<(?!loc_)[^>]*>[^<]*)*)((?:<loc_\d+>){4})")
_PALIGEMMA = re.compile(r"((?:<loc\d{4}>){4})\s*([^;<]*)")
_JSON_OBJECT = re.compile(r"\{[^{}]*\}")


def _clean(label: str) -> str:
    return _SPECIAL.sub("", label).strip().strip(".,;:").strip()


def _clip(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = box
    x0, x1 = sorted((min(max(x0, 0.0), width), min(max(x1, 0.0), width)))
    y0, y1 = sorted((min(max(y0, 0.0), height), min(max(y1, 0.0), height)))
    return (x0, y0, x1, y1)


def parse_florence2(text: str, width: int, height: int) -> list[GroundedBox]:
    """Bins are dequantised to their centres, as Florence-2's own post-processor does."""
    boxes, last = [], ""
    for m in _FLORENCE.finditer(text):
        label = _clean(m.group(1)) or last
        last = label
        bins = [int(v) for v in re.findall(r"<loc_(\d+)>", m.group(2))]
        xyxy = ((bins[0] + 0.5) / 1000 * width, (bins[1] + 0.5) / 1000 * height,
                (bins[2] + 0.5) / 1000 * width, (bins[3] + 0.5) / 1000 * height)
        boxes.append(GroundedBox(label, _clip(xyxy, width, height), m.span()))
    return boxes


def parse_paligemma(text: str, width: int, height: int) -> list[GroundedBox]:
    boxes = []
    for m in _PALIGEMMA.finditer(text):
        y0, x0, y1, x1 = (int(v) / 1024 for v in re.findall(r"<loc(\d{4})>", m.group(1)))
        xyxy = (x0 * width, y0 * height, x1 * width, y1 * height)
        boxes.append(GroundedBox(_clean(m.group(2)), _clip(xyxy, width, height), m.span()))
    return boxes


def parse_qwen_json(text: str, width: int, height: int, coord_size: tuple[float, float]) -> list[GroundedBox]:
    """`coord_size` = (w, h) the coordinates are expressed in: the resized input (Qwen2.5-VL) or (1000, 1000).

    Each object is parsed on its own, so a list cut off by max_new_tokens still yields its complete boxes.
    """
    sx, sy = width / coord_size[0], height / coord_size[1]
    boxes = []
    for m in _JSON_OBJECT.finditer(text):
        try:
            item = json.loads(m.group(0))
        except json.JSONDecodeError:
            continue
        box = item.get("bbox_2d", item.get("bbox"))
        if not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, int | float) for v in box):
            continue
        xyxy = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
        boxes.append(GroundedBox(str(item.get("label", "")).strip(), _clip(xyxy, width, height), m.span()))
    return boxes


def match_phrase(phrase: str, prompts: Sequence[str]) -> int | None:
    """Which label a generated phrase names: exact (case-insensitive), else the longest label contained in it
    ("a red car" -> "car"), else the label containing it; None when it names none of them."""
    p = phrase.strip().lower()
    if not p:
        return None
    lowered = [q.strip().lower() for q in prompts]
    if p in lowered:
        return lowered.index(p)
    inside = [(len(q), i) for i, q in enumerate(lowered) if q and re.search(rf"\b{re.escape(q)}s?\b", p)]
    if inside:
        return max(inside)[1]
    around = [(len(q), i) for i, q in enumerate(lowered) if re.search(rf"\b{re.escape(p)}\b", q)]
    return min(around)[1] if around else None


def token_offsets(prefixes: Sequence[str]) -> np.ndarray:
    """(n, 2) character [start, end) of each token; `prefixes[k]` is the decoded text of tokens 0..k.

    Decoding prefixes (not single tokens) keeps SentencePiece's leading spaces and multi-byte characters right.
    """
    ends = np.maximum.accumulate(np.array([len(p) for p in prefixes], dtype=int)) if prefixes else np.zeros(0, int)
    starts = np.concatenate([[0], ends[:-1]]) if len(ends) else ends
    return np.stack([starts, ends], axis=1) if len(ends) else np.zeros((0, 2), int)


def span_confidence(offsets: np.ndarray, logprobs: np.ndarray, span: tuple[int, int]) -> float:
    """Geometric mean of the probabilities of the tokens that wrote `span` (label and coordinates).

    A box whose coordinate tokens the model was unsure of scores low even when its label was certain.
    """
    if len(offsets) == 0:
        return 0.0
    hit = (offsets[:, 0] < span[1]) & (offsets[:, 1] > span[0])
    if not hit.any():
        return 0.0
    return float(np.exp(np.mean(logprobs[hit])))


def _bin(v: float, size: float, bins: int) -> int:
    return int(min(max(v / size * bins, 0), bins - 1))


def _format_florence2(boxes, labels, width, height, coord_size) -> str:
    return "".join(f"{lab}<loc_{_bin(x0, width, 1000)}><loc_{_bin(y0, height, 1000)}><loc_{_bin(x1, width, 1000)}>"
                   f"<loc_{_bin(y1, height, 1000)}>" for (x0, y0, x1, y1), lab in zip(boxes, labels, strict=True))


def _format_paligemma(boxes, labels, width, height, coord_size) -> str:
    return " ; ".join(f"<loc{_bin(y0, height, 1024):04d}><loc{_bin(x0, width, 1024):04d}>"
                      f"<loc{_bin(y1, height, 1024):04d}><loc{_bin(x1, width, 1024):04d}> {lab}"
                      for (x0, y0, x1, y1), lab in zip(boxes, labels, strict=True))


def _format_qwen_json(boxes, labels, width, height, coord_size) -> str:
    cw, ch = coord_size or (1000, 1000)
    items = [{"bbox_2d": [round(x0 * cw / width), round(y0 * ch / height), round(x1 * cw / width),
                          round(y1 * ch / height)], "label": lab}
             for (x0, y0, x1, y1), lab in zip(boxes, labels, strict=True)]
    return "```json\n" + json.dumps(items) + "\n```"


# format -> (parse(text, width, height, coord_size), format(boxes, labels, width, height, coord_size))
Parser = Callable[[str, int, int, tuple[float, float] | None], list[GroundedBox]]
Formatter = Callable[[Sequence[Sequence[float]], Sequence[str], int, int, tuple[float, float] | None], str]
FORMATS: dict[BoxFormat, tuple[Parser, Formatter]] = {
    BoxFormat.FLORENCE2: (lambda text, w, h, size: parse_florence2(text, w, h), _format_florence2),
    BoxFormat.PALIGEMMA: (lambda text, w, h, size: parse_paligemma(text, w, h), _format_paligemma),
    BoxFormat.QWEN_PIXELS: (lambda text, w, h, size: parse_qwen_json(text, w, h, size or (1000, 1000)),
                            _format_qwen_json),
    BoxFormat.QWEN_1000: (lambda text, w, h, size: parse_qwen_json(text, w, h, (1000, 1000)),
                          lambda boxes, labels, w, h, size: _format_qwen_json(boxes, labels, w, h, None)),
}


def _format_of(kind: str) -> BoxFormat:
    try:
        return BoxFormat(kind)
    except ValueError:
        raise ValueError(f"no box format {kind!r}") from None


def parse_boxes(kind: str, text: str, width: int, height: int,
                coord_size: tuple[float, float] | None = None) -> list[GroundedBox]:
    """Generated text in format `kind` -> pixel boxes of a `width` x `height` image. `coord_size` (w, h) is
    what QWEN_PIXELS coordinates are expressed in (the resized input); the other formats ignore it."""
    return FORMATS[_format_of(kind)][0](text, width, height, coord_size)


def format_boxes(kind: str, boxes: Sequence[Sequence[float]], labels: Sequence[str], width: int, height: int,
                 coord_size: tuple[float, float] | None = None) -> str:
    """The inverse of the parsers: the answer text a family is fine-tuned to write for these pixel boxes."""
    return FORMATS[_format_of(kind)][1](boxes, labels, width, height, coord_size)
