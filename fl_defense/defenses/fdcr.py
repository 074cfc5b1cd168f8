"""FDCR: Fisher Discrepancy Cluster and Rescale (Huang, Ye, Shi, Wan and Du, NeurIPS 2024)."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..updates import RoundUpdates
from .aggregators import column_block_sums, row_min_max
from .base import Defense, DefenseResult, RunKey

CLUSTERINGS = ("finch", "kmeans", "dbscan")


def minmax(x: torch.Tensor) -> torch.Tensor:
    """Row-wise min-max normalisation to [0, 1] (a constant row becomes 0)."""
    lo = x.min(dim=1, keepdim=True).values
    span = x.max(dim=1, keepdim=True).values - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1.0), torch.zeros_like(x))


def cluster_1d(values: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """Cluster labels of scalar values; every label is >= 0 (DBSCAN noise points become singletons)."""
    v = values.reshape(-1, 1).astype(np.float64)
    if method == "finch":
        from finch import FINCH

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            partitions, _, _ = FINCH(v, distance="euclidean", verbose=False)
        return np.asarray(partitions)[:, 0]  # the first, finest partition, as the paper
    if method == "kmeans":
        from sklearn.cluster import KMeans

        if len(np.unique(v)) < 2:
            return np.zeros(len(v), dtype=int)
        return KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(v)
    if method == "dbscan":
        from sklearn.cluster import DBSCAN

        eps = max(0.5 * float(np.median(v)), 1e-12)  # neighbours: within half the median discrepancy
        labels = DBSCAN(eps=eps, min_samples=2).fit_predict(v)
        noise = labels < 0
        labels[noise] = labels.max() + 1 + np.arange(int(noise.sum()))
        return labels
    raise ValueError(f"clustering must be one of {CLUSTERINGS}, got {method!r}")


class FDCR(Defense):
    """Fisher Discrepancy Cluster and Rescale, Huang et al., NeurIPS 2024 (sec. 3.2-3.3, eqs. (5)-(12),
    Algorithm 1).

    Clients ship the diagonal empirical Fisher F_k of their trained model on their own data.

    1. I_k = min-max normalisation of F_k (eq. 5) over the whole trainable vector (eq. 6).
    2. Importance-weighted update g_k = delta_k (.) I_k (eqs. 7-8; the paper divides delta_k by the
       local learning rate, which scales every V_k alike); aggregate g = sum_k alpha_k g_k with
       sample weights alpha_k = n_k / n (eq. 9a).
    3. Discrepancy V_k = ||g_k - g||_2 (the L2 distance of the authors' code; the paper's eq. 9b
       writes the mean squared difference, a monotone transform of it).
    4. FINCH on the scalars V_k, first (finest) partition (eq. 10); the cluster with the largest
       mean V is malicious: weight 0, flagged, the others' weights renormalised (eq. 11). A single
       cluster flags nobody.
    5. Fisher parameter rescaling: each benign update is scaled per coordinate by 2*sigmoid(I_k)
       (eq. 12; in [1, 1.46]: important coordinates count more) and the benign ones are averaged
       with the renormalised sample weights of eq. 11.

    When nobody is flagged (one cluster) the round is plain sample-weighted averaging, as in the
    authors' code. The authors' released server replaces attackers' Fisher with noise using the
    ground-truth attacker list; this implementation never sees ground truth and uses only what the
    clients reported. ``clustering`` ("finch", "kmeans", "dbscan") reruns the paper's ablation
    (table 1).
    """

    name = "fdcr"
    paper = "Huang et al., NeurIPS 2024"
    detects = True
    needs_fisher = True
    run_config = {
        "clustering": RunKey("FDCR: clustering of the Fisher discrepancies", choices=("finch", "kmeans", "dbscan")),
        "rescale": RunKey("FDCR: rescale the kept updates by 2 sigmoid(I_k) (eq. 12)"),
    }

    def __init__(self, clustering: str = "finch", rescale: bool = True, server_lr: float = 1.0) -> None:
        self.clustering = clustering
        self.rescale = rescale
        self.server_lr = server_lr

    def validate(self) -> None:
        if self.clustering not in CLUSTERINGS:
            raise ValueError(f"clustering must be one of {CLUSTERINGS}, got {self.clustering!r}")
        if not self.server_lr > 0:
            raise ValueError(f"server_lr must be > 0, got {self.server_lr}")

    def discrepancy(self, ru: RoundUpdates, keep_rescaled: bool = False) -> torch.Tensor:
        """V_k = ||g_k - mean_j g_j|| with g_k = I_k * delta_k (eqs. 7-9), where I_k is the
        min-max normalised Fisher (as F * 1/span - min/span; a constant row is 0). The mean and
        the squared norms are both per coordinate, so they are formed column block by column
        block (no second n x d matrix; blocks shared out among the threads, the per-block squared
        norms added in block order).

        ``keep_rescaled`` also writes sigmoid(I_k) * delta_k, the rescaled update of eq. 12 up to
        its factor 2, over ``ru.fisher`` (the round's workspace, read here for the last time), so
        the rescaled average is one product later instead of a second pass over both matrices."""
        lo, hi = row_min_max(ru.fisher)
        span = hi - lo
        inv = torch.where(span > 0, 1.0 / torch.where(span > 0, span, 1.0), 0.0)[:, None]
        shift = -lo[:, None] * inv
        w = ru.sample_weights

        def block(cols: slice) -> torch.Tensor:
            importance = torch.addcmul(shift, ru.fisher[:, cols], inv)
            delta = ru.updates[:, cols]
            if keep_rescaled:
                torch.mul(torch.sigmoid(importance), delta, out=ru.fisher[:, cols])
            g = importance.mul_(delta)
            g -= w @ g
            return torch.linalg.vector_norm(g, dim=1).double() ** 2

        return column_block_sums(block, ru.updates, ru.n).sqrt().to(torch.float32)

    def aggregate(self, global_params: torch.Tensor, round_updates: RoundUpdates) -> DefenseResult:
        if round_updates.fisher is None:
            raise ValueError("FDCR needs the clients' Fisher information")
        v = self.discrepancy(round_updates, keep_rescaled=self.rescale)
        alpha = round_updates.sample_weights
        flagged = torch.zeros(round_updates.n, dtype=torch.bool, device=round_updates.device)
        labels = np.zeros(round_updates.n, dtype=int)
        if round_updates.n >= 3:
            labels = cluster_1d(v.cpu().numpy(), self.clustering)
        if len(np.unique(labels)) > 1:
            means = {c: float(v[torch.as_tensor(labels == c)].mean()) for c in np.unique(labels)}
            evil = max(means, key=means.get)
            flagged = torch.as_tensor(labels == evil, device=round_updates.device)
            alpha = torch.where(flagged, 0.0, alpha)
            alpha = alpha / alpha.sum()
            if self.rescale:  # alpha @ (delta * 2 sigmoid(I)); the product is in the Fisher workspace now
                step = (2 * alpha) @ round_updates.fisher
            else:
                step = alpha @ round_updates.updates
        else:
            step = alpha @ round_updates.updates
        return DefenseResult(
            params=global_params + self.server_lr * step, weights=alpha, flagged=flagged,
            info={"discrepancy": v, "clusters": labels.tolist()},
        )
