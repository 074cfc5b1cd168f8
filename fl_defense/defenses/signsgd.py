"""signSGD with majority vote (Bernstein, Zhao, Azizzadenesheli and Anandkumar, ICLR 2019)."""

from __future__ import annotations

import torch

from ..updates import RoundUpdates
from .aggregators import sign_vote
from .base import Defense, DefenseResult, no_flags, RunKey


class SignSGD(Defense):
    """signSGD with majority vote, Bernstein et al. (Algorithm 1): the server steps by
    ``server_lr * sign(sum_k sign(delta_k))``; clients' magnitudes never reach the model."""

    name = "signsgd"
    paper = "Bernstein et al., ICLR 2019"
    run_config = {"server_lr": RunKey("signsgd: server step per coordinate", key="sign-lr", check=lambda v: v > 0)}

    def __init__(self, server_lr: float = 0.001) -> None:
        self.server_lr = server_lr

    def validate(self) -> None:
        if not self.server_lr > 0:
            raise ValueError(f"server_lr must be > 0, got {self.server_lr}")

    def aggregate(self, global_params: torch.Tensor, round_updates: RoundUpdates) -> DefenseResult:
        step, w = sign_vote(round_updates)
        return DefenseResult(params=global_params + self.server_lr * step, weights=w,
                             flagged=no_flags(round_updates.n, round_updates.device))
