"""Label-efficiency simulation on real handwritten digits: does active learning beat random?

Each seed draws a fixed test split and an initial labeled set. Every round, each strategy (random,
uncertainty, disagreement, hybrid) picks `budget` images from the pool through Tandem's own scoring
and selection code, the "annotator" reveals their ground truth, and YOLOv8n is fine-tuned from the
previous round's weights. Scores are mAP50 (detection) and top-1 accuracy (classification) on the test
split. Round 0 is shared by all strategies of a seed.

The second opinion: no VLM weights exist offline, so disagreement uses a *differently trained model*
— for classification a logistic regression on the raw 8×8 scans (another model family), for detection
a second YOLOv8n trained with another seed and input size. The output says so.

`--imbalance R` makes the classification pool long-tailed, as production pools are: the class at
frequency rank r keeps n_max · R^(−r/9) of its images (Cui et al.'s CIFAR-LT profile; which digit is
rarest is drawn per seed), while the test split stays balanced, so a model is scored on every class.

    uv run python benchmarks/al_simulation.py --task classify --seeds 3
    uv run python benchmarks/al_simulation.py --task classify --seeds 3 --imbalance 10
    uv run python benchmarks/al_simulation.py --task detect --seeds 3   # about 70 minutes on 2 cores

Each seed's curves are written to `al_<tag>_seed<S>.json` as it finishes, so seeds can run as parallel
processes (one torch thread each) and be summarised afterwards — the longer-horizon run in the README:

    for s in 0 1 2; do uv run python benchmarks/al_simulation.py --task classify --rounds 10 \
        --strategies fixed,random,hybrid --tag classify_e300 --seed-list $s --threads 1 & done; wait
    uv run python benchmarks/al_simulation.py --task classify --tag classify_e300 --summarise

(classify_h440 is the same run at the old `--epochs0 120`.)

`--human-seconds` (detection) counts human work instead of labels: the arms of `backend.demo_rounds` —
Tandem's loop (auto-accept of the boxes both models agree on, calibrated on the boxes humans verified,
with a Clopper-Pearson bound; the rest queued by hybrid disagreement; the simulated annotator verifies,
modifies, deletes and draws) beside random labelling (every box drawn) — from the same round-0 CNN and
second opinion, each action priced by `active_learning.effort.EffortModel`. The initial labels are the
replay the job would find on the parent's version. Results: al_<tag>_human_seed<S>.json and
al_human_seconds.md (`--summarise --human-seconds`).

    uv run python benchmarks/al_simulation.py --task detect --human-seconds --seeds 3

Classification (`benchmarks/al_human_classify.py`): the same two arms from one round-0 YOLOv8n-cls on
`run_seed`'s pool and test split; random chooses every class from scratch, Tandem auto-accepts the tasks where
the CNN and the logistic-regression second opinion (refit on human labels only) agree above the calibrated
threshold, and the annotator confirms (verify_class) or chooses (choose_class) on the hybrid queue. Results:
al_<tag>_human_seed<S>.json (records as detection's, `test_map50` = top-1 accuracy) and
al_human_seconds_classify.md.

    for s in 0 1 2; do uv run python benchmarks/al_simulation.py --task classify --human-seconds \
        --seed-list $s --threads 1 & done; wait
    uv run python benchmarks/al_simulation.py --task classify --human-seconds --summarise

`--strategies fixed` adds a control that no selection can beat: every round fine-tunes on the initial
labels alone. What that curve climbs is training time, not labels — every strategy's curve holds it too,
and the summary says how much of random's climb it is. A strategy run later in its own process joins a
seed's file as a part (`--part fixed` writes al_<tag>_seed<S>_fixed.json; --summarise merges the parts).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "False")

import numpy as np  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402

from active_learning.scoring import SELECT_AGGREGATE, score_outputs  # noqa: E402
from active_learning.selection import SelectionConfig, Strategy, select  # noqa: E402
from active_learning.uncertainty import AGGREGATES  # noqa: E402
from backend.convert.yolo_txt import box_lines  # noqa: E402
from backend.models.base import ModelOutput  # noqa: E402
from backend.models.yolo import YoloAdapter  # noqa: E402
from backend.training.yolo_finetune import trainer_without_validation  # noqa: E402
from benchmarks.digits_data import DigitSample, classification_set, detection_set  # noqa: E402

STRATEGIES = [Strategy.RANDOM, Strategy.UNCERTAINTY, Strategy.DISAGREEMENT, Strategy.HYBRID]
FIXED = "fixed"  # not a strategy: the initial labels only, trained on with the same schedule (training time alone)
NAMES = [str(i) for i in range(10)]
# classify epochs0 was 120: the 'fixed' control (no labels added) then climbed 36% of random's climb on training
# time alone; at 300 it climbs 1%, so the curves measure labels
DEFAULTS = {"classify": dict(rounds=5, initial=40, budget=40, pool=1200, test=400, epochs0=300, epochs=40, imgsz=64,
                             lr_finetune=0.002),
            "detect": dict(rounds=4, initial=60, budget=30, pool=400, test=100, epochs0=80, epochs=12, imgsz=128,
                           lr_finetune=0.0005)}  # per task, for every option left unset
MAX_LABELED_FOR_DIVERSITY = 256  # as `tandem select` does: k-center keeps away from this many labeled images


def write_split(samples: list[DigitSample], idx, root: Path, split: str, task: str) -> None:
    for i in idx:
        s = samples[i]
        if task == "classify":
            folder = root / split / str(int(s.labels[0]))
            folder.mkdir(parents=True, exist_ok=True)
            s.image.save(folder / f"{i}.png")
            continue
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        s.image.save(root / "images" / split / f"{i}.png")
        lines = box_lines(np.asarray(s.boxes, dtype=float).reshape(-1, 4), s.labels, s.image.size)
        (root / "labels" / split / f"{i}.txt").write_text("\n".join(lines) + "\n")


def dataset(samples, labeled, test, root: Path, task: str) -> str:
    if root.exists():
        shutil.rmtree(root)
    write_split(samples, labeled, root, "train", task)
    write_split(samples, test, root, "val", task)
    if task == "classify":
        for name in NAMES:  # every class folder exists even before it has a label
            (root / "train" / name).mkdir(parents=True, exist_ok=True)
            (root / "val" / name).mkdir(parents=True, exist_ok=True)
        return str(root)
    names = "\n".join(f"  {i}: '{n}'" for i, n in enumerate(NAMES))
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
    return str(root / "data.yaml")


def train(task: str, data: str, init: str, epochs: int, imgsz: int, seed: int, work: Path, lr0: float = 0.002) -> str:
    from ultralytics import YOLO

    model = YOLO(init)
    model.train(trainer=trainer_without_validation(task), data=data, epochs=epochs, imgsz=imgsz, batch=16,
                workers=0, device="cpu", seed=seed, val=False,
                plots=False, verbose=False, project=str(work), name="run", exist_ok=True, warmup_epochs=0,
                optimizer="AdamW", lr0=lr0, close_mosaic=0, mosaic=0.5 if task == "detect" else 0.0,
                fliplr=0.0, erasing=0.0)  # a mirrored digit is not the same digit
    out = work / f"w{time.monotonic_ns()}.pt"
    shutil.copyfile(work / "run" / "weights" / "last.pt", out)
    return str(out)


def evaluate(task: str, weights: str, data: str, imgsz: int) -> float:
    from ultralytics import YOLO

    m = YOLO(weights).val(data=data, imgsz=imgsz, batch=32, workers=0, device="cpu", plots=False, verbose=False,
                          split="val")
    return float(m.top1 if task == "classify" else m.box.map50)


def second_opinion(task, samples, labeled, pool, args, prev_b, work, seed):
    """Returns (outputs on the pool, class names, weights for next round)."""
    if task == "classify":
        x = np.stack([samples[i].pixels for i in labeled])
        y = np.array([samples[i].labels[0] for i in labeled])
        clf = LogisticRegression(max_iter=2000).fit(x, y)
        probs = np.zeros((len(pool), 10))
        probs[:, clf.classes_] = clf.predict_proba(np.stack([samples[i].pixels for i in pool]))
        return [ModelOutput(probabilities=p) for p in probs], NAMES, None
    data = dataset(samples, labeled, labeled[:8], work / "data_b", task)  # ultralytics wants a val folder
    # trained as the CNN was (from scratch for epochs0, then fine-tuned each round), with another seed and size:
    # a few epochs from scratch gave a model that disagreed with everything (disagreement 1.0 on 90% of the
    # pool), and then hybrid ranked by uncertainty alone
    init, epochs, lr = ("yolov8n.yaml", args.epochs0, 0.002) if prev_b is None else (prev_b, args.epochs, args.lr_finetune)
    weights = train(task, data, init, epochs, args.imgsz - 32, seed + 1000, work / "b", lr)
    adapter = YoloAdapter(weights, device="cpu", conf=0.05, imgsz=args.imgsz - 32)
    return adapter.predict([samples[i].image for i in pool]), adapter.class_names, weights


def long_tail(indices: np.ndarray, labels: np.ndarray, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """A long-tailed subset: the class at frequency rank r keeps n_max · ratio^(−r/(C−1)) of its images."""
    classes = rng.permutation(np.unique(labels[indices]))
    n_max = min(int((labels[indices] == c).sum()) for c in classes)
    keep = []
    for rank, c in enumerate(classes):
        members = indices[labels[indices] == c]
        keep.extend(members[: max(1, int(round(n_max * ratio ** (-rank / max(len(classes) - 1, 1)))))])
    return rng.permutation(np.array(keep))


def draw_split(task: str, args, seed: int) -> tuple[list[DigitSample], np.ndarray, np.ndarray]:
    """A seed's samples, its fixed test split and its pool (long-tailed with --imbalance)."""
    samples = classification_set(seed) if task == "classify" else detection_set(args.pool + args.test, seed)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(samples))
    test, rest = order[: args.test], order[args.test :]
    if args.imbalance > 1:
        rest = long_tail(rest, np.array([s.labels[0] for s in samples]), args.imbalance, rng)
        sizes = np.bincount([samples[i].labels[0] for i in rest[: args.pool]], minlength=10)
        print(f"  seed {seed}: long-tailed pool of {min(len(rest), args.pool)}, images per digit {sizes.tolist()}",
              flush=True)
    return samples, test, rest[: args.pool]


def fixed_labels_curve(task: str, args, seed: int, work: Path, data0: str, w0: str, s0: float, n: int) -> dict:
    """The control no strategy can beat by selection: every round's fine-tune on the initial labels alone.

    Whatever this curve climbs is training time, not labels; the strategies' curves contain it too."""
    weights, scores = w0, [s0]
    for r in range(1, args.rounds + 1):
        weights = train(task, data0, weights, args.epochs, args.imgsz, seed + r, work / "a", args.lr_finetune)
        scores.append(evaluate(task, weights, data0, args.imgsz))
        print(f"  seed {seed} {FIXED:12s} round {r}: {n} labels -> {scores[-1]:.3f}", flush=True)
    return {"labels": [n] * (args.rounds + 1), "score": scores}


def run_seed(task: str, args, seed: int, work: Path) -> dict:
    samples, test, pool_all = draw_split(task, args, seed)
    initial = list(pool_all[: args.initial])
    data0 = dataset(samples, initial, test, work / "data", task)
    init_arch = "yolov8n-cls.yaml" if task == "classify" else "yolov8n.yaml"
    w0 = train(task, data0, init_arch, args.epochs0, args.imgsz, seed, work / "a")
    s0 = evaluate(task, w0, data0, args.imgsz)
    curves = {}
    if FIXED in args.strategies.split(","):
        curves[FIXED] = fixed_labels_curve(task, args, seed, work, data0, w0, s0, len(initial))
    for strategy in [s for s in STRATEGIES if s.value in args.strategies.split(",")]:
        labeled, weights, prev_b, scores, counts = list(initial), w0, None, [s0], [len(initial)]
        for r in range(1, args.rounds + 1):
            pool = [i for i in pool_all if i not in set(labeled)]
            adapter = YoloAdapter(weights, device="cpu", conf=0.05, imgsz=args.imgsz)
            images = [samples[i].image for i in pool]
            config = SelectionConfig(strategy=strategy, budget=args.budget, control_fraction=0.0, seed=seed * 100 + r,
                                     pool_factor=args.pool_factor, cold_start_labels=args.cold_start)
            if strategy is Strategy.RANDOM:
                sel = select(config, uncertainty=np.zeros(len(pool)))
            else:
                outputs = adapter.predict(images)
                second = names_b = None
                if strategy in (Strategy.DISAGREEMENT, Strategy.HYBRID):
                    second, names_b, prev_b = second_opinion(task, samples, labeled, pool, args, prev_b, work, seed + r)
                table = score_outputs(outputs, adapter.class_names, second, names_b, aggregate=args.aggregate)
                emb = adapter.embed(images)
                lab_emb = adapter.embed([samples[i].image for i in labeled[-MAX_LABELED_FOR_DIVERSITY:]])
                sel = select(config, table.uncertainty, table.disagreement, emb, lab_emb, num_labeled=len(labeled))
            labeled += [pool[i] for i in sel.indices]
            data = dataset(samples, labeled, test, work / "data", task)
            weights = train(task, data, weights, args.epochs, args.imgsz, seed + r, work / "a", args.lr_finetune)
            scores.append(evaluate(task, weights, data, args.imgsz))
            counts.append(len(labeled))
            print(f"  seed {seed} {strategy.value:12s} round {r}: {len(labeled)} labels -> {scores[-1]:.3f}", flush=True)
        curves[strategy.value] = {"labels": counts, "score": scores}
    return curves


def human_seconds_seed(args, seed: int, work: Path) -> list[dict]:
    """The auto-accept arm and random labelling on one seed's digits, every human action in seconds."""
    from dataclasses import asdict

    from active_learning.effort import EffortModel
    from backend.demo_rounds import LoopConfig, Pool, run_rounds, truth_prediction
    from backend.training.export import ExportedDataset
    from backend.training.replay import MAX_REPLAY, ReplayItem

    samples, test, pool_all = draw_split("detect", args, seed)
    initial, pool = list(pool_all[: args.initial]), list(pool_all[args.initial :])
    data0 = dataset(samples, initial, test, work / "data", "detect")
    w0 = train("detect", data0, "yolov8n.yaml", args.epochs0, args.imgsz, seed, work / "a")
    data_b = dataset(samples, initial, initial[:8], work / "data_b", "detect")
    second = train("detect", data_b, "yolov8n.yaml", args.epochs0, args.imgsz - 32, seed + 1000, work / "b")
    test_root = work / "test"
    dataset(samples, [], test, test_root, "detect")
    names = lambda s: [NAMES[int(c)] for c in s.labels]  # noqa: E731
    replay = [ReplayItem(f"init{i}", samples[i].image, box_lines(np.asarray(samples[i].boxes, float).reshape(-1, 4),
                                                                  samples[i].labels, samples[i].image.size))
              for i in initial[:MAX_REPLAY]]
    world = Pool(images=[samples[i].image for i in pool],
                 truth=[truth_prediction(np.asarray(samples[i].boxes, float).reshape(-1, 4), names(samples[i]))
                        for i in pool],
                 class_names=list(NAMES), replay=replay,
                 test=ExportedDataset(root=test_root, task="detect", class_names=list(NAMES),
                                      data=str(test_root / "data.yaml")))
    config = LoopConfig(rounds=args.rounds, budget=args.budget, epochs=args.epochs, imgsz=args.imgsz,
                        lr0=args.lr_finetune, seed=seed, effort=EffortModel.from_env())
    records = run_rounds(world, w0, second, work / "rounds", config,
                         progress=lambda m: print(f"  seed {seed} {m}", flush=True))
    return [asdict(r) for r in records]


def mean_std(values) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) else "n/a"


def savings_table(rows: dict, score: str, unit: str) -> list[str]:
    """The per-seed table of `demo_rounds.Savings` and the share / precision lines under it, for detection
    (`score` mAP50, `unit` boxes) and classification (top-1, tasks)."""
    lines = [f"| seed | random: human s (final {score}) | Tandem: human s (final {score}) | Tandem s to random's final "
             f"| share of random's s | auto-accepted {unit} | precision vs truth | coverage |", "|---" * 8 + "|"]
    for seed, s in sorted(rows.items()):
        reach = "not reached" if s.tandem_seconds_to_random_final is None else f"{s.tandem_seconds_to_random_final:.0f}"
        share = "-" if s.share_of_random_seconds is None else f"{s.share_of_random_seconds:.0%}"
        prec = "-" if s.auto_accept_precision is None else f"{s.auto_accept_precision:.3f}"
        auto = s.auto_accepted_boxes if unit == "boxes" else s.auto_accepted_tasks
        lines.append(f"| {seed} | {s.random_seconds:.0f} ({s.random_final_map50:.3f}) | {s.tandem_seconds:.0f} "
                     f"({s.tandem_final_map50:.3f}) | {reach} | {share} | {auto} | {prec} | {s.coverage:.0%} |")
    shares = [s.share_of_random_seconds for s in rows.values() if s.share_of_random_seconds is not None]
    precs = [s.auto_accept_precision for s in rows.values() if s.auto_accept_precision is not None]
    return lines + ["", f"- seeds: {len(rows)}; Tandem reached random's final {score} in {len(shares)} of them",
                    f"- share of random's human seconds to reach it: {mean_std(shares)} (target ≤ 0.30)",
                    f"- auto-accepted {unit}' precision against ground truth: {mean_std(precs)} (target ≥ 0.98), "
                    "over seeds with any auto-accepted"]


def summarise_human(results: dict[int, list[dict]], out: Path, tag: str) -> str:
    """Per seed and mean ± std: human seconds to reach random's final mAP50, auto-accept precision, coverage."""
    from backend.demo_report import quality_vs_seconds
    from backend.demo_rounds import RoundRecord, savings

    rows = {seed: savings([RoundRecord(**r) for r in recs]) for seed, recs in results.items()}
    lines = savings_table(rows, "mAP50", "boxes") + [
              "- coverage (auto-accepted / all boxes Tandem labelled): "
              f"{mean_std([s.coverage for s in rows.values()])} (target ≥ 0.50)",
              "- second opinion: a differently trained YOLOv8n (another seed and input size); no VLM weights offline"]
    first = results[min(results)]
    quality_vs_seconds(out, first, name=f"al_{tag}_human_seconds.png")
    (out / f"al_{tag}_human_summary.json").write_text(json.dumps({k: asdict_(v) for k, v in rows.items()}, indent=1))
    return "\n".join(lines)


def asdict_(obj) -> dict:
    from dataclasses import asdict

    return asdict(obj)


def labels_to_reach(labels, scores, target) -> float | None:
    """Labels at which a (mean) curve first reaches target, linearly interpolated."""
    for k in range(len(scores)):
        if scores[k] >= target:
            if k == 0:
                return float(labels[0])
            frac = (target - scores[k - 1]) / max(scores[k] - scores[k - 1], 1e-12)
            return float(labels[k - 1] + frac * (labels[k] - labels[k - 1]))
    return None


def summarise(task: str, results: dict, out: Path, tag: str, imbalance: float = 1.0) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = list(results)
    labels = results[seeds[0]]["random"]["labels"]
    metric = "top-1 accuracy" if task == "classify" else "mAP50"
    strategies = [s for s in STRATEGIES if all(s.value in results[seed] for seed in seeds)]
    stats = {s.value: curve_matrix(results, s.value) for s in strategies}
    fixed = curve_matrix(results, FIXED) if all(FIXED in results[x] for x in seeds) else None
    longer = [name for name, m in [*stats.items(), (FIXED, fixed)] if m is not None and m.shape[1] > len(labels)]
    if longer:
        raise ValueError(f"{', '.join(longer)} ran more rounds than random; random's final score is the target, "
                         "so run random at least as far")
    columns = [s.value for s in strategies] + ([f"initial {labels[0]} only"] if fixed is not None else [])
    rows = [stats[s.value] for s in strategies] + ([fixed] if fixed is not None else [])
    random_mean = stats["random"].mean(0)
    random_final = random_mean[-1]
    pool = f", long-tailed pool (imbalance {imbalance:g}), balanced test split" if imbalance > 1 else ""
    lines = [f"## {task}: {metric} on a fixed test split{pool}, mean ± std over {len(seeds)} seeds",
             "", "| labels | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for k, n in enumerate(labels):
        lines.append(f"| {n} | " + " | ".join(f"{row[:, k].mean():.3f} ± {row[:, k].std():.3f}" if k < row.shape[1]
                                             else "–" for row in rows) + " |")
    # a strategy may have been run to a shorter horizon than random (random extended later, in another process):
    # what it needs is read off its own curve, and its gain is taken over the rounds both ran
    shorter = [s.value for s in strategies if stats[s.value].shape[1] < len(labels)]
    lines += ["", f"Random's final score: {random_final:.3f} at {labels[-1]} labels."]
    if shorter:
        lines += ["", "Run to fewer labels than random: " + ", ".join(
            f"{name} to {labels[stats[name].shape[1] - 1]}" for name in shorter) + "; a mean gain is over the rounds "
            "both ran, and a strategy that never reached a score in its rounds reads \"not reached\"."]
    lines += ["", "| strategy | labels to reach random's final | share of random's labels | mean gain over random per round |",
              "|---|---|---|---|"]
    for s in strategies:
        m = stats[s.value]
        need = labels_to_reach(labels[: m.shape[1]], m.mean(0), random_final)
        gains = (m[:, 1:] - stats["random"][:, 1 : m.shape[1]]).mean(1)  # per seed, mean over rounds
        share = f"{need / labels[-1]:.0%}" if need else "not reached"
        lines.append(f"| {s.value} | {need:.0f} | {share} | {gains.mean():+.3f} ± {gains.std():.3f} |" if need else
                     f"| {s.value} | not reached | – | {gains.mean():+.3f} ± {gains.std():.3f} |")
    # the headline share hangs on random's last point alone; the same ratio at every horizon shows whether it is noise
    horizons = labels[2:]
    lines += ["", "Share of random's labels each strategy needs to reach random's score at each horizon:", "",
              "| strategy | " + " | ".join(str(n) for n in horizons) + " |", "|---" * (len(horizons) + 1) + "|"]
    for s in [x for x in strategies if x is not Strategy.RANDOM]:
        m = stats[s.value].mean(0)
        cells = []
        for k, n in enumerate(horizons, start=2):
            need = labels_to_reach(labels[: len(m)], m, random_mean[k])
            cells.append(f"{need / n:.0%}" if need else "–")
        lines.append(f"| {s.value} | " + " | ".join(cells) + " |")
    second = "logistic regression on the raw 8×8 scans" if task == "classify" else "a second YOLOv8n (other seed, input size)"
    lines += ["", f"Second opinion for disagreement: {second} — no VLM weights exist offline."]
    if fixed is not None:
        rounds = fixed.shape[1] - 1  # random's climb over the same rounds as the control
        start, end, climb = fixed.mean(0)[0], fixed.mean(0)[-1], random_mean[rounds] - random_mean[0]
        lines += ["", (f"Training time alone: the same schedule on the initial {labels[0]} labels, with none added, "
                       f"takes the score from {start:.3f} to {end:.3f} in {rounds} rounds — "
                       f"{(end - start) / climb:.0%} of random's climb ({climb:+.3f}) in those rounds is training, "
                       "not labels.")]

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for s in strategies:
        m, sd = stats[s.value].mean(0), stats[s.value].std(0)
        ax.plot(labels[: len(m)], m, marker="o", label=s.value)
        ax.fill_between(labels[: len(m)], m - sd, m + sd, alpha=0.15)
    if fixed is not None:
        ax.plot(labels[: fixed.shape[1]], fixed.mean(0), color="grey", linestyle="--",
                label=f"initial {labels[0]} labels only")
    ax.axhline(random_final, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("labeled images")
    ax.set_ylabel(metric)
    shape = f", long-tailed {imbalance:g}" if imbalance > 1 else ""
    ax.set_title(f"Tandem active learning on digits ({task}{shape}, {len(seeds)} seeds)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / f"al_{tag}_learning_curve.png", dpi=120)
    text = "\n".join(lines)
    (out / f"al_{tag}_results.md").write_text(text + "\n")
    (out / f"al_{tag}_results.json").write_text(json.dumps(results, indent=1))
    return text


def curve_matrix(results: dict, name: str) -> np.ndarray:
    """Seeds × rounds scores of one strategy; every seed must have run it for the same rounds."""
    lengths = {len(results[seed][name]["score"]) for seed in results}
    if len(lengths) > 1:
        raise ValueError(f"{name} ran for different numbers of rounds across seeds ({sorted(lengths)}): "
                         "rerun the short seeds or summarise another tag")
    return np.array([results[seed][name]["score"] for seed in results])


def load_seed_files(out: Path, tag: str) -> dict:
    """{seed: {strategy: curve}} from al_<tag>_seed<S>.json and its parts (strategies run in other processes)."""
    results: dict = {}
    for f in sorted(out.glob(f"al_{tag}_seed*.json")):
        saved = json.loads(f.read_text())
        results.setdefault(saved["seed"], {}).update(saved["curves"])
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["classify", "detect"], default="classify")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--initial", type=int, default=None)
    ap.add_argument("--budget", type=int, default=None)
    ap.add_argument("--pool", type=int, default=None)
    ap.add_argument("--test", type=int, default=None)
    ap.add_argument("--epochs0", type=int, default=None, help="epochs for the round-0 model")
    ap.add_argument("--epochs", type=int, default=None, help="fine-tune epochs per round")
    ap.add_argument("--imgsz", type=int, default=None)
    ap.add_argument("--lr-finetune", type=float, default=None,
                    help="AdamW learning rate of the per-round fine-tunes (the round-0 model trains at 0.002); "
                         "detection defaults to 0.0005: at 0.002 every detector lost a third of its mAP in round 1")
    ap.add_argument("--strategies", default=",".join(s.value for s in STRATEGIES),
                    help="comma-separated subset to run (the summary needs random; it covers the ones run); "
                         f"'{FIXED}' adds the control with no labels added: the initial labels, trained on with "
                         "the same schedule, shows how much of every curve is training time")
    ap.add_argument("--pool-factor", type=float, default=SelectionConfig.pool_factor,
                    help="k-center picks the batch from the top pool_factor × budget by acquisition")
    ap.add_argument("--cold-start", type=int, default=0,
                    help="below this many labels, pick typical images (TypiClust) instead of ranking by acquisition")
    ap.add_argument("--aggregate", choices=AGGREGATES, default=SELECT_AGGREGATE,
                    help="detection: rank an image by its worst box (max), its typical box (mean), or how much "
                         "is doubtful (capped_sum, as `tandem select` does: uncertainty summed over boxes, "
                         "disagreement as a count of boxes)")
    ap.add_argument("--imbalance", type=float, default=1.0,
                    help="classification: a long-tailed pool whose rarest digit has 1/R of the commonest's images "
                         "(the test split stays balanced); 1 = the digits as they come")
    ap.add_argument("--seed-list", default=None,
                    help="comma-separated seeds to run instead of 0..seeds-1 (e.g. one per process, then --summarise)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 when seeds run in parallel processes)")
    ap.add_argument("--tag", default=None, help="results file stem (default: task, with _ltR for a long tail)")
    ap.add_argument("--part", default=None,
                    help="per-seed file suffix, for strategies of one seed run in another process: "
                         "al_<tag>_seed<S>_<part>.json; --summarise merges the parts")
    ap.add_argument("--summarise", action="store_true",
                    help="no training: summarise the per-seed files al_<tag>_seed<S>.json already in --out")
    ap.add_argument("--human-seconds", action="store_true",
                    help="the auto-accept arm beside random labelling, in human seconds (detection: "
                         "backend.demo_rounds; classification: benchmarks.al_human_classify)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    if args.imbalance > 1 and args.task != "classify":
        ap.error("--imbalance is for --task classify (a detection image holds several digits)")
    for k, v in DEFAULTS[args.task].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or (f"{args.task}_lt{args.imbalance:g}" if args.imbalance > 1 else args.task)
    if args.human_seconds:
        return run_human_seconds(args, tag)
    if args.summarise:
        results = load_seed_files(args.out, tag)
        if not results:
            ap.error(f"no al_{tag}_seed*.json in {args.out}")
        if not all("random" in c for c in results.values()):
            ap.error("the summary compares against random: run --strategies with random for every seed")
        print(summarise(args.task, results, args.out, tag, args.imbalance))
        return
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    seeds = [int(x) for x in args.seed_list.split(",")] if args.seed_list else list(range(args.seeds))
    t0 = time.perf_counter()
    results = {}
    for seed in seeds:
        t_seed = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="tandem-al-") as tmp:
            results[seed] = run_seed(args.task, args, seed, Path(tmp))
        part = f"_{args.part}" if args.part else ""
        (args.out / f"al_{tag}_seed{seed}{part}.json").write_text(  # seconds: this seed's alone
            json.dumps({"seed": seed, "seconds": time.perf_counter() - t_seed, "curves": results[seed]}, indent=1))
    if "random" in args.strategies.split(",") and not args.seed_list:
        print(summarise(args.task, results, args.out, tag, args.imbalance))
    print(f"\n{time.perf_counter() - t0:.0f} s; wrote {args.out}/al_{tag}_*")


def run_human_seconds(args, tag: str) -> None:
    """Detection: `backend.demo_rounds`; classification: `benchmarks.al_human_classify` (same records, same savings)."""
    from benchmarks.al_human_classify import human_seconds_classify_seed, summarise_classify

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not args.summarise:
        seeds = [int(x) for x in args.seed_list.split(",")] if args.seed_list else list(range(args.seeds))
        for seed in seeds:
            t_seed = time.perf_counter()
            path = args.out / f"al_{tag}_human_seed{seed}.json"
            write = lambda saved: path.write_text(json.dumps(  # noqa: E731
                {"seed": seed, "seconds": time.perf_counter() - t_seed, **saved}, indent=1))
            with tempfile.TemporaryDirectory(prefix="tandem-al-") as tmp:
                if args.task == "classify":  # written after every round: a run stopped early keeps its rounds
                    write(human_seconds_classify_seed(args, seed, Path(tmp), checkpoint=write))
                else:
                    write({"records": human_seconds_seed(args, seed, Path(tmp))})
    files = {f: json.loads(f.read_text()) for f in sorted(args.out.glob(f"al_{tag}_human_seed*.json"))}
    if not files:
        return
    if args.task == "classify":
        print(summarise_classify({d["seed"]: d for d in files.values()}, args.out, tag))
    else:
        print(summarise_human({d["seed"]: d["records"] for d in files.values()}, args.out, tag))


if __name__ == "__main__":
    main()
