"""Serving speed on CPU, in one run on the same images: raw ultralytics PyTorch predict (its CPU default),
raw ultralytics on the OpenVINO export, and Tandem's /predict over HTTP with each engine (`tandem serve`
in its own process, as deployed — a server thread in this process would fight the client for the GIL).
Prints median latencies per image and the ratios the targets are about.

    uv run python benchmarks/serve_bench.py [--images 30] [--imgsz 640] [--weights PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

import httpx  # noqa: E402

from backend.datasets.shapes import generate_samples  # noqa: E402
from backend.models.starter import train_starter_model  # noqa: E402
from backend.models.yolo import YoloAdapter  # noqa: E402
from backend.labelstudio.local import free_port  # noqa: E402

CONFIG = """<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">
<Label value="square"/><Label value="circle"/><Label value="triangle"/></RectangleLabels></View>"""


def median_ms(fn, items, warmup) -> float:
    """Warm up on other images: Tandem caches each task's answer, and a repeat would time the cache."""
    for item in warmup:
        fn(item)
    times = []
    for item in items:
        t = time.perf_counter()
        fn(item)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def bench_server(weights: Path, engine: str, imgsz: int, media: Path, files: list[Path], warm: list[Path]) -> float:
    """`tandem serve` in its own process, as deployed; one task per request, as Label Studio's task open."""
    port = free_port()
    env = {**os.environ, "TANDEM_HOME": str(media / f"home-{engine}"), "LOCAL_FILES_DOCUMENT_ROOT": str(media)}
    proc = subprocess.Popen([sys.executable, "-m", "backend.cli", "serve", "--model", str(weights), "--port", str(port),
                             "--engine", engine, "--imgsz", str(imgsz), "--device", "cpu", "--log-level", "warning"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
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
            def call(f):
                body = {"tasks": [{"id": 1, "data": {"image": f"/data/local-files/?d={f.name}"}}], "label_config": CONFIG}
                http.post(f"{url}/predict", json=body, timeout=60).raise_for_status()

            return median_ms(call, files, warm)
    finally:
        proc.terminate()
        proc.wait(20)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=30)
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--weights", type=Path, default=None)
    args = ap.parse_args()
    from ultralytics import YOLO

    with tempfile.TemporaryDirectory(prefix="tandem-serve-bench-") as tmp:
        tmp = Path(tmp)
        weights = args.weights or train_starter_model(Path(os.environ.get("TANDEM_HOME", "~/.tandem")).expanduser(), "detect")
        files = []
        for img, s in generate_samples(args.images + 3, seed=99, size=(640, 480)):
            files.append(tmp / f"{s.name}.jpg")
            img.save(files[-1], quality=92)
        warm, files = files[:3], files[3:]

        ov_adapter = YoloAdapter(weights, device="cpu", imgsz=args.imgsz, engine="openvino", cache_dir=tmp / "ov")
        raw_torch = YOLO(str(weights))
        raw_ov = ov_adapter._infer  # the same OpenVINO export, driven by ultralytics directly
        results = {
            "ultralytics PyTorch (CPU default)": median_ms(
                lambda f: raw_torch.predict(str(f), imgsz=args.imgsz, verbose=False), files, warm),
            "ultralytics OpenVINO": median_ms(lambda f: raw_ov.predict(str(f), imgsz=args.imgsz, verbose=False), files, warm),
        }
        del ov_adapter, raw_ov
        for label, engine in (("Tandem /predict, PyTorch", "torch"), ("Tandem /predict, OpenVINO", "openvino")):
            results[label] = bench_server(weights, engine, args.imgsz, tmp, files, warm)

        base = results["ultralytics PyTorch (CPU default)"]
        print(f"{args.images} images 640×480, imgsz {args.imgsz}, {os.cpu_count()} CPU cores; median ms per image")
        for k, v in results.items():
            print(f"  {k:36s} {v:7.1f} ms   {base / v:5.2f}× vs ultralytics PyTorch")
        speedup = base / results["Tandem /predict, OpenVINO"]
        print(f"\nTandem /predict with OpenVINO vs ultralytics' PyTorch CPU default: {speedup:.2f}× faster [target ≥ 2.5×]")
        print(f"/predict overhead over its raw engine: PyTorch "
              f"{results['Tandem /predict, PyTorch'] / base:.3f}×, OpenVINO "
              f"{results['Tandem /predict, OpenVINO'] / results['ultralytics OpenVINO']:.3f}× [target ≤ 1.10×]")


if __name__ == "__main__":
    main()
