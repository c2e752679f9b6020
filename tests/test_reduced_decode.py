"""A JPEG far larger than a detector's input is decoded at 1/2, 1/4 or 1/8 scale; results stay in the whole
image's pixels and proportions."""

import io

import numpy as np
import pytest
from PIL import Image

from active_learning.agreement import box_iou
from backend.datasets.shapes import generate_samples
from backend.media.fetch import MediaFetcher, MediaSettings, decode_sized
from backend.predict import Predictor, plan_for
from tests.test_media import exif_rotated_jpeg_bytes

RECT = """<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">
<Label value="square"/><Label value="circle"/><Label value="triangle"/></RectangleLabels></View>"""


def _jpeg(img: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def test_a_large_jpeg_decodes_smaller_and_knows_its_whole_size():
    img = Image.new("RGB", (1280, 960), "white")
    img.paste((255, 0, 0), (960, 0, 1280, 240))  # a red block at the top right
    small, size = decode_sized(_jpeg(img), "big.jpg", 80_000_000, min_side=160)
    assert size == (1280, 960)
    assert small.size == (160, 120)  # 1/8: the largest reduction keeping the longer side >= 160
    assert np.asarray(small)[5, 150].tolist() == pytest.approx([255, 0, 0], abs=12)  # the block, in place
    mid, size = decode_sized(_jpeg(img), "big.jpg", 80_000_000, min_side=400)
    assert (mid.size, size) == ((640, 480), (1280, 960))  # 1/2: 1/4 would make the longer side 320 < 400
    whole, size = decode_sized(_jpeg(img), "big.jpg", 80_000_000, min_side=700)
    assert whole.size == size == (1280, 960)  # under twice the side: every pixel


def test_exif_rotation_swaps_the_whole_size_too(tmp_path):
    displayed = Image.new("RGB", (1600, 800), "white")
    displayed.paste((255, 0, 0), (1200, 0, 1600, 200))
    (tmp_path / "rot.jpg").write_bytes(exif_rotated_jpeg_bytes(displayed))
    loaded = MediaFetcher(MediaSettings(local_files_root=tmp_path)).load("/data/local-files/?d=rot.jpg", min_side=200)
    assert loaded.size == (1600, 800) and loaded.image.size == (200, 100) and loaded.scale == (8.0, 8.0)
    assert np.asarray(loaded.image)[10, 190].tolist() == pytest.approx([255, 0, 0], abs=12)  # top right as shown


def test_other_formats_and_the_switch_decode_every_pixel(tmp_path):
    img = Image.new("RGB", (1280, 960), "white")
    img.save(tmp_path / "big.png")
    (tmp_path / "big.jpg").write_bytes(_jpeg(img))
    fetcher = MediaFetcher(MediaSettings(local_files_root=tmp_path))
    png = fetcher.load("/data/local-files/?d=big.png", min_side=160)
    assert png.image.size == png.size == (1280, 960) and png.scale == (1.0, 1.0)
    off = MediaFetcher(MediaSettings(local_files_root=tmp_path, reduced_decode=False))
    assert off.load("/data/local-files/?d=big.jpg", min_side=160).image.size == (1280, 960)
    assert fetcher.load("/data/local-files/?d=big.jpg").image.size == (1280, 960)  # no side asked: whole


def test_served_boxes_match_the_whole_decode_in_the_whole_images_pixels(tmp_path, detect_adapter):
    """The detector's boxes from a 1/4-scale decode, mapped back, agree with those from every pixel; Label
    Studio's results carry the whole image's size."""
    samples = generate_samples(12, seed=11, size=(1280, 960))
    tasks = []
    for i, (img, _) in enumerate(samples):
        (tmp_path / f"{i}.jpg").write_bytes(_jpeg(img.convert("RGB")))
        tasks.append({"id": i + 1, "data": {"image": f"/data/local-files/?d={i}.jpg"}})
    plan = plan_for(detect_adapter, RECT)
    assert plan.decode_side("image") == detect_adapter.imgsz == detect_adapter.decode_side
    runs = {}
    for reduced in (True, False):
        fetcher = MediaFetcher(MediaSettings(local_files_root=tmp_path, reduced_decode=reduced))
        predictor = Predictor(fetcher, workers=2)
        try:
            runs[reduced] = predictor.predict_typed(tasks, plan)
        finally:
            predictor.close()
    boxes = matched = 0
    for (item_r, typed_r), (item_w, typed_w) in zip(runs[True], runs[False], strict=True):
        a, b = typed_w["label"].detections, typed_r["label"].detections
        boxes += len(a)
        if len(a) and len(b):
            iou = box_iou(a.xyxy, b.xyxy)
            best = iou.argmax(1)
            same = (iou.max(1) >= 0.9) & (np.asarray(a.data["class_name"]) == np.asarray(b.data["class_name"])[best])
            matched += int(same.sum())
        for region in item_r["result"]:
            assert (region["original_width"], region["original_height"]) == (1280, 960)
    assert boxes >= 12 and matched / boxes >= 0.98, (matched, boxes)


def test_scaled_maps_boxes_and_outlines_and_refuses_masks():
    import supervision as sv

    from backend.core.prediction import POLYGON, Prediction

    outlines = np.empty(2, dtype=object)
    outlines[0], outlines[1] = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), None
    det = sv.Detections(xyxy=np.array([[1.0, 2.0, 5.0, 6.0], [0.0, 0.0, 1.0, 1.0]]), class_id=np.array([0, 1]),
                        data={POLYGON: outlines})
    out = Prediction(detections=det).scaled(2.0, 4.0)
    assert out.detections.xyxy.tolist() == [[2.0, 8.0, 10.0, 24.0], [0.0, 0.0, 2.0, 4.0]]
    assert out.detections.data[POLYGON][0].tolist() == [[2.0, 8.0], [6.0, 16.0], [10.0, 24.0]]
    assert out.detections.data[POLYGON][1] is None and out.detections.class_id.tolist() == [0, 1]
    assert det.xyxy[0, 2] == 5.0  # the original is untouched
    masked = sv.Detections(xyxy=det.xyxy, mask=np.zeros((2, 8, 8), bool), class_id=det.class_id)
    with pytest.raises(ValueError, match="masks"):
        Prediction(detections=masked).scaled(2.0, 2.0)
    assert Prediction(detections=masked).scaled(1.0, 1.0).detections is masked  # nothing to map
