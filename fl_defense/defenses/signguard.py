"""SignGuard (Xu, Huang, Song and Lai, "Byzantine-robust Federated Learning through Collaborative
Malicious Gradient Filtering", ICDCS 2022)."""

from __future__ import annotations

import numpy as np
import torch

from ..updates import RoundUpdates
from .aggregators import uses_numpy
from .base import Defense, DefenseResult, RunKey
from .rflbat import one_thread
from .sampling import SeededGenerator, sample_columns

GATHER_COLUMNS = 1 << 16  # columns gathered at a time for the sign counts


def sign_statistics(u: torch.Tensor, cols: np.ndarray, backend: str | None = None) -> np.ndarray:
    """Per row, the fractions of positive, zero and negative entries among the columns ``cols``
    (an n x 3 float64 array), gathered a piece at a time. On the CPU row by row through numpy
    (a take from one contiguous row, then two counts), several times faster than torch's
    gather of strided columns and its boolean sums; the counts are the same integers
    (``backend="torch"`` forces the path other devices take)."""
    n = u.shape[0]
    if uses_numpy(u, backend):
        x = u.detach().numpy()
        counts = np.zeros((n, 2))
        for i in range(n):
            g = x[i].take(cols)
            counts[i] = np.count_nonzero(g > 0), np.count_nonzero(g < 0)
        k = max(1, len(cols))
        pos, neg = counts[:, 0] / k, counts[:, 1] / k
        return np.stack([pos, 1.0 - pos - neg, neg], axis=1)
    pos = torch.zeros(n, dtype=torch.float64, device=u.device)
    neg = torch.zeros(n, dtype=torch.float64, device=u.device)
    for start in range(0, len(cols), GATHER_COLUMNS):
        idx = torch.as_tensor(cols[start:start + GATHER_COLUMNS], device=u.device)
        x = u.index_select(1, idx)
        pos += (x > 0).sum(dim=1)
        neg += (x < 0).sum(dim=1)
    k = max(1, len(cols))
    pos, neg = pos.cpu().numpy() / k, neg.cpu().numpy() / k
    return np.stack([pos, 1.0 - pos - neg, neg], axis=1)


def largest_meanshift_cluster(features: np.ndarray) -> np.ndarray:
    """The boolean mask of the largest MeanShift cluster (scikit-learn; bandwidth by
    ``estimate_bandwidth`` at quantile 0.5 over all rows, bin seeding, points far from every
    mode left unassigned, as the authors' code)."""
    from sklearn.cluster import MeanShift, estimate_bandwidth

    n = len(features)
    if n < 2:
        return np.ones(n, dtype=bool)
    bandwidth = estimate_bandwidth(features, quantile=0.5)
    if not bandwidth > 1e-12:  # (nearly) identical statistics: one cluster
        return np.ones(n, dtype=bool)
    with one_thread():
        labels = MeanShift(bandwidth=bandwidth, bin_seeding=True, cluster_all=False).fit(features).labels_
    clusters, counts = np.unique(labels[labels >= 0], return_counts=True)
    if not len(clusters):
        return np.ones(n, dtype=bool)
    return labels == clusters[np.argmax(counts)]


class SignGuard(SeededGenerator, Defense):
    """SignGuard, Xu et al., ICDCS 2022 (sec. IV, Algorithm 1).

    1. Norm filter: with M the median of the updates' L2 norms, S1 = {i : ``lower`` <=
       ||g_i|| / M <= ``upper``} (L = 0.1, R = 3 in the paper).
    2. Sign clustering: on a random ``coordinate_fraction`` of the coordinates (10% in the
       paper; drawn from a generator seeded with ``seed`` and checkpointed), each update's sign
       statistics (fractions of positive, zero and negative entries) are clustered by MeanShift;
       S2 is the largest cluster.
    3. The admitted set is S1 intersected with S2; everyone else is flagged.
    4. Each admitted update is clipped to norm M and the clipped updates are averaged (plainly,
       as in the paper).
    """

    name = "signguard"
    paper = "Xu et al., ICDCS 2022"
    detects = True
    run_config = {
        "lower": RunKey("SignGuard: lower bound L of the norm filter (times the median norm)", check=lambda v: v >= 0),
        "upper": RunKey("SignGuard: upper bound R of the norm filter (times the median norm)", check=lambda v: v > 0),
        "coordinate_fraction": RunKey("SignGuard: share of coordinates the sign statistics use",
                                      check=lambda v: 0 < v <= 1),
    }

    def __init__(self, lower: float = 0.1, upper: float = 3.0, coordinate_fraction: float = 0.1,
                 seed: int = 0) -> None:
        self.lower = lower
        self.upper = upper
        self.coordinate_fraction = coordinate_fraction
        self.seed = seed

    def validate(self) -> None:
        if not 0 <= self.lower < self.upper:
            raise ValueError(f"need 0 <= lower < upper, got lower={self.lower}, upper={self.upper}")
        if not 0 < self.coordinate_fraction <= 1:
            raise ValueError(f"coordinate_fraction must be in (0, 1], got {self.coordinate_fraction}")

    def aggregate(self, global_params: torch.Tensor, round_updates: RoundUpdates) -> DefenseResult:
        ru = round_updates
        norms = torch.linalg.vector_norm(ru.updates, dim=1).cpu().double()
        bound = float(norms.median()) if ru.n % 2 else float(norms.sort().values[ru.n // 2 - 1:ru.n // 2 + 1].mean())
        ratio = norms / bound if bound > 0 else torch.ones_like(norms)
        by_norm = ((ratio >= self.lower) & (ratio <= self.upper)).numpy()
        cols = sample_columns(self._rng(), ru.d, max(1, int(round(self.coordinate_fraction * ru.d))))
        stats = sign_statistics(ru.updates, cols)
        by_sign = largest_meanshift_cluster(stats)
        admitted = torch.as_tensor(by_norm & by_sign, device=ru.device)
        if not admitted.any():
            return DefenseResult(params=global_params.clone(), weights=torch.zeros(ru.n, device=ru.device),
                                 flagged=~admitted, info={"norm-bound": bound})
        scale = torch.clamp(bound / norms.clamp_min(1e-30), max=1.0).to(ru.device, ru.updates.dtype)
        w = admitted.to(ru.updates.dtype) / admitted.sum()
        return DefenseResult(params=global_params + (w * scale) @ ru.updates, weights=w, flagged=~admitted,
                             info={"norm-bound": bound, "sign-statistics": stats.tolist(),
                                   "norm-filter": by_norm.tolist(), "sign-filter": by_sign.tolist()})
