"""FedAvg (McMahan et al., AISTATS 2017): the sample-weighted mean of the client models."""

from __future__ import annotations

import torch

from ..updates import RoundUpdates
from .base import Defense, DefenseResult, no_flags


class FedAvg(Defense):
    """FedAvg, eq. (1) of McMahan et al. 2017: w_{t+1} = w_t + sum_k (n_k / n) delta_k.

    No defense at all; the reference every other rule is compared with.

    Parameters
    ----------
    server_lr : float
        Server learning rate applied to the averaged update (1.0 is plain FedAvg).
    """

    name = "fedavg"
    paper = "McMahan et al., AISTATS 2017"

    def __init__(self, server_lr: float = 1.0) -> None:
        self.server_lr = server_lr

    @property
    def reference_free(self) -> bool:  # global + 1 * mean(w_k - global) = mean(w_k)
        return self.server_lr == 1.0

    def validate(self) -> None:
        if not self.server_lr > 0:
            raise ValueError(f"server_lr must be > 0, got {self.server_lr}")

    def aggregate(self, global_params: torch.Tensor, round_updates: RoundUpdates) -> DefenseResult:
        w = round_updates.sample_weights
        step = w @ round_updates.updates
        return DefenseResult(
            params=global_params + self.server_lr * step,
            weights=w,
            flagged=no_flags(round_updates.n, round_updates.device),
        )
