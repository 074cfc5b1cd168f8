"""Model poisoning: how an attacking client alters the update it sends.

Each function maps (global vector, the client's trained vector) to the vector it reports, or
shapes training itself (projection for constrain-and-scale, a coordinate mask for Neurotoxin).
"""

from __future__ import annotations

import torch

# What one attacker does alone; the colluding attacks follow in attacks.MODEL_ATTACKS.
LOCAL_MODEL_ATTACKS = ("none", "boost", "pgd", "neurotoxin", "signflip", "gaussian")


def boost(global_vec: torch.Tensor, trained: torch.Tensor, factor: float) -> torch.Tensor:
    """Boosting / model replacement (Bhagoji et al. 2019; Bagdasaryan et al. 2020): scale the
    update by ``factor`` (n / eta replaces the global model under FedAvg)."""
    return global_vec + factor * (trained - global_vec)


def project_to_ball(global_vec: torch.Tensor, current: torch.Tensor, bound: float) -> torch.Tensor:
    """Project ``current`` onto the L2 ball of radius ``bound`` around the global vector."""
    delta = current - global_vec
    norm = torch.linalg.vector_norm(delta)
    return current if norm <= bound else global_vec + delta * (bound / norm)


def scale_to_bound(global_vec: torch.Tensor, trained: torch.Tensor, bound: float) -> torch.Tensor:
    """Constrain-and-scale's final step: stretch the update to exactly the bound it knows."""
    delta = trained - global_vec
    norm = torch.linalg.vector_norm(delta)
    return trained if norm == 0 else global_vec + delta * (bound / norm)


def neurotoxin_mask(benign_update: torch.Tensor, top_ratio: float) -> torch.Tensor:
    """Neurotoxin (Zhang et al., ICML 2022): the coordinates the attacker may change: all but the
    ``top_ratio`` share with the largest benign update magnitude (those benign clients keep
    rewriting, which would erase the backdoor)."""
    d = benign_update.numel()
    k = int(round(top_ratio * d))
    allowed = torch.ones(d, dtype=torch.bool)
    if k > 0:
        allowed[torch.topk(benign_update.abs(), k).indices] = False
    return allowed


def sign_flip(global_vec: torch.Tensor, trained: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
    """Byzantine sign flipping: report -factor times the honest update."""
    return global_vec - factor * (trained - global_vec)


def gaussian_update(global_vec: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    """Byzantine noise: an update drawn from N(0, std^2), ignoring training."""
    gen = torch.Generator().manual_seed(seed)
    return global_vec + std * torch.randn(global_vec.shape, generator=gen)
