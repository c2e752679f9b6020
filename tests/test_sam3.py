"""SAM 3 through Tandem's loading path: a tiny random-weight checkpoint built offline and saved with
save_pretrained, then loaded by `load_sam3` as a real one would be (`facebook/sam3` is gated)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from backend.errors import ModelLoadError
from backend.models.base import Capability, ModelRequest, ModelTask, Vocabulary, bind
from backend.models.sam3 import load_sam3
from tests.tiny_sam3 import scene, teach, tiny_sam3

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_sam3(tmp_path_factory.mktemp("sam3"))


def _noise(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_every_instance_has_a_mask_inside_the_image_a_box_and_its_own_score(checkpoint):
    sam = load_sam3(str(checkpoint), device="cpu", threshold=0.0)
    assert {Capability.PROMPTABLE, Capability.SEGMENT, Capability.DETECT} <= sam.capabilities
    vocab = Vocabulary.from_labels(["Grape cluster", "Leaf"], {"Grape cluster": "grape cluster"})
    images = [_noise(130, 90, 1), _noise(40, 60, 2), _noise(64, 64, 3)]
    out = sam.predict(images, ModelRequest(ModelTask.SEGMENT, vocab))
    assert len(out) == 3
    for pred, im in zip(out, images, strict=True):
        det = pred.detections
        assert len(det) > 0 and det.mask.shape == (len(det), im.height, im.width) and det.mask.dtype == bool
        assert det.mask.reshape(len(det), -1).any(axis=1).all()
        assert ((det.confidence > 0) & (det.confidence <= 1)).all()
        assert len(np.unique(det.confidence)) > 1  # each instance its own score, never a constant
        assert set(det.data["class_name"]) <= {"Grape cluster", "Leaf"}  # labels from the config, not the prompts
        assert (det.xyxy[:, [0, 2]] >= 0).all() and (det.xyxy[:, [0, 2]] <= im.width).all()
        assert (det.xyxy[:, [1, 3]] >= 0).all() and (det.xyxy[:, [1, 3]] <= im.height).all()
        ys, xs = np.nonzero(det.mask[0])
        assert det.xyxy[0].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert all(p is None or (p.ndim == 2 and p.shape[1] == 2) for p in det.data["polygon"])
        assert np.all(np.diff(det.confidence) <= 0)  # highest score first


def test_prompts_are_batched_and_answer_as_each_prompt_alone(checkpoint):
    """All the labels' prompts run in one pass per image batch; each label's instances equal asking it alone."""
    sam = load_sam3(str(checkpoint), device="cpu", threshold=0.0, max_det=1000)
    images = [_noise(80, 70, 4), _noise(50, 90, 5)]
    both = sam.predict(images, ModelRequest(ModelTask.SEGMENT, Vocabulary.from_labels(["cat", "dog"])))
    for label in ("cat", "dog"):
        alone = sam.predict(images, ModelRequest(ModelTask.SEGMENT, Vocabulary.from_labels([label])))
        for b, a in zip(both, alone, strict=True):
            mine = b.detections[b.detections.data["class_name"] == label]
            np.testing.assert_allclose(np.sort(mine.confidence), np.sort(a.detections.confidence), atol=1e-5)
    # the batch size (images per pass) does not change the answer either
    one = sam.with_options(batch_size=1).predict(images, ModelRequest(ModelTask.SEGMENT, Vocabulary.from_labels(["cat", "dog"])))
    for x, y in zip(both, one, strict=True):
        np.testing.assert_allclose(x.detections.confidence, y.detections.confidence, atol=1e-5)


def test_thresholds_are_configurable(checkpoint):
    sam = load_sam3(str(checkpoint), device="cpu", threshold=0.0)
    vocab = Vocabulary.from_labels(["cat"])
    image = _noise(64, 48, 6)
    everything = sam.predict([image], ModelRequest(ModelTask.SEGMENT, vocab))[0].detections
    cut = float(np.median(everything.confidence))
    fewer = sam.with_options(threshold=cut).predict([image], ModelRequest(ModelTask.SEGMENT, vocab))[0].detections
    assert 0 < len(fewer) < len(everything) and (fewer.confidence > cut).all()
    assert len(sam.with_options(max_det=2).predict([image], ModelRequest(ModelTask.SEGMENT, vocab))[0].detections) == 2
    with pytest.raises(ModelLoadError, match="no option"):
        load_sam3(str(checkpoint), device="cpu", iou_threshold=0.3)


def test_masks_follow_the_exif_orientation(checkpoint):
    """A photo stored sideways with an EXIF rotation is segmented as the annotator sees it (upright)."""
    sam = load_sam3(str(checkpoint), device="cpu", threshold=0.0)
    stored = _noise(60, 40, 7)  # 60 wide, 40 high as stored
    exif = stored.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    import io

    buf = io.BytesIO()
    stored.save(buf, format="JPEG", exif=exif)
    photo = Image.open(io.BytesIO(buf.getvalue()))
    det = sam.predict([photo], ModelRequest(ModelTask.SEGMENT, Vocabulary.from_labels(["cat"])))[0].detections
    assert det.mask.shape[1:] == (60, 40)  # displayed: 40 wide, 60 high


def test_a_missing_or_wrong_checkpoint_is_a_clear_error(tmp_path, checkpoint):
    with pytest.raises(ModelLoadError, match="no such model folder"):
        load_sam3(str(tmp_path / "nowhere"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "owlv2"}')
    with pytest.raises(ModelLoadError, match="not a SAM 3"):
        load_sam3(str(tmp_path / "other"))


def test_taught_on_one_image_its_mask_matches_the_truth(checkpoint):
    """A few optimizer steps on one image (seconds): the present prompt's top instance covers the object
    (mask IoU with the truth), the absent prompt finds nothing."""
    import torch

    torch.manual_seed(0)
    sam = load_sam3(str(checkpoint), device="cpu")
    image, truth = scene()
    teach(sam, image, truth, present="square", absent="circle")
    bound = bind(sam, ModelTask.SEGMENT, Vocabulary.from_labels(["Square", "Circle"], {"Square": "square",
                                                                                          "Circle": "circle"}))
    det = bound.predict([image])[0].detections
    assert len(det) >= 1 and det.data["class_name"][0] == "Square"
    assert "Circle" not in set(det.data["class_name"])
    top = det.mask[0]
    iou = (top & truth).sum() / (top | truth).sum()
    assert iou >= 0.8, iou


SERVED = """<View><Image name="image" value="$image"/>
<RectangleLabels name="box" toName="image"><Label value="Square"/><Label value="Circle"/></RectangleLabels>
<PolygonLabels name="poly" toName="image"><Label value="Square"/><Label value="Circle"/></PolygonLabels>
<BrushLabels name="brush" toName="image"><Label value="Square"/><Label value="Circle"/></BrushLabels>
</View>"""


def test_served_through_load_vlm_it_fills_rectangles_polygons_and_brushes(checkpoint):
    """`--vlm <SAM 3 folder>` loads it like any VLM; the config's labels (reworded by per-label prompts) are its
    text prompts, and one prediction fills every control: boxes, outlines and Label Studio RLE masks."""
    from backend.convert.brush import rle_to_mask
    from backend.convert.labelstudio import WRITERS
    from backend.models.sam3 import Sam3Segmenter
    from backend.models.vlm.loader import load_vlm
    from backend.predict import describe, plan_for

    sam = load_vlm(str(checkpoint), device="cpu", threshold=0.0, max_det=5)
    assert isinstance(sam, Sam3Segmenter) and describe(sam) == "detect+segment"
    plan = plan_for(sam, SERVED, prompts={"Square": "bright square"})
    assert [p.control.name for p in plan.controls] == ["box", "poly", "brush"]
    assert [p.adapter.task for p in plan.controls] == [ModelTask.DETECT, ModelTask.SEGMENT, ModelTask.SEGMENT]
    assert plan.controls[0].adapter.vocabulary.prompts == ("bright square", "Circle")
    image = _noise(70, 50, 8)
    out = {}
    for planned in plan.controls:
        pred = planned.adapter.predict([image])[0]
        out[planned.control.name] = (pred, WRITERS[planned.control.kind].regions(
            planned.control, planned.labels, pred, planned.adapter.class_names, image.size))
    pred, boxes = out["box"]
    _, polygons = out["poly"]
    _, brushes = out["brush"]
    n = len(pred.detections)
    assert n == 5 and len(boxes) == len(polygons) == len(brushes) == n
    for k, (box, brush) in enumerate(zip(boxes, brushes, strict=True)):
        label = box["value"]["rectanglelabels"][0]
        assert label in ("Square", "Circle") and brush["value"]["brushlabels"] == [label]
        assert box["score"] == brush["score"] == round(float(pred.detections.confidence[k]), 6)
        mask = rle_to_mask(brush["value"]["rle"], *image.size)
        assert np.array_equal(mask, pred.detections.mask[k])  # Label Studio gets the mask itself
        ys, xs = np.nonzero(mask)
        np.testing.assert_allclose([box["value"]["x"], box["value"]["width"]],
                                   [xs.min() / 70 * 100, (xs.max() + 1 - xs.min()) / 70 * 100], atol=1e-3)
    assert all(len(p["value"]["points"]) >= 3 for p in polygons)
