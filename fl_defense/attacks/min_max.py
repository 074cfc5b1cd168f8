"""Min-Max and Min-Sum: Shejwalkar & Houmansadr, "Manipulating the Byzantine", NDSS 2021."""

from __future__ import annotations

import torch

from .alie import mean_std
from .base import (AttackRound, ColludingAttack, Distances, check_target, gram_matrix, krum_picks_candidate,
                   largest_feasible)

DIRECTIONS = ("unit", "std", "sign")


def perturbation(known: torch.Tensor, mean: torch.Tensor, kind: str) -> torch.Tensor:
    """The paper's perturbation vectors p (sec. IV-A): the inverse unit vector -mu / ||mu||, the
    inverse standard deviation -sigma, or the inverse sign -sign(mu)."""
    if kind == "unit":
        norm = torch.linalg.vector_norm(mean)
        return -mean / norm if norm > 0 else torch.zeros_like(mean)
    if kind == "std":
        return -mean_std(known)[1]
    if kind == "sign":
        return -torch.sign(mean)
    raise ValueError(f"unknown perturbation {kind!r}; choose one of {DIRECTIONS}")


class MinMax(ColludingAttack):
    """Min-Max (Shejwalkar & Houmansadr, NDSS 2021, eq. 6, Alg. 1): all attackers send
    mu + gamma * p, mu the mean of the benign updates they know and p a ``direction``, with the
    largest gamma (binary search, tolerance ``tol``) whose largest distance to a benign update
    stays within the largest distance between two benign ones. ``target="krum"`` is the same
    paper's Krum-tailored attack (sec. IV-B): the largest gamma Krum (f = m) still selects.
    Distances come from products computed once (``base.Distances``), never a pass per step."""

    name = "min_max"
    paper = "Shejwalkar & Houmansadr, NDSS 2021"
    targets = ("agnostic", "krum")

    def __init__(self, direction: str = "std", target: str = "agnostic", gamma_init: float = 10.0,
                 tol: float = 1e-5) -> None:
        self.direction = direction
        self.target = target
        self.gamma_init = gamma_init
        self.tol = tol
        self.last_gamma: float | None = None

    def _setup(self, known: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Distances]:
        check_target(self, self.target)
        mean = known.mean(dim=0)
        p = perturbation(known, mean, self.direction)
        gram = gram_matrix(known)
        if self.direction == "unit":  # B p = -(B mu) / ||mu||, and B mu is the Gram's row mean
            norm = float(gram.mean().clamp_min(0).sqrt())
            dist = _unit_distances(gram, norm)
        else:
            dist = Distances(known, gram, p)
        return mean, p, dist

    def feasible(self, dist: Distances, rnd: AttackRound, known: torch.Tensor):
        if self.target == "krum":
            rows = slice(rnd.num_attackers, None) if len(known) > rnd.num_attackers else slice(0, rnd.num_attackers)
            gram_b = dist.gram[rows, rows]
            return lambda g: krum_picks_candidate(gram_b, dist.at(g)[rows], rnd.num_attackers, rnd.num_attackers)
        bound = _pairwise_max(dist.gram)
        return lambda g: float(dist.at(g).max()) <= bound

    def craft(self, known: torch.Tensor, rnd: AttackRound) -> torch.Tensor:
        mean, p, dist = self._setup(known)
        gamma = largest_feasible(self.feasible(dist, rnd, known), self.gamma_init, self.tol)
        self.last_gamma = gamma
        return mean.add_(p, alpha=gamma)


class MinSum(MinMax):
    """Min-Sum (Shejwalkar & Houmansadr, NDSS 2021, eq. 7): as Min-Max, but the sum of squared
    distances from mu + gamma p to the benign updates must stay within the largest such sum of
    a benign update. Both sums expand into row norms and B mu (one product): no Gram needed."""

    name = "min_sum"
    targets = ("agnostic",)

    def _setup(self, known: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Distances]:
        check_target(self, self.target)
        mean = known.mean(dim=0)
        p = perturbation(known, mean, self.direction)
        return mean, p, _RowDistances(known, mean, p)

    def feasible(self, dist: "_RowDistances", rnd: AttackRound, known: torch.Tensor):
        bound = dist.max_benign_sum()
        return lambda g: float(dist.at(g).sum()) <= bound


def _pairwise_max(gram: torch.Tensor) -> float:
    sq = gram.diagonal()
    return float((sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0).max())


def _unit_distances(gram: torch.Tensor, mu_norm: float) -> Distances:
    """``Distances`` for p = -mu/||mu|| from the Gram alone: p.b_i = -(mu.b_i)/||mu||, ||p|| = 1."""
    dist = Distances.__new__(Distances)
    sq, mu_b, mu_sq = gram.diagonal(), gram.mean(dim=1), gram.mean()
    dist.base = (sq - 2 * mu_b + mu_sq).clamp_min(0)
    if mu_norm > 0:
        dist.cross = (mu_b - mu_sq) / mu_norm  # p.mu - p.b_i = (-||mu||^2 + mu.b_i) / ||mu||
        dist.pp = 1.0
    else:
        dist.cross, dist.pp = torch.zeros_like(sq), 0.0
    dist.gram = gram
    return dist


class _RowDistances(Distances):
    """Squared distances to mu + gamma p from row norms, B mu and B p (no Gram): Min-Sum's needs."""

    def __init__(self, known: torch.Tensor, mean: torch.Tensor, direction: torch.Tensor) -> None:
        both = torch.stack([mean, direction], dim=1)  # one pass over the matrix for B mu and B p
        prods = (known @ both).double().cpu()
        self.sq = torch.linalg.vector_norm(known, dim=1).double().cpu().square()
        mu_b, bp = prods[:, 0], prods[:, 1]
        mu_sq = float(mean.double().square().sum())
        self.base = (self.sq - 2 * mu_b + mu_sq).clamp_min(0)
        self.cross = float(mean.double() @ direction.double()) - bp
        self.pp = float(direction.double().square().sum())
        self.mu_b, self.mu_sq = mu_b, mu_sq
        self.gram = None

    def max_benign_sum(self) -> float:
        """max_i sum_j ||b_i - b_j||^2 = max_i (k ||b_i||^2 - 2 k b_i.mu + sum_j ||b_j||^2)."""
        k = len(self.sq)
        return float((k * self.sq - 2 * k * self.mu_b + self.sq.sum()).max())
