"""Min-Max and Min-Sum: Shejwalkar & Houmansadr, "Manipulating the Byzantine", NDSS 2021."""

from __future__ import annotations

import numpy as np
import torch

from .agr_tailored import RULES, TrimmedObjective, most_damaging_gamma, trim_count
from .base import AttackRound, ColludingAttack, Distances, check_target, column_pass, krum_picks_candidate, largest_feasible
from ..run_keys import RunKey

DIRECTIONS = ("unit", "std", "sign")


def perturbation(known: torch.Tensor, mean: torch.Tensor, kind: str) -> torch.Tensor:
    """The paper's perturbation vectors p (sec. IV-A): the inverse unit vector -mu / ||mu||, the
    inverse standard deviation -sigma, or the inverse sign -sign(mu)."""
    if kind == "unit":
        norm = torch.linalg.vector_norm(mean)
        return -mean / norm if norm > 0 else torch.zeros_like(mean)
    if kind == "std":
        return -column_pass(known, std=True)["std"]
    if kind == "sign":
        return -torch.sign(mean)
    raise ValueError(f"unknown perturbation {kind!r}; choose one of {DIRECTIONS}")


def _piecewise(kind: str):
    """p piece by piece from a piece's statistics; "unit" is -mu here, normalised after the pass."""
    if kind == "std":
        return lambda st: -st["std"]
    if kind == "sign":
        return lambda st: -(np.sign(st["mean"]) if isinstance(st["mean"], np.ndarray) else torch.sign(st["mean"]))
    if kind == "unit":
        return lambda st: -st["mean"]
    raise ValueError(f"unknown perturbation {kind!r}; choose one of {DIRECTIONS}")


def pass_with_direction(known: torch.Tensor, kind: str, gram: bool = False, norms: bool = False) -> tuple[dict, float]:
    """``column_pass`` for mu, p (of ``kind``), B p and the Gram or the row norms and B mu;
    returns it and ||p||^2."""
    out = column_pass(known, std=kind == "std", direction=_piecewise(kind), gram=gram, norms=norms)
    if kind == "unit":
        norm = float(torch.linalg.vector_norm(out["mean"].double()))
        if norm > 0:
            out["p"] /= norm
            out["bp"] = out["bp"] / norm
    return out, float(out["p"].double().square().sum())


class MinMax(ColludingAttack):
    """Min-Max (Shejwalkar & Houmansadr, NDSS 2021, eq. 6, Alg. 1): all attackers send
    mu + gamma * p, mu the mean of the benign updates they know and p a ``direction``, with the
    largest gamma (binary search, tolerance ``tol``) whose largest distance to a benign update
    stays within the largest distance between two benign ones. ``target="krum"`` is the same
    paper's Krum-tailored attack (sec. IV-B): the largest gamma Krum (f = m) still selects.
    Distances come from products computed once in one pass (``base.Distances``), never a pass
    per step.

    ``target`` "trimmed_mean" or "median" is the paper's AGR-tailored attack on them (sec. IV-A):
    the gamma that maximises ||mu - f_agr(m copies of mu + gamma p, benign updates)||, mu standing
    for the benign aggregate, found by Alg. 1's search (``agr_tailored.most_damaging_gamma``,
    gamma in (0, 2 gamma_init)). The benign updates are the others' with full knowledge, the
    attackers' own honest ones with partial (``AttackRound.benign_rows``, as the paper's partial
    knowledge). The trimmed mean cuts int(``trim_beta`` n) at each end of those n values, as
    ``defenses.TrimmedMean`` does (run-config key ``minmax-trim-beta``); ``trim_beta`` None or 0 is
    the paper's assumption that it cuts as many as there are attackers (beta = m / num_clients). One sort of the benign columns gives
    the few order statistics f depends on; each step of the search reads only those
    (``agr_tailored.TrimmedObjective``)."""

    name = "min_max"
    paper = "Shejwalkar & Houmansadr, NDSS 2021"
    run_config = {"direction": RunKey("min_max, min_sum: perturbation direction (inverse unit vector, std or sign)",
                                      key="minmax-direction", choices=DIRECTIONS),
                  "trim_beta": RunKey("min_max with attack-target=trimmed_mean: the share the attackers assume the "
                                      "trimmed mean cuts at each end (0: the paper's assumption, as many as there are "
                                      "attackers, beta = m / n; the defense's trim-beta for attackers that know it)",
                                      key="minmax-trim-beta", check=lambda v: 0.0 <= v < 0.5, default=0.0)}
    targets = ("agnostic", "krum", "trimmed_mean", "median")

    def __init__(self, direction: str = "std", target: str = "agnostic", gamma_init: float = 10.0,
                 tol: float = 1e-5, trim_beta: float | None = None) -> None:
        self.direction = direction
        self.target = target
        self.gamma_init = gamma_init
        self.tol = tol
        self.trim_beta = trim_beta  # 0 or None: the paper's m / n
        self.last_gamma: float | None = None

    @classmethod
    def check(cls, cfg) -> tuple[str, str] | None:
        """The base's target check; ``minmax-trim-beta`` is read only where the attack is tailored to
        the trimmed mean (Min-Sum, which targets no rule, never reads it)."""
        problem = super().check(cfg)
        if problem is None and cfg.value("minmax-trim-beta") and cfg.attack_target != "trimmed_mean":
            return "minmax-trim-beta", (f"only model-poisoning=min_max with attack-target=trimmed_mean reads it, not "
                                        f"model-poisoning={cfg.model_poisoning} with attack-target={cfg.attack_target}")
        return problem

    def _setup(self, known: torch.Tensor):
        out, pp = pass_with_direction(known, self.direction, gram=True)
        return out["mean"], out["p"], Distances(out["gram"], out["bp"], pp)

    def feasible(self, dist: Distances, rnd: AttackRound, known: torch.Tensor):
        if self.target == "krum":
            rows = rnd.benign_rows(len(known))
            gram_b = dist.gram[rows, rows]
            return lambda g: krum_picks_candidate(gram_b, dist.at(g)[rows], rnd.num_attackers, rnd.num_attackers)
        bound = _pairwise_max(dist.gram)
        return lambda g: float(dist.at(g).max()) <= bound

    def objective(self, known: torch.Tensor, rnd: AttackRound) -> tuple[torch.Tensor, torch.Tensor, TrimmedObjective]:
        """mu, p and the AGR-tailored objective of ``target`` "trimmed_mean" or "median"."""
        out, _ = pass_with_direction(known, self.direction)
        benign = known[rnd.benign_rows(len(known))]
        num_values = len(benign) + rnd.num_attackers
        cut = trim_count(self.target, num_values, rnd.num_attackers, rnd.num_clients, self.trim_beta or None)
        return out["mean"], out["p"], TrimmedObjective.build(benign, rnd.num_attackers, cut, out["mean"], out["p"])

    def craft(self, known: torch.Tensor, rnd: AttackRound) -> torch.Tensor:
        check_target(self, self.target)
        if self.target in RULES:
            mean, p, objective = self.objective(known, rnd)
            self.last_gamma = most_damaging_gamma(objective, self.gamma_init, self.tol)
            return mean.add_(p, alpha=self.last_gamma)
        mean, p, dist = self._setup(known)
        if dist.pp == 0:  # no direction (the std of one known update is 0): every gamma sends mu
            self.last_gamma = 0.0
            return mean
        gamma = largest_feasible(self.feasible(dist, rnd, known), self.gamma_init, self.tol)
        self.last_gamma = gamma
        return mean.add_(p, alpha=gamma)


class MinSum(MinMax):
    """Min-Sum (Shejwalkar & Houmansadr, NDSS 2021, eq. 7): as Min-Max, but the sum of squared
    distances from mu + gamma p to the benign updates must stay within the largest such sum of
    a benign update. Both sums need only the row norms, B mu and B p (the same single pass): no
    Gram."""

    name = "min_sum"
    targets = ("agnostic",)

    def __init__(self, direction: str = "std", target: str = "agnostic", gamma_init: float = 10.0,
                 tol: float = 1e-5) -> None:
        super().__init__(direction, target, gamma_init, tol)

    def _setup(self, known: torch.Tensor):
        out, pp = pass_with_direction(known, self.direction, norms=True)
        mean = out["mean"]
        mu_sq = float(mean.double().square().sum())
        return mean, out["p"], _SumDistances(out["sq"].double(), out["bmu"].double(), mu_sq, out["bp"], pp)

    def feasible(self, dist: "_SumDistances", rnd: AttackRound, known: torch.Tensor):
        bound = dist.max_benign_sum()
        return lambda g: float(dist.at(g).sum()) <= bound


def _pairwise_max(gram: torch.Tensor) -> float:
    sq = gram.diagonal()
    return float((sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0).max())


class _SumDistances(Distances):
    """``Distances`` from row norms, B mu and B p instead of the Gram."""

    def __init__(self, sq: torch.Tensor, mu_b: torch.Tensor, mu_sq: float, bp: torch.Tensor, pp: float) -> None:
        self.sq, self.mu_b = sq, mu_b
        self.base = (sq - 2 * mu_b + mu_sq).clamp_min(0)
        bp = bp.double()
        self.cross = bp.mean() - bp
        self.pp = pp
        self.gram = None

    def max_benign_sum(self) -> float:
        """max_i sum_j ||b_i - b_j||^2 = max_i (k ||b_i||^2 - 2 k b_i.mu + sum_j ||b_j||^2)."""
        k = len(self.sq)
        return float((k * self.sq - 2 * k * self.mu_b + self.sq.sum()).max())
