"""Base aggregators that RLR (and later wrappers) compose with: weighted mean, median, sign."""

from __future__ import annotations

import numpy as np
import torch

from ..updates import RoundUpdates


def weighted_mean(round_updates: RoundUpdates, updates: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    u = round_updates.updates if updates is None else updates
    w = round_updates.sample_weights
    return w @ u, w


def order_statistics(u: torch.Tensor, kth: list[int]) -> torch.Tensor:
    """``u`` (n x d) rearranged per column so that row k holds the k-th smallest value for every k
    in ``kth`` (smaller values above, larger below, as ``np.partition``). On the CPU a selection
    over a contiguous d x n copy (introselect, O(n) per column) beats sorting strided columns
    several times over; elsewhere a sort."""
    if u.device.type == "cpu":
        part = np.partition(u.detach().T.contiguous().numpy(), kth, axis=1)
        return torch.from_numpy(part).T
    return u.sort(dim=0).values


def median_of_rows(u: torch.Tensor) -> torch.Tensor:
    """Per-column median of ``u`` (n x d); for an even n the mean of the two middle values (as numpy)."""
    n = u.shape[0]
    lo, hi = (n - 1) // 2, n // 2
    s = order_statistics(u, sorted({lo, hi}))
    return (s[lo] + s[hi]) / 2


def coordinate_median(round_updates: RoundUpdates, updates: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinate-wise median of the updates, with uniform weights."""
    u = round_updates.updates if updates is None else updates
    n = u.shape[0]
    return median_of_rows(u), torch.full((n,), 1.0 / n, device=u.device)


def sign_vote(round_updates: RoundUpdates, updates: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """signSGD with majority vote (Bernstein et al. 2018): sign(sum_k sign(delta_k))."""
    u = round_updates.updates if updates is None else updates
    n = u.shape[0]
    return torch.sign(torch.sign(u).sum(dim=0)), torch.full((n,), 1.0 / n, device=u.device)


AGGREGATORS = {"mean": weighted_mean, "median": coordinate_median, "sign": sign_vote}


def clip_rows(updates: torch.Tensor, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """delta_k / max(1, ||delta_k|| / C), returned with the per-row scale factors."""
    norms = torch.linalg.vector_norm(updates, dim=1)
    scale = 1.0 / torch.clamp(norms / max_norm, min=1.0)
    return updates * scale[:, None], scale
