"""Serving speed on CPU, on the same images, measured interleaved (each image goes through every contender
in turn, so drift in the machine's speed hits all of them alike):

- ultralytics' PyTorch predict (its CPU default) — the baseline;
- Tandem's PyTorch adapter called in process (ultralytics' predict plus the class vectors Tandem keeps);
- ultralytics driving the same OpenVINO export Tandem serves;
- Tandem's OpenVINO engine called in process, on the image decoded as /predict decodes it;
- Tandem's OpenVINO INT8 engine (`--engine int8`, calibrated on 48 other generated images), in process;
- Tandem's /predict over HTTP, with PyTorch, OpenVINO and OpenVINO INT8 (`tandem serve` in its own process,
  as deployed; one task per request, as when an annotator opens a task). The client is the standard
  library's keep-alive `http.client`, so what is timed is the server and the socket, not a client
  library's Python; the OpenVINO server is also timed through httpx, to show what a heavier client adds.

Prints median milliseconds per image and the ratios the targets are about.

    uv run python benchmarks/serve_bench.py [--images 30] [--rounds 5] [--imgsz 640] [--weights PATH]
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
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
from backend.dev.local_label_studio import free_port  # noqa: E402
from backend.media.fetch import decode_image  # noqa: E402
from backend.models.starter import train_starter_model  # noqa: E402
from backend.models.yolo import YoloAdapter  # noqa: E402

CONFIG = """<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">
<Label value="square"/><Label value="circle"/><Label value="triangle"/></RectangleLabels></View>"""
BASE, TORCH_ENGINE, ULTRA_OV, ENGINE, ENGINE8, HTTP_TORCH, HTTP_OV, HTTP_OV8, HTTPX_OV = (
    "ultralytics PyTorch (CPU default)", "Tandem PyTorch adapter, in process", "ultralytics on the OpenVINO export",
    "Tandem OpenVINO engine, in process", "Tandem OpenVINO INT8 engine, in process",
    "Tandem /predict, PyTorch", "Tandem /predict, OpenVINO", "Tandem /predict, OpenVINO INT8",
    "Tandem /predict, OpenVINO, httpx client")


def cpu_bf16() -> bool:
    """Whether this CPU has bf16 units (OpenVINO then computes in bf16 by default, and fp32 is not the regime)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@contextmanager
def tandem_server(weights: Path, engine: str, imgsz: int, media: Path, calibration: Path | None = None):
    """`tandem serve` in its own process; yields two functions that ask /predict for one task, through
    http.client and through httpx."""
    port = free_port()
    env = {**os.environ, "TANDEM_HOME": str(media / f"home-{engine}"), "LOCAL_FILES_DOCUMENT_ROOT": str(media)}
    extra = ["--calibration", str(calibration)] if calibration else []
    proc = subprocess.Popen([sys.executable, "-m", "backend.cli", "serve", "--model", str(weights), "--port", str(port),
                             "--engine", engine, "--imgsz", str(imgsz), "--device", "cpu", "--log-level", "warning",
                             *extra], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    task_ids = itertools.count(1)  # a fresh id per call: a repeated task would be answered from the cache
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                health = httpx.get(f"{url}/health", timeout=1).json()
                if health.get("ready"):
                    served = {"int8": "openvino-int8"}.get(engine, engine)
                    if health.get("engine") != served:  # an INT8 model that failed its check serves fp32
                        raise RuntimeError(f"tandem serve --engine {engine} serves {health.get('engine')}")
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tandem serve --engine {engine} did not start")
            time.sleep(0.5)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

        def body(f: Path) -> bytes:
            task = {"id": next(task_ids), "data": {"image": f"/data/local-files/?d={f.name}"}}
            return json.dumps({"tasks": [task], "label_config": CONFIG}).encode()

        def call(f: Path) -> None:
            conn.request("POST", "/predict", body=body(f), headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            text = resp.read()
            assert resp.status == 200 and "result" in json.loads(text)["results"][0], text

        with httpx.Client() as client:
            def call_httpx(f: Path) -> None:
                resp = client.post(f"{url}/predict", content=body(f), headers={"Content-Type": "application/json"},
                                   timeout=60)
                resp.raise_for_status()
                assert "result" in resp.json()["results"][0], resp.text

            yield call, call_httpx
        conn.close()
    finally:
        proc.terminate()
        proc.wait(20)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5, help="passes over the images")
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
        calibration = tmp / "calibration"
        calibration.mkdir()
        for i, (img, _) in enumerate(generate_samples(48, seed=4242, size=(640, 480))):
            img.save(calibration / f"{i}.jpg", quality=92)

        engine = YoloAdapter(weights, device="cpu", imgsz=args.imgsz, engine="openvino", cache_dir=tmp / "ov")
        engine8 = YoloAdapter(weights, device="cpu", imgsz=args.imgsz, engine="int8", cache_dir=tmp / "ov",
                              calibration=calibration)
        if engine8.engine != "openvino-int8":
            raise RuntimeError("the INT8 model did not pass its check (see the log above)")
        torch_engine = YoloAdapter(weights, device="cpu", imgsz=args.imgsz, engine="torch")
        raw_torch = YOLO(str(weights))
        raw_ov = YOLO(str(tmp / "ov" / f"{engine.version}_openvino_model"), task="detect")  # fp32, not the INT8 one
        torch_server, _ = servers.enter_context(tandem_server(weights, "torch", args.imgsz, tmp))
        ov_server, ov_server_httpx = servers.enter_context(tandem_server(weights, "openvino", args.imgsz, tmp))
        ov8_server, _ = servers.enter_context(tandem_server(weights, "int8", args.imgsz, tmp, calibration))
        contenders = {
            BASE: lambda f: raw_torch.predict(str(f), imgsz=args.imgsz, verbose=False),
            TORCH_ENGINE: lambda f: torch_engine.predict([decode_image(f.read_bytes(), f.name, 10**8)]),
            HTTP_TORCH: torch_server,
            ULTRA_OV: lambda f: raw_ov.predict(str(f), imgsz=args.imgsz, verbose=False),
            ENGINE: lambda f: engine.predict([decode_image(f.read_bytes(), f.name, 10**8)]),
            HTTP_OV: ov_server,
            ENGINE8: lambda f: engine8.predict([decode_image(f.read_bytes(), f.name, 10**8)]),
            HTTP_OV8: ov8_server,
            HTTPX_OV: ov_server_httpx,
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
          f"{os.cpu_count()} CPU cores ({'with' if cpu_bf16() else 'no'} bf16 units); median ms per image")
    for k in (BASE, TORCH_ENGINE, ULTRA_OV, ENGINE, ENGINE8, HTTP_TORCH, HTTP_OV, HTTP_OV8, HTTPX_OV):
        v = med[k]
        print(f"  {k:40s} {v:7.1f} ms   {med[BASE] / v:5.2f}× vs ultralytics PyTorch")
    paired = statistics.median(h / e for h, e in zip(times[HTTP_OV], times[ENGINE]))
    paired8 = statistics.median(h / e for h, e in zip(times[HTTP_OV8], times[ENGINE8]))
    print("\nTandem /predict vs ultralytics' PyTorch CPU default [target ≥ 2.5×]: "
          f"OpenVINO {med[BASE] / med[HTTP_OV]:.2f}× faster, OpenVINO INT8 {med[BASE] / med[HTTP_OV8]:.2f}× faster")
    print("/predict overhead over the raw engine it uses [target ≤ 1.10×]:")
    print(f"  OpenVINO: {med[HTTP_OV] / med[ENGINE]:.3f}× over Tandem's engine in process "
          f"(median of {n} paired ratios {paired:.3f}×; {med[HTTP_OV] - med[ENGINE]:.1f} ms); "
          f"{med[HTTP_OV] / med[ULTRA_OV]:.3f}× over ultralytics driving the same export")
    print(f"  OpenVINO INT8: {med[HTTP_OV8] / med[ENGINE8]:.3f}× over Tandem's INT8 engine in process "
          f"(median of {n} paired ratios {paired8:.3f}×; {med[HTTP_OV8] - med[ENGINE8]:.1f} ms)")
    print(f"  OpenVINO through httpx: {med[HTTPX_OV] / med[ENGINE]:.3f}× over Tandem's engine in process "
          f"({med[HTTPX_OV] - med[HTTP_OV]:+.1f} ms for the client library)")
    print(f"  PyTorch:  {med[HTTP_TORCH] / med[TORCH_ENGINE]:.3f}× over Tandem's PyTorch adapter in process "
          f"({med[HTTP_TORCH] - med[TORCH_ENGINE]:.1f} ms); {med[HTTP_TORCH] / med[BASE]:.3f}× over ultralytics' predict")


if __name__ == "__main__":
    main()
