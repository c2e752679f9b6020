"""The demo's rounds at small size: every summary figure is recomputed from what the run did.

Real models (the starter CNN and a small, differently trained second opinion), real fine-tunes, real
calibration; only the annotator is simulated, from ground truth, as in the demo itself."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest

from active_learning.agreement import box_iou
from active_learning.effort import EffortModel
from backend.demo_rounds import (
    Actions,
    LoopConfig,
    build_pool,
    review,
    run_rounds,
    savings,
    seconds_to_reach,
    truth_prediction,
)
from backend.models.starter import StarterRecipe, train_starter_model
from tests.conftest import CACHE

pytestmark = pytest.mark.timeout(1500)

# unusual prices, so a figure that ignored the effort model (or used its defaults) could not match
EFFORT = EffortModel(draw_box=31.0, verify_box=3.0, modify_box=13.0, delete_box=2.0, spot_check=0.25)


@pytest.fixture(scope="module")
def run(tmp_path_factory, detect_weights):
    second = train_starter_model(CACHE / "demo-rounds-second-e12", "detect",
                                 StarterRecipe("detect", epochs=12, seed=1, imgsz=128, train_images=120))
    work = tmp_path_factory.mktemp("rounds")
    pool = build_pool(work, images=48, test_images=12)
    # a permissive guarantee (0.8 at 70%: 6 verified boxes suffice) so that auto-accept turns on at this size
    config = LoopConfig(rounds=3, budget=8, epochs=1, target=0.8, delta=0.3, effort=EFFORT)
    records = run_rounds(pool, str(detect_weights), str(second), work / "work", config)
    return pool, config, records, work / "work"


def test_review_counts_each_kind_of_edit():
    truth = truth_prediction(np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]]), ["a", "b", "a"])
    shown = truth_prediction(np.array([[0, 0, 10, 10], [21, 20, 31, 30], [40, 40, 50, 50], [60, 60, 70, 70]]),
                             ["a", "b", "b", "a"])  # kept, moved (IoU 0.82 → kept too), relabelled, extra
    moved = truth_prediction(np.array([[0, 0, 10, 10], [23, 20, 33, 30]]), ["a", "b"])
    assert review(shown, truth) == Actions(verify=2, modify=1, delete=1, draw=0)
    assert review(moved, truth) == Actions(verify=1, modify=1, delete=0, draw=1)  # IoU 0.54: moved; one missed


def test_human_seconds_come_from_the_effort_model_and_the_actions(run):
    _, config, records, _ = run
    assert {r.arm for r in records} == {"random", "tandem"} and max(r.round for r in records) == 3
    for r in records:
        a = r.actions
        if r.arm == "random":  # every final box drawn from scratch
            assert r.human_seconds == pytest.approx(a["draw"] * EFFORT.draw_box)
            assert r.human_tasks == r.labelled == 8 * r.round
        else:
            expected = (a["verify"] * EFFORT.verify_box + a["modify"] * EFFORT.modify_box
                        + a["delete"] * EFFORT.delete_box + a["draw"] * EFFORT.draw_box + r.spot_boxes * EFFORT.verify_box)
            assert r.human_seconds == pytest.approx(expected)
            # a human reviews the budget, or what auto-accept left of the pool when that is less
            assert r.human_tasks <= 8 * r.round and r.labelled == r.human_tasks + r.auto_tasks
    assert [r for r in records if r.arm == "tandem"][1].human_tasks == 8  # round 1: auto-accept still off
    default = EffortModel()
    last = [r for r in records if r.arm == "random"][-1]
    assert last.human_seconds != pytest.approx(last.actions["draw"] * default.draw_box)


def test_auto_accept_precision_is_a_recount_against_ground_truth(run):
    pool, _, records, work = run
    last = [r for r in records if r.arm == "tandem"][-1]
    accepted = [e for f in sorted(work.glob("tandem/auto_accepted_round*.json")) for e in json.loads(f.read_text())]
    assert last.auto_tasks == len(accepted) > 0, [r.calibration for r in records if r.arm == "tandem"]
    boxes = correct = 0
    for e in accepted:  # an independent greedy recount: each true box used once, class and IoU ≥ 0.5
        truth = pool.truth[e["task"]].detections
        assert np.allclose(e["truth"], truth.xyxy)
        used = set()
        for box, name in zip(e["boxes"], e["classes"], strict=True):
            boxes += 1
            iou = box_iou(np.array([box]), truth.xyxy)[0] if len(truth) else np.zeros(0)
            for j in np.argsort(-iou):
                if iou[j] >= 0.5 and j not in used and e["truth_classes"][j] == name:
                    used.add(int(j))
                    correct += 1
                    break
    assert (last.auto_boxes, last.auto_correct) == (boxes, correct)
    s = savings(records)
    assert s.auto_accept_precision == pytest.approx(correct / boxes)
    human_boxes = last.actions["verify"] + last.actions["modify"] + last.actions["draw"]
    assert s.coverage == pytest.approx(boxes / (boxes + human_boxes))
    per_round = [len(json.loads(f.read_text())) for f in sorted(work.glob("tandem/auto_accepted_round*.json"))]
    assert last.spot_checks == sum(int(np.ceil(0.25 * n)) for n in per_round)


def test_savings_are_read_off_the_rounds(run):
    _, _, records, _ = run
    s = savings(records)
    rnd = [r for r in records if r.arm == "random"]
    tan = [r for r in records if r.arm == "tandem"]
    assert s.random_seconds == rnd[-1].human_seconds and s.tandem_seconds == tan[-1].human_seconds
    assert s.random_final_map50 == rnd[-1].test_map50 and s.tandem_final_map50 == tan[-1].test_map50
    assert s.random_actions == rnd[-1].actions and s.tandem_actions == tan[-1].actions
    improved = rnd[-1].test_map50 > rnd[0].test_map50  # else random's final costs nothing: no saving claimed
    reach = seconds_to_reach(records, "tandem", rnd[-1].test_map50) if improved else None
    assert s.tandem_seconds_to_random_final == reach and s.start_map50 == rnd[0].test_map50
    if reach is None:
        assert s.seconds_saved is None and s.share_of_random_seconds is None
    else:
        assert s.seconds_saved == pytest.approx(rnd[-1].human_seconds - reach)
        assert s.share_of_random_seconds == pytest.approx(reach / rnd[-1].human_seconds)
    common = min(rnd[-1].test_map50, tan[-1].test_map50)
    assert s.common_map50 == common
    if common > rnd[0].test_map50:
        assert s.random_seconds_to_common == seconds_to_reach(records, "random", common)
        assert s.tandem_seconds_to_common == seconds_to_reach(records, "tandem", common)
    else:
        assert s.random_seconds_to_common is s.tandem_seconds_to_common is s.share_at_common is None
    if s.random_seconds_to_common:
        assert s.share_at_common == pytest.approx(s.tandem_seconds_to_common / s.random_seconds_to_common)
    for r in records:
        assert 0 <= r.test_map50 <= 1
    assert rnd[0].test_map50 == tan[0].test_map50 and rnd[0].human_seconds == 0  # the same starting CNN
    json.dumps(asdict(s))  # the demo writes it to summary.json


def test_seconds_to_reach_interpolates_between_rounds():
    from backend.demo_rounds import RoundRecord

    rows = [RoundRecord("tandem", k, 0, 0, sec, {}, test_map50=q) for k, (sec, q) in
            enumerate([(0, 0.5), (100, 0.6), (300, 0.8)])]
    assert seconds_to_reach(rows, "tandem", 0.7) == pytest.approx(200)
    assert seconds_to_reach(rows, "tandem", 0.4) == 0
    assert seconds_to_reach(rows, "tandem", 0.9) is None
