"""Multi-metrics (Huang, Li, Chen, Shi and Gao, "Multi-metrics adaptively identifies backdoors in
Federated learning", ICCV 2023)."""

from __future__ import annotations

import numpy as np
import torch

from ..updates import RoundUpdates
from .aggregators import column_block_sums
from .base import Defense, DefenseResult, RunKey
from .krum import gram_matrix


SUB_BLOCK = 2048  # columns per sort inside a column block: 1.6x faster than a whole 4 MB block


def manhattan_row_sums(u: torch.Tensor) -> torch.Tensor:
    """sum_j ||u_i - u_j||_1 for every row i (float64), without the n^2 d pairwise pass.

    Per column, with the values sorted (s_0 <= ... <= s_{n-1}), the value at rank r is at
    distance sum_j |s_r - s_j| = (2r - n) s_r + T - 2 P_r from the others, where T is the
    column's total and P_r the sum of the values ranked below it. So one argsort per column (n log
    n) replaces n comparisons per value; the per-value sums go back to their rows by a bincount.
    Column blocks are shared out among the threads and totalled in block order.

    Tied values are at the same distance from the others whatever their order, so the order
    need not be stable (numpy's vectorised argsort, 4x faster than the stable one), and the
    sorted values come from a plain sort (faster than gathering them by the order)."""
    n = u.shape[0]
    coef = 2 * np.arange(n, dtype=np.float64) - n  # 2r - n

    def block(cols: slice) -> torch.Tensor:
        columns = np.ascontiguousarray(u[:, cols].detach().cpu().numpy().T)  # B x n: each column's values contiguous
        out = np.zeros(n)
        for start in range(0, len(columns), SUB_BLOCK):  # float64 temporaries that stay in cache
            t = columns[start:start + SUB_BLOCK]
            order = np.argsort(t, axis=1)
            t.sort(axis=1)
            below = t.astype(np.float64)
            for r in range(1, n):  # the prefix sums, rank by rank: 10x numpy's cumsum over short rows, same sums
                below[:, r] += below[:, r - 1]
            dist = coef * t
            dist += below[:, -1:]  # + T
            below -= t  # exclusive prefix sums P_r
            below *= 2
            dist -= below
            out += np.bincount(order.ravel(), weights=dist.ravel(), minlength=n)
        return torch.from_numpy(out)

    return column_block_sums(block, u, n).cpu()


def multi_metric_features(u: torch.Tensor) -> np.ndarray:
    """The n x 3 features: for each update, summed over the others, the squared cosine distance
    (1 - cos)^2, the Manhattan distance and the difference of L2 norms |‖g_i‖ - ‖g_j‖|."""
    gram = gram_matrix(u).cpu().numpy()
    norms = np.sqrt(np.clip(np.diag(gram), 0, None))
    cos = gram / np.maximum(np.outer(norms, norms), 1e-300)
    cos_dist = (1 - cos) ** 2
    np.fill_diagonal(cos_dist, 0)
    length = np.abs(norms[:, None] - norms[None, :]).sum(axis=1)
    return np.stack([cos_dist.sum(axis=1), manhattan_row_sums(u).numpy(), length], axis=1)


def whitened_scores(features: np.ndarray) -> np.ndarray:
    """x_i^T Sigma^-1 x_i with Sigma the features' sample covariance (the dynamic weighting: each
    metric counts in inverse proportion to its spread and correlation with the others). A
    singular covariance (constant or collinear metrics, n < 4) is pseudo-inverted."""
    if len(features) < 2:
        return np.zeros(len(features))
    inv = np.linalg.pinv(np.cov(features.T))
    return np.einsum("ij,jk,ik->i", features, inv, features)


class MultiMetrics(Defense):
    """Multi-metrics, Huang et al., ICCV 2023 (sec. 4: multi-metric features, dynamic weighting,
    scoring and selection).

    For each update g_i three metrics are summed over the other updates g_j: the cosine distance
    (angle), the Manhattan distance (which stays meaningful in high dimension where the
    Euclidean one does not) and the Euclidean length difference. Following the authors' released
    code the cosine term is squared, (1 - cos)^2, and the Euclidean term is the difference of the
    L2 norms |‖g_i‖ - ‖g_j‖|. The feature vectors x_i are whitened by their covariance Sigma
    across clients, score_i = x_i^T Sigma^-1 x_i, and the ``keep_fraction`` p of updates with the
    lowest scores (int(p n), at least one; p = 0.3 in the paper) are averaged with sample weights;
    the rest are flagged.

    The Manhattan sums come from one sort per coordinate (``manhattan_row_sums``); cosine and
    norms from the Gram matrix.
    """

    name = "multi_metrics"
    paper = "Huang et al., ICCV 2023"
    detects = True
    run_config = {"keep_fraction": RunKey("MultiMetrics: share p of clients kept (lowest scores)",
                                          check=lambda v: 0 < v <= 1)}

    def __init__(self, keep_fraction: float = 0.3) -> None:
        self.keep_fraction = keep_fraction

    def validate(self) -> None:
        if not 0 < self.keep_fraction <= 1:
            raise ValueError(f"keep_fraction must be in (0, 1], got {self.keep_fraction}")

    def aggregate(self, global_params: torch.Tensor, round_updates: RoundUpdates) -> DefenseResult:
        ru = round_updates
        features = multi_metric_features(ru.updates)
        scores = whitened_scores(features)
        keep = max(1, int(self.keep_fraction * ru.n))
        chosen = torch.as_tensor(np.argsort(scores, kind="stable")[:keep])
        kept = torch.zeros(ru.n, dtype=torch.bool)
        kept[chosen] = True
        kept = kept.to(ru.device)
        w = torch.where(kept, ru.sample_weights, 0.0)
        w = w / w.sum()
        return DefenseResult(params=global_params + w @ ru.updates, weights=w, flagged=~kept,
                             info={"features": features.tolist(), "scores": scores.tolist()})
