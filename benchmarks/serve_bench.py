"""Serving speed on CPU, on the same images, measured interleaved (each image goes through every contender
in turn, so drift in the machine's speed hits all of them alike):

- ultralytics' PyTorch predict (its CPU default) — the baseline;
- ultralytics driving the same OpenVINO export Tandem serves;
- Tandem's OpenVINO engine called in process, on the image decoded as /predict decodes it;
- Tandem's /predict over HTTP, with PyTorch and with OpenVINO (`tandem serve` in its own process, as
  deployed; one task per request, as when an annotator opens a task).

Prints median milliseconds per image and the ratios the targets are about.

    uv run python benchmarks/serve_bench.py [--images 30] [--rounds 3] [--imgsz 640] [--weights PATH]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

import httpx  # noqa: E402

from backend.datasets.shapes import generate_samples  # noqa: E402
from backend.labelstudio.local import free_port  # noqa: E402
from backend.media.fetch import decode_image  # noqa: E402
from backend.models.starter import train_starter_model  # noqa: E402
from backend.models.yolo import YoloAdapter  # noqa: E402

CONFIG = """<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">
<Label value="square"/><Label value="circle"/><Label value="triangle"/></RectangleLabels></View>"""
BASE, ULTRA_OV, ENGINE, HTTP_TORCH, HTTP_OV = (
    "ultralytics PyTorch (CPU default)", "ultralytics on the OpenVINO export", "Tandem OpenVINO engine, in process",
    "Tandem /predict, PyTorch", "Tandem /predict, OpenVINO")


@contextmanager
def tandem_server(weights: Path, engine: str, imgsz: int, media: Path):
    """`tandem serve` in its own process; yields a function that asks /predict for one task."""
    port = free_port()
    env = {**os.environ, "TANDEM_HOME": str(media / f"home-{engine}"), "LOCAL_FILES_DOCUMENT_ROOT": str(media)}
    proc = subprocess.Popen([sys.executable, "-m", "backend.cli", "serve", "--model", str(weights), "--port", str(port),
                             "--engine", engine, "--imgsz", str(imgsz), "--device", "cpu", "--log-level", "warning"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    task_ids = itertools.count(1)  # a fresh id per call: a repeated task would be answered from the cache
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).json().get("ready"):
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tandem serve --engine {engine} did not start")
            time.sleep(0.5)
        with httpx.Client() as http:
            def call(f: Path) -> None:
                task = {"id": next(task_ids), "data": {"image": f"/data/local-files/?d={f.name}"}}
                resp = http.post(f"{url}/predict", json={"tasks": [task], "label_config": CONFIG}, timeout=60)
                resp.raise_for_status()
                assert "result" in resp.json()["results"][0], resp.text

            yield call
    finally:
        proc.terminate()
        proc.wait(20)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3, help="passes over the images")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--pause-ms", type=float, default=50,
                    help="idle time between calls, untimed: a thread pool still spinning after one contender's "
                         "call (OpenMP, TBB) would otherwise take the cores from the next")
    ap.add_argument("--weights", type=Path, default=None)
    args = ap.parse_args()
    from ultralytics import YOLO

    with tempfile.TemporaryDirectory(prefix="tandem-serve-bench-") as tmp, ExitStack() as servers:
        tmp = Path(tmp)
        weights = args.weights or train_starter_model(Path(os.environ.get("TANDEM_HOME", "~/.tandem")).expanduser(), "detect")
        files = []
        for img, s in generate_samples(args.images + 3, seed=99, size=(640, 480)):
            files.append(tmp / f"{s.name}.jpg")
            img.save(files[-1], quality=92)
        warm, files = files[:3], files[3:]

        engine = YoloAdapter(weights, device="cpu", imgsz=args.imgsz, engine="openvino", cache_dir=tmp / "ov")
        raw_torch = YOLO(str(weights))
        raw_ov = YOLO(str(next((tmp / "ov").glob("*_openvino_model"))), task="detect")
        contenders = {
            BASE: lambda f: raw_torch.predict(str(f), imgsz=args.imgsz, verbose=False),
            HTTP_TORCH: servers.enter_context(tandem_server(weights, "torch", args.imgsz, tmp)),
            ULTRA_OV: lambda f: raw_ov.predict(str(f), imgsz=args.imgsz, verbose=False),
            ENGINE: lambda f: engine.predict([decode_image(f.read_bytes(), f.name, 10**8)]),
            HTTP_OV: servers.enter_context(tandem_server(weights, "openvino", args.imgsz, tmp)),
        }
        for fn in contenders.values():
            for f in warm:
                fn(f)
        times: dict[str, list[float]] = {k: [] for k in contenders}
        for _ in range(args.rounds):
            for f in files:
                for label, fn in contenders.items():
                    time.sleep(args.pause_ms / 1000)
                    t = time.perf_counter()
                    fn(f)
                    times[label].append((time.perf_counter() - t) * 1000)

    med = {k: statistics.median(v) for k, v in times.items()}
    n = args.images * args.rounds
    print(f"{args.images} images 640×480 × {args.rounds} rounds, interleaved with {args.pause_ms:.0f} ms pauses; "
          f"imgsz {args.imgsz}, "
          f"{os.cpu_count()} CPU cores; median ms per image")
    for k in (BASE, ULTRA_OV, ENGINE, HTTP_TORCH, HTTP_OV):
        v = med[k]
        print(f"  {k:36s} {v:7.1f} ms   {med[BASE] / v:5.2f}× vs ultralytics PyTorch")
    paired = statistics.median(h / e for h, e in zip(times[HTTP_OV], times[ENGINE]))
    print(f"\nTandem /predict with OpenVINO vs ultralytics' PyTorch CPU default: {med[BASE] / med[HTTP_OV]:.2f}× faster "
          "[target ≥ 2.5×]")
    print("/predict overhead over the raw engine it uses [target ≤ 1.10×]:")
    print(f"  OpenVINO: {med[HTTP_OV] / med[ENGINE]:.3f}× over Tandem's engine in process "
          f"(median of {n} paired ratios {paired:.3f}×; {med[HTTP_OV] - med[ENGINE]:.1f} ms); "
          f"{med[HTTP_OV] / med[ULTRA_OV]:.3f}× over ultralytics driving the same export")
    print(f"  PyTorch:  {med[HTTP_TORCH] / med[BASE]:.3f}× over ultralytics' predict "
          f"({med[HTTP_TORCH] - med[BASE]:.1f} ms)")


if __name__ == "__main__":
    main()
