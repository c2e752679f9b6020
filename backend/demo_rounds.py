"""Rounds of Tandem's loop beside random labelling, with every simulated human action counted.

Both arms start from the same CNN, pool and held-out test set. Each round:

- **tandem**: the CNN and the second opinion predict the unlabelled pool; tasks where they agree
  (`active_learning.agreement`) above the threshold `calibration.calibrate` chose on the boxes humans have
  verified so far are auto-accepted (their agreed boxes become labels; a human spot-checks a share of
  them); `budget` of the rest are queued by hybrid disagreement + uncertainty (with random controls) and
  the simulated annotator fixes the CNN's pre-annotations from ground truth: verify, modify, delete, draw.
- **random**: `budget` tasks drawn at random, every box drawn from scratch (labelling without Tandem).

Then each arm fine-tunes its CNN from the last round's weights on all its labels (the job's schedule) and
is scored on the held-out test set. Seconds come from `active_learning.effort.EffortModel`; auto-accepted
boxes are judged against ground truth, never against the models. Pure of Label Studio: `tandem demo` and
`benchmarks/al_simulation.py` both run it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import supervision as sv
from PIL import Image
from scipy.optimize import linear_sum_assignment

from active_learning.agreement import agreed, box_iou, task_agreement
from active_learning.calibration import calibrate
from active_learning.effort import EffortModel
from active_learning.scoring import score_outputs
from active_learning.selection import SelectionConfig, Strategy, select
from backend.convert.yolo_txt import box_lines
from backend.core.prediction import CLASS_NAME, Prediction
from backend.models.yolo import YoloAdapter
from backend.training.evaluate import evaluate
from backend.training.export import ExportedDataset, frozen_split

CORRECT_IOU = 0.5  # a shown or accepted box is right when it matches a true box of its class at this IoU (VOC)
UNCHANGED_IOU = 0.75  # ... and a human leaves it as it is above this; between the two it is moved (modified)


@dataclass(frozen=True)
class Actions:
    """What a human did to one task's pre-annotation to make it right."""

    verify: int = 0  # kept unchanged
    modify: int = 0  # moved or relabelled
    delete: int = 0  # a shown box with no object under it
    draw: int = 0  # an object nothing was shown for

    def __add__(self, other: Actions) -> Actions:
        return Actions(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values(), strict=True)))

    def seconds(self, effort: EffortModel) -> float:
        return effort.assisted_seconds(self.verify, self.modify, self.delete, self.draw)


def truth_prediction(xyxy: np.ndarray, names: Sequence[str]) -> Prediction:
    xyxy = np.asarray(xyxy, float).reshape(-1, 4)
    classes = sorted(set(names))
    det = sv.Detections(xyxy=xyxy, confidence=np.ones(len(xyxy)),
                        class_id=np.array([classes.index(n) for n in names], int),
                        data={CLASS_NAME: np.array(list(names), dtype=object)})
    return Prediction(detections=det, class_names=tuple(classes))


def _names(p: Prediction) -> np.ndarray:
    det = p.detections
    return np.zeros(0, object) if det is None or len(det) == 0 else np.asarray(det.data[CLASS_NAME], object)


def _pairs(shown: Prediction, truth: Prediction) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one class-agnostic matching of shown boxes to true boxes at IoU ≥ CORRECT_IOU: (rows, cols, iou)."""
    a, b = shown.detections, truth.detections
    if a is None or b is None or len(a) == 0 or len(b) == 0:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0)
    iou = box_iou(a.xyxy, b.xyxy)
    rows, cols = linear_sum_assignment(np.where(iou >= CORRECT_IOU, iou, -1.0), maximize=True)
    keep = iou[rows, cols] >= CORRECT_IOU
    return rows[keep], cols[keep], iou[rows[keep], cols[keep]]


def review(shown: Prediction, truth: Prediction) -> Actions:
    """The annotator's actions on one pre-annotated task (ground truth as the final annotation)."""
    rows, cols, iou = _pairs(shown, truth)
    same = _names(shown)[rows] == _names(truth)[cols]
    verify = int((same & (iou >= UNCHANGED_IOU)).sum())
    n_shown = 0 if shown.detections is None else len(shown.detections)
    n_true = 0 if truth.detections is None else len(truth.detections)
    return Actions(verify=verify, modify=len(rows) - verify, delete=n_shown - len(rows), draw=n_true - len(rows))


def correct_boxes(boxes: Prediction, truth: Prediction) -> np.ndarray:
    """(N,) for each box: does it match a true box of its class (one-to-one, IoU ≥ CORRECT_IOU)?"""
    n = 0 if boxes.detections is None else len(boxes.detections)
    out = np.zeros(n, bool)
    rows, cols, _ = _pairs(boxes, truth)
    out[rows] = _names(boxes)[rows] == _names(truth)[cols]
    return out


@dataclass
class RoundRecord:
    arm: str
    round: int
    labelled: int  # tasks with labels (human or auto-accepted)
    human_tasks: int
    human_seconds: float  # cumulative
    actions: dict[str, int]  # cumulative verify / modify / delete / draw
    auto_tasks: int = 0  # cumulative
    auto_boxes: int = 0
    auto_correct: int = 0
    spot_checks: int = 0  # auto-accepted tasks a human looked at (cumulative)
    spot_boxes: int = 0  # ... and their boxes, each costing a verify
    threshold: float | None = None
    calibration: str = ""
    test_map50: float = 0.0
    promoted: bool = True


@dataclass
class LoopConfig:
    rounds: int = 3
    budget: int = 30
    control_fraction: float = 0.2
    epochs: int = 10
    imgsz: int = 160
    lr0: float = 0.001
    serve_conf: float = 0.25  # what annotators are shown
    second_conf: float = 0.25
    target: float = 0.98
    delta: float = 0.05
    match_iou: float = 0.5
    seed: int = 0
    effort: EffortModel = field(default_factory=EffortModel)


@dataclass
class Pool:
    """The arms' shared world: unlabelled images with their hidden truth, and a held-out test set."""

    images: list[Image.Image]
    truth: list[Prediction]
    class_names: list[str]
    test: ExportedDataset
    replay: list = field(default_factory=list)  # backend.training.replay.ReplayItem: the starting CNN's own data


def _write_dataset(root: Path, pool: Pool, labels: dict[int, Prediction], human: set[int]) -> ExportedDataset:
    """Every labelled task into train; human-labelled tasks the job would hold out form the frozen val split."""
    if root.exists():
        shutil.rmtree(root)
    counts = {"train": 0, "val": 0}
    for split in counts:
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
    ids = {n: i for i, n in enumerate(pool.class_names)}
    frozen = frozen_split(0, human & set(labels))
    for task, pred in labels.items():
        split = "val" if task in frozen else "train"
        det, image = pred.detections, pool.images[task]
        names = _names(pred)
        lines = box_lines(det.xyxy if det is not None else np.zeros((0, 4)), [ids[n] for n in names], image.size)
        image.save(root / "images" / split / f"t{task}.png")
        (root / "labels" / split / f"t{task}.txt").write_text("\n".join(lines) + "\n")
        counts[split] += 1
    body = "\n".join(f"  {i}: {n}" for i, n in enumerate(pool.class_names))
    val = "images/val" if counts["val"] else "images/train"  # ultralytics builds a val loader even unused
    (root / "data.yaml").write_text(f"path: {root.resolve()}\ntrain: images/train\nval: {val}\nnames:\n{body}\n")
    return ExportedDataset(root=root, task="detect", class_names=list(pool.class_names), data=str(root / "data.yaml"),
                           **counts)


def _with_replay(dataset: ExportedDataset, pool: Pool) -> int:
    """The job's replay (`backend.training.replay`): few labels get the parent's own data in the training split."""
    from backend.training.export import add_replay
    from backend.training.replay import FEW_IMAGES, replay_count

    if dataset.train >= FEW_IMAGES or not pool.replay:
        return 0
    return add_replay(dataset, pool.replay[: replay_count(dataset.train)])


def _retrain(weights: str, dataset: ExportedDataset, pool: Pool, work: Path, config: LoopConfig) -> tuple[str, bool]:
    """Fine-tune as the job does (replay, schedule), and gate on the frozen split (not worse by more than the margin)."""
    from backend.training.replay import choose_schedule
    from backend.training.worker import DEFAULTS, gate, scoring_adapter
    from backend.training.yolo_finetune import fine_tune

    params = choose_schedule({**DEFAULTS, "epochs": config.epochs, "imgsz": config.imgsz, "lr0": config.lr0},
                             dataset.train, _with_replay(dataset, pool), dataset.task).params
    out = fine_tune(weights, dataset.data, work, params, "cpu")
    target = work / f"r{len(list(work.glob('r*.pt')))}.pt"
    shutil.copyfile(out["weights"], target)
    if dataset.val == 0:
        return str(target), True
    new = evaluate(scoring_adapter(target, "cpu"), dataset)["fitness"]
    old = evaluate(scoring_adapter(Path(weights), "cpu"), dataset)["fitness"]
    promoted, _ = gate(new, old, DEFAULTS["margin"], "the serving model")
    return (str(target) if promoted else weights), promoted


def _test_map50(weights: str, pool: Pool) -> float:
    return evaluate(YoloAdapter(weights, device="cpu", conf=0.001), pool.test)["map50"]


def run_rounds(pool: Pool, cnn: str, second: str, work: Path, config: LoopConfig,
               arms: Sequence[str] = ("random", "tandem"),
               progress: Callable[[str], None] = lambda _: None) -> list[RoundRecord]:
    """Every arm's rounds; round 0 is the shared starting CNN (no human seconds)."""
    start = _test_map50(cnn, pool)
    records = []
    for arm in arms:
        records.append(RoundRecord(arm, 0, 0, 0, 0.0, asdict(Actions()), test_map50=start))
        run = _tandem_arm if arm == "tandem" else _random_arm
        records += run(pool, cnn, second, work / arm, config, progress)
    return records


def _random_arm(pool, cnn, _second, work, config, progress) -> list[RoundRecord]:
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(pool.images))
    labels: dict[int, Prediction] = {}
    weights, seconds, out = cnn, 0.0, []
    for r in range(1, config.rounds + 1):
        picked = order[(r - 1) * config.budget : r * config.budget]
        for t in picked:
            labels[int(t)] = pool.truth[t]
            seconds += config.effort.scratch_seconds(len(pool.truth[t].detections))
        drawn = sum(len(p.detections) for p in labels.values())
        progress(f"random round {r}: {len(picked)} tasks drawn from scratch; fine-tuning")
        data = _write_dataset(work / "data", pool, labels, set(labels))
        weights, promoted = _retrain(weights, data, pool, work, config)
        out.append(RoundRecord("random", r, len(labels), len(labels), seconds,
                               asdict(Actions(draw=drawn)), test_map50=_test_map50(weights, pool), promoted=promoted))
    return out


def _tandem_arm(pool, cnn, second, work, config, progress) -> list[RoundRecord]:
    labels: dict[int, Prediction] = {}
    human: set[int] = set()
    scores: list[float] = []  # verified agreed pairs: score, and whether the CNN's box was right
    right: list[bool] = []
    weights, seconds, actions, out = cnn, 0.0, Actions(), []
    auto_tasks = auto_boxes = auto_correct = spot = spot_boxes = 0
    for r in range(1, config.rounds + 1):
        todo = [t for t in range(len(pool.images)) if t not in labels]
        model = YoloAdapter(weights, device="cpu", conf=config.serve_conf)
        other = YoloAdapter(second, device="cpu", conf=config.second_conf)
        images = [pool.images[t] for t in todo]
        shown, seen = model.predict(images), other.predict(images)
        verdicts = [task_agreement(a, b, config.match_iou) for a, b in zip(shown, seen, strict=True)]
        cal = calibrate(np.array(scores), np.array(right, bool), config.target, config.delta)
        accepted = [i for i, v in enumerate(verdicts) if v.accepted(cal.threshold)]
        for i in accepted:
            boxes = agreed(shown[i], verdicts[i].match)
            ok = correct_boxes(boxes, pool.truth[todo[i]])
            labels[todo[i]] = boxes
            auto_tasks, auto_boxes, auto_correct = auto_tasks + 1, auto_boxes + len(ok), auto_correct + int(ok.sum())
        checks = int(np.ceil(config.effort.spot_check * len(accepted)))
        checked = sum(len(labels[todo[i]].detections) for i in accepted[:checks])
        spot, spot_boxes = spot + checks, spot_boxes + checked
        seconds += checked * config.effort.verify_box
        rest = [i for i in range(len(todo)) if i not in set(accepted)]
        table = score_outputs([shown[i] for i in rest], model.class_names, [seen[i] for i in rest], other.class_names,
                              threshold=config.serve_conf)
        sel = select(SelectionConfig(strategy=Strategy.HYBRID, budget=config.budget,
                                     control_fraction=config.control_fraction, seed=config.seed * 100 + r),
                     table.uncertainty, table.disagreement)
        for k in sel.indices:
            i = rest[int(k)]
            task, truth = todo[i], pool.truth[todo[i]]
            did = review(shown[i], truth)
            actions, seconds = actions + did, seconds + did.seconds(config.effort)
            labels[task] = truth
            human.add(task)
            v = verdicts[i]
            if v.match is not None and v.match.matched:  # the calibration sample: agreed pairs a human judged
                ok = correct_boxes(shown[i].with_meta(detections=shown[i].detections[v.match.rows]), truth)
                scores += list(v.match.pair_scores)
                right += list(ok)
        progress(f"tandem round {r}: {len(accepted)} auto-accepted ({cal.reason}); {len(sel.indices)} reviewed; "
                 "fine-tuning")
        data = _write_dataset(work / "data", pool, labels, human)
        weights, promoted = _retrain(weights, data, pool, work, config)
        out.append(RoundRecord("tandem", r, len(labels), len(human), seconds, asdict(actions), auto_tasks, auto_boxes,
                               auto_correct, spot, spot_boxes, cal.threshold, cal.reason, _test_map50(weights, pool),
                               promoted))
        (work / f"auto_accepted_round{r}.json").write_text(json.dumps(
            [{"task": todo[i], "boxes": labels[todo[i]].detections.xyxy.tolist(),
              "classes": _names(labels[todo[i]]).tolist(), "truth": pool.truth[todo[i]].detections.xyxy.tolist(),
              "truth_classes": _names(pool.truth[todo[i]]).tolist()} for i in accepted]))
    return out


def build_pool(root: Path, images: int, test_images: int = 60, seed: int = 20261123, parent_recipe=None) -> Pool:
    """Generated shapes (all three classes) with their truth, and a held-out test set written once under `root`.

    `parent_recipe` (a `StarterRecipe`): the starting CNN's training data, regenerated, is the replay the job
    would find on the parent's version."""
    from backend.datasets.shapes import CLASS_NAMES, generate_samples, write_yolo_dataset
    from backend.training.replay import MAX_REPLAY, ReplayItem

    samples = generate_samples(images, seed=seed)
    truth = [truth_prediction(np.array([o.box for o in s.objects], float).reshape(-1, 4), [o.label for o in s.objects])
             for _, s in samples]
    test_root = Path(root) / f"test-{test_images}"
    if not (test_root / "data.yaml").exists():
        write_yolo_dataset(test_root, train=0, val=test_images, seed=4242)
    test = ExportedDataset(root=test_root, task="detect", class_names=list(CLASS_NAMES), data=str(test_root / "data.yaml"))
    replay = []
    if parent_recipe is not None:  # the starter's train split: generate_samples(train_images, seed, classes)
        known = generate_samples(parent_recipe.train_images, seed=parent_recipe.seed, classes=parent_recipe.classes)
        for img, s in known[:MAX_REPLAY]:
            xyxy = np.array([o.box for o in s.objects], float).reshape(-1, 4)
            replay.append(ReplayItem(s.name, img, box_lines(xyxy, [CLASS_NAMES.index(o.label) for o in s.objects],
                                                            img.size)))
    return Pool(images=[img for img, _ in samples], truth=truth, class_names=list(CLASS_NAMES), test=test, replay=replay)


@dataclass(frozen=True)
class Savings:
    """What the run shows, every figure recomputed from its records."""

    rounds: int
    start_map50: float  # the shared starting CNN's
    random_seconds: float  # random labelling's human seconds over all its rounds
    random_final_map50: float
    tandem_seconds: float
    tandem_final_map50: float
    tandem_seconds_to_random_final: float | None  # None: Tandem never reached random's final quality
    share_of_random_seconds: float | None
    seconds_saved: float | None
    common_map50: float  # the lower of the two arms' final mAP50: a quality both reached
    random_seconds_to_common: float | None
    tandem_seconds_to_common: float | None
    share_at_common: float | None  # Tandem's seconds / random's, to reach common_map50
    random_actions: dict[str, int]
    tandem_actions: dict[str, int]
    auto_accepted_tasks: int
    auto_accepted_boxes: int
    auto_accept_precision: float | None  # against ground truth; None when nothing was auto-accepted
    coverage: float  # auto-accepted boxes / all boxes the tandem arm labelled
    spot_checks: int


def savings(records: Sequence[RoundRecord]) -> Savings:
    rnd = [r for r in records if r.arm == "random"]
    tan = [r for r in records if r.arm == "tandem"]
    last_r, last_t = rnd[-1], tan[-1]
    start = rnd[0].test_map50
    # a level the starting CNN already had costs nothing in either arm: no saving is claimed there
    reach = seconds_to_reach(records, "tandem", last_r.test_map50) if last_r.test_map50 > start else None
    common = min(last_r.test_map50, last_t.test_map50)
    r_common, t_common = ((seconds_to_reach(records, "random", common), seconds_to_reach(records, "tandem", common))
                          if common > start else (None, None))
    human_boxes = sum(last_t.actions[k] for k in ("verify", "modify", "draw"))  # the boxes humans left in
    labelled = human_boxes + last_t.auto_boxes
    return Savings(
        rounds=last_t.round, start_map50=start, random_seconds=last_r.human_seconds, random_final_map50=last_r.test_map50,
        tandem_seconds=last_t.human_seconds, tandem_final_map50=last_t.test_map50,
        tandem_seconds_to_random_final=reach,
        share_of_random_seconds=None if reach is None or last_r.human_seconds == 0 else reach / last_r.human_seconds,
        seconds_saved=None if reach is None else last_r.human_seconds - reach,
        common_map50=common, random_seconds_to_common=r_common, tandem_seconds_to_common=t_common,
        share_at_common=t_common / r_common if t_common is not None and r_common else None,
        random_actions=dict(last_r.actions), tandem_actions=dict(last_t.actions),
        auto_accepted_tasks=last_t.auto_tasks, auto_accepted_boxes=last_t.auto_boxes,
        auto_accept_precision=last_t.auto_correct / last_t.auto_boxes if last_t.auto_boxes else None,
        coverage=last_t.auto_boxes / labelled if labelled else 0.0, spot_checks=last_t.spot_checks)


def seconds_to_reach(records: Sequence[RoundRecord], arm: str, target: float) -> float | None:
    """Human seconds at which an arm's held-out mAP50 first reaches `target`, linearly interpolated."""
    rows = [r for r in records if r.arm == arm]
    for k, row in enumerate(rows):
        if row.test_map50 >= target:
            if k == 0:
                return row.human_seconds
            prev = rows[k - 1]
            frac = (target - prev.test_map50) / max(row.test_map50 - prev.test_map50, 1e-12)
            return prev.human_seconds + frac * (row.human_seconds - prev.human_seconds)
    return None


__all__ = ["Actions", "LoopConfig", "Pool", "RoundRecord", "Savings", "build_pool", "correct_boxes", "review",
           "run_rounds", "savings", "seconds_to_reach", "truth_prediction"]
