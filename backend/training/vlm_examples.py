"""Label Studio annotations -> (image, question, answer) examples for a generative VLM.

Classification becomes "question -> the chosen label"; grounding becomes "question -> the boxes written in
the family's own format" (Florence-2 loc tokens, PaliGemma y-first bins, Qwen JSON). The answers use the
same prompts the adapter asks with, so a fine-tuned model is scored on exactly what it learned. Tasks
split with the same frozen rule as the YOLO export.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from backend.errors import MediaError
from backend.labeling.config import ControlKind, parse_label_config
from backend.media.fetch import MediaFetcher
from backend.models.base import ModelTask
from backend.models.vlm.base import Vocabulary
from backend.models.vlm.generative import GenerativeVlm
from backend.predict import image_url
from backend.training.export import is_validation, latest_annotation

Example = tuple[Image.Image, str, str]


@dataclass
class VlmExamples:
    train: list[Example] = field(default_factory=list)
    val: list[Example] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)
    snapshot: str = ""


def examples_from_tasks(
    tasks: Iterable[Mapping[str, Any]],
    label_config: str,
    project_id: int,
    fetcher: MediaFetcher,
    vlm: GenerativeVlm,
    prompts: Mapping[str, str] | None = None,
    val_percent: int = 20,
) -> VlmExamples:
    config = parse_label_config(label_config)
    out = VlmExamples()
    snapshot = hashlib.sha256()
    for task in sorted(tasks, key=lambda t: t["id"]):
        annotation = latest_annotation(task)
        if annotation is None:
            continue
        split = out.val if is_validation(project_id, task["id"], val_percent) else out.train
        result = annotation.get("result") or []
        for control in config.controls:
            vocab = Vocabulary.from_labels([lab.value for lab in control.labels], prompts)
            prompt_of = {lab.result_value: vocab.prompts[i] for i, lab in enumerate(control.labels)}
            regions = [r for r in result if r.get("from_name") == control.name and r.get("type") == control.kind.value]
            if not regions:
                continue
            try:
                image = fetcher.load(image_url(task, control.image_key) or "", task_id=task["id"]).image
            except MediaError as exc:
                out.skipped[task["id"]] = str(exc)
                break
            if control.kind is ControlKind.CHOICES and ModelTask.CLASSIFY in vlm.tasks:
                chosen = (regions[0].get("value") or {}).get("choices") or []
                if chosen and chosen[0] in prompt_of:
                    split.append((image, vlm.question(ModelTask.CLASSIFY, vocab), prompt_of[chosen[0]]))
            elif control.kind is ControlKind.RECTANGLE and ModelTask.DETECT in vlm.tasks:
                boxes, labels = [], []
                for region in regions:
                    value = region.get("value") or {}
                    names = value.get("rectanglelabels") or []
                    if not names or names[0] not in prompt_of or value.get("width", 0) <= 0:
                        continue
                    x, y = value["x"] / 100 * image.width, value["y"] / 100 * image.height
                    boxes.append((x, y, x + value["width"] / 100 * image.width, y + value["height"] / 100 * image.height))
                    labels.append(prompt_of[names[0]])
                split.append((image, vlm.question(ModelTask.DETECT, vocab), vlm.grounding_answer(image, boxes, labels)))
            snapshot.update(f"{task['id']}:{annotation.get('id')}:{control.name};".encode())
    out.snapshot = snapshot.hexdigest()[:16]
    return out
