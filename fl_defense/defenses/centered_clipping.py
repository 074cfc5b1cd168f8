"""Centered clipping (Karimireddy, He and Jaggi, "Learning from History for Byzantine Robust
Optimization", ICML 2021)."""

from __future__ import annotations

import numpy as np
import torch

from ..updates import RoundUpdates
from .aggregators import column_block_sums
from .base import Defense, DefenseResult, no_flags, RunKey


def squared_distances_to(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """||u_k - v||^2 for every row k (float64), block by block over the columns."""

    def block(cols: slice) -> torch.Tensor:
        diff = u[:, cols] - v[cols]
        return (diff * diff).sum(dim=1, dtype=torch.float64)

    return column_block_sums(block, u, u.shape[0])


class CenteredClipping(Defense):
    """Centered clipping (CC), Karimireddy et al., ICML 2021, eq. (CC) of sec. 4 / Algorithm 2.

    Starting from the previous round's aggregate v_0 (zero in the first round), ``iterations``
    times (l in the paper, which uses l = 1):

        v_{l+1} = v_l + (1/n) sum_i (x_i - v_l) min(1, tau / ||x_i - v_l||)

    and v_L is this round's aggregated update, kept as the next round's centre: the "history"
    that makes the rule robust (an attacker can move the aggregate by at most tau * f / n per
    round, whatever it sends). The paper applies the rule to the clients' momenta; here it is
    applied to whatever the clients send (their model updates), so client-side momentum is the
    client's business. ``tau`` is in the units of the updates (there is no scale-free default:
    the paper tunes it per task).

    Nobody is flagged; client k's weight is its share of the aggregate, c_k / sum c where v_L =
    a v_0 + sum_k c_k x_k. State: the centre (a d-vector), saved with checkpoints.
    """

    name = "centered_clipping"
    paper = "Karimireddy et al., ICML 2021"
    run_config = {
        "tau": RunKey("centered clipping: radius tau around the previous aggregate (units of the updates)",
                      check=lambda v: v > 0),
        "iterations": RunKey("centered clipping: clipping iterations l per round", check=lambda v: v >= 1),
    }

    def __init__(self, tau: float = 10.0, iterations: int = 1) -> None:
        self.tau = tau
        self.iterations = iterations
        self._center: torch.Tensor | None = None

    def validate(self) -> None:
        if not self.tau > 0:
            raise ValueError(f"tau (the clipping radius) must be > 0, got {self.tau}")
        if not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"iterations must be an integer >= 1, got {self.iterations!r}")

    @property
    def center(self) -> torch.Tensor | None:
        """The previous round's aggregate (the next round's starting point), or None before the first."""
        return self._center

    def aggregate(self, global_params: torch.Tensor, round_updates: RoundUpdates) -> DefenseResult:
        ru = round_updates
        u, n = ru.updates, ru.n
        if self._center is not None and self._center.shape[0] != ru.d:
            raise ValueError(f"update size {ru.d} differs from the kept centre's {self._center.shape[0]}")
        v = torch.zeros(ru.d, dtype=u.dtype, device=u.device) if self._center is None else \
            self._center.to(u.device, u.dtype)
        a, c = 1.0, torch.zeros(n, dtype=torch.float64)  # v = a v_0 + c @ u
        factors = []
        for _ in range(self.iterations):
            dist = squared_distances_to(u, v).sqrt().cpu()
            s = torch.clamp(self.tau / dist.clamp_min(1e-30), max=1.0)
            keep = 1.0 - float(s.mean())
            a, c = a * keep, c * keep + s / n
            v = v * keep + (s / n).to(u.device, u.dtype) @ u
            factors.append(s)
        self._center = v.detach().to("cpu").clone()
        total = float(c.sum())
        w = (c / total if total > 0 else torch.full((n,), 1.0 / n, dtype=torch.float64)).to(u.device, u.dtype)
        return DefenseResult(params=global_params + v, weights=w, flagged=no_flags(n, ru.device),
                             info={"clip-factors": factors[-1].tolist(), "center-share": a})

    def state_dict(self) -> dict:
        return {} if self._center is None else {"center": self._center.numpy().copy()}

    def load_state_dict(self, state: dict) -> None:
        unknown = set(state) - {"center"}
        if unknown:
            raise ValueError(f"CenteredClipping got unknown state keys {sorted(unknown)}")
        center = state.get("center")
        self._center = None if center is None else torch.as_tensor(np.asarray(center)).clone()
