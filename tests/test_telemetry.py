"""Edit counts of pre-annotations against final annotations, and the effort model, on hand-computed cases."""

import numpy as np
import pytest

from active_learning.effort import EffortModel
from active_learning.telemetry import edits, precision_coverage, reliability, summarise, total
from backend.core.prediction import Prediction
from tests.test_agreement import NAMES, boxes


def test_each_kind_of_edit_is_counted_once():
    pred = boxes([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [60, 0, 70, 10]],
                 ["Cat", "Cat", "Dog", "Dog"], conf=[0.9, 0.8, 0.7, 0.3])
    human = boxes([[0, 0, 10, 10],    # unchanged
                   [20, 0, 30, 8],    # moved: IoU 0.8 < 0.9
                   [40, 0, 50, 10],   # relabelled Dog -> Cat
                   [80, 80, 90, 90]],  # missed; pred 3 (Dog at 60) deleted
                  ["Cat", "Cat", "Cat", "Dog"])
    e = edits(pred, human, task_id=7, model_version="v1")
    c = e.counts
    assert (c.unchanged, c.moved, c.relabelled, c.deleted, c.missed) == (1, 1, 1, 1, 1)
    assert c.modified == 2 and c.predicted == 4 and c.final == 4
    assert e.per_class["Cat"].unchanged == 1 and e.per_class["Cat"].moved == 1
    assert e.per_class["Dog"].relabelled == 1 and e.per_class["Dog"].deleted == 1 and e.per_class["Dog"].missed == 1
    np.testing.assert_array_equal(e.kept, [True, False, False, False])


def test_a_same_class_partner_wins_over_a_better_overlapping_relabel():
    pred = boxes([[0, 0, 10, 10]], ["Cat"])
    human = boxes([[0, 0, 10, 10], [0, 0, 10, 9]], ["Dog", "Cat"])
    c = edits(pred, human).counts
    assert (c.unchanged, c.relabelled, c.missed) == (1, 0, 1)


def test_choices_accept_rate():
    p = Prediction(probabilities=np.array([0.8, 0.2]), class_names=NAMES)
    right = Prediction(probabilities=np.array([1.0, 0.0]), class_names=NAMES)
    wrong = Prediction(probabilities=np.array([0.0, 1.0]), class_names=NAMES)
    s = summarise([edits(p, right, 1, "v"), edits(p, wrong, 2, "v")])["v"]
    assert s.counts.choices == 2 and s.counts.rate("choice_accept") == 0.5


def test_minutes_saved_from_the_effort_model():
    pred = boxes([[0, 0, 10, 10], [20, 0, 30, 10]], ["Cat", "Dog"])
    human = boxes([[0, 0, 10, 10], [40, 40, 50, 50]], ["Cat", "Cat"])  # 1 unchanged, 1 deleted, 1 missed
    effort = EffortModel(draw_box=30, verify_box=5, delete_box=2)
    s = summarise([edits(pred, human, 1, "v1")], effort)["v1"]
    assert s.scratch_seconds == 2 * 30  # two final boxes drawn from nothing
    assert s.assisted_seconds == 5 + 2 + 30
    assert s.saved_minutes == pytest.approx((60 - 37) / 60)
    assert total(summarise([edits(pred, human, 1, "v1"), edits(pred, human, 2, "v2")], effort)).tasks == 2


def test_effort_from_env_rejects_unknown_names(monkeypatch):
    monkeypatch.setenv("TANDEM_EFFORT", '{"draw_box": 20}')
    assert EffortModel.from_env().draw_box == 20
    monkeypatch.setenv("TANDEM_EFFORT", '{"draw_boxes": 20}')
    with pytest.raises(ValueError, match="unknown field.*draw_boxes"):
        EffortModel.from_env()


def test_reliability_and_precision_coverage():
    pred = boxes([[0, 0, 10, 10], [20, 0, 30, 10]], ["Cat", "Cat"], conf=[0.95, 0.15])
    human = boxes([[0, 0, 10, 10]], ["Cat"])
    centres, share, count = reliability([edits(pred, human)], bins=10)
    assert count[9] == 1 and share[9] == 1 and count[1] == 1 and share[1] == 0
    cov, prec = precision_coverage(np.array([0.9, 0.9, 0.5, 0.1]), np.array([True, True, False, True]))
    np.testing.assert_allclose(cov, [0.5, 0.75, 1.0])
    np.testing.assert_allclose(prec, [1.0, 2 / 3, 0.75])


def test_the_effort_model_names_the_prices_of_the_work_counted():
    """A Choices project's report named box prices it never used (a new user's walk)."""
    e = EffortModel()
    assert e.describe(regions=False, choices=True) == "choose 5 s, confirm 2 s per choice"
    assert e.describe() == "draw 35 s, verify 7 s, modify 15 s, delete 3 s per box"
    assert e.describe(polygons=True).startswith("draw 80 s") and e.describe(polygons=True).endswith("per polygon")
    assert e.describe(regions=True, choices=True).count(";") == 1
