"""Base aggregators that RLR (and later wrappers) compose with: weighted mean, median, sign."""

from __future__ import annotations

import torch

from ..updates import RoundUpdates


def weighted_mean(round_updates: RoundUpdates, updates: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    u = round_updates.updates if updates is None else updates
    w = round_updates.sample_weights
    return w @ u, w


def coordinate_median(round_updates: RoundUpdates, updates: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinate-wise median; for an even n the mean of the two middle values (as numpy)."""
    u = round_updates.updates if updates is None else updates
    n = u.shape[0]
    s = u.sort(dim=0).values
    med = (s[(n - 1) // 2] + s[n // 2]) / 2
    return med, torch.full((n,), 1.0 / n, device=u.device)


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
