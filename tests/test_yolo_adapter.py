import time

import numpy as np
import pytest

from backend.datasets.shapes import generate_samples
from backend.errors import ModelLoadError
from backend.models.base import ModelTask
from backend.models.yolo import YoloAdapter


def test_missing_file_and_offline_hub_name_fail_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not found"):
        YoloAdapter(tmp_path / "nope.pt")
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError, match="cannot be reached"):
        YoloAdapter("yolov8n.pt")
    assert time.perf_counter() - t0 < 3


def test_corrupt_weights_are_a_load_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ModelLoadError, match="cannot load YOLO weights") as err:
        YoloAdapter(bad)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ModelLoadError) as empty:
        YoloAdapter(tmp_path / "empty.pt")
    for said in (str(err.value), str(empty.value)):  # one line, without ultralytics' advice to run its hub models
        assert "\n" not in said and "ERROR" not in said and "yolo predict" not in said, said
    assert "the file is empty, truncated or corrupted" in str(empty.value)


def test_version_is_content_addressed(tmp_path, classify_weights):
    copy = tmp_path / "shapes-yolov8n-classify.pt"
    copy.write_bytes(classify_weights.read_bytes())
    a, b = YoloAdapter(classify_weights), YoloAdapter(copy)
    assert a.version == b.version and a.version.startswith("shapes-yolov8n-classify-")
    copy.write_bytes(classify_weights.read_bytes() + b"\0")  # different bytes, different version
    assert YoloAdapter(copy).version != a.version


def test_batched_predict_keeps_order_and_types(detect_adapter, classify_adapter):
    images = [img for img, _ in generate_samples(5, seed=11)]
    detect_adapter.batch = 2  # several internal batches
    try:
        outs = detect_adapter.predict(images)
    finally:
        detect_adapter.batch = 16
    assert detect_adapter.task is ModelTask.DETECT and len(outs) == 5
    singles = [detect_adapter.predict([img])[0] for img in images]
    for batched, single in zip(outs, singles, strict=True):
        np.testing.assert_allclose(batched.detections.xyxy, single.detections.xyxy, atol=1e-3)
        assert set(batched.detections.data["class_name"]) <= {"square", "circle", "triangle"}
    probs = classify_adapter.predict(images[:2])
    assert all(p.probabilities.shape == (3,) and p.probabilities.sum() == pytest.approx(1.0) for p in probs)


def test_kept_boxes_carry_their_pre_nms_class_scores(detect_adapter, segment_adapter):
    images = [img for img, _ in generate_samples(3, seed=12)]
    for adapter in (detect_adapter, segment_adapter):
        for out in adapter.predict(images):
            det = out.detections
            scores = det.data["class_scores"]
            assert scores.shape == (len(det), 3)
            # the kept box's confidence is its top class score, and that class is its label
            np.testing.assert_allclose(scores.max(axis=1), det.confidence, atol=1e-4)
            np.testing.assert_array_equal(scores.argmax(axis=1), det.class_id)


def test_embeddings_are_per_image_vectors(detect_adapter):
    images = [img for img, _ in generate_samples(3, seed=13)]
    emb = detect_adapter.embed(images)
    assert emb.ndim == 2 and emb.shape[0] == 3 and emb.shape[1] >= 64
    assert not np.allclose(emb[0], emb[1])


def test_image_without_objects_gives_empty_detections(detect_adapter):
    from PIL import Image

    (out,) = detect_adapter.predict([Image.new("RGB", (320, 240), (200, 200, 200))])
    assert len(out.detections) == 0 and out.detections.data["class_scores"].shape == (0, 3)
    # the best candidate it threw away is reported, so active learning can still rank this image
    assert out.candidate_peak is not None and 0.0 <= out.candidate_peak < detect_adapter.conf


def test_candidate_peak_is_at_least_every_kept_box(detect_adapter):
    for out in detect_adapter.predict([img for img, _ in generate_samples(3, seed=14)]):
        assert len(out.detections) and out.candidate_peak >= out.detections.confidence.max() - 1e-6


@pytest.mark.parametrize("task_fixture", ["detect_weights", "segment_weights", "classify_weights"])
def test_openvino_engine_matches_pytorch(task_fixture, request, tmp_path):
    weights = request.getfixturevalue(task_fixture)
    torch_adapter = YoloAdapter(weights, device="cpu")
    fast = YoloAdapter(weights, device="cpu", engine="openvino", cache_dir=tmp_path)
    assert fast.engine == "openvino" and fast.version == torch_adapter.version
    assert (tmp_path / f"{fast.version}_openvino_model" / "tandem_parity.json").is_file()
    images = [img for img, _ in generate_samples(4, seed=21)]
    for a, b in zip(torch_adapter.predict(images), fast.predict(images), strict=True):
        if a.probabilities is not None:
            np.testing.assert_allclose(a.probabilities, b.probabilities, atol=0.02)
            continue
        assert len(a.detections) == len(b.detections)
        np.testing.assert_allclose(np.sort(a.detections.confidence), np.sort(b.detections.confidence), atol=0.05)
        assert b.detections.data["class_scores"].shape == (len(b.detections), 3)
    again = YoloAdapter(weights, device="cpu", engine="openvino", cache_dir=tmp_path)  # cached: no re-export
    assert again.engine == "openvino"


def test_models_loading_one_version_at_once_share_one_export(detect_weights, tmp_path):
    """Two projects bound to one model load it in parallel (as the server's pool does, or replicas sharing a
    home): each exports in a folder of its own and publishes it whole, so none reads or rewrites the others'
    half-written files (a model file rewritten under a process that mapped it kills it with SIGBUS)."""
    from concurrent.futures import ThreadPoolExecutor

    from backend.models.openvino_engine import publish

    with ThreadPoolExecutor(3) as pool:
        adapters = list(pool.map(lambda _: YoloAdapter(detect_weights, device="cpu", engine="openvino",
                                                       cache_dir=tmp_path), range(3)))
    assert {a.engine for a in adapters} == {"openvino"}
    (export,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]  # one export, no partial folders
    assert export.name == f"{adapters[0].version}_openvino_model" and not list(tmp_path.glob(".*partial"))
    image = [generate_samples(1, seed=5)[0][0]]
    first = adapters[0].predict(image)[0].detections
    for other in adapters[1:]:
        np.testing.assert_array_equal(other.predict(image)[0].detections.xyxy, first.xyxy)

    kept = {p.name: p.read_bytes() for p in export.iterdir()}
    late = tmp_path / ".late.partial"  # a copy finished after the winner's is dropped, the winner kept
    late.mkdir()
    (late / "model.xml").write_text("late")
    assert publish(late, export) == export and not late.exists()
    assert {p.name: p.read_bytes() for p in export.iterdir()} == kept
    broken = tmp_path / "v0_openvino_model"  # a crashed export's leftover without a model is replaced
    broken.mkdir()
    (broken / "half.bin").write_bytes(b"")
    fresh = tmp_path / ".fresh.partial"
    fresh.mkdir()
    (fresh / "m.xml").write_text("whole")
    assert publish(fresh, broken) == broken and (broken / "m.xml").read_text() == "whole"
    assert not (broken / "half.bin").exists()
