"""Coordinate-wise median and trimmed mean (Yin, Chen, Ramchandran and Bartlett, ICML 2018)."""

from __future__ import annotations

import torch

from ..updates import RoundUpdates
from .aggregators import coordinate_median, reduce_sorted_columns
from .base import Defense, DefenseResult, no_flags, RunKey


class Median(Defense):
    """Coordinate-wise median, Yin et al., ICML 2018 (Option I); numpy's median for even n."""

    name = "median"
    reference_free = True
    paper = "Yin et al., ICML 2018"

    def aggregate(self, global_params: torch.Tensor, round_updates: RoundUpdates) -> DefenseResult:
        step, w = coordinate_median(round_updates)
        return DefenseResult(params=global_params + step, weights=w, flagged=no_flags(round_updates.n, round_updates.device))


class TrimmedMean(Defense):
    """Coordinate-wise trimmed mean, Yin et al., ICML 2018 (Option II): per coordinate drop the
    int(beta * n) smallest and largest values and average the rest (scipy's trim_mean, as Flower)."""

    name = "trimmed_mean"
    reference_free = True
    paper = "Yin et al., ICML 2018"
    run_config = {"beta": RunKey("trimmed_mean: share cut at each end per coordinate", key="trim-beta",
                                 check=lambda v: 0 <= v < 0.5)}

    def __init__(self, beta: float = 0.2) -> None:
        self.beta = beta

    def validate(self) -> None:
        if not 0.0 <= self.beta < 0.5:
            raise ValueError(f"beta must be in [0, 0.5), got {self.beta}")

    def aggregate(self, global_params: torch.Tensor, round_updates: RoundUpdates) -> DefenseResult:
        n = round_updates.n
        cut = int(self.beta * n)
        step = reduce_sorted_columns(round_updates.updates, lambda s: s[cut:n - cut].mean(dim=0))
        return DefenseResult(params=global_params + step, weights=torch.full((n,), 1.0 / n),
                             flagged=no_flags(n, round_updates.device))
