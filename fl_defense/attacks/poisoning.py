"""Data poisoning on a client's local data, and the seeded choice of attackers."""

from __future__ import annotations

import numpy as np
import torch

from .triggers import apply_trigger


def select_attackers(num_partitions: int, fraction: float, seed: int) -> list[int]:
    """A seeded, fixed set of round(fraction * num_partitions) attacker partitions."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"malicious-fraction must be in [0, 1], got {fraction}")
    k = int(round(fraction * num_partitions))
    rng = np.random.default_rng([seed, 0xA77AC])
    return sorted(int(i) for i in rng.choice(num_partitions, size=k, replace=False))


def eligible(labels: torch.Tensor, target_label: int, base_label: int) -> torch.Tensor:
    """Samples the backdoor is meant to redirect: the base class if one is set (the RLR setting),
    otherwise every sample whose label is not the target (all-to-one)."""
    return labels == base_label if base_label >= 0 else labels != target_label


def poison_with_trigger(images: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, poison_rate: float,
                        target_label: int, base_label: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stamp the trigger on ``poison_rate`` of the eligible samples and relabel them to the target.

    Returns (images, labels, indices of the poisoned samples); the inputs are not modified.
    """
    if not 0.0 <= poison_rate <= 1.0:
        raise ValueError(f"poison-rate must be in [0, 1], got {poison_rate}")
    candidates = torch.nonzero(eligible(labels, target_label, base_label)).flatten().numpy()
    k = int(np.floor(poison_rate * len(candidates)))
    rng = np.random.default_rng(seed)
    idx = torch.as_tensor(np.sort(rng.choice(candidates, size=k, replace=False)), dtype=torch.long)
    images, labels = images.clone(), labels.clone()
    if k:
        images[idx] = apply_trigger(images[idx], mask)
        labels[idx] = target_label
    return images, labels, idx
