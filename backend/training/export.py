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


def _lines(control: ControlSpec, result: Iterable[Mapping[str, Any]], classes: dict[str, int]) -> list[str]:
    lines = []
    key = control.kind.value
    for region in result:
        if region.get("from_name") != control.name or region.get("type") != key:
            continue
        value = region.get("value") or {}
        labels = value.get(key) or []
        if not labels or labels[0] not in classes:
            continue
        cls = classes[labels[0]]
        if control.kind is ControlKind.RECTANGLE:
            x, y, w, h = (float(value[k]) / 100 for k in ("x", "y", "width", "height"))
            if w <= 0 or h <= 0:
                continue
            lines.append(f"{cls} {x + w / 2:.6f} {y + h / 2:.6f} {w:.6f} {h:.6f}")
        elif control.kind is ControlKind.POLYGON:
            pts = value.get("points") or []
            if len(pts) >= 3:
                coords = " ".join(f"{min(max(px / 100, 0), 1):.6f} {min(max(py / 100, 0), 1):.6f}" for px, py in pts)
                lines.append(f"{cls} {coords}")
    return lines


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
    classes = {n: i for i, n in enumerate(names)}
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
            chosen = [r["value"]["choices"][0] for r in result
                      if r.get("from_name") == control.name and (r.get("value") or {}).get("choices")]
            if not chosen or chosen[0] not in classes:
                continue
            folder = root / split / chosen[0]
            folder.mkdir(parents=True, exist_ok=True)
            loaded.image.save(folder / f"{stem}.png")
        else:
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
            loaded.image.save(root / "images" / split / f"{stem}.png")
            text = "\n".join(_lines(control, result, classes))
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
