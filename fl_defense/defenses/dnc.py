"""Divide-and-Conquer, DnC (Shejwalkar and Houmansadr, "Manipulating the Byzantine: Optimizing
Model Poisoning Attacks and Defenses for Federated Learning", NDSS 2021)."""

from __future__ import annotations

import numpy as np
import torch

from ..updates import RoundUpdates
from .base import Defense, DefenseResult, RunKey
from .sampling import SeededGenerator, sample_columns


def top_direction_scores(x: torch.Tensor) -> torch.Tensor:
    """Outlier scores s_i = <x_i - mu, v>^2 with mu the mean row and v the top right singular
    vector of the centred rows (float64). From the n x n Gram matrix of the centred rows: if
    (lambda, e) is its top eigenpair, the projections onto v are sqrt(lambda) e, so
    s = lambda e^2 without forming v."""
    c = x.double()
    c = c - c.mean(dim=0)
    vals, vecs = torch.linalg.eigh(c @ c.T)
    return vals[-1].clamp_min(0) * vecs[:, -1] ** 2


class DnC(SeededGenerator, Defense):
    """DnC, Shejwalkar and Houmansadr, NDSS 2021 (sec. VI, Algorithm 2).

    ``iterations`` times (niters): sample ``subsample_dim`` coordinates (b) at random, restrict
    the updates to them, centre them on their mean, take the top right singular vector v of the
    centred matrix and score each update by its squared projection s_i = <x_i - mu, v>^2; the
    n - floor(c m) lowest scores are good this time (c = ``filter_frac``, m =
    ``num_malicious``). The updates good in every iteration are averaged (sample-weighted
    among them); the others are flagged (when the good sets do not intersect, everyone is and
    the model stays where it is). Coordinates are drawn from a generator seeded with
    ``seed`` and checkpointed, so rows in any order get the same coordinates.
    """

    name = "dnc"
    paper = "Shejwalkar and Houmansadr, NDSS 2021"
    detects = True
    run_config = {
        "filter_frac": RunKey("DnC: filtering fraction c (removes c * num-malicious per iteration)", check=lambda v: v > 0),
        "iterations": RunKey("DnC: iterations niters", check=lambda v: v >= 1),
        "subsample_dim": RunKey("DnC: coordinates b sampled per iteration", check=lambda v: v >= 1),
    }

    def __init__(self, num_malicious: int = 0, filter_frac: float = 1.0, iterations: int = 5,
                 subsample_dim: int = 10_000, seed: int = 0) -> None:
        self.num_malicious = num_malicious
        self.filter_frac = filter_frac
        self.iterations = iterations
        self.subsample_dim = subsample_dim
        self.seed = seed

    def validate(self) -> None:
        if not isinstance(self.num_malicious, int) or self.num_malicious < 0:
            raise ValueError(f"num_malicious must be an integer >= 0, got {self.num_malicious!r}")
        if self.filter_frac < 0:
            raise ValueError(f"filter_frac must be >= 0, got {self.filter_frac}")
        if not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"iterations must be an integer >= 1, got {self.iterations!r}")
        if not isinstance(self.subsample_dim, int) or self.subsample_dim < 1:
            raise ValueError(f"subsample_dim must be an integer >= 1, got {self.subsample_dim!r}")

    def num_removed(self) -> int:
        return int(np.floor(self.filter_frac * self.num_malicious + 1e-9))

    def check_num_clients(self, n: int) -> None:
        if n - self.num_removed() < 1:
            raise ValueError(f"DnC removes floor(filter_frac * num_malicious) = {self.num_removed()} updates "
                             f"per iteration, the round has only {n}")

    def aggregate(self, global_params: torch.Tensor, round_updates: RoundUpdates) -> DefenseResult:
        ru = round_updates
        self.check_num_clients(ru.n)
        keep = ru.n - self.num_removed()
        good = torch.ones(ru.n, dtype=torch.bool)
        all_scores = []
        for _ in range(self.iterations):
            cols = torch.as_tensor(sample_columns(self._rng(), ru.d, self.subsample_dim), device=ru.device)
            scores = top_direction_scores(ru.updates.index_select(1, cols)).cpu()
            all_scores.append(scores.tolist())
            this = torch.zeros(ru.n, dtype=torch.bool)
            this[torch.argsort(scores, stable=True)[:keep]] = True
            good &= this
        good = good.to(ru.device)
        if not good.any():  # the iterations' good sets do not intersect: no update is trusted
            return DefenseResult(params=global_params.clone(), weights=torch.zeros(ru.n, device=ru.device),
                                 flagged=~good, info={"scores": all_scores})
        w = torch.where(good, ru.sample_weights, 0.0)
        w = w / w.sum()
        return DefenseResult(params=global_params + w @ ru.updates, weights=w, flagged=~good,
                             info={"scores": all_scores})
