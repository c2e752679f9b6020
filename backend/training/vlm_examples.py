"""Label Studio annotations -> (image, question, answer) examples for a generative VLM.

Classification becomes "question -> the chosen label"; grounding becomes "question -> the boxes written in
the family's own format" (Florence-2 loc tokens, PaliGemma y-first bins, Qwen JSON). The answers use the
same prompts the adapter asks with, so a fine-tuned model is scored on exactly what it learned. Tasks
split with the same frozen rule as the YOLO export.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from backend.convert.labelstudio import from_results, unknown_labels
from backend.core.prediction import CLASS_NAME
from backend.errors import MediaError
from backend.labeling.config import ControlKind, parse_label_config
from backend.media.fetch import MediaFetcher
from backend.models.base import ModelTask
from backend.models.vlm.base import Vocabulary
from backend.models.vlm.generative import GenerativeVlm
from backend.predict import image_url
from backend.training.export import frozen_split, latest_annotation, renamed_labels

Example = tuple[Image.Image, str, str]
MANIFEST = "annotations.json"


@dataclass
class VlmExamples:
    train: list[Example] = field(default_factory=list)
    val: list[Example] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)
    snapshot: str = ""


@dataclass
class AnnotatedImage:
    """One control's corrected answer on one image, in pixels and label values: no VLM needed yet."""

    task_id: int
    kind: str  # a ControlKind value
    labels: list[str]  # the control's label values, in config order (what prompts are keyed by)
    result_values: list[str]  # the same labels as annotations write them (aliases where set)
    image: Image.Image
    validation: bool
    choice: str | None = None
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    box_labels: list[str] = field(default_factory=list)


@dataclass
class AnnotatedSet:
    items: list[AnnotatedImage] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)
    snapshot: str = ""

    def save(self, folder: Path) -> Path:
        """Images as PNG beside a JSON manifest: what a Modal container needs to build the examples."""
        (folder / "images").mkdir(parents=True, exist_ok=True)
        rows = []
        for i, item in enumerate(self.items):
            item.image.save(folder / "images" / f"{i}.png")
            rows.append({**{k: v for k, v in asdict(item).items() if k != "image"}, "image": f"images/{i}.png"})
        manifest = {"snapshot": self.snapshot, "skipped": self.skipped, "items": rows}
        (folder / MANIFEST).write_text(json.dumps(manifest))
        return folder

    @classmethod
    def load(cls, folder: Path) -> AnnotatedSet:
        manifest = json.loads((folder / MANIFEST).read_text())
        items = []
        for row in manifest["items"]:
            with Image.open(folder / row.pop("image")) as img:
                image = img.convert("RGB")
            items.append(AnnotatedImage(**{**row, "boxes": [tuple(b) for b in row["boxes"]]}, image=image))
        return cls(items, {int(k): v for k, v in manifest["skipped"].items()}, manifest["snapshot"])


def collect_annotations(
    tasks: Iterable[Mapping[str, Any]],
    label_config: str,
    project_id: int,
    fetcher: MediaFetcher,
    val_percent: int = 20,
) -> AnnotatedSet:
    """Latest annotation of each task, per Choices / RectangleLabels control, split by the frozen rule."""
    config = parse_label_config(label_config)
    out = AnnotatedSet()
    snapshot = hashlib.sha256()
    tasks = sorted(tasks, key=lambda t: t["id"])
    frozen = frozen_split(project_id, [t["id"] for t in tasks if latest_annotation(t) is not None], val_percent)
    for task in tasks:
        annotation = latest_annotation(task)
        if annotation is None:
            continue
        validation = task["id"] in frozen
        result = annotation.get("result") or []
        for control in config.controls:
            if control.kind not in (ControlKind.CHOICES, ControlKind.RECTANGLE):
                continue
            regions = [r for r in result if r.get("from_name") == control.name and r.get("type") == control.kind.value]
            if not regions:
                continue
            if gone := unknown_labels(regions, control):  # trained as "not there" otherwise
                out.skipped[task["id"]] = renamed_labels(gone)
                break
            try:
                image = fetcher.load(image_url(task, control.image_key) or "", task_id=task["id"]).image
            except MediaError as exc:
                out.skipped[task["id"]] = str(exc)
                break
            item = AnnotatedImage(task["id"], control.kind.value, [lab.value for lab in control.labels],
                                  [lab.result_value for lab in control.labels], image, validation)
            truth = from_results(regions, control, image.size, item.result_values)
            if control.kind is ControlKind.CHOICES:
                chosen = truth.probabilities
                item.choice = item.result_values[int(np.argmax(chosen))] if chosen is not None else None
            else:
                det = truth.detections
                item.boxes = [tuple(float(v) for v in box) for box in det.xyxy]
                item.box_labels = [str(n) for n in det.data[CLASS_NAME]]
            out.items.append(item)
            snapshot.update(f"{task['id']}:{annotation.get('id')}:{control.name};".encode())
    out.snapshot = snapshot.hexdigest()[:16]
    return out


def to_examples(annotated: AnnotatedSet, vlm: GenerativeVlm, prompts: Mapping[str, str] | None = None) -> VlmExamples:
    """Questions and answers in this family's own format, asked with the prompts the adapter uses."""
    out = VlmExamples(skipped=dict(annotated.skipped), snapshot=annotated.snapshot)
    for item in annotated.items:
        vocab = Vocabulary.from_labels(item.labels, prompts)
        prompt_of = dict(zip(item.result_values, vocab.prompts, strict=True))
        split = out.val if item.validation else out.train
        if item.kind == ControlKind.CHOICES.value and ModelTask.CLASSIFY in vlm.tasks:
            if item.choice in prompt_of:
                split.append((item.image, vlm.question(ModelTask.CLASSIFY, vocab), prompt_of[item.choice]))
        elif item.kind == ControlKind.RECTANGLE.value and ModelTask.DETECT in vlm.tasks:
            kept = [(b, prompt_of[n]) for b, n in zip(item.boxes, item.box_labels, strict=True) if n in prompt_of]
            answer = vlm.grounding_answer(item.image, [b for b, _ in kept], [n for _, n in kept])
            split.append((item.image, vlm.question(ModelTask.DETECT, vocab), answer))
    return out


def examples_from_tasks(
    tasks: Iterable[Mapping[str, Any]],
    label_config: str,
    project_id: int,
    fetcher: MediaFetcher,
    vlm: GenerativeVlm,
    prompts: Mapping[str, str] | None = None,
    val_percent: int = 20,
) -> VlmExamples:
    return to_examples(collect_annotations(tasks, label_config, project_id, fetcher, val_percent), vlm, prompts)
