"""Label Studio annotations -> a YOLO dataset (detect, segment or classify) with Tandem's own class map.

Annotations only (never predictions); the newest non-cancelled annotation of each task wins. Class ids
follow the order of the control's labels in the labeling config — Label Studio's own YOLO export numbers
the sorted union of *every* control's labels, Choices included. Each image is downloaded once (content-
addressed by sha256). The validation split is a pure function of (project, task id), so it never
changes between rounds and versions stay comparable.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from backend.convert.labelstudio import from_results
from backend.convert.yolo_txt import to_lines
from backend.errors import ConfigError, MediaError
from backend.labeling.config import ControlKind, ControlSpec, parse_label_config
from backend.media.fetch import MediaFetcher
from backend.predict import image_url

TASK_FOR_CONTROL = {ControlKind.RECTANGLE: "detect", ControlKind.POLYGON: "segment", ControlKind.CHOICES: "classify"}


@dataclass
class ExportedDataset:
    root: Path
    task: str
    class_names: list[str]
    data: str  # what ultralytics' `data=` takes: data.yaml, or the folder for classify
    train: int = 0
    val: int = 0
    skipped: dict[int, str] = field(default_factory=dict)
    snapshot: str = ""  # sha256 over (task id, annotation id, image sha) of everything exported
    control: ControlSpec | None = None  # the control exported: the gate maps model classes onto its labels


def is_validation(project_id: int, task_id: int, val_percent: int = 20) -> bool:
    digest = hashlib.sha256(f"tandem-val:{project_id}:{task_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < val_percent


def latest_annotation(task: Mapping[str, Any]) -> Mapping[str, Any] | None:
    done = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    return max(done, key=lambda a: (a.get("updated_at") or "", a.get("id") or 0)) if done else None


def _lines(control: ControlSpec, result: Iterable[Mapping[str, Any]], size: tuple[int, int]) -> list[str]:
    """One annotation's regions of `control` -> YOLO label lines; class ids follow the control's labels."""
    truth = from_results(list(result), control, size)
    return to_lines(truth, size, segment=control.kind is ControlKind.POLYGON)


def export_yolo_dataset(
    tasks: Iterable[Mapping[str, Any]],
    label_config: str,
    project_id: int,
    fetcher: MediaFetcher,
    root: Path,
    control_name: str | None = None,
    val_percent: int = 20,
) -> ExportedDataset:
    controls = parse_label_config(label_config).controls
    control = next((c for c in controls if control_name in (None, c.name)), None)
    if control is None:
        raise ConfigError(f"no control named {control_name!r} to export")
    task_kind = TASK_FOR_CONTROL[control.kind]
    names = [label.result_value for label in control.labels]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)  # a project with nothing annotated still gets a (empty) dataset
    out = ExportedDataset(root=root, task=task_kind, class_names=names, data="", control=control)
    snapshot = hashlib.sha256()
    for task in sorted(tasks, key=lambda t: t["id"]):
        annotation = latest_annotation(task)
        if annotation is None:
            continue
        split = "val" if is_validation(project_id, task["id"], val_percent) else "train"
        try:
            loaded = fetcher.load(image_url(task, control.image_key) or "", task_id=task["id"])
        except MediaError as exc:
            out.skipped[task["id"]] = str(exc)
            continue
        pixels = loaded.image.tobytes()
        digest = hashlib.sha256(pixels).hexdigest()[:16]
        stem = f"task{task['id']}_{digest}"
        result = annotation.get("result") or []
        if task_kind == "classify":
            chosen = from_results(result, control).probabilities
            if chosen is None:
                continue
            folder = root / split / names[int(np.argmax(chosen))]
            folder.mkdir(parents=True, exist_ok=True)
            loaded.image.save(folder / f"{stem}.png")
        else:
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
            loaded.image.save(root / "images" / split / f"{stem}.png")
            text = "\n".join(_lines(control, result, loaded.image.size))
            (root / "labels" / split / f"{stem}.txt").write_text(text + ("\n" if text else ""))
        setattr(out, split, getattr(out, split) + 1)
        snapshot.update(f"{task['id']}:{annotation.get('id')}:{digest};".encode())
    out.snapshot = snapshot.hexdigest()[:16]
    if task_kind == "classify":
        for split in ("train", "val"):
            for n in names:
                (root / split / n).mkdir(parents=True, exist_ok=True)
        out.data = str(root)
    else:
        body = "\n".join(f"  {i}: {json.dumps(n)}" for i, n in enumerate(names))
        (root / "data.yaml").write_text(f"path: {root.resolve()}\ntrain: images/train\nval: images/val\nnames:\n{body}\n")
        out.data = str(root / "data.yaml")
    (root / "tandem_export.json").write_text(json.dumps(
        {"project": project_id, "task": task_kind, "classes": names, "train": out.train, "val": out.val,
         "snapshot": out.snapshot, "skipped": out.skipped}, indent=1))
    return out
