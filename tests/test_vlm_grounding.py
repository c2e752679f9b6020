"""Each generative family's box format, parsed from known strings into pixels of the original image."""

from __future__ import annotations

import json

import numpy as np
import pytest

from backend.models.vlm.grounding import (
    format_boxes,
    match_phrase,
    parse_florence2,
    parse_paligemma,
    parse_qwen_json,
    span_confidence,
    token_offsets,
)

W, H = 640, 480


def test_florence2_od_and_phrase_grounding():
    text = "</s><s>cat<loc_100><loc_200><loc_500><loc_900>dog<loc_0><loc_0><loc_999><loc_999></s>"
    boxes = parse_florence2(text, W, H)
    assert [b.label for b in boxes] == ["cat", "dog"]
    np.testing.assert_allclose(boxes[0].xyxy, [100.5 / 1000 * W, 200.5 / 1000 * H, 500.5 / 1000 * W, 900.5 / 1000 * H])
    np.testing.assert_allclose(boxes[1].xyxy, [0.32, 0.24, W, H], atol=0.5)
    assert text[boxes[0].span[0]:boxes[0].span[1]].endswith("<loc_900>")
    # phrase grounding repeats loc groups for several instances of one phrase
    multi = parse_florence2("a cat<loc_1><loc_2><loc_3><loc_4><loc_10><loc_20><loc_30><loc_40></s>", W, H)
    assert [b.label for b in multi] == ["a cat", "a cat"]


def test_florence2_parser_agrees_with_the_processor(tiny_vlm):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_vlm("florence2"))
    text = "</s><s>cat<loc_100><loc_200><loc_500><loc_900>dog<loc_0><loc_0><loc_999><loc_999></s>"
    theirs = processor.post_process_generation(text, task="<OD>", image_size=(W, H))["<OD>"]
    ours = parse_florence2(text, W, H)
    assert theirs["labels"] == [b.label for b in ours]
    np.testing.assert_allclose(theirs["bboxes"], [b.xyxy for b in ours], atol=1.0)


def test_paligemma_locations_are_y_first_in_1024_bins():
    text = "<loc0256><loc0128><loc0768><loc0896> cat ; <loc0000><loc0000><loc1023><loc1023> dog<eos>"
    boxes = parse_paligemma(text, W, H)
    assert [b.label for b in boxes] == ["cat", "dog"]
    np.testing.assert_allclose(boxes[0].xyxy, [128 / 1024 * W, 256 / 1024 * H, 896 / 1024 * W, 768 / 1024 * H])
    assert boxes[1].xyxy[2] == pytest.approx(1023 / 1024 * W)


def test_qwen25_pixels_of_the_resized_image_and_qwen3_relative():
    text = '```json\n[\n\t{"bbox_2d": [28, 56, 280, 420], "label": "cat"},\n\t{"bbox_2d": [300, 10, 600, 460], "label": "dog"}\n]\n```'
    # Qwen2.5-VL resizes 640x480 to 644x476 (multiples of 28): coordinates come back in that frame
    q25 = parse_qwen_json(text, W, H, coord_size=(644, 476))
    np.testing.assert_allclose(q25[0].xyxy, [28 * W / 644, 56 * H / 476, 280 * W / 644, 420 * H / 476])
    q3 = parse_qwen_json(text, W, H, coord_size=(1000, 1000))
    np.testing.assert_allclose(q3[1].xyxy, [300 * W / 1000, 10 * H / 1000, 600 * W / 1000, 460 * H / 1000])
    assert [b.label for b in q3] == ["cat", "dog"]


def test_qwen_json_cut_off_by_the_token_limit_keeps_complete_boxes():
    text = '```json\n[{"bbox_2d": [1, 2, 30, 40], "label": "cat"}, {"bbox_2d": [5, 6, 7'
    boxes = parse_qwen_json(text, W, H, coord_size=(W, H))
    assert len(boxes) == 1 and boxes[0].xyxy == (1, 2, 30, 40)
    assert parse_qwen_json("I cannot see any cats.", W, H, (W, H)) == []
    assert parse_qwen_json('[{"bbox_2d": "oops", "label": "cat"}]', W, H, (W, H)) == []


def test_boxes_outside_the_image_are_clipped_and_reordered():
    boxes = parse_qwen_json('[{"bbox_2d": [700, -10, 600, 300], "label": "x"}]', W, H, coord_size=(W, H))
    assert boxes[0].xyxy == (600, 0, W, 300)


@pytest.mark.parametrize("kind", ["florence2", "paligemma", "qwen_pixels", "qwen_1000"])
def test_format_boxes_round_trips_through_the_parser(kind):
    boxes = [(40.0, 30.0, 140.0, 120.0), (180.0, 100.0, 280.0, 200.0)]
    text = format_boxes(kind, boxes, ["square", "circle"], 320, 240, coord_size=(336, 252))
    parse = {"florence2": lambda t: parse_florence2(t, 320, 240), "paligemma": lambda t: parse_paligemma(t, 320, 240),
             "qwen_pixels": lambda t: parse_qwen_json(t, 320, 240, (336, 252)),
             "qwen_1000": lambda t: parse_qwen_json(t, 320, 240, (1000, 1000))}[kind]
    back = parse(text)
    assert [b.label for b in back] == ["square", "circle"]
    np.testing.assert_allclose([b.xyxy for b in back], boxes, atol=1.0)
    if kind.startswith("qwen"):
        json.loads(text.strip("`").removeprefix("json"))


def test_match_phrase_maps_generated_phrases_onto_labels():
    labels = ["car", "traffic light", "person"]
    assert match_phrase("Car", labels) == 0
    assert match_phrase("a red car", labels) == 0
    assert match_phrase("cars", labels) == 0
    assert match_phrase("the traffic light", labels) == 1
    assert match_phrase("light", labels) == 1  # a phrase naming part of one label
    assert match_phrase("carpet", labels) is None
    assert match_phrase("", labels) is None
    assert match_phrase("dog", labels) is None


def test_span_confidence_is_the_geometric_mean_of_the_tokens_that_wrote_the_box():
    prefixes = ["cat", "cat<loc_1>", "cat<loc_1><loc_2>", "cat<loc_1><loc_2>dog", "cat<loc_1><loc_2>dog<loc_3>"]
    offsets = token_offsets(prefixes)
    assert offsets.tolist() == [[0, 3], [3, 10], [10, 17], [17, 20], [20, 27]]
    logp = np.log([0.9, 0.5, 0.8, 0.99, 0.2])
    assert span_confidence(offsets, logp, (0, 17)) == pytest.approx((0.9 * 0.5 * 0.8) ** (1 / 3))
    assert span_confidence(offsets, logp, (17, 27)) == pytest.approx((0.99 * 0.2) ** 0.5)
    assert span_confidence(offsets, logp, (30, 40)) == 0.0
