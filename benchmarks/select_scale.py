"""Scale of `tandem select` on stored predictions: N tasks whose predictions from two detectors are stored,
then a hybrid batch of 100 chosen from them, with no image fetched.

For each N (`--sizes`) three fresh subprocesses, so that each peak RSS (ru_maxrss) is that step's alone:
  write   every task's predictions from both models, built as `Predictor.predict_typed` builds them (model
          outputs pooled onto the RectangleLabels control's labels by the plan, with the Label Studio item
          and the primary's embedding), written through `PredictionRepo.put_many` a chunk at a time;
  select1 `run_selection` with nothing but predictions stored: scores computed from them, and stored;
  select2 `run_selection` again: scores read back.
Models: the starter detect weights as the primary `YoloAdapter` and the same weights as `second` (another
version). Every image URL points nowhere: the fetcher counts calls and fails each, so "fetched 0" proves that
selection read only the store. Ratios are against the smallest N, run the same way on the same generator.

    uv run python benchmarks/select_scale.py [--sizes 1000,10000,100000] [--budget 100]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's code, whatever the environment's editable install points at
RECT = """<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">
<Label value="Square"/><Label value="Circle"/><Label value="Triangle"/></RectangleLabels></View>"""
IMAGE_SIZE = (1280, 960)
WRITE_CHUNK = 1000  # tasks per put_many (both models' rows)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def weights_path() -> Path:
    cached = ROOT / ".test-cache" / "home" / "models" / "starter" / "shapes-yolov8n-detect.pt"
    if cached.is_file():
        return cached
    from backend.models.starter import train_starter_model

    return train_starter_model(ROOT / ".test-cache" / "home", "detect")


def models():
    from backend.models.yolo import YoloAdapter

    weights = weights_path()
    return YoloAdapter(weights, device="cpu"), YoloAdapter(weights, device="cpu", name="second")


def tasks_for(n: int) -> list[dict]:
    return [{"id": i, "data": {"image": f"/data/local-files/?d=img{i}.png"}} for i in range(n)]


def counting_fetcher():
    from backend.errors import MediaError
    from backend.media.fetch import MediaFetcher, MediaSettings

    class Counting(MediaFetcher):
        calls = 0

        def load(self, url, task_id=None, deadline=None, min_side=None):
            type(self).calls += 1
            raise MediaError(f"benchmark: no image is served ({url})")

    return Counting(MediaSettings(local_files_root=Path(tempfile.mkdtemp(prefix="select-scale-empty-"))))


# -- synthetic model outputs, in the models' own classes (as YoloAdapter returns them) ----------------------
def _output(rng, class_names, xyxy, conf, cls):
    import supervision as sv

    from backend.core.prediction import CLASS_NAME, CLASS_SCORES, Prediction

    c = len(class_names)
    k = len(conf)
    if k:
        rest = rng.dirichlet(np.ones(c), k) * (1 - conf)[:, None] * 0.5
        scores = rest
        scores[np.arange(k), cls] = conf
    else:
        scores = np.zeros((0, c))
    det = sv.Detections(xyxy=np.asarray(xyxy, dtype=np.float64).reshape(-1, 4), confidence=conf.astype(np.float64),
                        class_id=cls.astype(int),
                        data={CLASS_NAME: np.array([class_names[i] for i in cls], dtype=object),
                              CLASS_SCORES: scores.astype(np.float64)})
    peak = float(conf.max()) if k else float(rng.uniform(0.02, 0.3))
    return Prediction(detections=det, candidate_peak=peak)


def synthetic_pair(rng, class_names):
    """Model A: 0-6 boxes; model B: A's boxes jittered, some missing, some relabelled, some extra; for 10% of
    the images B sees something else entirely."""
    w, h = IMAGE_SIZE
    c = len(class_names)
    k = int(rng.integers(0, 7))
    xy = rng.uniform(0, [w - 200, h - 200], (k, 2))
    wh = rng.uniform(20, 200, (k, 2))
    xyxy = np.hstack([xy, xy + wh])
    conf = rng.beta(4, 2, k) * 0.9 + 0.1
    cls = rng.integers(0, c, k)
    a = _output(rng, class_names, xyxy, conf, cls)
    if rng.random() < 0.1:
        k2 = int(rng.integers(0, 7))
        xy2 = rng.uniform(0, [w - 200, h - 200], (k2, 2))
        b_xyxy = np.hstack([xy2, xy2 + rng.uniform(20, 200, (k2, 2))])
        b_conf, b_cls = rng.beta(3, 3, k2) * 0.9 + 0.1, rng.integers(0, c, k2)
    else:
        keep = rng.random(k) > 0.15
        b_xyxy = (xyxy + rng.normal(0, 4, (k, 4)))[keep]
        b_cls = np.where(rng.random(k) < 0.1, rng.integers(0, c, k), cls)[keep]
        b_conf = np.clip(conf + rng.normal(0, 0.08, k), 0.05, 1.0)[keep]
        if rng.random() < 0.2:
            xy2 = rng.uniform(0, [w - 200, h - 200], (1, 2))
            b_xyxy = np.vstack([b_xyxy, np.hstack([xy2, xy2 + rng.uniform(20, 200, (1, 2))])])
            b_conf, b_cls = np.append(b_conf, rng.uniform(0.1, 0.5)), np.append(b_cls, rng.integers(0, c))
    b = _output(rng, class_names, b_xyxy, np.asarray(b_conf), np.asarray(b_cls))
    return a, b


def rows_for(tasks, plan, outputs, role, project_id, embeddings=None):
    """PredictionRows exactly as Predictor.predict_typed + _save build them."""
    from backend.labeling.results import WRITERS, prediction_score
    from backend.predict import shown, task_key
    from backend.storage.predictions import PredictionRow

    planned = plan.controls[0]
    pooled = planned.in_labels(outputs, plan.version, role)
    if embeddings is not None:
        pooled = [p.with_meta(embedding=v) for p, v in zip(pooled, embeddings, strict=True)]
    writer = WRITERS[planned.control.kind]
    rows = []
    for task, out, typed in zip(tasks, outputs, pooled, strict=True):
        regions = writer.regions(planned.control, planned.labels, shown(out, plan.min_confidence),
                                 planned.adapter.class_names, IMAGE_SIZE)
        item = {"result": regions, "score": prediction_score(regions), "model_version": plan.version}
        key = task_key(task, plan)
        rows.append(PredictionRow(key[0], key[1], key[2], project_id, plan.name, str(role), item,
                                  {planned.control.name: typed}))
    return rows


# -- the three steps, each in its own process -----------------------------------------------------------------
def step_write(n: int, db: str, seed: int) -> dict:
    from active_learning.uncertainty import NEAR
    from backend.core.prediction import Role
    from backend.predict import plan_for
    from backend.storage.predictions import PredictionRepo

    primary, second = models()
    plan1 = plan_for(primary, RECT, min_confidence=NEAR[0])
    plan2 = plan_for(second, RECT, min_confidence=NEAR[0])
    from PIL import Image

    dim = primary.embed([Image.new("RGB", (64, 48))]).shape[1]  # the real model's embedding size
    store = PredictionRepo(db)
    tasks = tasks_for(n)
    rng = np.random.default_rng(seed)
    rss0 = current_rss_mb()
    build = put = 0.0
    for start in range(0, n, WRITE_CHUNK):
        t0 = time.perf_counter()
        part = tasks[start : start + WRITE_CHUNK]
        pairs = [synthetic_pair(rng, primary.class_names) for _ in part]
        emb = rng.normal(0, 1, (len(part), dim)).astype(np.float32)
        rows = rows_for(part, plan1, [p[0] for p in pairs], Role.PRE_ANNOTATION, 1, emb)
        rows += rows_for(part, plan2, [p[1] for p in pairs], Role.SECOND_OPINION, 1)
        t1 = time.perf_counter()
        store.put_many(rows)
        put += time.perf_counter() - t1
        build += t1 - t0
    rows = store.count(1)
    size = Path(db.split("///", 1)[1]).stat().st_size
    return {"rows": rows, "build_s": build, "write_s": put, "db_mb": size / 2**20, "rss_before_mb": rss0,
            "peak_mb": peak_rss_mb(), "embed_dim": dim}


def step_select(n: int, db: str, budget: int, profile: str | None) -> dict:
    from active_learning.pipeline import run_selection
    from active_learning.selection import SelectionConfig, Strategy
    from backend.storage.predictions import PredictionRepo
    from backend.storage.scores import ScoreRepo

    primary, second = models()
    fetcher = counting_fetcher()
    store, scores = PredictionRepo(db), ScoreRepo(db)
    tasks = tasks_for(n)
    config = SelectionConfig(strategy=Strategy.HYBRID, budget=budget)
    rss0 = current_rss_mb()
    t0 = time.perf_counter()
    if profile:
        import cProfile

        prof = cProfile.Profile()
        outcome, _, ids = prof.runcall(run_selection, tasks, RECT, fetcher, primary, config, second=second,
                                       store=store, scores=scores, project_id=1)
        prof.dump_stats(profile)
    else:
        outcome, _, ids = run_selection(tasks, RECT, fetcher, primary, config, second=second, store=store,
                                        scores=scores, project_id=1)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "rss_before_mb": rss0, "peak_mb": peak_rss_mb(), "picked": len(outcome.entries),
            "mode": outcome.mode, "candidates": outcome.candidates, "from_store": outcome.from_store,
            "predicted": outcome.predicted, "fetched": type(fetcher).calls,
            "with_disagreement": sum(e.disagreement is not None for e in outcome.entries)}


def run_step(step: str, n: int, db: str, args) -> dict:
    cmd = [sys.executable, __file__, "--step", step, "--n", str(n), "--db", db, "--budget", str(args.budget),
           "--seed", str(args.seed)]
    if args.profile and step.startswith("select"):
        cmd += ["--profile", str(Path(args.profile) / f"{step}-{n}.prof")]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"{step} N={n} failed ({out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--budget", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", help="folder: cProfile each select step into it")
    ap.add_argument("--step", choices=["write", "select1", "select2"], help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--db", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.step:
        import logging

        logging.disable(logging.WARNING)
        if args.step == "write":
            result = step_write(args.n, args.db, args.seed)
        else:
            result = step_select(args.n, args.db, args.budget, args.profile)
        print(json.dumps(result))
        return

    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    results = {}
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix=f"select-scale-{n}-") as tmp:
            db = f"sqlite:///{Path(tmp) / 'tandem.db'}"
            w = run_step("write", n, db, args)
            s1 = run_step("select1", n, db, args)
            s2 = run_step("select2", n, db, args)
        results[n] = (w, s1, s2)
        print(f"N={n}: write {w['write_s']:.1f}s ({w['rows']} rows, {w['db_mb']:.0f} MB), select1 {s1['seconds']:.2f}s "
              f"peak {s1['peak_mb']:.0f} MB, select2 {s2['seconds']:.2f}s peak {s2['peak_mb']:.0f} MB; "
              f"picked {s1['picked']} ({s1['mode']}), from store {s1['from_store']}, predicted {s1['predicted']}, "
              f"images fetched {s1['fetched']}+{s2['fetched']}", flush=True)

    base = results[sizes[0]]
    print(f"\n{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d')}; budget {args.budget}, hybrid, 2 detectors, embeddings dim "
          f"{base[0]['embed_dim']}; ratios vs N={sizes[0]:,}\n")
    print("| N | write s (build s) | select 1 s (score+store) | select 2 s (stored scores) | peak RSS write MB | "
          "peak RSS select 1 MB (before) | peak RSS select 2 MB (before) | select 1 s × | select 2 s × | "
          "select 1 RSS × | select 2 RSS × |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        w, s1, s2 = results[n]
        print(f"| {n:,} | {w['write_s']:.1f} ({w['build_s']:.1f}) | {s1['seconds']:.2f} | {s2['seconds']:.2f} | "
              f"{w['peak_mb']:.0f} | {s1['peak_mb']:.0f} ({s1['rss_before_mb']:.0f}) | "
              f"{s2['peak_mb']:.0f} ({s2['rss_before_mb']:.0f}) | {s1['seconds'] / base[1]['seconds']:.1f} | "
              f"{s2['seconds'] / base[2]['seconds']:.1f} | {s1['peak_mb'] / base[1]['peak_mb']:.2f} | "
              f"{s2['peak_mb'] / base[2]['peak_mb']:.2f} |")
    last = results[sizes[-1]]
    print(f"\ntargets at N={sizes[-1]:,}: select <= 15 s: select 1 {last[1]['seconds']:.1f} s, select 2 "
          f"{last[2]['seconds']:.1f} s; peak RSS < 2x of N={sizes[0]:,}: select 1 "
          f"{last[1]['peak_mb'] / base[1]['peak_mb']:.2f}x, select 2 {last[2]['peak_mb'] / base[2]['peak_mb']:.2f}x")


if __name__ == "__main__":
    main()
