"""YOLO pre-annotation throughput: ultralytics' predict on files vs Tandem's adapter vs the GPU pipeline.

On the same generated JPEG/PNG files (mixed sizes, some with EXIF orientation), for each model and batch
size, prints images/s end to end from the files of:
  - ultralytics  `YOLO.predict(paths, batch=B)` (its own loader, cv2 decode, fp16 on CUDA)
  - adapter      Tandem's `YoloAdapter`: read bytes, PIL decode + EXIF (backend.media.fetch), predict
  - pipeline     `GpuYoloPipeline.stream`: bytes read in fetch threads, nvjpeg decode, GPU letterbox/NMS
  - pipeline-mem the same from encoded bytes already in memory (decode onwards)
  - forward      the network's forward pass alone on a ready (B, 3, imgsz, imgsz) tensor (a ceiling)
and the box agreement with ultralytics: the share of ultralytics' boxes that the path has with the same
class at IoU >= 0.9 (computed for the model that produces boxes; random weights produce none).

    uv run python -m benchmarks.gpu_pipeline                      # CPU: small sizes
    python3 -m benchmarks.gpu_pipeline --images 1024 --batches 1,16,64,128 --out results.json   # a GPU

`--weights` defaults to the starter detector (trained once on CPU under --home, a few minutes).
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import supervision as sv
import torch
from PIL import Image

SIZES = [(640, 480), (1280, 720), (1920, 1080), (480, 640), (800, 600), (1024, 768)]


def make_images(folder: Path, count: int, distinct: int = 96, seed: int = 0) -> list[Path]:
    """`count` files cycling over `distinct` rendered shape images of mixed sizes: every 5th is stored
    rotated with an EXIF orientation (6 or 8, as phones do), every 7th is a PNG, the rest JPEGs."""
    from backend.datasets.shapes import render_sample

    rng = np.random.default_rng(seed)
    blobs = []
    for i in range(min(count, distinct)):
        w, h = SIZES[i % len(SIZES)]
        img, _ = render_sample(rng, f"bench_{i}", size=(w, h))
        buf = io.BytesIO()
        if i % 7 == 3:
            img.save(buf, "PNG")
            blobs.append((buf.getvalue(), "png"))
            continue
        if i % 5 == 1:
            orientation = 6 if i % 10 == 1 else 8
            # store the pixels as a camera would (unrotated) so that applying the tag gives `img` back
            stored = img.transpose(Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270)
            exif = Image.Exif()
            exif[0x0112] = orientation
            stored.save(buf, "JPEG", quality=90, exif=exif)
        else:
            img.save(buf, "JPEG", quality=90)
        blobs.append((buf.getvalue(), "jpg"))
    paths = []
    for i in range(count):
        data, ext = blobs[i % len(blobs)]
        path = folder / f"img_{i:05d}.{ext}"
        path.write_bytes(data)
        paths.append(path)
    return paths


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def agreement(reference: list[tuple[np.ndarray, np.ndarray]], other: list[tuple[np.ndarray, np.ndarray]],
              threshold: float = 0.9) -> tuple[int, int]:
    """(matched, total): reference boxes with a same-class box in `other` at IoU >= threshold (one-to-one)."""
    matched = total = 0
    for (ref_xyxy, ref_cls), (xyxy, cls) in zip(reference, other):
        total += len(ref_xyxy)
        if not len(ref_xyxy) or not len(xyxy):
            continue
        iou = sv.box_iou_batch(ref_xyxy, xyxy)
        iou[ref_cls[:, None] != cls[None, :]] = 0
        used = set()
        for i in np.argsort(-iou.max(axis=1)):
            for j in np.argsort(-iou[i]):
                if iou[i, j] < threshold:
                    break
                if j not in used:
                    used.add(j)
                    matched += 1
                    break
    return matched, total


def boxes_of(outputs) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(o.detections.xyxy, o.detections.class_id) for o in outputs]


def run_ultralytics(weights: str, paths: list[Path], batch: int, imgsz: int, device: str):
    from ultralytics import YOLO

    model = YOLO(weights)
    kwargs = dict(batch=batch, imgsz=imgsz, device=device, verbose=False, stream=True, conf=0.25, iou=0.7)
    if device.startswith("cuda"):
        kwargs["half"] = True
    for _ in model.predict([str(p) for p in paths[:batch]], **kwargs):  # warm-up
        pass
    sync(device)
    t = time.perf_counter()
    out = [(r.boxes.xyxy.float().cpu().numpy().astype(np.float64), r.boxes.cls.cpu().numpy().astype(int))
           for r in model.predict([str(p) for p in paths], **kwargs)]
    sync(device)
    return time.perf_counter() - t, out


def run_adapter(weights: str, paths: list[Path], batch: int, imgsz: int, device: str):
    from backend.media.fetch import decode_image
    from backend.models.yolo import YoloAdapter

    adapter = YoloAdapter(weights, device=device, imgsz=imgsz, batch=batch)

    def go(ps):
        out = []
        for start in range(0, len(ps), batch):
            images = [decode_image(p.read_bytes(), str(p), 1 << 31) for p in ps[start:start + batch]]
            out.extend(adapter.predict(images))
        return out

    go(paths[:batch])
    sync(device)
    t = time.perf_counter()
    out = go(paths)
    sync(device)
    return time.perf_counter() - t, boxes_of(out)


def run_pipeline(weights: str, paths: list[Path], batch: int, imgsz: int, device: str):
    from backend.models.yolo_gpu import GpuYoloPipeline

    pipe = GpuYoloPipeline(weights, device=device, imgsz=imgsz, batch=batch)

    def go(ps):
        return [r for _, r in pipe.stream(((p, p.read_bytes) for p in ps))]

    go(paths[:batch])
    sync(device)
    t = time.perf_counter()
    out = go(paths)
    sync(device)
    pipe.close()
    return time.perf_counter() - t, boxes_of(out)


def run_pipeline_memory(weights: str, paths: list[Path], batch: int, imgsz: int, device: str, **options):
    """The pipeline from encoded bytes already in memory (no file reads): decode onwards."""
    from backend.models.yolo_gpu import GpuYoloPipeline

    pipe = GpuYoloPipeline(weights, device=device, imgsz=imgsz, batch=batch, **options)
    blobs = [p.read_bytes() for p in paths]
    pipe.predict_bytes(blobs[:batch])
    sync(device)
    t = time.perf_counter()
    out = pipe.predict_bytes(blobs)
    sync(device)
    pipe.close()
    return time.perf_counter() - t, boxes_of(out)


def run_forward(weights: str, batch: int, imgsz: int, device: str, repeats: int = 10) -> float:
    """images/s of the fused network's forward pass alone (fp16 on CUDA) on a ready batch."""
    from ultralytics import YOLO
    from ultralytics.nn.autobackend import AutoBackend

    half = device.startswith("cuda")
    model = AutoBackend(model=YOLO(weights).model, device=torch.device(device), fp16=half, fuse=True, verbose=False)
    x = torch.rand(batch, 3, imgsz, imgsz, device=device, dtype=torch.float16 if half else torch.float32)
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        sync(device)
        t = time.perf_counter()
        for _ in range(repeats):
            model(x)
        sync(device)
    return batch * repeats / (time.perf_counter() - t)


def profile_stages(weights: str, paths: list[Path], batch: int, imgsz: int, device: str) -> dict:
    """Seconds per image of each pipeline stage run alone (synchronised), from bytes in memory."""
    from backend.models.yolo_gpu import GpuYoloPipeline, decode_batch, read_header

    pipe = GpuYoloPipeline(weights, device=device, imgsz=imgsz, batch=batch)
    blobs = [p.read_bytes() for p in paths]
    chunks = [blobs[i:i + batch] for i in range(0, len(blobs), batch)]
    stages = {"header": 0.0, "decode": 0.0, "letterbox": 0.0, "forward+nms+convert": 0.0}
    with torch.inference_mode():
        for rep in range(2):  # the first pass warms up
            for key in stages:
                stages[key] = 0.0 if rep else stages[key]
            for chunk in chunks:
                t = time.perf_counter()
                headers = [read_header(b) for b in chunk]
                t1 = time.perf_counter()
                images = decode_batch(chunk, headers, pipe._device, pool=pipe._pool, cpu_share=pipe.cpu_decode_share)
                sync(device)
                t2 = time.perf_counter()
                prep = pipe._letterbox(list(range(len(images))), images, {})
                sync(device)
                t3 = time.perf_counter()
                list(pipe._infer(prep))
                sync(device)
                t4 = time.perf_counter()
                stages["header"] += t1 - t
                stages["decode"] += t2 - t1
                stages["letterbox"] += t3 - t2
                stages["forward+nms+convert"] += t4 - t3
    pipe.close()
    return {k: round(v / len(blobs) * 1e3, 4) for k, v in stages.items()}  # ms per image


def main(argv: list[str] | None = None) -> dict:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024 if cuda else 32)
    parser.add_argument("--small-batch-images", type=int, default=256 if cuda else 16,
                        help="images timed at batch sizes below 8 (they are slow on every path)")
    parser.add_argument("--batches", default="1,16,64,128" if cuda else "1,8")
    parser.add_argument("--imgsz", type=int, default=640 if cuda else 320)
    parser.add_argument("--device", default="cuda:0" if cuda else "cpu")
    parser.add_argument("--weights", default=None, help="a model that produces boxes (default: the starter)")
    parser.add_argument("--home", type=Path, default=Path(".test-cache/home"), help="where the starter is cached")
    parser.add_argument("--random-model", default="yolov8n.yaml" if cuda else "",
                        help="also time this architecture with random weights ('' to skip)")
    parser.add_argument("--paths", default="ultralytics,adapter,pipeline,pipeline-mem,forward")
    parser.add_argument("--cpu-shares", default="", help="also time the pipeline at these shares of JPEGs "
                        "decoded on the CPU beside nvjpeg (e.g. 0,0.25,0.5,0.75), at the largest batch")
    parser.add_argument("--profile", action="store_true", help="also time each pipeline stage alone")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    weights = args.weights
    if weights is None:
        from backend.models.starter import train_starter_model

        weights = str(train_starter_model(args.home, "detect"))
    batches = [int(b) for b in args.batches.split(",")]
    wanted = args.paths.split(",")
    info = {
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "imgsz": args.imgsz,
        "images": args.images,
    }
    try:
        import torchvision
        import ultralytics

        info.update(torchvision=torchvision.__version__, ultralytics=ultralytics.__version__)
    except ImportError:
        pass
    print(json.dumps(info), flush=True)
    rows = []
    models = [(weights, "starter (trained)")] + ([(args.random_model, "random weights")] if args.random_model else [])
    with tempfile.TemporaryDirectory(prefix="tandem-gpu-bench-") as tmp:
        all_paths = make_images(Path(tmp), args.images)
        print(f"{len(all_paths)} files, {sum(p.stat().st_size for p in all_paths) / 1e6:.1f} MB; "
              f"sizes {SIZES}; every 5th EXIF-rotated, every 7th PNG", flush=True)
        print(f"{'model':<18} {'batch':>5} {'path':<12} {'images/s':>9} {'boxes':>6} {'agree@0.9':>10}", flush=True)
        for model_path, label in models:
            for batch in batches:
                paths = all_paths[:args.small_batch_images] if batch < 8 else all_paths
                reference = None
                for name, fn in (("ultralytics", run_ultralytics), ("adapter", run_adapter),
                                 ("pipeline", run_pipeline), ("pipeline-mem", run_pipeline_memory)):
                    if name not in wanted:
                        continue
                    seconds, boxes = fn(model_path, paths, batch, args.imgsz, args.device)
                    if name == "ultralytics":
                        reference = boxes
                    n_boxes = sum(len(b[0]) for b in boxes)
                    row = {"model": label, "batch": batch, "path": name, "images": len(paths),
                           "images_per_s": round(len(paths) / seconds, 1), "boxes": n_boxes}
                    if reference is not None and name != "ultralytics":
                        matched, total = agreement(reference, boxes)
                        row.update(matched=matched, reference_boxes=total,
                                   agreement=round(matched / total, 4) if total else None)
                    rows.append(row)
                    agree = f"{row['agreement']:.2%}" if row.get("agreement") is not None else "-"
                    print(f"{label:<18} {batch:>5} {name:<12} {row['images_per_s']:>9.1f} {n_boxes:>6} {agree:>10}",
                          flush=True)
                if "forward" in wanted:
                    ips = run_forward(model_path, batch, args.imgsz, args.device)
                    rows.append({"model": label, "batch": batch, "path": "forward", "images_per_s": round(ips, 1)})
                    print(f"{label:<18} {batch:>5} {'forward':<12} {ips:>9.1f}", flush=True)
        for share in [float(x) for x in args.cpu_shares.split(",") if x]:
            batch = max(batches)
            seconds, _ = run_pipeline_memory(weights, all_paths, batch, args.imgsz, args.device, cpu_decode_share=share)
            ips = round(len(all_paths) / seconds, 1)
            rows.append({"model": "starter (trained)", "batch": batch, "path": f"pipeline-mem cpu_share={share}",
                         "images_per_s": ips})
            print(f"pipeline-mem, batch {batch}, share of JPEGs decoded on the CPU {share}: {ips} images/s", flush=True)
        if args.profile:
            batch = max(batches)
            stages = profile_stages(weights, all_paths, batch, args.imgsz, args.device)
            rows.append({"model": "starter (trained)", "batch": batch, "path": "stages (ms/image)", **stages})
            print(f"pipeline stages alone, batch {batch}, ms per image: {json.dumps(stages)}", flush=True)
    result = {"info": info, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
