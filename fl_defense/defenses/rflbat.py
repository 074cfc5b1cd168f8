"""RFLBAT (Wang, Xu and Fan, "RFLBAT: A Robust Federated Learning Algorithm against Backdoor
Attack", arXiv 2201.03772, 2022)."""

from __future__ import annotations

import numpy as np
import torch

from ..updates import RoundUpdates
from .base import Defense, DefenseResult, RunKey
from .krum import gram_matrix


def pca_2d_from_gram(gram: np.ndarray) -> np.ndarray:
    """The rows' coordinates on their first two principal components (n x 2), from their Gram
    matrix: the centred Gram H G H has eigenpairs (lambda_k, e_k) and the PCA scores are
    sqrt(lambda_k) e_k (up to each axis's sign, which no distance sees)."""
    n = len(gram)
    h = np.eye(n) - 1.0 / n
    vals, vecs = np.linalg.eigh(h @ gram @ h)
    top = np.argsort(vals)[::-1][:2]
    out = np.zeros((n, 2))
    out[:, :len(top)] = vecs[:, top] * np.sqrt(np.clip(vals[top], 0, None))
    return out


def distance_sum_outliers(points: np.ndarray, eps: float) -> np.ndarray:
    """Mask of points kept by RFLBAT's outlier rule: each point's summed Euclidean distance to
    the others, divided by the median of those sums, must be below ``eps``."""
    sums = np.linalg.norm(points[:, None] - points[None], axis=-1).sum(axis=1)
    med = np.median(sums)
    if not med > 0:
        return np.ones(len(points), dtype=bool)
    return sums / med < eps


def kmeans_calinski_harabasz(points: np.ndarray, k_max: int, seed: int) -> np.ndarray:
    """K-means labels with the number of clusters k in 2..k_max (and below the number of
    points) that maximises the Calinski-Harabasz index; one cluster when fewer than 3 points or
    all points coincide."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import calinski_harabasz_score

    m = len(points)
    distinct = len(np.unique(points.round(12), axis=0))
    if m < 3 or distinct < 2:
        return np.zeros(m, dtype=int)
    best, best_labels = -np.inf, np.zeros(m, dtype=int)
    with one_thread():  # a few dozen 2-D points: BLAS/OpenMP threads cost 10x the work
        for k in range(2, min(k_max, m - 1, distinct) + 1):
            labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(points).labels_
            if len(np.unique(labels)) < 2:
                continue
            score = calinski_harabasz_score(points, labels)
            if score > best:
                best, best_labels = score, labels
    return best_labels


def one_thread():
    try:
        from threadpoolctl import threadpool_limits

        return threadpool_limits(1)
    except ImportError:  # pragma: no cover
        from contextlib import nullcontext

        return nullcontext()


class RFLBAT(Defense):
    """RFLBAT, Wang et al. 2022 (Algorithm 1).

    1. PCA: the updates are projected onto their first two principal components.
    2. Outliers: a client whose summed Euclidean distance to the others (in the 2-D space),
       divided by the median of those sums, is at least ``eps1`` (10 in the paper) is removed.
    3. K-means over the remaining 2-D points, with the number of clusters (2..``k_max``) chosen by
       the Calinski-Harabasz index.
    4. Cluster selection: within each cluster of two or more, each member's mean cosine
       similarity (of the full updates) to the other members; the cluster whose median of these is
       lowest is selected (backdoor updates resemble each other more than honest ones do).
    5. A second outlier filter (threshold ``eps2``, 4 in the paper) inside the selected cluster,
       then the plain mean of the survivors. Everyone else is flagged.

    K-means is seeded with ``seed``. Like FDCR, the rule always keeps a single cluster, so it
    drops some honest clients even in rounds without attackers.
    """

    name = "rflbat"
    paper = "Wang et al., arXiv 2201.03772, 2022"
    detects = True
    run_config = {
        "eps1": RunKey("RFLBAT: first outlier threshold eps1", check=lambda v: v > 0),
        "eps2": RunKey("RFLBAT: second outlier threshold eps2", check=lambda v: v > 0),
        "k_max": RunKey("RFLBAT: largest number of K-means clusters tried", check=lambda v: v >= 2),
    }

    def __init__(self, eps1: float = 10.0, eps2: float = 4.0, k_max: int = 10, seed: int = 0) -> None:
        self.eps1 = eps1
        self.eps2 = eps2
        self.k_max = k_max
        self.seed = seed

    def validate(self) -> None:
        if not self.eps1 > 0 or not self.eps2 > 0:
            raise ValueError(f"eps1 and eps2 must be > 0, got {self.eps1}, {self.eps2}")
        if not isinstance(self.k_max, int) or self.k_max < 2:
            raise ValueError(f"k_max must be an integer >= 2, got {self.k_max!r}")

    def select(self, gram: np.ndarray) -> tuple[np.ndarray, dict]:
        """The admitted mask from the updates' Gram matrix, and what led to it."""
        n = len(gram)
        points = pca_2d_from_gram(gram)
        first = np.flatnonzero(distance_sum_outliers(points, self.eps1))
        labels = kmeans_calinski_harabasz(points[first], self.k_max, self.seed)
        norms = np.sqrt(np.clip(np.diag(gram), 0, None))
        cos = gram / np.maximum(np.outer(norms, norms), 1e-300)
        medians = {}
        for c in np.unique(labels):
            members = first[labels == c]
            if len(members) < 2:
                medians[int(c)] = np.inf
                continue
            sub = cos[np.ix_(members, members)]
            medians[int(c)] = float(np.median((sub.sum(axis=1) - np.diag(sub)) / (len(members) - 1)))
        chosen = min(medians, key=lambda c: (medians[c], c))
        cluster = first[labels == chosen]
        final = cluster[distance_sum_outliers(points[cluster], self.eps2)]
        admitted = np.zeros(n, dtype=bool)
        admitted[final] = True
        return admitted, {"pca": points.tolist(), "clusters": {int(k): v for k, v in medians.items()},
                          "first-filter": first.tolist()}

    def aggregate(self, global_params: torch.Tensor, round_updates: RoundUpdates) -> DefenseResult:
        ru = round_updates
        admitted, info = self.select(gram_matrix(ru.updates).cpu().numpy())
        adm = torch.as_tensor(admitted, device=ru.device)
        w = adm.to(ru.updates.dtype) / adm.sum()
        return DefenseResult(params=global_params + w @ ru.updates, weights=w, flagged=~adm, info=info)
