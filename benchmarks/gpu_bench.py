"""One run, the same images: YOLO pre-annotation (ultralytics' predict on files vs Tandem's GPU pipeline) and
every VLM family's seconds per image at batch 1 / 8 / 32 through Tandem's adapters.

YOLO: images/s end to end from the files, and the share of ultralytics' boxes that Tandem's pipeline has too
(same class, IoU >= 0.9, one-to-one); the files are benchmarks/gpu_pipeline.py's (mixed sizes, EXIF-rotated
JPEGs, PNGs), the weights the starter detector (so there are boxes to agree on).

VLMs: "batch" is images per forward pass (generative: images whose prefixes share a pass, B x K candidate
sequences scored from their cache; grounding: images per `generate` call; zero-shot: images per pass), set on
the adapter, while `predict` gets the same list of images every time. Seconds per image = wall time / images.
  --size real   the hub checkpoints' architectures with random weights (benchmarks/vlm_latency.py; nothing is
                downloaded), bf16 on CUDA; generation runs 64 new tokens (EOS suppressed until then)
  --size tiny   the tests' tiny checkpoints (backend/models/families/*: build_tiny), for CPUs and CI: they
                exercise every code path, their timings say little about real models

    uv run python -m benchmarks.gpu_bench                                   # CPU: tiny models, small sizes
    python -m benchmarks.gpu_bench --size real --out gpu_bench.json         # an H100 (docs/gpu.md)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import track  # noqa: E402
from rich.table import Table  # noqa: E402

from backend.models.base import ModelTask  # noqa: E402
from backend.models.vlm.base import OpenVocabularyModel, Vocabulary  # noqa: E402
from backend.models.vlm.generative import GenerativeVlm  # noqa: E402
from benchmarks import gpu_pipeline  # noqa: E402

console = Console()
LABELS = ("square", "circle", "triangle")
TINY = ["clip", "siglip", "owlv2", "grounding_dino", "florence2", "idefics3", "qwen2_5_vl", "qwen3_vl", "paligemma",
        "llava"]
REAL = ["clip", "siglip", "owlv2", "grounding-dino", "florence2", "smolvlm", "qwen2.5-vl", "qwen3-vl", "paligemma"]


@dataclass
class VlmRow:
    family: str
    model: str
    task: str
    batch: int
    images: int
    seconds_per_image: float
    peak_gib: float | None  # GPU memory at the peak (CUDA), else None
    note: str = ""


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_images(count: int, size: tuple[int, int] = (640, 480), seed: int = 0) -> list[Image.Image]:
    from backend.datasets.shapes import render_sample

    rng = np.random.default_rng(seed)
    return [render_sample(rng, f"vlm_{i}", size=size)[0] for i in range(count)]


# ------------------------------------------------------------------------------------------ YOLO


def bench_yolo(weights: str, images: int, batch: int, imgsz: int, device: str) -> list[dict]:
    """ultralytics' predict on the files, then Tandem's pipeline on the same files; box agreement at 0.9."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="tandem-gpu-bench-") as tmp:
        paths = gpu_pipeline.make_images(Path(tmp), images)
        reference = None
        for name, run in (("ultralytics predict (files)", gpu_pipeline.run_ultralytics),
                          ("Tandem GpuYoloPipeline (files)", gpu_pipeline.run_pipeline)):
            seconds, boxes = run(weights, paths, batch, imgsz, device)
            row = {"path": name, "batch": batch, "images": len(paths), "imgsz": imgsz,
                   "images_per_s": round(len(paths) / seconds, 1), "boxes": int(sum(len(b[0]) for b in boxes))}
            if reference is None:
                reference = boxes
            else:
                matched, total = gpu_pipeline.agreement(reference, boxes)
                row.update(matched=matched, reference_boxes=total, agreement=round(matched / total, 4) if total else None)
            rows.append(row)
            console.print(row, highlight=False)
    return rows


# ------------------------------------------------------------------------------------------ VLMs


def set_batch(adapter: OpenVocabularyModel, batch: int, candidates: int) -> None:
    """Images per forward pass, on whichever knob the adapter has."""
    if isinstance(adapter, GenerativeVlm):
        adapter.max_images = batch
        adapter.max_sequences = batch * candidates  # the teacher-forced path: B images x K candidates
    else:
        adapter.batch_size = batch


def tiny_adapters(names: list[str], device: str, root: Path):
    from backend.models.families.synthetic import build
    from backend.models.vlm.loader import load_vlm

    for name in names:
        adapter = load_vlm(str(build(name, root)), device=device)
        if isinstance(adapter, GenerativeVlm):
            adapter.max_new_tokens = adapter.model.generation_config.min_new_tokens = 64  # random weights must not
            # stop early: every image generates 64 tokens, as in --size real
        elif name == "owlv2":
            adapter.threshold = 0.0  # random weights score below the default: boxes reach NMS as trained ones would
        yield name, f"tiny {adapter.model.__class__.__name__}", adapter


def real_adapters(names: list[str], device: str, image: Image.Image, vocabulary: Vocabulary):
    from benchmarks import vlm_latency as real

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    for family in (f for f in real.FAMILIES if f.key in names):
        processor = family.processor()
        model = real.build_model(family, family.config(processor), dtype).to(device)
        adapter = real.make_adapter(family, model, processor, device=device)
        if family.adapter == "detector":
            with torch.inference_mode():
                adapter.threshold = real.calibrate_threshold(adapter, image, vocabulary)
        yield family.key, family.checkpoint, adapter
        del adapter, model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def time_predict(adapter, task: ModelTask, vocabulary: Vocabulary, images: list[Image.Image], device: str
                 ) -> tuple[float, float | None, list]:
    bound = adapter.bind(task, vocabulary)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t = time.perf_counter()
    outputs = bound.predict(images)
    sync(device)
    seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return seconds, peak, outputs


def bench_vlms(adapters, batches: list[int], min_images: int, device: str, vocabulary: Vocabulary,
               images: list[Image.Image]) -> list[VlmRow]:
    rows = []
    for key, model_name, adapter in adapters:
        for task in sorted(adapter.tasks, key=lambda t: t.value):
            for batch in batches:
                n = max(batch, min_images)
                pics = images[:n]
                set_batch(adapter, batch, len(vocabulary.names))
                try:
                    time_predict(adapter, task, vocabulary, pics[:batch], device)  # warm-up at this batch
                    seconds, peak, outputs = time_predict(adapter, task, vocabulary, pics, device)
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    rows.append(VlmRow(key, model_name, task.value, batch, n, float("nan"), None, "out of memory"))
                    continue
                assert len(outputs) == n
                rows.append(VlmRow(key, model_name, task.value, batch, n, round(seconds / n, 5),
                                   None if peak is None else round(peak, 2)))
                console.print(f"{key:<15} {task.value:<8} batch {batch:>3}: {seconds / n:.4f} s/image"
                              + (f", peak {peak:.1f} GiB" if peak is not None else ""), highlight=False)
    return rows


def print_vlm_table(rows: list[VlmRow], batches: list[int]) -> None:
    table = Table(title="VLM seconds per image (images per forward pass = batch)")
    for col in ["family", "task", *[f"batch {b}" for b in batches], f"speed-up {batches[0]} -> {batches[-1]}"]:
        table.add_column(col)
    for (family, task), group in _grouped(rows).items():
        by_batch = {r.batch: r.seconds_per_image for r in group}
        first, last = by_batch.get(batches[0]), by_batch.get(batches[-1])
        gain = f"{first / last:.1f}x" if first and last and last == last else "-"
        table.add_row(family, task, *[f"{by_batch[b]:.4f}" if b in by_batch else "-" for b in batches], gain)
    console.print(table)


def _grouped(rows: list[VlmRow]) -> dict[tuple[str, str], list[VlmRow]]:
    groups: dict[tuple[str, str], list[VlmRow]] = {}
    for r in rows:
        groups.setdefault((r.family, r.task), []).append(r)
    return groups


def markdown(result: dict) -> str:
    """The tables of one run, for benchmarks/results/."""
    info, batches = result["info"], result["info"]["batches"]
    lines = [f"Device: **{info['device']}**; torch {info['torch']}, transformers {info['transformers']}; "
             f"VLM size: {info['size']}; {info['threads']} torch threads; peak RSS of the run "
             f"{info.get('peak_rss_gib', '?')} GiB.", ""]
    if result["yolo"]:
        lines += ["| YOLO path | batch | imgsz | images | images/s | boxes | agree@0.9 with ultralytics |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in result["yolo"]:
            agree = f"{r['agreement']:.2%} ({r['matched']}/{r['reference_boxes']})" if r.get("agreement") is not None \
                else "-"
            lines.append(f"| {r['path']} | {r['batch']} | {r['imgsz']} | {r['images']} | {r['images_per_s']} | "
                         f"{r['boxes']} | {agree} |")
        lines.append("")
    if result["vlm"]:
        rows = [VlmRow(**r) for r in result["vlm"]]
        lines += ["| family | model | task | " + " | ".join(f"s/image at batch {b}" for b in batches)
                  + f" | speed-up (s at {batches[0]} / s at {batches[-1]}) |",
                  "|---|---|---|" + "---:|" * (len(batches) + 1)]
        for (family, task), group in _grouped(rows).items():
            by_batch = {r.batch: r.seconds_per_image for r in group}
            first, last = by_batch.get(batches[0]), by_batch.get(batches[-1])
            gain = f"{first / last:.1f}x" if first and last and last == last else "-"
            lines.append(f"| {family} | {group[0].model} | {task} | "
                         + " | ".join(f"{by_batch[b]:.4f}" if b in by_batch else "-" for b in batches) + f" | {gain} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda:0" if cuda else "cpu")
    parser.add_argument("--size", choices=["tiny", "real"], default="real" if cuda else "tiny")
    parser.add_argument("--families", nargs="*", default=None, help="VLM families (default: all of --size's)")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--min-images", type=int, default=None,
                        help="images timed per batch size (default: the largest batch)")
    parser.add_argument("--yolo-images", type=int, default=1024 if cuda else 16, help="0 skips YOLO")
    parser.add_argument("--yolo-batch", type=int, default=64 if cuda else 8)
    parser.add_argument("--imgsz", type=int, default=640 if cuda else 320)
    parser.add_argument("--weights", default=None, help="YOLO weights that produce boxes (default: the starter)")
    parser.add_argument("--home", type=Path, default=Path(".test-cache/home"), help="where the starter is cached")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on a CPU")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the tables as Markdown here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    names = args.families if args.families is not None else (TINY if args.size == "tiny" else REAL)

    import transformers

    info = {"device": torch.cuda.get_device_name(0) if args.device.startswith("cuda")
            else f"CPU ({platform.processor() or platform.machine()}, {psutil.cpu_count()} cores)",
            "torch": torch.__version__, "transformers": transformers.__version__, "size": args.size,
            "threads": torch.get_num_threads(), "batches": batches}
    console.print(info, highlight=False)
    result: dict = {"info": info, "yolo": [], "vlm": []}

    if args.yolo_images:
        weights = args.weights
        if weights is None:
            from backend.models.starter import train_starter_model

            weights = str(train_starter_model(args.home, "detect"))
        result["yolo"] = bench_yolo(weights, args.yolo_images, args.yolo_batch, args.imgsz, args.device)

    if names:
        vocabulary = Vocabulary.from_labels(LABELS)
        n = max(max(batches), args.min_images or 0)
        images = list(track(bench_images(n), description="rendering images", console=console))
        with tempfile.TemporaryDirectory(prefix="tandem-tiny-vlms-") as root, torch.inference_mode():
            adapters = (tiny_adapters(names, args.device, Path(root)) if args.size == "tiny"
                        else real_adapters(names, args.device, images[0], vocabulary))
            rows = bench_vlms(adapters, batches, args.min_images or max(batches), args.device, vocabulary, images)
        result["vlm"] = [asdict(r) for r in rows]
        print_vlm_table(rows, batches)
    info["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # Linux: KiB
    console.print(f"peak RSS {info['peak_rss_gib']} GiB", highlight=False)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    if args.markdown:
        args.markdown.write_text(markdown(result))
    return result


if __name__ == "__main__":
    main()
