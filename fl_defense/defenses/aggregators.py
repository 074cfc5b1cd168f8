"""Base aggregators that RLR (and later wrappers) compose with: weighted mean, median, sign."""

from __future__ import annotations

import numpy as np
import torch

from ..updates import RoundUpdates


def column_blocks(u: torch.Tensor, block_bytes: int = 4 << 20):
    """Column slices of ``u`` (n x d) about ``block_bytes`` each: an elementwise step on an n x d
    matrix done block by block keeps its temporaries in cache instead of allocating (and page
    faulting) a second n x d matrix."""
    n, d = u.shape
    step = max(1024, block_bytes // (4 * max(1, n)))
    for start in range(0, d, step):
        yield slice(start, min(d, start + step))


def sign_sum(u: torch.Tensor) -> torch.Tensor:
    """sum_k sign(u_k) per column, block by block."""
    out = torch.empty(u.shape[1], dtype=u.dtype, device=u.device)
    for sl in column_blocks(u):
        torch.sum(torch.sign(u[:, sl]), dim=0, out=out[sl])
    return out


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
    return torch.sign(sign_sum(u)), torch.full((n,), 1.0 / n, device=u.device)


AGGREGATORS = {"mean": weighted_mean, "median": coordinate_median, "sign": sign_vote}


def clip_scale(updates: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The per-row factors 1 / max(1, ||delta_k|| / C) that clip each update to norm C. A weighted
    mean of clipped updates is (w * scale) @ updates: no clipped copy needed."""
    norms = torch.linalg.vector_norm(updates, dim=1)
    return 1.0 / torch.clamp(norms / max_norm, min=1.0)


def clip_rows(updates: torch.Tensor, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """delta_k / max(1, ||delta_k|| / C) as a new matrix, with the per-row scale factors (for
    rules that need the clipped rows themselves, not only their weighted mean)."""
    scale = clip_scale(updates, max_norm)
    return updates * scale[:, None], scale
