"""The auto-accept threshold, chosen so accepted labels are precise with a stated confidence.

Given agreement scores of human-verified items (regions or tasks) and whether each was right, every
candidate threshold t is a hypothesis H_t: "the false-accept rate of items scoring ≥ t exceeds 1 − target".
Each is tested with the exact one-sided Clopper–Pearson upper bound on that rate (scipy.stats.beta), in a
fixed sequence from strict to permissive, stopping at the first that cannot be rejected (Learn-then-Test,
Angelopoulos et al. 2021; fixed-sequence testing needs no multiplicity correction). The chosen threshold is
the most permissive one rejected, so with probability ≥ 1 − δ over the verified sample the precision of
what it accepts is ≥ target. The sequence starts at the strictest threshold that accepts enough items for
a zero-error sample to pass at all; it is read off the scores alone, never off which items were right.

With fewer verified items than that, or when even the strictest testable threshold fails, auto-accept stays
off (`threshold` None) and `needed` says how many more verified items would let it pass at the observed
error rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import beta


@dataclass(frozen=True)
class Calibration:
    threshold: float | None  # accept items scoring ≥ this; None: auto-accept stays off
    bound: float | None  # upper confidence bound on the false-accept rate at the threshold (1 - bound: precision)
    coverage: float  # share of the verified items the threshold accepts
    n_verified: int
    needed: int | None  # more verified items needed before auto-accept can turn on (None when on or unknown)
    reason: str
    target: float = 0.98
    delta: float = 0.05
    errors: int = 0  # false accepts among the verified items the threshold accepts
    accepted: int = 0

    @property
    def on(self) -> bool:
        return self.threshold is not None


def upper_bound(errors: np.ndarray | int, n: np.ndarray | int, delta: float) -> np.ndarray:
    """One-sided (1 − δ) Clopper–Pearson upper bound on an error rate from `errors` of `n`."""
    errors, n = np.asarray(errors, float), np.asarray(n, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        ub = beta.ppf(1 - delta, errors + 1, np.maximum(n - errors, 1e-12))
    return np.where(n <= 0, 1.0, np.where(errors >= n, 1.0, ub))


def by_threshold(scores: np.ndarray, *counts: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each distinct score, strictest first, and the running totals of each of `counts` over the items scoring
    at least that much: a threshold accepts every tie, so totals are read at the last of equal scores."""
    scores = np.asarray(scores, float)
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    last = np.r_[s[1:] != s[:-1], True] if len(s) else np.zeros(0, bool)
    return (s[last], *(np.cumsum(np.asarray(c)[order])[last] for c in counts))


def min_verified(target: float = 0.98, delta: float = 0.05) -> int:
    """Fewest accepted items with which even zero errors pass: (1 − α)^n ≤ δ, α = 1 − target."""
    return int(math.ceil(math.log(delta) / math.log(target)))


def _errors(rate: float, n: int) -> int:
    """Errors among n items at `rate`; 3/49·49 is 2.9999999999999996 in floats, and 3 errors are 3."""
    return math.floor(rate * n + 1e-9)


def needed_at(rate: float, target: float, delta: float, limit: int = 10**6, start: int = 0) -> int | None:
    """Fewest items at an observed error `rate` whose upper bound is ≤ 1 − target (None: the rate is too high).
    `start`: the items the rate was observed on; no fewer are counted, so the errors already seen are never
    rounded away (1 error in 15 was read as floor(14 / 15) = 0 errors in 14, hence "1 more")."""
    alpha = 1 - target
    if rate >= alpha:
        return None
    lo = hi = max(min_verified(target, delta), start)
    while upper_bound(_errors(rate, hi), hi, delta) > alpha:
        lo, hi = hi, hi * 2
        if hi > limit:
            return None
    while lo < hi:  # the bound is not monotone in n through floor(); the smallest passing power-of-2 bracket is enough
        mid = (lo + hi) // 2
        if upper_bound(_errors(rate, mid), mid, delta) <= alpha:
            hi = mid
        else:
            lo = mid + 1
    return hi


def calibrate(
    scores: np.ndarray,
    correct: np.ndarray,
    target: float = 0.98,
    delta: float = 0.05,
    min_n: int | None = None,
) -> Calibration:
    """Choose the most permissive threshold whose accepted items are ≥ `target` precise with prob. ≥ 1 − δ.

    Args:
        scores: (N,) agreement score of each verified item (higher = more likely right).
        correct: (N,) whether the human kept the item unchanged.
        target: the precision to guarantee (accepted items that are right).
        delta: the allowed probability that the guarantee fails.
        min_n: fewest verified items before testing at all; defaults to `min_verified(target, delta)`, below
            which no threshold could pass.

    Returns:
        The threshold (None when auto-accept must stay off), the bound at it, its coverage, and why.
    """
    scores, correct = np.asarray(scores, float).reshape(-1), np.asarray(correct, bool).reshape(-1)
    if len(scores) != len(correct):
        raise ValueError(f"{len(scores)} scores but {len(correct)} verdicts")
    if not 0 < target < 1 or not 0 < delta < 1:
        raise ValueError(f"target and delta must be in (0, 1) (got {target}, {delta})")
    alpha = 1 - target
    floor_n = min_verified(target, delta)
    min_n = max(min_n or floor_n, floor_n)
    n = len(scores)
    off = dict(threshold=None, bound=None, coverage=0.0, n_verified=n, target=target, delta=delta)
    if n < min_n:
        wrong = int((~correct).sum())
        if not wrong:
            return Calibration(**off, needed=min_n - n,
                               reason=f"auto-accept stays off: {n} verified item{'s' * (n != 1)}, "
                                      f"{min_n - n} more needed (at least {min_n} with no errors for "
                                      f"precision ≥ {target:g} at {1 - delta:.0%} confidence)")
        # errors already seen: "N more needed" counted as if none would come would mislead
        total = needed_at(wrong / n, target, delta, start=n)
        then = (f"{max(total, min_n) - n} more needed at that error rate" if total is not None else
                f"if the models keep erring at that rate, no number of verified items reaches precision ≥ "
                f"{target:g} (at least {min_n - n} more are needed in any case)")
        return Calibration(**off, needed=max(total or 0, min_n) - n,
                           reason=f"auto-accept stays off: {n} verified item{'s' * (n != 1)}, {wrong} of them "
                                  f"wrong (observed precision {1 - wrong / n:.3f}); {then}")
    thresholds, accepted, errors = by_threshold(scores, np.ones(n, int), ~correct)
    testable = accepted >= floor_n
    accepted, errors, thresholds = accepted[testable], errors[testable], thresholds[testable]
    bounds = upper_bound(errors, accepted, delta)
    passed = bounds <= alpha
    fails = np.flatnonzero(~passed)
    k = int(fails[0]) if len(fails) else len(passed)  # tests 0..k-1 pass in sequence
    if k == 0:
        rate = errors[0] / accepted[0]
        more = needed_at(rate, target, delta, start=int(accepted[0]))
        need = None if more is None else max(more - int(accepted[0]), 1)
        why = (f"{need} more verified items at the observed error rate" if need is not None
               else "the models' agreement is not precise enough at any threshold")
        return Calibration(**off, needed=need,
                           reason=f"auto-accept stays off: at the strictest testable threshold {thresholds[0]:.3g}, "
                                  f"{int(errors[0])} of {int(accepted[0])} verified items were wrong "
                                  f"(bound {bounds[0]:.3f} > {alpha:.3g}); {why}")
    i = k - 1
    return Calibration(threshold=float(thresholds[i]), bound=float(bounds[i]), coverage=float(accepted[i] / n),
                       n_verified=n, needed=None, target=target, delta=delta, errors=int(errors[i]),
                       accepted=int(accepted[i]),
                       reason=f"auto-accept at agreement ≥ {thresholds[i]:.3g}: {int(errors[i])} of {int(accepted[i])} "
                              f"verified items wrong, false-accept rate ≤ {bounds[i]:.3f} at {1 - delta:.0%} "
                              f"confidence (precision ≥ {1 - bounds[i]:.3f}), coverage {accepted[i] / n:.0%} of the agreed "
                              "verified items")


__all__ = ["Calibration", "by_threshold", "calibrate", "min_verified", "needed_at", "upper_bound"]
