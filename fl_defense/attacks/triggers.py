"""Backdoor triggers as (mask, value) pairs over an image's height and width.

Images are float tensors in [0, 1] of shape (..., C, H, W); applying a trigger sets the masked
pixels of every channel to the trigger's value.
"""

from __future__ import annotations

import torch

TRIGGERS = ("plus",)


def plus_mask(height: int, width: int) -> torch.Tensor:
    """The RLR paper's plus pattern (Ozdayi et al. 2021, Fashion-MNIST code): at 28x28 a vertical
    bar of 5 pixels in column 5, rows 5-9, crossed by a horizontal bar in row 7, columns 3-7.
    Other sizes scale the start and bar length by H/28 (at least 3 pixels per bar)."""
    start = max(1, round(5 * height / 28))
    size = max(3, round(5 * height / 28))
    mask = torch.zeros((height, width), dtype=torch.bool)
    mask[start:start + size, start] = True
    row = start + size // 2
    mask[row, max(0, start - size // 2):start + size // 2 + 1] = True
    return mask


def trigger_mask(name: str, height: int, width: int) -> torch.Tensor:
    if name == "plus":
        return plus_mask(height, width)
    raise ValueError(f"unknown trigger {name!r}; choose one of {TRIGGERS}")


def apply_trigger(images: torch.Tensor, mask: torch.Tensor, value: float = 1.0) -> torch.Tensor:
    """Return a copy of ``images`` (N, C, H, W) with the masked pixels set to ``value``."""
    out = images.clone()
    out[..., mask] = value
    return out
