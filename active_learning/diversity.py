"""Diversity over image embeddings: k-center greedy (core-set) and typicality for a cold start.

Embeddings are L2-normalised, so squared Euclidean distance is 2 − 2·cosine; everything is float32
matrix work so 100k × 512 fits in memory and in seconds.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import MiniBatchKMeans
from sklearn.neighbors import NearestNeighbors


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.clip(norms, 1e-12, None)


def _min_sq_dist(x: np.ndarray, centers: np.ndarray, chunk: int = 8192) -> np.ndarray:
    out = np.full(len(x), np.inf, dtype=np.float32)
    if len(centers) == 0:
        return out
    sq_x = (x * x).sum(1)
    for s in range(0, len(centers), chunk):
        c = centers[s : s + chunk]
        d = sq_x[:, None] + (c * c).sum(1)[None, :] - 2 * x @ c.T
        np.minimum(out, d.min(axis=1), out=out)
    return np.clip(out, 0, None)


def k_center_greedy(
    embeddings: np.ndarray, budget: int, labeled: np.ndarray | None = None, seed: int = 0
) -> np.ndarray:
    """Pick `budget` rows, each the farthest from everything labeled or already picked (Sener & Savarese)."""
    x = normalise(embeddings)
    n = len(x)
    budget = min(budget, n)
    if budget <= 0:
        return np.zeros(0, dtype=int)
    centers = normalise(labeled) if labeled is not None and len(labeled) else np.zeros((0, x.shape[1]), np.float32)
    dist = _min_sq_dist(x, centers)
    picked = np.empty(budget, dtype=int)
    sq_x = (x * x).sum(1)
    for k in range(budget):
        i = int(np.random.default_rng(seed).integers(n)) if not np.isfinite(dist).any() else int(np.argmax(dist))
        picked[k] = i
        d_new = sq_x + sq_x[i] - 2 * (x @ x[i])
        np.minimum(dist, np.clip(d_new, 0, None), out=dist)
        dist[i] = -1.0  # never twice
    return picked


def typicality(embeddings: np.ndarray, k: int = 20) -> np.ndarray:
    """Inverse mean distance to the k nearest neighbours (TypiClust): high in dense regions."""
    x = normalise(embeddings)
    k = min(k, len(x) - 1)
    if k < 1:
        return np.ones(len(x))
    dist, _ = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)
    return 1.0 / (dist[:, 1:].mean(axis=1) + 1e-8)


def typical_per_cluster(embeddings: np.ndarray, budget: int, seed: int = 0, k: int = 20) -> np.ndarray:
    """Cold start: cluster into `budget` groups and take the most typical image of each, largest first."""
    x = normalise(embeddings)
    budget = min(budget, len(x))
    if budget <= 0:
        return np.zeros(0, dtype=int)
    clusters = MiniBatchKMeans(n_clusters=budget, random_state=seed, n_init=3, batch_size=2048).fit_predict(x)
    picks = []
    sizes = np.bincount(clusters, minlength=budget)
    for c in np.argsort(-sizes):
        members = np.flatnonzero(clusters == c)
        if len(members) == 0:
            continue
        picks.append(int(members[np.argmax(typicality(x[members], k))]))
    return np.array(picks[:budget], dtype=int)
