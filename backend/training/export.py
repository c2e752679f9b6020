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

from backend.convert.labelstudio import from_results, unknown_labels
from backend.convert.yolo_txt import to_lines
from backend.errors import ConfigError, MediaError
from backend.labeling.config import ControlKind, ControlSpec, parse_label_config
from backend.media.fetch import MediaFetcher
from backend.predict import image_url

TASK_FOR_CONTROL = {ControlKind.RECTANGLE: "detect", ControlKind.POLYGON: "segment", ControlKind.BRUSH: "segment",
                    ControlKind.CHOICES: "classify"}


@dataclass
class ExportedDataset:
    root: Path
    task: str
    class_names: list[str]
    data: str  # what ultralytics' `data=` takes: data.yaml, or the folder for classify
    train: int = 0
    val: int = 0
    skipped: dict[int, str] = field(default_factory=dict)
    auto_accepted: int = 0  # tasks whose labels `tandem accept` wrote, exported to the training split
    auto_left_out: int = 0  # such tasks left out (not asked for, or in the frozen split: the gate judges on people)
    snapshot: str = ""  # sha256 over (task id, annotation id, image sha) of everything exported
    control: ControlSpec | None = None  # the control exported: the gate maps model classes onto its labels
    val_regions: int = 0  # the frozen split's regions of the control
    val_unchanged: int = 0  # of them, pre-annotations accepted unchanged (Label Studio's origin "prediction")

    @property
    def unchanged_share(self) -> float:
        return self.val_unchanged / self.val_regions if self.val_regions else 0.0

    def val_classes(self) -> list[str]:
        """A classify dataset's classes with at least one frozen-validation image (class folders are made for
        every label, so ultralytics counts them against the full list)."""
        if self.task != "classify":
            return []
        return [n for n in self.class_names
                if (self.root / "val" / n).is_dir() and any((self.root / "val" / n).iterdir())]


MIN_VAL_TASKS = 2  # the frozen split a project of TOP_UP_FROM or more annotated tasks always has
TOP_UP_FROM = 10


def _task_key(project_id: int, task_id: int) -> int:
    return int.from_bytes(hashlib.sha256(f"tandem-val:{project_id}:{task_id}".encode()).digest()[:4], "big")


def is_validation(project_id: int, task_id: int, val_percent: int = 20) -> bool:
    """The hash rule: a fixed ~`val_percent`% of a project's tasks, whatever else is annotated."""
    return _task_key(project_id, task_id) % 100 < val_percent


def frozen_split(project_id: int, task_ids: Iterable[int], val_percent: int = 20) -> set[int]:
    """The frozen validation split of these annotated tasks: the hash rule, topped up to MIN_VAL_TASKS on
    projects of TOP_UP_FROM or more tasks (the hash alone leaves 10 tasks without one 11% of the time) by the
    other tasks of lowest hash. Of a larger set, the k lowest are among the k lowest of a smaller one or new,
    so as annotations are added no task moves from training into validation: the gate never scores the serving
    model on a task it trained on (unless annotations are deleted, or a job ran on fewer than TOP_UP_FROM)."""
    ids = sorted(set(task_ids))
    val = {t for t in ids if is_validation(project_id, t, val_percent)}
    if len(ids) >= TOP_UP_FROM and len(val) < MIN_VAL_TASKS and val_percent > 0:
        rest = sorted((t for t in ids if t not in val), key=lambda t: _task_key(project_id, t))
        val.update(rest[: MIN_VAL_TASKS - len(val)])
    return val


def renamed_labels(labels: Iterable[str]) -> str:
    """Why a task whose annotation uses labels the config no longer has is left out of a training set."""
    quoted = ", ".join(json.dumps(label, ensure_ascii=False) for label in labels)
    return (f"its annotation uses {quoted}, which the labeling config no longer has (renamed or removed since): "
            "left out rather than trained as background; relabel those regions in Label Studio")


def latest_annotation(task: Mapping[str, Any]) -> Mapping[str, Any] | None:
    done = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    return max(done, key=lambda a: (a.get("updated_at") or "", a.get("id") or 0)) if done else None


def _lines(control: ControlSpec, result: Iterable[Mapping[str, Any]], size: tuple[int, int]) -> list[str]:
    """One annotation's regions of `control` -> YOLO label lines; class ids follow the control's labels."""
    truth = from_results(list(result), control, size)
    return to_lines(truth, size, segment=control.kind in (ControlKind.POLYGON, ControlKind.BRUSH))  # brush: outlines


def export_yolo_dataset(
    tasks: Iterable[Mapping[str, Any]],
    label_config: str,
    project_id: int,
    fetcher: MediaFetcher,
    root: Path,
    control_name: str | None = None,
    val_percent: int = 20,
    auto_accepted: bool = False,
) -> ExportedDataset:
    """`auto_accepted`: train on the labels `tandem accept --create-annotations` wrote too. They never enter the
    frozen validation split, so the gate keeps judging every candidate against people's labels only."""
    from active_learning.queue import is_auto_accepted

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
    tasks = list(tasks)
    human = [t["id"] for t in tasks if (a := latest_annotation(t)) is not None and not is_auto_accepted(a)]
    # an auto-accepted task the hash rule puts in the split is left out below (it may be reviewed later)
    validation = frozen_split(project_id, human, val_percent) | {
        t["id"] for t in tasks if is_validation(project_id, t["id"], val_percent)}
    for task in sorted(tasks, key=lambda t: t["id"]):
        annotation = latest_annotation(task)
        if annotation is None:
            continue
        split = "val" if task["id"] in validation else "train"
        auto = is_auto_accepted(annotation)
        if auto and (split == "val" or not auto_accepted):
            out.auto_left_out += 1
            continue
        result = annotation.get("result") or []
        if gone := unknown_labels(result, control):  # a renamed label: its objects would be trained as background
            out.skipped[task["id"]] = renamed_labels(gone)
            continue
        try:
            loaded = fetcher.load(image_url(task, control.image_key) or "", task_id=task["id"])
        except MediaError as exc:
            out.skipped[task["id"]] = str(exc)
            continue
        pixels = loaded.image.tobytes()
        digest = hashlib.sha256(pixels).hexdigest()[:16]
        stem = f"task{task['id']}_{digest}"
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
            if split == "val":  # the editor marks a region "prediction" until someone moves or redraws it
                mine = [r for r in result if isinstance(r, Mapping) and r.get("from_name") == control.name]
                out.val_regions += len(mine)
                out.val_unchanged += sum(r.get("origin") == "prediction" for r in mine)
            (root / "labels" / split / f"{stem}.txt").write_text(text + ("\n" if text else ""))
        setattr(out, split, getattr(out, split) + 1)
        out.auto_accepted += auto
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
         "snapshot": out.snapshot, "skipped": out.skipped, "auto_accepted": out.auto_accepted,
         "auto_left_out": out.auto_left_out, "val_regions": out.val_regions, "val_unchanged": out.val_unchanged},
        indent=1))
    return out


def add_replay(dataset: ExportedDataset, items: Iterable[tuple[str, Any, list[str]]]) -> int:
    """Add (stem, image, YOLO label lines) to the training split only: replay of what the parent knew.

    A fine-tune on a few corrections alone forgets what the serving model learned; mixing in images from
    its own training data (or its own confident predictions on unreviewed images) keeps it anchored. The
    frozen validation split is never touched, so the gate still scores on human corrections only.
    Returns how many images were added; the snapshot is unchanged (replay is derived, not labelled)."""
    if dataset.task == "classify":
        raise ConfigError("replay is for detect and segment datasets")
    root = Path(dataset.root)
    (root / "images" / "train").mkdir(parents=True, exist_ok=True)
    (root / "labels" / "train").mkdir(parents=True, exist_ok=True)
    added = 0
    for stem, image, lines in items:
        image.save(root / "images" / "train" / f"replay_{stem}.png")
        (root / "labels" / "train" / f"replay_{stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
        added += 1
    return added


def pseudo_labels(adapter, images: list[Any], class_ids: Mapping[str, int], conf: float = 0.5,
                  label_map: Mapping[str, str] | None = None, segment: bool = False) -> list[list[str]]:
    """The adapter's own boxes (outlines with `segment`) at or above `conf`, as YOLO lines in the dataset's ids.

    A model class is mapped through `label_map` (model name -> label), then matched to the dataset's labels
    ignoring case ("square" serves as "Square"); boxes of classes the dataset lacks are dropped. A segment
    dataset takes outlines only (ultralytics refuses one that mixes boxes in): an object without one is left
    out, and so is the whole image (None) when that leaves out an object, since training on it would teach
    that the object is background."""
    from backend.convert.yolo_txt import box_lines, polygon_lines
    from backend.core.prediction import POLYGON

    lookup = {str(k).lower(): v for k, v in class_ids.items()}
    mapped = {str(k).lower(): str(v).lower() for k, v in (label_map or {}).items()}
    out = []
    for image, output in zip(images, adapter.predict(images), strict=True):
        det = output.detections
        if det is None or len(det) == 0:
            out.append([])
            continue
        names = [mapped.get(n.lower(), n.lower()) for n in (str(adapter.class_names[int(c)]) for c in det.class_id)]
        keep = [i for i, n in enumerate(names) if det.confidence[i] >= conf and n in lookup]
        ids = [lookup[names[i]] for i in keep]
        if not segment:
            out.append(box_lines(det.xyxy[keep], ids, image.size))
            continue
        outlines = det.data.get(POLYGON, [None] * len(det))
        lines = polygon_lines([outlines[i] for i in keep], ids, image.size)
        out.append(lines if len(lines) == len(keep) else None)
    return out
