"""Replay and schedule for a fine-tune on a few corrections: build on what the serving model knows.

Measured on the generated shapes (`benchmarks/finetune_small.py`, results in
`benchmarks/results/finetune_small.md`): on 10-20 corrections a fine-tune on the corrections alone lost
held-out mAP50-95 (frozen backbone: mean -0.04 to -0.05 on the starter model, worst -0.08), while the same
corrections plus a replay of what the parent knew, with the whole network trained, built on it. How much
replay matters: two replayed images per correction still let 10 corrections pull a parent that already knew
every class below the gate's margin (worst -0.028 to -0.037); four per correction never fell below the parent
in 12 runs (its data or its pseudo-labels, a parent with a blind spot and one without; worst +0.006) and
gained most in every cell (+0.01 to +0.07 on the full parent, +0.16 to +0.38 on the blind one). Replay
therefore decides the schedule: with replay the network is trained whole; without it, few images keep the
backbone frozen (the least harm).

Where replay comes from, in order: the parent's own exported dataset (a job's dataset stays under
TANDEM_HOME/jobs/<id>/dataset, its path is recorded on the version as `dataset_root` and its archive in the
artifact store as `dataset_uri`, which any replica unpacks into TANDEM_HOME/cache/datasets when the folder is
not on this machine), else the parent's confident predictions on the project's tasks no human has labelled
(pseudo-labels). Only exported images are replayed, never a job's own replay (`replay_*`): a replica with the
folder and one with the archive replay the same images, and pseudo-labels do not compound over generations.
Replay goes into the training split only; the frozen validation split stays human corrections, so the gate
is unchanged.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

# per the measurement: replay four times as many images as corrections, at most this many (the job stays
# short): twice as many still let 10 corrections pull a parent that knew every class below the gate's margin
REPLAY_PER_CORRECTION, MAX_REPLAY = 4, 64
# Below FEW_IMAGES without replay a detector's backbone (its first FROZEN_LAYERS layers) stays frozen: on 16
# corrected images a full fine-tune collapsed (held-out mAP50 0.667 -> 0.168) while a frozen backbone held
# (0.630-0.650); on 31 a full fine-tune taught a class the parent had never seen (mAP50-95 0.549 -> 0.786).
FEW_IMAGES, FROZEN_LAYERS = 24, 10
PSEUDO_CONF = 0.5  # the parent's boxes kept as pseudo-labels
_TASK_STEM = re.compile(r"^task(\d+)_")


class ReplayItem(NamedTuple):
    """One training image the parent knew, with its YOLO label lines in the child dataset's class ids."""

    stem: str
    image: Any  # PIL.Image
    lines: list[str]


@dataclass(frozen=True)
class Schedule:
    params: dict
    reason: str


def replay_count(train_images: int) -> int:
    return min(REPLAY_PER_CORRECTION * train_images, MAX_REPLAY)


def choose_schedule(params: Mapping[str, Any], train_images: int, replay_images: int, task: str) -> Schedule:
    """The fine-tune's parameters for this many corrections and replayed images; a `freeze` the user set wins."""
    params = dict(params)
    if task == "classify" or params.get("freeze") is not None or train_images >= FEW_IMAGES:
        return Schedule(params, "")
    if replay_images > 0:
        return Schedule(params, f"{train_images} corrections + {replay_images} replayed images: the whole network "
                                "is fine-tuned (measured to build on the parent; benchmarks/results/finetune_small.md)")
    return Schedule({**params, "freeze": FROZEN_LAYERS},
                    f"only {train_images} training images and nothing to replay: the backbone (first "
                    f"{FROZEN_LAYERS} layers) stays frozen")


def _task_id(stem: str) -> int | None:
    found = _TASK_STEM.match(stem)
    return int(found.group(1)) if found else None


def _dataset_classes(root: Path) -> list[str]:
    meta = root / "tandem_export.json"
    if meta.is_file():
        return list(json.loads(meta.read_text())["classes"])
    names = re.findall(r"^\s+\d+:\s*(.+)$", (root / "data.yaml").read_text(), flags=re.M)
    return [json.loads(n) if n.startswith('"') else n.strip() for n in names]


class ParentDataset(NamedTuple):
    """Where the parent's dataset was found (None: nowhere) and, when its archive could not be read, why."""

    root: Path | None
    source: str = ""  # the folder or the archive's address, for the job log
    problem: str = ""


def _is_dataset(root: Path) -> bool:
    return (root / "images" / "train").is_dir() and (root / "data.yaml").is_file()


def find_parent_dataset(metrics: Mapping[str, Any], name: str, home: Path) -> ParentDataset:
    """The dataset the parent version was trained on (detect/segment only): its folder where this machine has it,
    else its archive in the artifact store, unpacked into TANDEM_HOME/cache/datasets."""
    from backend.storage.artifacts import fetch_dataset

    candidates = [metrics.get("dataset_root")]
    if found := re.match(r"^p\d+-job(\d+)$", name or ""):  # a job's version: its work folder
        candidates.append(str(Path(home) / "jobs" / found.group(1) / "dataset"))
    for root in filter(None, candidates):
        if _is_dataset(Path(root)):
            return ParentDataset(Path(root), str(root))
    uri = metrics.get("dataset_uri")
    if not uri:
        return ParentDataset(None)
    try:
        root = fetch_dataset(str(uri), Path(home) / "cache" / "datasets")
    except (OSError, tarfile.TarError) as exc:  # missing, unreadable or cut short: replay falls back
        return ParentDataset(None, str(uri), f"{name}'s dataset archive could not be read ({exc})")
    if not _is_dataset(root):
        return ParentDataset(None, str(uri), f"{name}'s dataset archive {uri} holds no detect/segment dataset")
    return ParentDataset(root, str(uri))


def parent_dataset(metrics: Mapping[str, Any], name: str, home: Path) -> Path | None:
    """The parent's dataset folder on this machine (fetched from the artifact store if need be), or None."""
    return find_parent_dataset(metrics, name, home).root


def dataset_replay(root: Path, class_names: Sequence[str], exclude_tasks: set[int], count: int,
                   seed: int = 0, segment: bool = False) -> list[ReplayItem]:
    """Up to `count` of the parent's training images, class ids remapped by name onto `class_names`.

    Tasks the new dataset has (its newer labels win) are left out, and so is an image with a class the new
    dataset lacks: training on it with that box dropped would teach that the object is background."""
    from PIL import Image

    root = Path(root)
    names = _dataset_classes(root)
    ids = {n: i for i, n in enumerate(class_names)}
    files = sorted(f for f in (root / "images" / "train").glob("*.png") if not f.stem.startswith("replay_"))
    order = np.random.default_rng(seed).permutation(len(files))
    out: list[ReplayItem] = []
    for k in order:
        if len(out) >= count:
            break
        f = files[int(k)]
        if _task_id(f.stem) in exclude_tasks:
            continue
        label = root / "labels" / "train" / f"{f.stem}.txt"
        rows = [ln.split() for ln in (label.read_text().splitlines() if label.is_file() else []) if ln.strip()]
        if any(int(r[0]) >= len(names) or names[int(r[0])] not in ids for r in rows):
            continue
        if segment and any(len(r) <= 5 for r in rows):  # a box in a segment dataset: ultralytics refuses the lot
            continue
        lines = [" ".join([str(ids[names[int(r[0])]]), *r[1:]]) for r in rows]
        out.append(ReplayItem(f"d{f.stem}", Image.open(f).convert("RGB"), lines))
    return out


def pseudo_replay(adapter, images: Iterable[tuple[str, Any]], class_ids: Mapping[str, int], count: int,
                  conf: float = PSEUDO_CONF, label_map: Mapping[str, str] | None = None,
                  segment: bool = False) -> list[ReplayItem]:
    """The parent's confident boxes (outlines for a segment dataset) on up to `count` images no human labelled,
    as replay; an image where an object has no outline is left out."""
    from backend.training.export import pseudo_labels

    chosen = list(images)[:count]
    if not chosen:
        return []
    lines = pseudo_labels(adapter, [img for _, img in chosen], class_ids, conf, label_map, segment)
    return [ReplayItem(f"p{stem}", img, ln) for (stem, img), ln in zip(chosen, lines, strict=True) if ln is not None]


def existing_task_ids(root: Path) -> set[int]:
    """Task ids already in an exported dataset (either split)."""
    return {t for f in Path(root).glob("images/*/*.png") if (t := _task_id(f.stem)) is not None}


def unlabelled_images(settings, project_id: int, image_key: str, exclude: set[int], count: int,
                      seed: int = 0) -> list[tuple[str, Any]]:
    """Up to `count` images of the project's tasks outside `exclude` (those with no annotation), drawn at random."""
    from label_studio_sdk import LabelStudio

    from backend.errors import MediaError
    from backend.media.fetch import MediaFetcher
    from backend.predict import image_url

    client = LabelStudio(base_url=settings.label_studio_url, api_key=settings.label_studio_api_key, timeout=120)
    tasks = [t.model_dump() for t in client.tasks.list(project=project_id, fields="all")]
    tasks = [t for t in tasks if t["id"] not in exclude and not t.get("annotations")]
    order = np.random.default_rng(seed).permutation(len(tasks))
    fetcher, out = MediaFetcher(settings.media()), []
    for k in order:
        if len(out) >= count:
            break
        task = tasks[int(k)]
        try:
            out.append((f"task{task['id']}", fetcher.load(image_url(task, image_key) or "", task_id=task["id"]).image))
        except MediaError:
            continue
    return out


def gather_replay(dataset, parent_metrics: Mapping[str, Any], parent_name: str, home: Path, parent_adapter,
                  unlabelled, label_map: Mapping[str, str] | None = None,
                  seed: int = 0) -> tuple[list[ReplayItem], str]:
    """The replay for this job and a sentence for its log: the parent's dataset, else its pseudo-labels.

    `parent_adapter()` loads the parent (only when pseudo-labels are needed); `unlabelled(exclude, count)` gives
    (stem, image) pairs of tasks no human has labelled."""
    if dataset.task == "classify" or dataset.train >= FEW_IMAGES:
        return [], ""
    count = replay_count(dataset.train)
    segment = dataset.task == "segment"  # outlines only: ultralytics refuses a segment dataset with boxes in it
    have = existing_task_ids(dataset.root)
    found = find_parent_dataset(parent_metrics, parent_name, home)
    parent_data = f"{parent_name}'s training data is not here"
    if found.root is not None:
        items = dataset_replay(found.root, dataset.class_names, have, count, seed, segment)
        if items:
            return items, f"replaying {len(items)} images of {parent_name}'s own training data ({found.source})"
        parent_data = f"every image of {parent_name}'s training data is in this export already"
    said = f"{found.problem}; " if found.problem else ""
    images = unlabelled(have, count)
    ids = {n: i for i, n in enumerate(dataset.class_names)}
    items = pseudo_replay(parent_adapter(), images, ids, count, label_map=label_map, segment=segment) if images else []
    if not items:
        left = ("no task is left unlabelled" if not images else
                f"it is confident on none of the {len(images)} unlabelled tasks looked at")
        return [], f"{said}nothing to replay: {parent_data}, and {left}"
    boxes = sum(len(i.lines) for i in items)
    return items, (f"{said}replaying {len(items)} unlabelled tasks with {parent_name}'s own confident "
                   f"{'outlines' if segment else 'boxes'} "
                   f"({boxes} pseudo-labels at confidence ≥ {PSEUDO_CONF})")


__all__ = ["gather_replay", "unlabelled_images", "FEW_IMAGES", "FROZEN_LAYERS", "MAX_REPLAY", "ReplayItem", "Schedule", "choose_schedule", "dataset_replay",
           "existing_task_ids", "find_parent_dataset", "parent_dataset", "ParentDataset", "pseudo_replay", "replay_count"]
