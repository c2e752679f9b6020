"""benchmarks/gpu_bench.py runs end to end on a CPU at its smallest size: YOLO through ultralytics and through
Tandem's pipeline on the same files (boxes agree), and VLM seconds per image at two batch sizes."""

from __future__ import annotations

import math

from benchmarks import gpu_bench


def test_gpu_bench_runs_on_cpu_at_its_smallest(detect_weights, tmp_path):
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    result = gpu_bench.main(["--device", "cpu", "--size", "tiny", "--families", "clip", "qwen2_5_vl",
                             "--batches", "1,4", "--yolo-images", "8", "--yolo-batch", "4", "--imgsz", "320",
                             "--weights", str(detect_weights), "--out", str(out), "--markdown", str(md)])
    assert out.is_file() and "agree@0.9" in md.read_text()

    ultralytics, pipeline = result["yolo"]
    assert ultralytics["images"] == pipeline["images"] == 8
    assert ultralytics["images_per_s"] > 0 and pipeline["images_per_s"] > 0
    assert ultralytics["boxes"] > 0  # the starter detector finds the shapes
    assert pipeline["agreement"] >= 0.9  # Tandem's pipeline keeps ultralytics' boxes

    rows = {(r["family"], r["task"], r["batch"]): r for r in result["vlm"]}
    assert set(rows) == {("clip", "classify", 1), ("clip", "classify", 4), ("qwen2_5_vl", "classify", 1),
                         ("qwen2_5_vl", "classify", 4), ("qwen2_5_vl", "detect", 1), ("qwen2_5_vl", "detect", 4)}
    for row in rows.values():
        assert row["images"] == 4 and math.isfinite(row["seconds_per_image"]) and row["seconds_per_image"] > 0
        assert row["peak_gib"] is None  # no GPU memory reading on a CPU
