"""Tandem's own OpenVINO detection pipeline against ultralytics' arithmetic and the PyTorch model."""

import json

import numpy as np
import pytest
import supervision as sv
import torch

from backend.datasets.shapes import generate_samples
from backend.models.openvino_detector import Letterbox, OpenVinoDetector, decode, letterbox
from backend.models.yolo import YoloAdapter

SIZES = [(480, 640), (333, 500), (640, 640), (100, 1000), (1200, 900), (31, 47)]


@pytest.mark.parametrize("imgsz", [640, 160])
@pytest.mark.parametrize("square", [False, True])
def test_letterbox_is_ultralytics_letterbox(imgsz, square):
    from ultralytics.data.augment import LetterBox

    rng = np.random.default_rng(0)
    for h, w in SIZES:
        image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        ours, _ = letterbox(image, imgsz, 32, square=square)
        theirs = LetterBox((imgsz, imgsz), auto=not square, stride=32)(image=image)
        assert ours.shape == theirs.shape and ours.flags.c_contiguous
        np.testing.assert_array_equal(ours, theirs)
        if not square:
            assert ours.shape[0] % 32 == 0 and ours.shape[1] % 32 == 0 and max(ours.shape[:2]) <= imgsz + 31


def test_boxes_map_back_as_ultralytics_scales_them():
    from ultralytics.utils.ops import scale_boxes

    rng = np.random.default_rng(1)
    for h, w in SIZES:
        padded, box = letterbox(np.zeros((h, w, 3), np.uint8), 640)
        xy = rng.uniform(0, min(padded.shape[:2]), (20, 2))
        wh = rng.uniform(1, 50, (20, 2))
        raw = np.zeros((4 + 2, 20), np.float32)
        raw[:2], raw[2:4] = (xy + wh / 2).T, wh.T  # cx, cy, w, h in network pixels
        raw[4] = np.linspace(0.3, 0.9, 20)  # class 0 scores, distinct boxes survive NMS only if apart
        out = decode(raw, box, (w, h), conf=0.25, iou=1.0, max_det=300, class_names=("a", "b"))
        expected = scale_boxes(padded.shape[:2], torch.from_numpy(np.hstack([xy, xy + wh])).float(), (h, w)).numpy()
        order = np.argsort(-raw[4])
        np.testing.assert_allclose(out.detections.xyxy, expected[order], atol=1e-3)


def test_decode_keeps_each_kept_box_class_vector_and_runs_class_aware_nms():
    raw = np.zeros((4 + 3, 4), np.float32)
    raw[:4] = np.array([[50, 50, 20, 20], [51, 50, 20, 20], [50, 50, 20, 20], [200, 200, 30, 30]], np.float32).T
    raw[4:] = np.array([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.1, 0.7, 0.2], [0.1, 0.2, 0.3]], np.float32).T
    out = decode(raw, Letterbox(1.0, 1.0, 0, 0), (400, 400), conf=0.25, iou=0.7, max_det=300, class_names=("a", "b", "c"))
    det = out.detections
    # box 1 overlaps box 0 in the same class and goes; box 2 overlaps too but is another class and stays
    assert det.class_id.tolist() == [0, 1, 2] and det.confidence.tolist() == pytest.approx([0.9, 0.7, 0.3])
    np.testing.assert_allclose(det.data["class_scores"], raw[4:, [0, 2, 3]].T)
    assert list(det.data["class_name"]) == ["a", "b", "c"]
    assert out.candidate_peak == pytest.approx(0.9)
    # nothing above the threshold: no box, but the near miss is reported
    missed = decode(raw, Letterbox(1.0, 1.0, 0, 0), (400, 400), conf=0.95, iou=0.7, max_det=300,
                    class_names=("a", "b", "c"))
    assert len(missed.detections) == 0 and missed.candidate_peak == pytest.approx(0.9)


@pytest.fixture(scope="module")
def engines(detect_weights, tmp_path_factory):
    cache = tmp_path_factory.mktemp("ov")
    return YoloAdapter(detect_weights, device="cpu"), YoloAdapter(detect_weights, device="cpu", engine="openvino",
                                                                   cache_dir=cache), cache


def test_detector_agrees_with_pytorch_at_any_aspect_ratio(engines):
    torch_adapter, fast, cache = engines
    assert fast.engine == "openvino"
    report = json.loads((cache / f"{fast.version}_openvino_model" / "tandem_parity.json").read_text())
    assert report["matched"] >= 0.9 and report["boxes_compared"] > 0
    images = [img for img, _ in generate_samples(3, seed=5)]
    images += [img for img, _ in generate_samples(2, seed=6, size=(500, 333))]
    images += [img for img, _ in generate_samples(2, seed=7, size=(300, 700))]
    compared = 0
    for a, b in zip(torch_adapter.predict(images), fast.predict(images), strict=True):
        assert len(a.detections) == len(b.detections)
        assert b.candidate_peak == pytest.approx(a.candidate_peak, abs=0.03)
        if len(a.detections) == 0:
            continue
        iou = sv.box_iou_batch(a.detections.xyxy, b.detections.xyxy)
        j = iou.argmax(1)
        assert (iou.max(1) > 0.9).all() and (a.detections.class_id == b.detections.class_id[j]).all()
        np.testing.assert_allclose(a.detections.confidence, b.detections.confidence[j], atol=0.03)
        scores = b.detections.data["class_scores"]
        np.testing.assert_allclose(scores.max(axis=1), b.detections.confidence, atol=1e-6)
        np.testing.assert_array_equal(scores.argmax(axis=1), b.detections.class_id)
        compared += len(a.detections)
    assert compared >= 5


def test_export_has_dynamic_input_and_a_fixed_shape_export_still_serves(engines, detect_weights, tmp_path):
    import openvino as ov
    from ultralytics import YOLO

    _, fast, cache = engines
    xml = next((cache / f"{fast.version}_openvino_model").glob("*.xml"))
    assert ov.Core().read_model(xml).input().get_partial_shape().is_dynamic
    # an export made without dynamic shapes (an older cache) pads to the full square instead
    staged = tmp_path / "fixed.pt"
    staged.write_bytes(detect_weights.read_bytes())
    fixed = OpenVinoDetector(YOLO(str(staged)).export(format="openvino", imgsz=fast.imgsz, dynamic=False,
                                                      verbose=False), fast.class_names, fast.imgsz)
    dynamic = OpenVinoDetector(xml.parent, fast.class_names, fast.imgsz)
    assert fixed.square and not dynamic.square
    image = np.asarray(generate_samples(1, seed=8, size=(500, 333))[0][0])
    (a,), (b,) = fixed.predict([image], 0.25, 0.7), dynamic.predict([image], 0.25, 0.7)
    assert len(a.detections) == len(b.detections) > 0
    assert (sv.box_iou_batch(a.detections.xyxy, b.detections.xyxy).max(1) > 0.85).all()


def test_parity_is_checked_one_image_at_a_time(tmp_path):
    """Ultralytics pads a mixed-size batch to the square and a single image to the stride; the served engine
    sees single images, so the reference must too (a weak model failed parity on padding alone)."""
    from backend.models.base import ModelOutput
    from backend.models.openvino_engine import MARKER, verify_once

    calls = []

    def runner(images, conf):
        calls.append(len(images))
        return [ModelOutput(detections=sv.Detections.empty()) for _ in images]

    report = verify_once(tmp_path, runner, runner, imgsz=160)
    assert set(calls) == {1} and len(calls) >= 2 * 6
    assert json.loads((tmp_path / MARKER).read_text()) == report
    calls.clear()
    verify_once(tmp_path, runner, runner, imgsz=160)  # checked once per export
    assert calls == []


# --- INT8 -----------------------------------------------------------------------------------------
def _calibration(folder, n=24, seed=4242):
    """Landscape and portrait images in class-like subfolders, as an export of a project's media might be."""
    for i in range(n):
        img, _ = generate_samples(1, seed=seed + i, size=(320, 240) if i % 3 else (240, 360))[0]
        (folder / f"part{i % 2}").mkdir(parents=True, exist_ok=True)
        img.save(folder / f"part{i % 2}" / f"{i}.jpg", quality=92)
    return folder


def test_int8_engine_is_quantized_checked_and_close_to_pytorch(detect_weights, engines, tmp_path):
    import openvino as ov

    from active_learning.scoring import score_outputs

    torch_adapter, _, _ = engines
    cache = tmp_path / "ov"
    int8 = YoloAdapter(detect_weights, device="cpu", engine="int8", cache_dir=cache,
                       calibration=_calibration(tmp_path / "calib"))
    assert int8.engine == "openvino-int8"
    (folder,) = [p for p in cache.glob("*_openvino_model") if "_int8-" in p.name]
    model = ov.Core().read_model(next(folder.glob("*.xml")))
    assert any(op.get_type_name() == "FakeQuantize" for op in model.get_ops())  # really quantized
    report = json.loads((folder / "tandem_parity.json").read_text())
    assert report["check"] == "disagreement" and report["mean_disagreement"] <= report["limit"] == 0.10
    assert not list(cache.glob("*.partial"))  # staged, then renamed into place
    assert report["conf"] == int8.conf and report["boxes_compared"] > 0
    images = [img for img, _ in generate_samples(4, seed=31)]
    a, b = torch_adapter.predict(images), int8.predict(images)
    assert score_outputs(a, int8.class_names, b, int8.class_names).disagreement.mean() < 0.15
    assert all(o.candidate_peak is not None for o in b)
    # a second start reuses the quantized model (same version, same calibration images)
    again = YoloAdapter(detect_weights, device="cpu", engine="int8", cache_dir=cache, calibration=tmp_path / "calib")
    assert again.engine == "openvino-int8" and len([p for p in cache.glob("*_int8-*_openvino_model")]) == 1
    # its weights cut short (a new file renamed over them; never rewritten under a reader): quantized again,
    # not served as fp32 from then on
    weights = next(folder.glob("*.bin"))
    whole = weights.read_bytes()
    cut = weights.with_name("cut")
    cut.write_bytes(whole[: len(whole) // 2])
    cut.replace(weights)
    mended = YoloAdapter(detect_weights, device="cpu", engine="int8", cache_dir=cache, calibration=tmp_path / "calib")
    assert mended.engine == "openvino-int8" and len(next(folder.glob("*.bin")).read_bytes()) == len(whole)
    assert len(list(cache.glob(f".{folder.name}.damaged-*"))) == 1


def test_int8_without_enough_calibration_images_serves_fp32_openvino(detect_weights, tmp_path, caplog):
    from backend.errors import ModelLoadError

    few = _calibration(tmp_path / "few", n=3)
    with caplog.at_level("WARNING", logger="tandem.models"):
        adapter = YoloAdapter(detect_weights, device="cpu", engine="int8", cache_dir=tmp_path / "ov", calibration=few)
    assert adapter.engine == "openvino"
    assert "at least 16 readable images" in caplog.text and "found 3" in caplog.text
    # enough files, but most are unreadable (garbage, truncated): skipped without crashing the start
    broken = _calibration(tmp_path / "broken", n=6)
    good = next(broken.rglob("*.jpg")).read_bytes()
    for i in range(14):
        (broken / f"bad{i}.jpg").write_bytes(b"not an image" if i % 2 else good[: len(good) // 3])
    caplog.clear()
    with caplog.at_level("WARNING", logger="tandem.models"):
        adapter = YoloAdapter(detect_weights, device="cpu", engine="int8", cache_dir=tmp_path / "ov",
                              calibration=broken)
    assert adapter.engine == "openvino" and "readable images besides" in caplog.text
    with pytest.raises(ModelLoadError, match="calibration"):
        YoloAdapter(detect_weights, device="cpu", engine="int8", cache_dir=tmp_path / "ov")


def test_agreement_check_refuses_a_model_that_sees_other_things():
    from backend.errors import ModelLoadError
    from backend.models.base import ModelOutput
    from backend.models.openvino_engine import check_agreement

    def out(boxes):
        n = len(boxes)
        return ModelOutput(detections=sv.Detections(
            xyxy=np.array(boxes, float).reshape(n, 4), confidence=np.full(n, 0.9), class_id=np.zeros(n, int),
            data={"class_name": np.array(["a"] * n, dtype=object)}))

    ref = [out([[0, 0, 10, 10]]), out([[20, 20, 40, 40], [50, 50, 60, 60]])]
    assert check_agreement(ref, ref, ("a",))["mean_disagreement"] == pytest.approx(0)
    with pytest.raises(ModelLoadError, match="disagrees"):
        check_agreement(ref, [out([]), out([[100, 100, 120, 120]])], ("a",))
    with pytest.raises(ModelLoadError, match="no box"):  # nothing compared is no evidence
        check_agreement([out([])], [out([])], ("a",))


@pytest.mark.parametrize("damage", ["truncated", "replaced"])
def test_a_damaged_cached_export_is_set_aside_and_exported_again(detect_weights, tmp_path, caplog, damage):
    """A cut-short weights file, or one replaced by a file of another size, no longer matches the sizes its
    parity report recorded. Either is exported again instead of falling back to PyTorch for good. The damaged
    export is set aside, not deleted under a reader, and kept for an hour even when it was cached long ago;
    older leftovers of killed exports are swept when the next export starts."""
    import os
    import time

    cache = tmp_path / "ov"
    first = YoloAdapter(detect_weights, device="cpu", engine="auto", cache_dir=cache)
    assert first.engine == "openvino"
    folder = cache / f"{first.version}_openvino_model"
    assert json.loads((folder / "tandem_parity.json").read_text())["files"]
    day_old = time.time() - 86400  # cached yesterday: a rename keeps this time, and the sweep reads it
    for path in (*folder.iterdir(), folder):
        os.utime(path, (day_old, day_old))
    weights = next(folder.glob("*.bin"))
    data = weights.read_bytes()
    swap = weights.with_name("swap")  # a new file renamed over it: the first adapter keeps its mapping (a file
    swap.write_bytes(data[: len(data) // 2] if damage == "truncated" else data + b"\0" * 64)  # rewritten in
    swap.replace(weights)  # place under a reader kills that process with SIGBUS, as publish() says)
    old, young = cache / ".v1.abcd.partial", cache / ".v2.efgh.partial"  # a killed export's; one still running
    for leftover in (old, young):
        leftover.mkdir()
        (leftover / "x.bin").write_bytes(b"half")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    with caplog.at_level("WARNING", logger="tandem.models"):
        again = YoloAdapter(detect_weights, device="cpu", engine="auto", cache_dir=cache)
    assert again.engine == "openvino", caplog.text
    assert "cannot be used (its files differ from the ones its parity check saw: sizes [" in caplog.text
    assert "exporting it again" in caplog.text
    assert next(folder.glob("*.bin")).read_bytes() == data  # a whole export again
    assert len(list(cache.glob(f".{folder.name}.damaged-*"))) == 1  # set aside, not deleted under a reader
    assert not old.exists() and young.exists()
    image = [img for img, _ in generate_samples(1, seed=9)]
    served, reference = again.predict(image)[0], first.predict(image)[0]
    assert len(served.detections) == len(reference.detections) > 0


def test_a_cached_classify_export_with_an_openvino_that_cannot_load_is_served_by_pytorch(classify_weights,
                                                                                           tmp_path):
    """Ultralytics loads a classify (or segment) export lazily, on the first predict: with the export cached
    and OpenVINO broken (a wheel that does not import on this CPU), the server used to report ready on the
    OpenVINO engine and answer every request with a 500."""
    import subprocess
    import sys

    cache = tmp_path / "ov"
    assert YoloAdapter(classify_weights, device="cpu", engine="auto", cache_dir=cache).engine == "openvino"
    broken = tmp_path / "site" / "openvino"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('openvino is broken here')\n")
    code = ("import sys; from pathlib import Path; from PIL import Image; from backend.models.yolo import YoloAdapter\n"
            "for engine in ('auto', 'openvino'):\n"
            "    try:\n"
            "        a = YoloAdapter(sys.argv[1], device='cpu', engine=engine, cache_dir=Path(sys.argv[2]))\n"
            "        out = a.predict([Image.new('RGB', (64, 64), 'red')])[0]\n"
            "        print(engine, a.engine, len(out.probabilities))\n"
            "    except Exception as exc:\n"
            "        print(engine, 'refused:', exc)\n")
    import os

    proc = subprocess.run([sys.executable, "-c", code, str(classify_weights), str(cache)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(broken.parent)})
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("auto ", "openvino "))]
    assert lines[0].startswith("auto torch ") and int(lines[0].split()[-1]) > 1, proc.stdout + proc.stderr
    assert lines[1].startswith("openvino refused: ") and "openvino is broken here" in lines[1]
    assert "OpenVINO" in lines[1]  # named, whichever step failed


def test_openvino_errors_are_said_by_their_first_meaningful_line():
    from backend.models.openvino_engine import first_line

    raw = RuntimeError("Exception from src/inference/src/cpp/core.cpp:84:\n"
                       "Check 'is_valid_weights_range(size, offset)' failed at src/core/xml_util.cpp:900:\n"
                       "Incorrect weights in bin file!\n")
    assert first_line(raw) == "Check 'is_valid_weights_range(size, offset)' failed at src/core/xml_util.cpp:900:"
    assert first_line(RuntimeError("Exception from src/x.cpp:1:")) == "Exception from src/x.cpp:1:"
    assert first_line(RuntimeError("")) == "RuntimeError" and first_line(ValueError("x" * 500)).endswith("…")
