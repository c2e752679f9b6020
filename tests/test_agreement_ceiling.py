"""benchmarks/agreement_ceiling.py's curve: auto-accept's precision and coverage at every threshold, by hand."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.agreement_ceiling import ceiling_curve


def test_precision_and_coverage_strictest_first_ties_accepted_together():
    # tasks (score, agreed boxes, correct): (0.9, 2, 2), (0.8, 1, 1), (0.8, 2, 1), (0.5, 3, 2); 10 true boxes
    out = ceiling_curve(np.array([0.8, 0.9, 0.5, 0.8]), np.array([1, 2, 3, 2]), np.array([1, 2, 2, 1]), 10)
    assert out["thresholds"] == [0.9, 0.8, 0.5]
    assert out["precision"] == pytest.approx([2 / 2, 4 / 5, 6 / 8])
    assert out["coverage"] == pytest.approx([0.2, 0.5, 0.8])
    assert out["all_candidates"] == {"boxes": 8, "precision": pytest.approx(0.75), "coverage": pytest.approx(0.8)}
    assert out["best_coverage_at_target_precision"] == pytest.approx(0.2)  # only the strictest reaches 0.98
    assert out["best_precision_at_target_coverage"] == pytest.approx(0.8)


def test_no_candidates_reach_nothing():
    out = ceiling_curve(np.zeros(0), np.zeros(0, int), np.zeros(0, int), 50)
    assert out["thresholds"] == [] and out["all_candidates"]["boxes"] == 0
    assert out["best_coverage_at_target_precision"] == 0.0 and out["best_precision_at_target_coverage"] is None
