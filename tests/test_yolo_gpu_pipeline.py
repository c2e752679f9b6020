"""The GPU pre-annotation pipeline, run here on its CPU path (the same tensor code the GPU runs), against
Tandem's YoloAdapter on the same images: EXIF-rotated JPEGs, PNGs, grey JPEGs, mixed and equal sizes."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from active_learning.agreement import region_iou
from backend.datasets.shapes import generate_samples
from backend.errors import MediaError
from backend.media.fetch import decode_image
from backend.models.base import ModelOutput
from backend.models.yolo_gpu import GpuYoloPipeline, decode_cpu, letterbox_batch, orient, plan_letterbox, read_header

# The pipeline resizes with torch's bilinear (rounded to uint8), the adapter with OpenCV's fixed-point
# bilinear: pixels differ by at most one grey level, so outputs agree closely, not bit for bit.
BOX_TOL, SCORE_TOL = 0.5, 3e-3


def encode(img: Image.Image, fmt: str = "JPEG", orientation: int = 1) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    img.save(buf, fmt, exif=exif, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.fixture(scope="module")
def pipeline(detect_weights, detect_adapter) -> GpuYoloPipeline:
    # the adapter's batch size: a batch of one shape is letterboxed differently from a mixed one (below)
    pipe = GpuYoloPipeline(detect_weights, device="cpu", batch=detect_adapter.batch, decode_workers=2)
    yield pipe
    pipe.close()


@pytest.fixture(scope="module")
def mixed_blobs() -> list[bytes]:
    """Shapes images: every EXIF orientation, a PNG, a grey JPEG, several sizes."""
    blobs = []
    for i, (img, _) in enumerate(generate_samples(11, seed=11, size=(320, 240))):
        if i < 8:
            blobs.append(encode(img if i % 3 else img.resize((256, 300)), "JPEG", orientation=i + 1))
        elif i == 8:
            blobs.append(encode(img.resize((400, 230)), "PNG"))
        elif i == 9:
            blobs.append(encode(img.convert("L").convert("RGB").convert("L"), "JPEG"))
        else:
            blobs.append(encode(img, "JPEG", orientation=6))
    return blobs


def assert_same(expected: ModelOutput, got: ModelOutput) -> None:
    a, b = expected.detections, got.detections
    assert len(a) == len(b)
    assert a.class_id.tolist() == b.class_id.tolist()
    assert list(a.data["class_name"]) == list(b.data["class_name"])
    np.testing.assert_allclose(b.xyxy, a.xyxy, atol=BOX_TOL)
    np.testing.assert_allclose(b.confidence, a.confidence, atol=SCORE_TOL)
    assert b.data["class_scores"].shape == a.data["class_scores"].shape
    np.testing.assert_allclose(b.data["class_scores"], a.data["class_scores"], atol=SCORE_TOL)
    assert got.candidate_peak == pytest.approx(expected.candidate_peak, abs=SCORE_TOL)
    assert b.xyxy.dtype == np.float64 and b.confidence.dtype == np.float64


def test_bytes_match_the_adapter_exif_included(pipeline, detect_adapter, mixed_blobs):
    expected = detect_adapter.predict([decode_image(b, f"img{i}", 1 << 30) for i, b in enumerate(mixed_blobs)])
    got = pipeline.predict_bytes(mixed_blobs)
    assert sum(len(p.detections) for p in expected) >= 8, "the starter model should find shapes here"
    for e, g in zip(expected, got, strict=True):
        assert_same(e, g)


def test_equal_sizes_take_the_rect_path_like_ultralytics(pipeline, detect_adapter, mixed_blobs):
    """A batch of one shape is padded only to the stride (ultralytics' rule), a mixed one to the square."""
    same = [mixed_blobs[4], mixed_blobs[5], mixed_blobs[7], mixed_blobs[10]]  # 240x320 shown: EXIF 5/6/8/6
    images = [decode_image(b, "x", 1 << 30) for b in same]
    assert len({im.size for im in images}) == 1
    shape, _ = plan_letterbox([(im.height, im.width) for im in images], pipeline.imgsz, pipeline.stride)
    assert shape != (pipeline.imgsz, pipeline.imgsz)
    for e, g in zip(detect_adapter.predict(images), pipeline.predict_bytes(same), strict=True):
        assert_same(e, g)


def test_pil_images_too(pipeline, detect_adapter, mixed_blobs):
    images = [decode_image(b, "x", 1 << 30) for b in mixed_blobs[:5]]
    for e, g in zip(detect_adapter.predict(images), pipeline.predict(images), strict=True):
        assert_same(e, g)


def test_class_vectors_survive_nms(pipeline, mixed_blobs):
    outputs = pipeline.predict_bytes(mixed_blobs)
    assert sum(len(o.detections) for o in outputs)
    for out in outputs:
        det = out.detections
        scores = det.data["class_scores"]
        assert scores.shape == (len(det), len(pipeline.class_names))
        if len(det):
            assert scores.argmax(axis=1).tolist() == det.class_id.tolist()
            np.testing.assert_allclose(scores.max(axis=1), det.confidence, rtol=0, atol=1e-6)
            assert out.candidate_peak >= det.confidence.max() - 1e-6


def test_orientation_matches_pil_for_every_tag():
    img, _ = generate_samples(1, seed=2, size=(37, 23))[0]
    for tag in range(1, 9):
        data = encode(img, "JPEG", orientation=tag)  # PIL and torchvision decode JPEGs identically
        header = read_header(data)
        assert header.orientation == tag
        decoded, oriented = decode_cpu(data, header)
        assert not oriented
        ours = orient(decoded, tag).permute(1, 2, 0).numpy()
        theirs = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
        np.testing.assert_array_equal(ours, theirs)


def test_letterbox_is_ultralytics_within_one_grey_level():
    from ultralytics.data.augment import LetterBox

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in ((240, 320), (500, 130), (64, 64))]
    for group, auto in ((images, False), (images[:1] * 2, True)):
        shape, placements = plan_letterbox([im.shape[:2] for im in group], 160, 32)
        ours = letterbox_batch([torch.from_numpy(im).permute(2, 0, 1) for im in group], shape, placements)
        lb = LetterBox((160, 160), auto=auto, stride=32)
        for b, im in enumerate(group):
            theirs = torch.from_numpy(lb(image=im)).permute(2, 0, 1)
            assert tuple(theirs.shape) == tuple(ours[b].shape)
            assert (ours[b].int() - theirs.int()).abs().max() <= 1


def test_a_broken_image_fails_alone(pipeline, mixed_blobs):
    keys_results = list(pipeline.stream([("a", mixed_blobs[0]), ("b", b"not an image"),
                                         ("c", lambda: mixed_blobs[2]), ("d", lambda: (_ for _ in ()).throw(OSError("gone")))]))
    assert [k for k, _ in keys_results] == ["a", "b", "c", "d"]
    assert isinstance(keys_results[0][1], ModelOutput) and isinstance(keys_results[2][1], ModelOutput)
    assert isinstance(keys_results[1][1], MediaError) and isinstance(keys_results[3][1], MediaError)
    with pytest.raises(MediaError, match="image 1"):
        pipeline.predict_bytes([mixed_blobs[0], b"\xff\xd8\xff garbage"])


def test_segmentation_matches_the_adapter(segment_weights, segment_adapter):
    pipe = GpuYoloPipeline(segment_weights, device="cpu", batch=segment_adapter.batch, decode_workers=1)
    blobs = [encode(img, "JPEG", orientation=6 if i % 2 else 1)
             for i, (img, _) in enumerate(generate_samples(4, seed=5, size=(320, 240)))]
    expected = segment_adapter.predict([decode_image(b, "x", 1 << 30) for b in blobs])
    got = pipe.predict_bytes(blobs)
    assert sum(len(e.detections) for e in expected)
    for e, g in zip(expected, got, strict=True):
        assert_same(e, g)
        # the same regions: a mask pixel on the threshold can flip between the two paths (float order), and
        # the traced contour then has other vertices (34 vs 40 on one CI-trained model at IoU 0.993)
        if len(e.detections):
            iou, _ = region_iou(e, g)
            assert np.diag(iou).min() >= 0.97
    pipe.close()
