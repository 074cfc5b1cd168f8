"""FLAME (Nguyen et al., USENIX Security 2022)."""

from __future__ import annotations

import numpy as np
import torch

from ..updates import RoundUpdates
from .base import Defense, DefenseResult, SeededNoise, RunKey
from .krum import gram_matrix


class FLAME(SeededNoise, Defense):
    """FLAME, Nguyen et al., USENIX Security 2022 (sec. 4, Algorithm 1).

    1. Pairwise cosine distances between the clients' vectors (``cluster_on``: "updates" or the
       local "models"; ``layers``: "all" or only the "last" layer: public reimplementations
       disagree on both). HDBSCAN (scikit-learn) with min_cluster_size = n/2 + 1 and
       min_samples = 1; the majority cluster is admitted, everyone else (noise) is flagged.
    2. Adaptive clipping: S_t = median of all updates' L2 norms; each admitted update is scaled by
       min(1, S_t / ||delta_k||).
    3. The admitted clipped updates are averaged, and Gaussian noise with std ``noise_lambda *
       S_t`` is added (lambda = 0.001 for image classification in the paper).
    """

    name = "flame"
    paper = "Nguyen et al., USENIX Security 2022"
    detects = True
    run_config = {
        "noise_lambda": RunKey("FLAME: noise lambda (std = lambda * median norm)", key="flame-noise", check=lambda v: v >= 0),
        "cluster_on": RunKey("FLAME: cosine distances between updates or local models", choices=("updates", "models")),
        "layers": RunKey("FLAME: cluster on all layers or the last layer only", choices=("all", "last")),
    }

    def __init__(self, noise_lambda: float = 0.001, cluster_on: str = "updates", layers: str = "all",
                 seed: int = 0) -> None:
        self.noise_lambda = noise_lambda
        self.cluster_on = cluster_on
        self.layers = layers
        self.seed = seed

    def validate(self) -> None:
        if self.cluster_on not in ("updates", "models"):
            raise ValueError(f"cluster_on must be 'updates' or 'models', got {self.cluster_on!r}")
        if self.layers not in ("all", "last"):
            raise ValueError(f"layers must be 'all' or 'last', got {self.layers!r}")
        if self.noise_lambda < 0:
            raise ValueError("noise_lambda must be >= 0")

    def cluster(self, global_params: torch.Tensor, ru: RoundUpdates) -> np.ndarray:
        """HDBSCAN labels over the cosine distances (-1: noise)."""
        return self._cluster(global_params, ru)[0]

    def _cluster(self, global_params: torch.Tensor, ru: RoundUpdates) -> tuple[np.ndarray, torch.Tensor | None]:
        """The labels, and the updates' squared norms when the Gram was of the whole updates
        (its diagonal; else None), which spares clipping a pass over the matrix."""
        from sklearn.cluster import HDBSCAN

        x, g = ru.updates, global_params
        if self.layers == "last" and len(ru.layer_slices) > 1:
            cols = slice(ru.layer_slices[-2].start, None)  # last weight + bias
            x, g = x[:, cols], g[cols]
        gram = gram_matrix(x)
        sq_norms = gram.diagonal().clone() if x is ru.updates else None
        if self.cluster_on == "models":
            # (u_i + g).(u_j + g) from the updates' Gram matrix: no n x d matrix of models is built
            ug = (x @ g).double()
            gram = gram + ug[:, None] + ug[None, :] + float(g.double() @ g.double())
        norms = gram.diagonal().clamp_min(1e-24).sqrt()
        dist = (1 - gram / (norms[:, None] * norms[None, :])).clamp_min(0).cpu().numpy()
        np.fill_diagonal(dist, 0)
        if ru.n < 3:
            return np.zeros(ru.n, dtype=int), sq_norms
        return HDBSCAN(min_cluster_size=ru.n // 2 + 1, min_samples=1, metric="precomputed", copy=True,
                       allow_single_cluster=True).fit(dist).labels_, sq_norms

    def aggregate(self, global_params: torch.Tensor, round_updates: RoundUpdates) -> DefenseResult:
        ru = round_updates
        labels, sq_norms = self._cluster(global_params, ru)
        clusters, counts = np.unique(labels[labels >= 0], return_counts=True)
        admitted = labels == clusters[np.argmax(counts)] if len(clusters) else np.ones(ru.n, dtype=bool)
        adm = torch.as_tensor(admitted, device=ru.device)
        norms = torch.linalg.vector_norm(ru.updates, dim=1) if sq_norms is None else \
            sq_norms.clamp_min(0).sqrt().to(ru.updates.dtype)
        bound = norms.median()
        scale = torch.clamp(bound / norms.clamp_min(1e-12), max=1.0)
        w = adm.float() / adm.sum()
        step = (w * scale) @ ru.updates
        if self.noise_lambda > 0:
            step = step + self.noise_lambda * bound * self._noise(step.shape, step.device)
        return DefenseResult(params=global_params + step, weights=w, flagged=~adm,
                             info={"clusters": labels.tolist(), "clip-bound": float(bound)})
