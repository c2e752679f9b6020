"""A generated "shapes" dataset with exact ground truth.

Tandem needs a real model with no network: the first-start model, the tests and the demo all train
YOLOv8n from its YAML on these images. Each class has its own shape *and* hue band so that a model
trained from scratch for a few CPU minutes learns it; positions, sizes, tints, backgrounds and noise
vary, and images are non-square so that coordinate bugs show.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASS_NAMES: tuple[str, ...] = ("square", "circle", "triangle")
_HUES = {"square": (220, 50, 50), "circle": (40, 170, 60), "triangle": (50, 80, 220)}


@dataclass(frozen=True)
class ShapeObject:
    """One object: class, pixel box (x1, y1, x2, y2) and outline polygon in pixels."""

    label: str
    box: tuple[float, float, float, float]
    polygon: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class ShapeSample:
    name: str
    width: int
    height: int
    objects: tuple[ShapeObject, ...] = field(default_factory=tuple)


def _polygon(label: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if label == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if label == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    angles = np.linspace(0, 2 * math.pi, 24, endpoint=False)
    return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]


def render_sample(
    rng: np.random.Generator,
    name: str,
    size: tuple[int, int] = (320, 240),
    max_objects: int = 3,
    single_label: str | None = None,
    classes: tuple[str, ...] = CLASS_NAMES,
) -> tuple[Image.Image, ShapeSample]:
    """Draw one image. `single_label` makes a one-object, centred-ish classification image; `classes`
    restricts which shapes appear (class ids stay those of CLASS_NAMES), to make a model with a blind spot."""
    width, height = size
    base = rng.integers(150, 235, size=3)
    yy, xx = np.mgrid[0:height, 0:width]
    gradient = (xx / width * rng.uniform(-25, 25) + yy / height * rng.uniform(-25, 25))[..., None]
    noise = rng.normal(0, 6, size=(height, width, 3))
    canvas = np.clip(base + gradient + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(canvas, "RGB")
    draw = ImageDraw.Draw(image)

    count = 1 if single_label else int(rng.integers(1, max_objects + 1))
    placed: list[tuple[float, float, float]] = []
    objects: list[ShapeObject] = []
    short = min(width, height)
    for _ in range(count * 20):
        if len(objects) == count:
            break
        label = single_label or classes[int(rng.integers(len(classes)))]
        r = float(rng.uniform(0.12, 0.22) * short) if not single_label else float(rng.uniform(0.2, 0.32) * short)
        cx = float(rng.uniform(r + 2, width - r - 2))
        cy = float(rng.uniform(r + 2, height - r - 2))
        if any(math.hypot(cx - px, cy - py) < (r + pr) * 1.05 for px, py, pr in placed):
            continue
        placed.append((cx, cy, r))
        tint = np.clip(np.array(_HUES[label]) + rng.integers(-30, 31, size=3), 0, 255)
        poly = _polygon(label, cx, cy, r)
        draw.polygon(poly, fill=tuple(int(v) for v in tint))
        xs, ys = [p[0] for p in poly], [p[1] for p in poly]
        objects.append(
            ShapeObject(
                label=label,
                box=(min(xs), min(ys), max(xs), max(ys)),
                polygon=tuple((round(x, 2), round(y, 2)) for x, y in poly),
            )
        )
    return image, ShapeSample(name=name, width=width, height=height, objects=tuple(objects))


def generate_samples(
    count: int,
    seed: int = 0,
    size: tuple[int, int] = (320, 240),
    classification: bool = False,
    classes: tuple[str, ...] = CLASS_NAMES,
) -> list[tuple[Image.Image, ShapeSample]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        label = classes[i % len(classes)] if classification else None
        out.append(render_sample(rng, f"shape_{seed}_{i:05d}", size=size, single_label=label, classes=classes))
    return out


def _yolo_detect_line(obj: ShapeObject, w: int, h: int) -> str:
    x1, y1, x2, y2 = obj.box
    cls = CLASS_NAMES.index(obj.label)
    return f"{cls} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}"


def _yolo_segment_line(obj: ShapeObject, w: int, h: int) -> str:
    cls = CLASS_NAMES.index(obj.label)
    coords = " ".join(f"{min(max(x / w, 0), 1):.6f} {min(max(y / h, 0), 1):.6f}" for x, y in obj.polygon)
    return f"{cls} {coords}"


def write_yolo_dataset(
    root: Path,
    task: str = "detect",
    train: int = 120,
    val: int = 30,
    seed: int = 0,
    size: tuple[int, int] = (320, 240),
    classes: tuple[str, ...] = CLASS_NAMES,
) -> Path:
    """Write a YOLO dataset; returns the path to pass as `data=` to ultralytics (yaml, or a folder for classify)."""
    root = Path(root)
    splits = {"train": (train, seed), "val": (val, seed + 10_000)}
    if task == "classify":
        for split, (n, s) in splits.items():
            for image, sample in generate_samples(n, seed=s, size=size, classification=True, classes=classes):
                folder = root / split / sample.objects[0].label
                folder.mkdir(parents=True, exist_ok=True)
                image.save(folder / f"{sample.name}.png")
        return root
    line = _yolo_segment_line if task == "segment" else _yolo_detect_line
    for split, (n, s) in splits.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        truth = []
        for image, sample in generate_samples(n, seed=s, size=size, classes=classes):
            image.save(root / "images" / split / f"{sample.name}.png")
            text = "\n".join(line(o, sample.width, sample.height) for o in sample.objects)
            (root / "labels" / split / f"{sample.name}.txt").write_text(text + "\n")
            truth.append(asdict(sample))
        (root / f"{split}_truth.json").write_text(json.dumps(truth))
    names = "\n".join(f"  {i}: {n}" for i, n in enumerate(CLASS_NAMES))
    yaml_path = root / "data.yaml"
    yaml_path.write_text(f"path: {root.resolve()}\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
    return yaml_path
