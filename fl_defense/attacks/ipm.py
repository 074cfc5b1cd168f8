"""Inner-product manipulation (IPM): Xie, Koyejo & Gupta, UAI 2020."""

from __future__ import annotations

import torch

from ..run_keys import RunKey, positive
from .base import AttackRound, ColludingAttack, column_stats


class IPM(ColludingAttack):
    """IPM (Xie et al., UAI 2020, sec. 4): every attacker sends -epsilon times the mean of the
    benign updates it knows, so the aggregate's inner product with the true gradient turns
    negative (epsilon small slips past Krum, large beats mean and median)."""

    name = "ipm"
    paper = "Xie et al., UAI 2020"
    run_config = {"epsilon": RunKey("ipm: attackers send -epsilon times the benign mean", check=positive)}

    def __init__(self, epsilon: float = 0.5) -> None:
        self.epsilon = epsilon

    def craft(self, known: torch.Tensor, rnd: AttackRound) -> torch.Tensor:
        return column_stats(known)["mean"].mul_(-self.epsilon)
