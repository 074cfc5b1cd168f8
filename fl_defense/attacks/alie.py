"""A little is enough (ALIE): Baruch, Baruch & Goldberg, NeurIPS 2019."""

from __future__ import annotations

import math
from statistics import NormalDist

import torch

from ..run_keys import RunKey, non_negative
from .base import AttackRound, ColludingAttack, column_stats


def alie_z(num_clients: int, num_attackers: int) -> float:
    """The paper's z_max (sec. 3, Alg. 1 line 2): with s = floor(n/2 + 1) - m the supporters the
    attackers need among the benign clients, z_max = Phi^-1((n - s) / n). With an attacking
    majority (s < 1) the formula has no finite value; s is held at 1 there."""
    n, m = num_clients, num_attackers
    if n < 1 or m < 0:
        raise ValueError(f"ALIE needs n >= 1 clients and m >= 0 attackers, got n={n}, m={m}")
    s = max(1, math.floor(n / 2 + 1) - m)
    return NormalDist().inv_cdf((n - s) / n) if s < n else 0.0


def mean_std(known: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-coordinate mean and (sample) standard deviation of the known updates."""
    stats = column_stats(known, std=True)
    return stats["mean"], stats["std"]


class ALIE(ColludingAttack):
    """ALIE (Baruch et al., NeurIPS 2019, Alg. 1): every attacker sends mu_j + z * sigma_j per
    coordinate, mu and sigma over the updates it knows, z = ``z`` or, when 0, the paper's z_max
    for the round's n and m (``alie_z``): a shift each coordinate's benign spread hides."""

    name = "alie"
    paper = "Baruch et al., NeurIPS 2019"
    run_config = {"z": RunKey("alie, alie_backdoor: z in mean + z * std (0: the paper's z_max for n and m)",
                              check=non_negative)}

    def __init__(self, z: float = 0.0) -> None:
        self.z = z

    def z_for(self, rnd: AttackRound) -> float:
        return self.z if self.z > 0 else alie_z(rnd.num_clients, rnd.num_attackers)

    def craft(self, known: torch.Tensor, rnd: AttackRound) -> torch.Tensor:
        mean, std = mean_std(known)
        return mean.add_(std, alpha=self.z_for(rnd))


class ALIEBackdoor(ALIE):
    """ALIE's backdoor variant (Baruch et al., NeurIPS 2019, sec. 4, Alg. 2): each attacker trains
    on its poisoned data, then keeps its update inside the range the benign spread allows,
    mu_j - z sigma_j <= u_j <= mu_j + z sigma_j (clipped per coordinate). The paper's extra loss
    term pulling training towards that range needs mu and sigma before training; here they are
    known only after the round, so only the final clip applies."""

    name = "alie_backdoor"
    uses_poisoned = True

    def craft(self, known: torch.Tensor, rnd: AttackRound) -> torch.Tensor:
        if rnd.poisoned is None:
            raise ValueError("alie_backdoor needs the attackers' poisoned updates")
        mean, std = mean_std(known)
        z = self.z_for(rnd)
        return torch.clamp(rnd.poisoned, mean - z * std, mean + z * std)
