"""Label flipping, an untargeted data poisoning (as in Fang et al., USENIX Security 2020, and
Tolpegin et al., ESORICS 2020): an attacker trains on its own samples with wrong labels."""

from __future__ import annotations

import numpy as np
import torch


def flip_labels(labels: torch.Tensor, num_classes: int, source: int = -1, target: int = -1) -> torch.Tensor:
    """Every label l becomes L - 1 - l (Fang et al.), or, with ``source`` >= 0, that one class
    becomes ``target`` (Tolpegin et al.'s pair). Returns a copy."""
    if source >= 0:
        return torch.where(labels == source, torch.as_tensor(target, dtype=labels.dtype), labels)
    if num_classes < 1:
        raise ValueError(f"label flipping needs the number of classes, got {num_classes}")
    return (num_classes - 1) - labels


def label_flip(labels: torch.Tensor, num_classes: int, poison_rate: float, source: int, target: int,
               seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip ``poison_rate`` of the eligible samples (seeded): every sample, or with ``source`` >= 0
    the samples of that class. Returns (labels, indices of the flipped samples); input untouched.
    A sample whose label maps to itself (the middle class of an odd L) is not counted."""
    if not 0.0 <= poison_rate <= 1.0:
        raise ValueError(f"poison-rate must be in [0, 1], got {poison_rate}")
    eligible = labels == source if source >= 0 else torch.ones_like(labels, dtype=torch.bool)
    candidates = torch.nonzero(eligible).flatten().numpy()
    k = int(np.floor(poison_rate * len(candidates)))
    idx = torch.as_tensor(np.sort(np.random.default_rng(seed).choice(candidates, size=k, replace=False)),
                          dtype=torch.long)
    out = labels.clone()
    out[idx] = flip_labels(labels[idx], num_classes, source, target)
    return out, idx[out[idx] != labels[idx]]
