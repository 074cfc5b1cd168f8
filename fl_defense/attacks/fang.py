"""Local model poisoning attacks on Byzantine-robust FL: Fang, Cao, Jia & Gong, USENIX Security 2020."""

from __future__ import annotations

import math

import numpy as np
import torch

from .base import AttackRound, ColludingAttack, check_target, column_pass, column_stats, krum_picks_candidate


def krum_lambda_bound(gram_benign: torch.Tensor, num_clients: int, num_attackers: int, dim: int) -> float:
    """The upper bound on lambda (sec. 3.3, "Attacking Krum"):
    1/((n - 2c - 1) sqrt(d)) min_i sum_{l in Gamma_i} D(w_l, w_i) + 1/sqrt(d) max_i D(w_i, w_Re),
    over benign i, Gamma_i the n - c - 2 benign models nearest to w_i, D the Euclidean distance;
    in update space D(w_i, w_Re) = ||delta_i||."""
    k = gram_benign.shape[0]
    sq = gram_benign.diagonal()
    dist = (sq[:, None] + sq[None, :] - 2 * gram_benign).clamp_min(0).sqrt()
    near = max(0, min(num_clients - num_attackers - 2, k - 1))
    nearest = dist.sort(dim=1).values[:, 1:near + 1].sum(dim=1)  # column 0 is the row itself
    denom = max(1, num_clients - 2 * num_attackers - 1)
    return float(nearest.min() / (denom * math.sqrt(dim)) + sq.clamp_min(0).sqrt().max() / math.sqrt(dim))


def _sign(stats: dict):
    mean = stats["mean"]
    return np.sign(mean) if isinstance(mean, np.ndarray) else torch.sign(mean)


class Fang(ColludingAttack):
    """Fang et al. (USENIX Security 2020, sec. 3): directed deviation against the direction s the
    global model would move in without attack (s = sign of the known benign updates' mean).

    ``target="krum"`` (sec. 3.3): every attacker sends -lambda * s, lambda from
    ``krum_lambda_bound`` halved until Krum (f = m, over the benign updates the attackers can
    stand in for) selects it or lambda falls below ``threshold`` (the c - 1 other crafted models
    are within epsilon = 0 of it). ``target`` "trimmed_mean", "median" or "agnostic" (sec. 3.4;
    the same attack serves median): per coordinate each attacker samples beyond the benign
    extreme on the far side of s, in [w_max, b w_max] (w_max > 0; else [w_max, w_max / b]) where
    s_j = -1 and [w_min / b, w_min] (w_min > 0; else [b w_min, w_min]) where s_j = 1, b = ``b``.
    With partial knowledge the extremes are estimated as the paper does from the attackers' own
    honest updates: samples in [mu + 3 sigma, mu + 4 sigma] or [mu - 4 sigma, mu - 3 sigma].
    Applied to updates (what the server aggregates), so the intervals are relative to the current
    global model rather than to zero parameters."""

    name = "fang"
    paper = "Fang et al., USENIX Security 2020"
    targets = ("agnostic", "krum", "trimmed_mean", "median")

    def __init__(self, target: str = "agnostic", b: float = 2.0, threshold: float = 1e-5) -> None:
        self.target = target
        self.b = b
        self.threshold = threshold
        self.last_lambda: float | None = None

    def craft(self, known: torch.Tensor, rnd: AttackRound) -> torch.Tensor:
        check_target(self, self.target)
        if self.target == "krum":
            return self._krum(known, rnd)
        partial = rnd.knowledge == "partial"
        stats = column_stats(known, std=partial, extremes=not partial)  # one pass
        return self._trim(known, stats, torch.sign(stats["mean"]), rnd)

    def _krum(self, known: torch.Tensor, rnd: AttackRound) -> torch.Tensor:
        # one pass: s = sign(mu) piece by piece, and over the benign stand-ins B s and their Gram
        rows = rnd.benign_rows(len(known))
        out = column_pass(known, direction=_sign, gram=True, rows=rows)
        s, gram = out["p"], out["gram"]
        lam = krum_lambda_bound(gram, rnd.num_clients, rnd.num_attackers, known.shape[1])
        # ||-lam s - b_i||^2 = lam^2 ||s||^2 + 2 lam s.b_i + ||b_i||^2: O(n^2) per lambda, no pass
        sb = out["bp"].double()
        ss, sq = float(s.double().square().sum()), gram.diagonal()
        while lam >= self.threshold:
            if krum_picks_candidate(gram, (lam * lam * ss + 2 * lam * sb + sq).clamp_min(0),
                                    rnd.num_attackers, rnd.num_attackers):
                break
            lam /= 2
        self.last_lambda = lam
        return s.mul_(-lam)

    def _trim(self, known: torch.Tensor, stats: dict, s: torch.Tensor, rnd: AttackRound) -> torch.Tensor:
        up = s < 0  # the benign step would lower this coordinate: push it up
        if rnd.knowledge == "partial":
            mean, std = stats["mean"], stats["std"]
            near = torch.where(up, mean + 3 * std, mean - 4 * std)
            far = torch.where(up, mean + 4 * std, mean - 3 * std)
            lo, hi = near, far
        else:
            w_min, w_max = stats["min"], stats["max"]
            b = self.b
            lo = torch.where(up, w_max, torch.where(w_min > 0, w_min / b, b * w_min))
            hi = torch.where(up, torch.where(w_max > 0, b * w_max, w_max / b), w_min)
        # numpy's generator: twice torch's seeded one on the CPU for the m x d draws
        u = np.random.default_rng(rnd.seed).random((rnd.num_attackers, known.shape[1]), dtype=np.float32)
        u = torch.from_numpy(u).to(known.device, known.dtype)
        return u.mul_(hi - lo).add_(lo)
