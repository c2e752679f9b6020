"""The auto-accept guarantee: on synthetic verified items with a known error rate, the chosen threshold's true
precision meets the target in ≥ 1 − δ of repeated draws; with too few verified items it refuses."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import beta

from active_learning.calibration import calibrate, min_verified, needed_at, upper_bound

TARGET, DELTA = 0.98, 0.05


def error_rate(s):
    """P(wrong | score s): 30% at s = 0, falling to 0 at s = 1 (cubic)."""
    return 0.3 * (1 - s) ** 3


def true_precision(t):
    """Precision of items scoring ≥ t, scores ~ U(0, 1): 1 − mean error over [t, 1] = 1 − 0.3 (1 − t)^3 / 4."""
    return 1 - 0.3 * (1 - t) ** 3 / 4


def test_clopper_pearson_hand_values():
    # zero errors of n: the bound solves (1 - p)^n = δ
    assert upper_bound(0, 149, DELTA) == pytest.approx(1 - DELTA ** (1 / 149))
    assert upper_bound(3, 200, DELTA) == pytest.approx(beta.ppf(0.95, 4, 197))
    assert min_verified(TARGET, DELTA) == 149  # ln .05 / ln .98 = 148.3
    assert upper_bound(0, 148, DELTA) > 0.02 >= upper_bound(0, 149, DELTA)


def test_the_guarantee_holds_in_repeated_draws():
    rng = np.random.default_rng(0)
    met = on = 0
    draws = 400
    coverages = []
    for _ in range(draws):
        s = rng.random(600)
        correct = rng.random(600) >= error_rate(s)
        cal = calibrate(s, correct, TARGET, DELTA)
        if cal.on:
            on += 1
            coverages.append(cal.coverage)
            met += true_precision(cal.threshold) >= TARGET
        else:
            met += 1  # nothing accepted: no false accept
    assert met / draws >= 1 - DELTA
    assert on / draws > 0.5 and np.mean(coverages) > 0.2  # it is not vacuous: it accepts, and a useful share
    # the most permissive threshold with true precision ≥ .98 is t* = 1 - (0.08 / 0.3)^(1/3) ≈ 0.356: coverage ≤ .644
    assert max(coverages) <= 0.70


def test_a_biased_score_fails_as_it_should_not_pass():
    # the error rate does not depend on the score and is 5%: precision 0.95 < 0.98 at every threshold
    rng = np.random.default_rng(1)
    passed = sum(calibrate(s := rng.random(2000), rng.random(2000) >= 0.05).on for _ in range(200))
    assert passed / 200 <= DELTA


def test_too_few_verified_items_refuse_and_say_how_many_more():
    cal = calibrate(np.linspace(0.9, 1, 100), np.ones(100, bool))
    assert not cal.on and cal.threshold is None and cal.needed == 49
    assert "49 more needed" in cal.reason and "100 verified items" in cal.reason


def test_too_few_verified_items_with_errors_say_so():
    """12 agreed, 5 of them wrong: not "137 more needed" as if the next 137 would all be right."""
    correct = np.r_[np.ones(7, bool), np.zeros(5, bool)]
    cal = calibrate(np.linspace(0.5, 1, 12), correct)
    assert not cal.on and cal.needed == 137
    assert "12 verified items, 5 of them wrong (observed precision 0.583)" in cal.reason
    assert "no number of verified items reaches precision ≥ 0.98 (at least 137 more" in cal.reason
    few = calibrate(np.linspace(0.5, 1, 100), np.r_[np.ones(99, bool), False])  # 1 % wrong: reachable
    assert few.needed == needed_at(0.01, TARGET, DELTA) - 100 > 49
    assert f"1 of them wrong (observed precision 0.990); {few.needed} more needed at that error rate" in few.reason


def test_errors_at_the_strictest_threshold_refuse_with_a_count_at_that_rate():
    s = np.linspace(0, 1, 200)
    correct = np.ones(200, bool)
    correct[-2:] = False  # the two highest-scoring items are wrong: 2 of the top 149
    cal = calibrate(s, correct)
    assert not cal.on
    assert cal.needed == needed_at(2 / 149, TARGET, DELTA) - 149
    assert "2 of 149" in cal.reason


def test_all_right_accepts_everything():
    cal = calibrate(np.linspace(0, 1, 400), np.ones(400, bool))
    assert cal.on and cal.threshold == 0 and cal.coverage == 1 and cal.errors == 0
    assert cal.bound == pytest.approx(1 - DELTA ** (1 / 400))


def test_ties_are_accepted_together():
    s = np.r_[np.ones(300), np.zeros(100)]
    correct = np.r_[np.ones(300, bool), np.zeros(100, bool)]
    cal = calibrate(s, correct)
    assert cal.threshold == 1.0 and cal.accepted == 300 and cal.coverage == 0.75


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 600), p=st.floats(0, 0.2), seed=st.integers(0, 2**32 - 1))
def test_whenever_it_accepts_the_stated_bound_is_below_the_allowed_rate(n, p, seed):
    rng = np.random.default_rng(seed)
    s, correct = rng.random(n), rng.random(n) >= p
    cal = calibrate(s, correct)
    if cal.on:
        assert cal.bound <= 1 - TARGET
        accepted = s >= cal.threshold
        assert accepted.sum() == cal.accepted and (~correct[accepted]).sum() == cal.errors
        assert cal.coverage == pytest.approx(accepted.mean())
    else:
        assert cal.threshold is None and cal.coverage == 0
        if n < 149:  # exactly the floor with no errors; with errors, what the observed rate needs, at least that
            wrong = int((~correct).sum())
            total = needed_at(wrong / n, TARGET, DELTA, start=n) if wrong else None
            assert cal.needed == max(total or 0, 149) - n


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 400), wrong=st.integers(1, 20), target=st.sampled_from([0.6, 0.7, 0.8, 0.9, 0.95, 0.98]))
def test_the_items_needed_at_the_observed_rate_really_pass_and_no_fewer_do(n, wrong, target):
    """`needed_at(k/n, start=n)` is an N ≥ n at which floor(k/n·N) errors pass the bound (checked against
    scipy's beta directly); it never counts the errors already seen away, as 1 of 15 at target 0.8 once read
    as "1 more" (16 items with 1 error still bound 0.264 > 0.2). (The bound is not monotone in N through the
    floor, so the search takes the smallest passing N of the first doubling bracket that has one.)"""
    from scipy.stats import beta

    if wrong >= n:
        return
    got = needed_at(wrong / n, target, DELTA, start=n)
    if got is None:
        return

    def passes(m: int) -> bool:
        k = (wrong * m) // n  # exact integers
        return k >= wrong and beta.ppf(1 - DELTA, k + 1, m - k) <= 1 - target

    assert got >= n and passes(got)
    assert got == max(n, min_verified(target, DELTA)) or not passes(got - 1)  # the first of its passing run


def test_one_error_in_fifteen_at_target_08_needs_more_than_one_item():
    cal = calibrate(np.full(15, 0.9), np.arange(15) != 0, target=0.8)
    assert not cal.on and cal.needed == needed_at(1 / 15, 0.8, DELTA, start=15) - 15 > 1
    assert f"{cal.needed} more verified items at the observed error rate" in cal.reason


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="3 scores but 2"):
        calibrate(np.zeros(3), np.zeros(2, bool))
    with pytest.raises(ValueError, match="target and delta"):
        calibrate(np.zeros(3), np.zeros(3, bool), target=1.0)
