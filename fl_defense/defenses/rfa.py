"""Robust federated aggregation by the geometric median (Pillutla, Kakade and Harchaoui, IEEE
Transactions on Signal Processing 70, 2022)."""

from __future__ import annotations

import torch

from ..updates import RoundUpdates
from .base import Defense, DefenseResult, no_flags, RunKey
from .krum import gram_matrix


def weiszfeld_coefficients(gram: torch.Tensor, alpha: torch.Tensor, nu: float, max_iter: int,
                           tol: float) -> tuple[torch.Tensor, list[float]]:
    """The smoothed Weiszfeld iterations over the points whose Gram matrix is ``gram`` (float64),
    with weights ``alpha`` (summing to 1). Every iterate is a convex combination v = c @ points,
    so ||v - w_i||^2 = c'Gc - 2 (Gc)_i + G_ii is known from the Gram matrix alone and the points
    are read once (for the Gram) whatever the number of iterations.

    Returns the final coefficients c and the objective sum_i alpha_i ||v - w_i|| at each iterate."""
    diag = gram.diagonal()

    def distances(c: torch.Tensor) -> torch.Tensor:
        gc = gram @ c
        return (c @ gc - 2 * gc + diag).clamp_min(0).sqrt()

    c = alpha.clone()  # v^(0): the weighted mean
    dist = distances(c)
    objective = [float(alpha @ dist)]
    for _ in range(max_iter):
        beta = alpha / dist.clamp_min(nu)
        c = beta / beta.sum()
        dist = distances(c)
        objective.append(float(alpha @ dist))
        if abs(objective[-2] - objective[-1]) <= tol * objective[-1]:
            break
    return c, objective


class RFA(Defense):
    """RFA, Pillutla et al., IEEE TSP 2022: the aggregate is the approximate weighted geometric
    median argmin_v sum_i alpha_i ||v - w_i|| of the updates, with alpha_i = n_i / sum n (the
    sample weights, eq. (3)), computed by the smoothed Weiszfeld algorithm (Algorithm 2): from
    v^(0) = sum_i alpha_i w_i, repeat beta_i = alpha_i / max(nu, ||v^(r) - w_i||),
    v^(r+1) = sum_i beta_i w_i / sum_i beta_i, at most ``max_iter`` times, stopping early once the
    objective changes by less than ``tol`` times its value (the stopping rule of the authors'
    released code, whose defaults nu = 1e-5, 4 iterations and 1e-6 are kept here).

    The distances come from the updates' Gram matrix (one pass over them; see
    ``weiszfeld_coefficients``), so they are exact up to float32 rounding relative to the
    updates' norms. Nobody is flagged; a client's weight is its share beta_i / sum beta in the
    final iterate, which is small for a far outlier.
    """

    name = "rfa"
    paper = "Pillutla et al., IEEE TSP 2022"
    run_config = {
        "nu": RunKey("RFA: smoothing nu of the Weiszfeld weights", check=lambda v: v > 0),
        "max_iter": RunKey("RFA: Weiszfeld iterations at most", check=lambda v: v >= 1),
        "tol": RunKey("RFA: stop when the objective improves by less than this (relative)", check=lambda v: v >= 0),
    }

    def __init__(self, nu: float = 1e-5, max_iter: int = 4, tol: float = 1e-6) -> None:
        self.nu = nu
        self.max_iter = max_iter
        self.tol = tol

    def validate(self) -> None:
        if not self.nu > 0:
            raise ValueError(f"nu (the Weiszfeld smoothing) must be > 0, got {self.nu}")
        if not isinstance(self.max_iter, int) or self.max_iter < 0:
            raise ValueError(f"max_iter must be an integer >= 0, got {self.max_iter!r}")
        if self.tol < 0:
            raise ValueError(f"tol must be >= 0, got {self.tol}")

    def aggregate(self, global_params: torch.Tensor, round_updates: RoundUpdates) -> DefenseResult:
        ru = round_updates
        alpha = ru.num_examples.to("cpu", torch.float64)
        alpha = alpha / alpha.sum()
        c, objective = weiszfeld_coefficients(gram_matrix(ru.updates).cpu(), alpha, self.nu, self.max_iter, self.tol)
        w = c.to(ru.device, ru.updates.dtype)
        return DefenseResult(params=global_params + w @ ru.updates, weights=w, flagged=no_flags(ru.n, ru.device),
                             info={"objective": objective})
