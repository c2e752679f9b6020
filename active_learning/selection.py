"""Batch selection: acquisition by strategy, a pool of the best few × budget, diversity inside the pool,
and a random control slice so users can always see whether active learning is paying off."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from active_learning.diversity import k_center_greedy, typical_per_cluster


class Strategy(StrEnum):
    RANDOM = "random"
    UNCERTAINTY = "uncertainty"
    DISAGREEMENT = "disagreement"
    HYBRID = "hybrid"


@dataclass(frozen=True)
class SelectionConfig:
    strategy: Strategy = Strategy.HYBRID
    budget: int = 20
    weights: dict[str, float] = field(default_factory=lambda: {"uncertainty": 0.5, "disagreement": 0.5})
    pool_factor: float = 4.0  # diversity chooses among the top pool_factor × budget
    control_fraction: float = 0.1  # share of the budget picked at random, marked as control
    cold_start_labels: int = 0  # below this many labeled images, pick typical images instead
    seed: int = 0

    def __post_init__(self) -> None:
        """Refused here, before any image is fetched: these values would fail (or overspend) only at the end."""
        problems = [text for bad, text in (
            (self.budget < 1, f"budget must be at least 1 (got {self.budget})"),
            (not 0 <= self.control_fraction <= 1, f"control must be between 0 and 1 (got {self.control_fraction})"),
            (self.pool_factor < 1, f"pool factor must be at least 1 (got {self.pool_factor})"),
            (self.cold_start_labels < 0, f"cold start must be 0 or more (got {self.cold_start_labels})"),
            (any(w < 0 for w in self.weights.values()), f"weights must be 0 or more (got {self.weights})"),
            (self.strategy is Strategy.HYBRID and not any(w > 0 for w in self.weights.values()),
             "hybrid needs a weight above 0 for uncertainty or disagreement"),
        ) if bad]
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class Selection:
    indices: np.ndarray  # into the candidate arrays, in queue order
    acquisition: np.ndarray  # (N,) the score each candidate was ranked by
    control: np.ndarray  # (len(indices),) True for the random control slice
    mode: str  # what actually ran, e.g. "hybrid+k-center", "typicality (cold start)"


def acquisition(
    strategy: Strategy,
    uncertainty: np.ndarray | None,
    disagreement: np.ndarray | None,
    weights: dict[str, float],
    rng: np.random.Generator,
    n: int,
) -> tuple[np.ndarray, str]:
    """The per-image value to rank by; falls back (and says so) when a signal is missing."""
    if strategy is Strategy.RANDOM:
        return rng.random(n), "random"
    if strategy is Strategy.UNCERTAINTY or (strategy is Strategy.DISAGREEMENT and disagreement is None):
        if uncertainty is None:
            raise ValueError("no uncertainty scores: predictions are needed for this strategy")
        return np.asarray(uncertainty, float), "uncertainty" if strategy is Strategy.UNCERTAINTY else (
            "uncertainty (no second model for disagreement)"
        )
    if strategy is Strategy.DISAGREEMENT:
        return np.asarray(disagreement, float), "disagreement"
    parts = {"uncertainty": uncertainty, "disagreement": disagreement}
    present = {k: v for k, v in parts.items() if v is not None and weights.get(k, 0) > 0}
    if not present:
        raise ValueError("hybrid needs uncertainty or disagreement scores")
    total = sum(weights[k] for k in present)
    score = sum(weights[k] / total * np.asarray(v, float) for k, v in present.items())
    return score, "hybrid" if len(present) == 2 else f"hybrid ({', '.join(present)} only)"


def select(
    config: SelectionConfig,
    uncertainty: np.ndarray | None = None,
    disagreement: np.ndarray | None = None,
    embeddings: np.ndarray | None = None,
    labeled_embeddings: np.ndarray | None = None,
    num_labeled: int = 0,
) -> Selection:
    n = next((len(v) for v in (uncertainty, disagreement, embeddings) if v is not None), 0)
    rng = np.random.default_rng(config.seed)
    budget = min(config.budget, n)
    if budget == 0:
        return Selection(np.zeros(0, int), np.zeros(n), np.zeros(0, bool), "empty")

    n_control = int(round(budget * config.control_fraction)) if config.strategy is not Strategy.RANDOM else 0
    n_active = budget - n_control

    if config.strategy is not Strategy.RANDOM and num_labeled < config.cold_start_labels and embeddings is not None:
        scores = np.zeros(n)
        active = typical_per_cluster(embeddings, n_active, seed=config.seed)
        mode = "typicality (cold start)"
    else:
        scores, mode = acquisition(config.strategy, uncertainty, disagreement, config.weights, rng, n)
        order = np.argsort(-scores, kind="stable")
        if config.strategy is Strategy.RANDOM or embeddings is None:
            active = order[:n_active]
        else:
            # never more than half the candidates: in a small project a pool of everything lets diversity
            # alone decide, and tasks scoring 1.0 were passed over for ones scoring 0.05
            size = min(int(np.ceil(config.pool_factor * n_active)), n // 2)
            pool = order[: max(n_active, size)]
            picked = k_center_greedy(embeddings[pool], n_active, labeled=labeled_embeddings, seed=config.seed)
            active = pool[picked]
            active = active[np.argsort(-scores[active], kind="stable")]
            mode += "+k-center"

    rest = np.setdiff1d(np.arange(n), active, assume_unique=False)
    control = rng.choice(rest, size=min(n_control, len(rest)), replace=False) if n_control else np.zeros(0, int)
    indices = np.concatenate([active, control]).astype(int)
    flags = np.concatenate([np.zeros(len(active), bool), np.ones(len(control), bool)])
    return Selection(indices=indices, acquisition=scores, control=flags, mode=mode)
