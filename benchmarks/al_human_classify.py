"""Human seconds for classification: Tandem's auto-accept loop beside random labelling, on digits.

The classification arm of `al_simulation.py --human-seconds` (issue #22, item 5). Both arms start from the same
round-0 YOLOv8n-cls (trained on the initial labels) and share `run_seed`'s pool and test split. Each round:

- **random**: `budget` random pool tasks, each labelled from scratch (`EffortModel.choose_class`).
- **tandem**: the CNN and the second opinion (logistic regression on the raw 8×8 scans, refit each round on the
  arm's HUMAN labels only — the initial labels and the tasks humans reviewed, never the auto-accepted ones, so it
  cannot confirm its own guesses) predict the unlabelled pool; `active_learning.agreement.task_agreement` pairs
  their top-1 choices (score min(p_cnn, p_lr)); `active_learning.calibration.calibrate` picks a threshold on the
  agreed tasks humans have reviewed so far (their score, and whether the agreed class was the true one); agreed
  tasks above it are auto-accepted with the agreed class (judged against ground truth; `spot_check` of them cost
  a verify each); `budget` of the rest are queued by hybrid uncertainty + disagreement with 20% random controls,
  and the simulated annotator pays `verify_class` when the CNN's top-1 was right, `choose_class` when it was not.

Then each arm fine-tunes from its previous weights on all its labels (initial + added, as `run_seed` does) and is
scored by top-1 accuracy on the test split. Records are `backend.demo_rounds.RoundRecord`s so that
`demo_rounds.savings` reads them as it reads detection's; for classification:

- `test_map50` holds top-1 accuracy on the test split (the field is named for detection);
- `actions["verify"]` counts choices a human confirmed (verify_class), `actions["draw"]` choices made from scratch
  (choose_class); modify / delete stay 0;
- `auto_boxes` / `auto_correct` count auto-accepted choices (one per task) and those equal to the truth;
  `spot_boxes` = `spot_checks` (one choice per task);
- `labelled` and `human_tasks` count pool tasks only; the initial labels (round 0's) are in neither arm's seconds.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from active_learning.agreement import task_agreement
from active_learning.calibration import calibrate
from active_learning.effort import EffortModel
from active_learning.scoring import score_outputs
from active_learning.selection import SelectionConfig, Strategy, select
from backend.core.prediction import Prediction
from backend.demo_rounds import RoundRecord

NAMES = [str(i) for i in range(10)]


@dataclass
class ClassifyConfig:
    rounds: int = 5
    budget: int = 40
    epochs: int = 40
    imgsz: int = 64
    lr_finetune: float = 0.002
    control_fraction: float = 0.2
    target: float = 0.98
    delta: float = 0.05
    seed: int = 0
    effort: EffortModel = field(default_factory=EffortModel)


def write_labels(samples, labels: dict[int, int], test: Sequence[int], root: Path) -> str:
    """An ultralytics classification folder: train/<class>/ from `labels` (sample index -> class, which may be an
    auto-accepted, possibly wrong class), val/<class>/ the test split (its truth)."""
    if root.exists():
        shutil.rmtree(root)
    for split in ("train", "val"):
        for name in NAMES:  # every class folder exists even before it has a label
            (root / split / name).mkdir(parents=True, exist_ok=True)
    for i, c in labels.items():
        samples[i].image.save(root / "train" / NAMES[int(c)] / f"{i}.png")
    for i in test:
        samples[i].image.save(root / "val" / NAMES[int(samples[i].labels[0])] / f"{i}.png")
    return str(root)


def second_opinion(samples, human: Sequence[int], truth: dict[int, int], todo: Sequence[int]) -> list[Prediction]:
    """Logistic regression on the raw 8×8 scans, fit on human labels only, as Predictions over `todo`."""
    from sklearn.linear_model import LogisticRegression

    x = np.stack([samples[i].pixels for i in human])
    y = np.array([truth[i] for i in human])
    clf = LogisticRegression(max_iter=2000).fit(x, y)
    probs = np.zeros((len(todo), len(NAMES)))
    probs[:, clf.classes_] = clf.predict_proba(np.stack([samples[i].pixels for i in todo]))
    return [Prediction(probabilities=p, class_names=tuple(NAMES)) for p in probs]


def _top1(p: Prediction) -> int:
    names = p.class_names or tuple(NAMES)
    return int(names[int(np.argmax(p.probabilities))])


Trainer = Callable[[str, str, int], str]  # (data folder, init weights, round) -> new weights
Scorer = Callable[[str, str], float]  # (weights, data folder) -> top-1 accuracy on its val split (the test split)


def random_arm(samples, initial, pool, test, w0: str, work: Path, config: ClassifyConfig, fit: Trainer,
               score: Scorer, progress=lambda _: None) -> Iterator[RoundRecord]:
    """One RoundRecord per round, as it finishes (the driver runs the arms in lock-step)."""
    truth = {i: int(samples[i].labels[0]) for i in [*initial, *pool]}
    order = np.random.default_rng(config.seed).permutation(len(pool))
    labels = {i: truth[i] for i in initial}
    picked: list[int] = []
    weights, seconds = w0, 0.0
    for r in range(1, config.rounds + 1):
        new = [int(pool[k]) for k in order[(r - 1) * config.budget : r * config.budget]]
        picked += new
        for i in new:
            labels[i] = truth[i]
        seconds += config.effort.scratch_seconds(0, choices=len(new))
        data = write_labels(samples, labels, test, work / "data")
        weights = fit(data, weights, r)
        acc = score(weights, data)
        progress(f"random round {r}: {len(new)} chosen from scratch, {seconds:.0f} s -> top-1 {acc:.3f}")
        yield RoundRecord("random", r, len(picked), len(picked), seconds,
                          dict(verify=0, modify=0, delete=0, draw=len(picked)), test_map50=acc)


def tandem_arm(samples, initial, pool, test, w0: str, work: Path, config: ClassifyConfig, fit: Trainer,
               score: Scorer, predict: Callable[[str, list], list[Prediction]], prefill=None,
               progress=lambda _: None) -> Iterator[tuple[RoundRecord, dict]]:
    """Per round, as it finishes: its record, and what the loop saw (agreement, calibration sample, who was
    accepted with which class)."""
    truth = {i: int(samples[i].labels[0]) for i in [*initial, *pool]}
    labels = {i: truth[i] for i in initial}  # sample index -> class used for training
    human: list[int] = list(initial)  # human-labelled samples (the second opinion's training set)
    reviewed: set[int] = set()
    scores, right = ([], []) if prefill is None else (list(prefill[0]), list(prefill[1]))
    weights, seconds = w0, 0.0
    verify = choose = auto_tasks = auto_correct = spot = 0
    for r in range(1, config.rounds + 1):
        todo = [int(i) for i in pool if int(i) not in labels]
        # once every pool task is labelled (auto-accept can take all that is left at once) the arm only retrains
        shown = predict(weights, [samples[i].image for i in todo]) if todo else []
        seen = second_opinion(samples, human, truth, todo) if todo else []
        verdicts = [task_agreement(a, b) for a, b in zip(shown, seen, strict=True)]
        cal = calibrate(np.array(scores, float), np.array(right, bool), config.target, config.delta)
        accepted = [k for k, v in enumerate(verdicts) if v.accepted(cal.threshold)]
        ok_now = 0
        for k in accepted:
            c = _top1(shown[k])  # the agreed class: both models' top-1
            labels[todo[k]] = c
            ok_now += int(c == truth[todo[k]])
        auto_tasks, auto_correct = auto_tasks + len(accepted), auto_correct + ok_now
        checks = int(math.ceil(config.effort.spot_check * len(accepted)))
        spot += checks
        seconds += checks * config.effort.verify_class
        rest = [k for k in range(len(todo)) if k not in set(accepted)]
        sel_k: list[int] = []
        if rest:
            table = score_outputs([shown[k] for k in rest], NAMES, [seen[k] for k in rest], NAMES)
            sel = select(SelectionConfig(strategy=Strategy.HYBRID, budget=config.budget,
                                         control_fraction=config.control_fraction, seed=config.seed * 100 + r),
                         table.uncertainty, table.disagreement)
            sel_k = [rest[int(j)] for j in sel.indices]
        agreed_reviewed = 0
        for k in sel_k:
            i, v = todo[k], verdicts[k]
            cnn_right = _top1(shown[k]) == truth[i]
            verify, choose = verify + int(cnn_right), choose + int(not cnn_right)
            seconds += config.effort.verify_class if cnn_right else config.effort.choose_class
            labels[i] = truth[i]
            human.append(i)
            reviewed.add(i)
            if v.candidate:  # the calibration sample: agreed tasks a human judged
                scores.append(v.score)
                right.append(cnn_right)  # agreed: the CNN's top-1 is the agreed class
                agreed_reviewed += 1
        data = write_labels(samples, labels, test, work / "data")
        weights = fit(data, weights, r)
        acc = score(weights, data)
        record = RoundRecord("tandem", r, len(labels) - len(initial), len(reviewed), seconds,
                             dict(verify=verify, modify=0, delete=0, draw=choose), auto_tasks, auto_tasks,
                             auto_correct, spot, spot, cal.threshold, cal.reason, acc)
        note = (dict(round=r, pool_unlabelled=len(todo), agreed=int(sum(v.candidate for v in verdicts)),
                          agreed_correct=int(sum(v.candidate and _top1(s) == truth[i]
                                                 for v, s, i in zip(verdicts, shown, todo, strict=True))),
                          auto_accepted=len(accepted), auto_correct=ok_now, reviewed=len(sel_k),
                          reviewed_agreed=agreed_reviewed, calibration_sample=len(scores),
                          calibration_errors=int(len(right) - sum(right)), threshold=cal.threshold,
                          calibration=cal.reason,
                          accepted=[[todo[k], labels[todo[k]]] for k in accepted]))
        progress(f"tandem round {r}: {len(accepted)} auto-accepted ({ok_now} right; {cal.reason}); {len(sel_k)} "
                 f"reviewed ({agreed_reviewed} agreed); {seconds:.0f} s -> top-1 {acc:.3f}")
        yield record, note


def yolo_fns(args, seed: int, work: Path):
    """The real trainer, scorer and predictor: `al_simulation`'s train/evaluate and `YoloAdapter`."""
    from backend.models.yolo import YoloAdapter
    from benchmarks.al_simulation import evaluate, train

    def fit(data: str, weights: str, r: int) -> str:
        return train("classify", data, weights, args.epochs, args.imgsz, seed + r, work / "a", args.lr_finetune)

    def score(weights: str, data: str) -> float:
        return evaluate("classify", weights, data, args.imgsz)

    def predict(weights: str, images: list) -> list[Prediction]:
        adapter = YoloAdapter(weights, device="cpu", imgsz=args.imgsz)
        names = tuple(adapter.class_names)  # the class folders, "0".."9"
        return [p.with_meta(class_names=names) for p in adapter.predict(images)]

    return fit, score, predict


def human_seconds_classify_seed(args, seed: int, work: Path, prefill=None, progress=None,
                                checkpoint: Callable[[dict], None] | None = None) -> dict:
    """One seed: the shared round-0 CNN, then both arms in lock-step, round by round.

    Returns {"records": [...], "tandem_rounds": [...], ...}; `checkpoint` gets the same after every round (with
    "complete": False until the last), so a run stopped at a deadline keeps the rounds both arms finished."""
    from benchmarks.al_simulation import dataset, draw_split, evaluate, train

    progress = progress or (lambda m: print(f"  seed {seed} {m}", flush=True))
    samples, test, pool_all = draw_split("classify", args, seed)
    initial, pool = [int(i) for i in pool_all[: args.initial]], [int(i) for i in pool_all[args.initial :]]
    data0 = dataset(samples, initial, test, work / "data0", "classify")
    w0 = train("classify", data0, "yolov8n-cls.yaml", args.epochs0, args.imgsz, seed, work / "a")
    s0 = evaluate("classify", w0, data0, args.imgsz)
    progress(f"round 0: {len(initial)} initial labels -> top-1 {s0:.3f}")
    config = ClassifyConfig(rounds=args.rounds, budget=args.budget, epochs=args.epochs, imgsz=args.imgsz,
                            lr_finetune=args.lr_finetune, target=getattr(args, "target", 0.98),
                            delta=getattr(args, "delta", 0.05), seed=seed, effort=EffortModel.from_env())
    fit, score, predict = yolo_fns(args, seed, work)
    start = [RoundRecord(arm, 0, 0, 0, 0.0, dict(verify=0, modify=0, delete=0, draw=0), test_map50=s0)
             for arm in ("random", "tandem")]
    arms = zip(random_arm(samples, initial, pool, test, w0, work / "random", config, fit, score, progress),
               tandem_arm(samples, initial, pool, test, w0, work / "tandem", config, fit, score, predict, prefill,
                          progress), strict=True)
    rnd, tan, notes = [start[0]], [start[1]], []
    meta = {"config": {k: (v.as_dict() if isinstance(v, EffortModel) else v) for k, v in asdict(config).items()},
            "initial": len(initial), "pool": len(pool), "test": len(test), "epochs0": args.epochs0}
    saved: dict = {}
    for r, (a, (b, note)) in enumerate(arms, start=1):
        rnd.append(a)
        tan.append(b)
        notes.append(note)
        saved = {"records": [asdict(x) for x in [*rnd, *tan]], "tandem_rounds": notes, **meta,
                 "rounds_done": r, "complete": r == config.rounds}
        if checkpoint:
            checkpoint(saved)
    return saved


def summarise_classify(results: dict[int, dict], out: Path, tag: str) -> str:
    """Seed table, mean ± std, per-round table; writes al_<tag>_human_summary.json and the plot (seed of lowest id)."""
    import json

    from backend.demo_report import quality_vs_seconds
    from backend.demo_rounds import savings
    from benchmarks.al_simulation import mean_std, savings_table

    # a seed stopped early (at a deadline) keeps its finished rounds: every seed is read to the rounds all finished
    done = {seed: min(max(r["round"] for r in res["records"] if r["arm"] == arm) for arm in ("random", "tandem"))
            for seed, res in results.items()}
    common = min(done.values())
    results = {seed: {**res, "records": [r for r in res["records"] if r["round"] <= common],
                      "tandem_rounds": [x for x in res.get("tandem_rounds", []) if x["round"] <= common]}
               for seed, res in results.items()}
    rows = {seed: savings([RoundRecord(**r) for r in res["records"]]) for seed, res in results.items()}
    lines = savings_table(rows, "top-1", "tasks")
    lines[-3:-3] = [f"- rounds: {common} (finished per seed: {', '.join(f'{k}: {v}' for k, v in sorted(done.items()))})"]
    lines += [
              f"- coverage (auto-accepted / all pool tasks Tandem labelled): {mean_std([s.coverage for s in rows.values()])}"
              " (target ≥ 0.50)",
              "- second opinion: logistic regression on the raw 8×8 scans, refit each round on human labels only; "
              "no VLM weights offline"]
    n = max(len([r for r in res["records"] if r["arm"] == "random"]) for res in results.values())
    lines += ["", "## Per round (test top-1; human seconds cumulative; Tandem: auto-accepted that round, right)", "",
              "| seed | arm | " + " | ".join(f"r{k}" for k in range(n)) + " |", "|---" * (n + 2) + "|"]
    for seed, res in sorted(results.items()):
        notes = {x["round"]: x for x in res.get("tandem_rounds", [])}
        for arm in ("random", "tandem"):
            cells = []
            for rec in [r for r in res["records"] if r["arm"] == arm]:
                cell = f"{rec['test_map50']:.3f} @ {rec['human_seconds']:.0f} s"
                if arm == "tandem" and rec["round"] in notes:
                    x = notes[rec["round"]]
                    cell += f" (+{x['auto_accepted']} auto, {x['auto_correct']} right)"
                cells.append(cell)
            lines.append(f"| {seed} | {arm} | " + " | ".join(cells) + " |")
    # the headline share hangs on random's last round alone (and random saturates): the same ratio at every horizon
    lines += ["", "## Share of random's human seconds Tandem needs to reach random's top-1 at each round", "",
              "| seed | " + " | ".join(f"r{k}" for k in range(1, common + 1)) + " |", "|---" * (common + 1) + "|"]
    for seed, res in sorted(results.items()):
        lines.append(f"| {seed} | " + " | ".join(horizon_shares(res["records"])) + " |")
    lines += ["", "## Tandem's calibration, per round (agreed tasks in the pool; the verified agreed sample; "
              "the calibration's verdict)", ""]
    for seed, res in sorted(results.items()):
        for x in res.get("tandem_rounds", []):
            lines.append(f"- seed {seed} r{x['round']}: {x['agreed']} of {x['pool_unlabelled']} unlabelled agreed "
                         f"({x['agreed_correct']} of them right); reviewed {x['reviewed']} ({x['reviewed_agreed']} "
                         f"agreed); sample after the round {x['calibration_sample']} ({x['calibration_errors']} wrong); "
                         f"{x['calibration']}")
    from active_learning.calibration import min_verified

    need = min_verified()
    lines += ["", f"## When auto-accept could first switch on (the verified agreed sample reaches {need} items)", "",
              "| seed | round | Tandem's human s by then | share of random's | sample (wrong) | last round within 30% "
              "| its sample (wrong) | its top-1 |", "|---" * 8 + "|"]
    for seed, res in sorted(results.items()):
        g = guarantee_reach(res["records"], res.get("tandem_rounds", []), need)
        reached = ("never", "–", "–", "–") if g["round"] is None else (
            f"r{g['round']}", f"{g['seconds']:.0f}", f"{g['share']:.0%}", f"{g['sample']} ({g['errors']})")
        within = ("–", "–", "–") if g["within_round"] is None else (
            f"r{g['within_round']}", f"{g['within_sample']} ({g['within_errors']})", f"{g['within_top1']:.3f}")
        lines.append(f"| {seed} | " + " | ".join([*reached, *within]) + " |")
    lines += ["", f"## A floor for a verification slice (what the best-timed slice of {need} agreed tasks could do)",
              "", "Per round r: the agreed pool's error rate, the chance a random slice of it holds no error, and "
                  "the human seconds (as a share of random's) if it replaced round r's queue, passed, and auto-accept "
                  "then took the agreed pool (5% spot-checked); see `slice_bound` for what the floor assumes.", "",
              "| seed | " + " | ".join(f"r{k}" for k in range(1, 8)) + " |", "|---" * 8 + "|"]
    for seed, res in sorted(results.items()):
        cells = {b["round"]: f"{b['error_rate']:.1%} wrong, p {b['p_pass']:.2f}, {b['share']:.0%}"
                 for b in slice_bound(res["records"], res.get("tandem_rounds", []), need)}
        lines.append(f"| {seed} | " + " | ".join(cells.get(k, "–") for k in range(1, 8)) + " |")
    first = results[min(results)]["records"]
    quality_vs_seconds(out, first, name=f"al_{tag}_human_seconds.png")
    (out / f"al_{tag}_human_summary.json").write_text(json.dumps({k: asdict(v) for k, v in rows.items()}, indent=1))
    return "\n".join(lines)


def guarantee_reach(records: list[dict], notes: list[dict], min_n: int, share: float = 0.30) -> dict:
    """When auto-accept could first have switched on, in human seconds: the round after which the verified agreed
    sample first held `min_n` items (the fewest with which even zero errors pass), Tandem's seconds by then as a
    share of random's final seconds, and the sample at the last round within `share` of them."""
    tandem = {r["round"]: r for r in records if r["arm"] == "tandem"}
    total = max((r for r in records if r["arm"] == "random"), key=lambda r: r["round"])["human_seconds"]
    first = next((x for x in notes if x["calibration_sample"] >= min_n), None)
    within = [x for x in notes if tandem[x["round"]]["human_seconds"] <= share * total]
    last = max(within, key=lambda x: x["round"]) if within else None
    return dict(
        round=None if first is None else first["round"],
        seconds=None if first is None else tandem[first["round"]]["human_seconds"],
        share=None if first is None else tandem[first["round"]]["human_seconds"] / total,
        sample=None if first is None else first["calibration_sample"],
        errors=None if first is None else first["calibration_errors"],
        within_round=None if last is None else last["round"],
        within_sample=None if last is None else last["calibration_sample"],
        within_errors=None if last is None else last["calibration_errors"],
        within_top1=None if last is None else tandem[last["round"]]["test_map50"])


def slice_bound(records: list[dict], notes: list[dict], min_n: int, spot_check: float = 0.05,
                verify_seconds: float = 2.0) -> list[dict]:
    """What the best-timed verification slice could have done, per round r, read off a finished run: instead of
    round r's queue, a person verifies `min_n` random agreed pool tasks (all right is the only way they pass, at
    `verify_seconds` each); if none is wrong, auto-accept takes the rest of the agreed pool in round r + 1 and a
    `spot_check` share of it is verified. Its seconds are a floor (the retrain after it is assumed to reach
    random's final at once, the queue's lost picks to cost no learning, the round to be chosen knowing the
    outcome); `p_pass` is the chance a random slice of that pool holds no error."""
    tandem = {r["round"]: r for r in records if r["arm"] == "tandem"}
    total = max((r for r in records if r["arm"] == "random"), key=lambda r: r["round"])["human_seconds"]
    out = []
    for x in notes:
        r = x["round"]
        if x["agreed"] < min_n:
            continue
        rate = 1 - x["agreed_correct"] / x["agreed"]
        seconds = (tandem[r - 1]["human_seconds"] + min_n * verify_seconds
                   + math.ceil(spot_check * (x["agreed"] - min_n)) * verify_seconds)
        out.append(dict(round=r, agreed=x["agreed"], error_rate=rate, p_pass=(1 - rate) ** min_n, seconds=seconds,
                        share=seconds / total))
    return out


def horizon_shares(records: list[dict]) -> list[str]:
    """Per round k ≥ 1: Tandem's seconds to reach random's top-1 at k, over random's seconds at k ("–": not
    reached; "start": the round-0 CNN already had it, no saving claimed)."""
    from backend.demo_rounds import seconds_to_reach

    recs = [RoundRecord(**r) for r in records]
    rnd = sorted((r for r in recs if r.arm == "random"), key=lambda r: r.round)
    out = []
    for row in rnd[1:]:
        if row.test_map50 <= rnd[0].test_map50:
            out.append("start")
            continue
        need = seconds_to_reach(recs, "tandem", row.test_map50)
        out.append("–" if need is None else f"{need / row.human_seconds:.0%}")
    return out


__all__ = ["ClassifyConfig", "guarantee_reach", "horizon_shares", "slice_bound", "human_seconds_classify_seed", "random_arm", "second_opinion", "summarise_classify",
           "tandem_arm", "write_labels"]
