"""Memory of `tandem select` on large photos with nothing stored: `--count` JPEGs of 4032×3024 (the shapes
dataset upscaled, with sensor-like noise, quality 90) served as Label Studio local files, ranked by
`run_selection` (the starter detect YOLO as primary on the CPU, the same weights as `second` for the second
opinion, hybrid, default chunk): every image is fetched, decoded, predicted by both models, embedded and stored
chunk by chunk.

Two fresh subprocesses, so that each peak RSS (ru_maxrss) is its own:
  full      run_selection on all `--count` photos: seconds, RSS before (imports, models, tasks), peak RSS;
  baseline  on the first `--subset` photos, the same process runs the old approach (every image decoded
            through the same MediaFetcher and held at once: RSS held), releases it, then run_selection (its
            own peak sampled from /proc/self/statm, since ru_maxrss already holds the old approach's). The
            old approach at `--count` photos is extrapolated from the subset's MB per held image.

    uv run python benchmarks/select_photos.py [--count 300] [--subset 30] [--photos DIR]
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
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # this checkout's code first
from select_scale import RECT, current_rss_mb, models, peak_rss_mb  # noqa: E402

SIZE = (4032, 3024)


def make_photos(folder: Path, count: int, seed: int = 0) -> list[str]:
    """`count` JPEGs (reused when already there): shapes scenes upscaled to 4032×3024, plus noise."""
    from PIL import Image

    from backend.datasets.shapes import generate_samples

    folder.mkdir(parents=True, exist_ok=True)
    names = [f"photo_{i:04d}.jpg" for i in range(count)]
    missing = [i for i, n in enumerate(names) if not (folder / n).is_file()]
    if missing:
        rng = np.random.default_rng(seed)
        tile = rng.normal(0, 6, (1024, 1024, 3)).astype(np.int16)  # sensor-like noise, tiled at random offsets
        samples = generate_samples(count, seed=seed, size=(640, 480))
        for i in missing:
            big = np.asarray(samples[i][0].convert("RGB").resize(SIZE, Image.BILINEAR), dtype=np.int16)
            dy, dx = rng.integers(0, 1024, 2)
            noise = np.roll(tile, (dy, dx), axis=(0, 1))
            reps = (SIZE[1] // 1024 + 1, SIZE[0] // 1024 + 1, 1)
            big += np.tile(noise, reps)[: SIZE[1], : SIZE[0]]
            Image.fromarray(np.clip(big, 0, 255).astype(np.uint8)).save(folder / names[i], quality=90)
    return names


def tasks_for(names: list[str]) -> list[dict]:
    return [{"id": i, "data": {"image": f"/data/local-files/?d={n}"}} for i, n in enumerate(names)]


def fetcher_for(folder: Path):
    from backend.media.fetch import MediaFetcher, MediaSettings

    return MediaFetcher(MediaSettings(local_files_root=folder))


def select_once(tasks, folder: Path, budget: int) -> dict:
    from active_learning.pipeline import run_selection
    from active_learning.selection import SelectionConfig, Strategy

    primary, second = models()
    fetcher = fetcher_for(folder)
    rss0 = current_rss_mb()
    t0 = time.perf_counter()
    outcome, _, _ = run_selection(tasks, RECT, fetcher, primary, SelectionConfig(strategy=Strategy.HYBRID,
                                  budget=min(budget, len(tasks))), second=second)
    return {"seconds": time.perf_counter() - t0, "rss_before_mb": rss0, "peak_mb": peak_rss_mb(),
            "picked": len(outcome.entries), "mode": outcome.mode, "predicted": outcome.predicted,
            "skipped": len(outcome.skipped)}


def step_full(folder: Path, count: int, budget: int) -> dict:
    return select_once(tasks_for(make_photos(folder, count)), folder, budget)


class RssSampler:
    """Peak RSS of a phase within one process (ru_maxrss only ever grows): /proc/self/statm every 5 ms."""

    def __init__(self) -> None:
        import threading

        self.peak = current_rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, current_rss_mb())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, current_rss_mb())


def step_baseline(folder: Path, subset: int, budget: int) -> dict:
    """The old approach first (in a fresh process its RSS is clean), then the chunked selection on the same
    photos, its own peak sampled (ru_maxrss already holds the old approach's)."""
    import gc

    tasks = tasks_for(make_photos(folder, subset))
    fetcher = fetcher_for(folder)
    primary, second = models()  # loaded before measuring, as select_once's are
    before = current_rss_mb()
    t0 = time.perf_counter()
    held = [fetcher.load(t["data"]["image"], task_id=t["id"]).image for t in tasks]  # the old approach
    held_mb = current_rss_mb()
    old = {"old_before_mb": before, "old_held_mb": held_mb, "old_peak_mb": peak_rss_mb(),
           "old_decode_s": time.perf_counter() - t0, "held": len(held), "mb_per_image": (held_mb - before) / len(held)}
    del held, primary, second
    gc.collect()
    sampler = RssSampler()
    new = select_once(tasks, folder, budget)
    new["peak_mb"] = sampler.stop()  # sampled: this phase's own peak
    return {"new": new, **old}


def run_step(step: str, args) -> dict:
    cmd = [sys.executable, __file__, "--step", step, "--photos", str(args.photos), "--count", str(args.count),
           "--subset", str(args.subset), "--budget", str(args.budget)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"{step} failed ({out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--subset", type=int, default=30)
    ap.add_argument("--budget", type=int, default=100)
    ap.add_argument("--photos", type=Path, default=Path(tempfile.gettempdir()) / "tandem-select-photos-4032x3024")
    ap.add_argument("--step", choices=["full", "baseline"], help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.step:
        import logging

        logging.disable(logging.WARNING)
        if args.step == "full":
            result = step_full(args.photos, args.count, args.budget)
        else:
            result = step_baseline(args.photos, args.subset, args.budget)
        print(json.dumps(result))
        return

    t0 = time.perf_counter()
    names = make_photos(args.photos, args.count)
    made = time.perf_counter() - t0
    total_mb = sum((args.photos / n).stat().st_size for n in names) / 2**20
    print(f"{args.count} photos {SIZE[0]}x{SIZE[1]} in {args.photos} ({total_mb:.0f} MB of JPEG, ready in {made:.0f} s)",
          flush=True)
    base = run_step("baseline", args)
    full = run_step("full", args)
    new_s, old = base["new"], base
    old_at_count = old["old_before_mb"] + old["mb_per_image"] * args.count
    print(f"\n{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d')}; primary + second YOLO on the CPU, hybrid, budget {args.budget}, default chunk\n")
    print("| run | photos | seconds | RSS before MB | peak RSS MB | peak − before MB |")
    print("|---|---|---|---|---|---|")
    print(f"| run_selection (chunked) | {args.count} | {full['seconds']:.1f} | {full['rss_before_mb']:.0f} | "
          f"{full['peak_mb']:.0f} | {full['peak_mb'] - full['rss_before_mb']:.0f} |")
    print(f"| run_selection (chunked), baseline process | {args.subset} | {new_s['seconds']:.1f} | "
          f"{new_s['rss_before_mb']:.0f} | {new_s['peak_mb']:.0f} | {new_s['peak_mb'] - new_s['rss_before_mb']:.0f} |")
    print(f"| old: all decoded and held, same process | {old['held']} | {old['old_decode_s']:.1f} (decode only) | "
          f"{old['old_before_mb']:.0f} | {old['old_held_mb']:.0f} (held) | {old['old_held_mb'] - old['old_before_mb']:.0f} "
          f"({old['mb_per_image']:.1f} MB per image) |")
    print(f"| old, extrapolated | {args.count} | | {old['old_before_mb']:.0f} | {old_at_count:.0f} | "
          f"{old_at_count - old['old_before_mb']:.0f} |")
    print(f"\nratios: old held / chunked peak at {args.subset} photos: {old['old_held_mb'] / new_s['peak_mb']:.2f}x; "
          f"old extrapolated / chunked peak at {args.count}: {old_at_count / full['peak_mb']:.2f}x; chunked peak "
          f"{args.count} vs {args.subset} photos: {full['peak_mb'] / new_s['peak_mb']:.2f}x")
    print(f"target: peak RSS < 2 GB (2048 MB) at {args.count} photos: {full['peak_mb']:.0f} MB -> "
          f"{'met' if full['peak_mb'] < 2048 else 'MISSED'}; picked {full['picked']} ({full['mode']}), "
          f"predicted {full['predicted']}, skipped {full['skipped']}")


if __name__ == "__main__":
    main()
