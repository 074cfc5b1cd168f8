"""Evaluation metrics: main-task accuracy, attack success rate, detection TPR/FPR.

Detection counts come from ``RoundRecord.detection`` (flagged vs ground truth, which only the
evaluation layer reads).
"""

from __future__ import annotations

import torch
from torch import nn

from .attacks import apply_trigger, eligible
from .training import predict


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: str = "cpu") -> float:
    if len(labels) == 0:
        return float("nan")
    return float((predict(model, images, device=device) == labels).float().mean())


def attack_success_rate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                        target_label: int, base_label: int = -1, device: str = "cpu") -> float:
    """Share of triggered test images whose true label is not the target (and is the base class,
    when one is set) that the model classifies as the target."""
    keep = eligible(labels, target_label, base_label)
    if not bool(keep.any()):
        return float("nan")
    preds = predict(model, apply_trigger(images[keep], mask), device=device)
    return float((preds == target_label).float().mean())
