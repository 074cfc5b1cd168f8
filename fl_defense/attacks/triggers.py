"""Backdoor triggers over images shaped (N, C, H, W) in [0, 1], for any size and channel count.

A trigger either stamps pixels (a boolean mask over H x W and the value set on every channel) or
blends a full-image pattern in at a ratio. ``pieces(k)`` splits a stamp into k disjoint parts for
the distributed backdoor attack (DBA).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

TRIGGERS = ("plus", "square", "pixel", "corner", "mask", "blend")


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


def square_mask(height: int, width: int) -> torch.Tensor:
    """A BadNets-style filled square in the bottom-right corner, one pixel from the border
    (4x4 at 28x28, scaled by H/28, at least 2x2)."""
    s = max(2, round(4 * height / 28))
    mask = torch.zeros((height, width), dtype=torch.bool)
    mask[height - 1 - s:height - 1, width - 1 - s:width - 1] = True
    return mask


def pixel_mask(height: int, width: int) -> torch.Tensor:
    """A single pixel, two in from the bottom-right corner."""
    mask = torch.zeros((height, width), dtype=torch.bool)
    mask[height - 2, width - 2] = True
    return mask


def corner_mask(height: int, width: int) -> torch.Tensor:
    """The FDCR paper's corner pattern: a 2 x 6 block in the top-left corner (at any size)."""
    mask = torch.zeros((height, width), dtype=torch.bool)
    mask[0:min(2, height), 0:min(6, width)] = True
    return mask


@dataclass
class Trigger:
    """``mask`` (H x W bool) stamped with ``value``, or, for blending, ``pattern`` (C x H x W)
    mixed in as (1 - ratio) * x + ratio * pattern."""

    mask: torch.Tensor | None = None
    value: float | torch.Tensor = 1.0
    pattern: torch.Tensor | None = None
    ratio: float = 0.0

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        out = images.clone()
        if self.pattern is not None:
            return (1 - self.ratio) * out + self.ratio * self.pattern.to(out.dtype)
        if isinstance(self.value, torch.Tensor):  # per-pixel values of a user pattern
            out[..., self.mask] = self.value[self.mask].to(out.dtype)
        else:
            out[..., self.mask] = self.value
        return out

    def pieces(self, k: int) -> list["Trigger"]:
        """Split the stamp into ``k`` disjoint pieces of consecutive pixels (row-major)."""
        if self.mask is None:
            raise ValueError("only stamp triggers can be split into DBA pieces")
        coords = torch.nonzero(self.mask)
        if k < 1 or k > len(coords):
            raise ValueError(f"cannot split a {len(coords)}-pixel trigger into {k} pieces")
        parts = []
        for chunk in np.array_split(np.arange(len(coords)), k):
            m = torch.zeros_like(self.mask)
            m[coords[chunk, 0], coords[chunk, 1]] = True
            parts.append(Trigger(mask=m, value=self.value))
        return parts


def make_trigger(name: str, shape: tuple[int, int, int], seed: int = 0, blend_ratio: float = 0.1,
                 trigger_file: str = "") -> Trigger:
    """The trigger called ``name`` for images of ``shape`` (C, H, W)."""
    c, h, w = shape
    if name == "plus":
        return Trigger(mask=plus_mask(h, w))
    if name == "square":
        return Trigger(mask=square_mask(h, w))
    if name == "pixel":
        return Trigger(mask=pixel_mask(h, w))
    if name == "corner":
        return Trigger(mask=corner_mask(h, w))
    if name == "blend":  # a fixed, seeded noise image, faintly mixed in
        gen = torch.Generator().manual_seed(seed)
        return Trigger(pattern=torch.rand((c, h, w), generator=gen), ratio=blend_ratio)
    if name == "mask":
        return load_trigger_file(trigger_file, h, w)
    raise ValueError(f"unknown trigger {name!r}; choose one of {TRIGGERS}")


def load_trigger_file(path: str, height: int, width: int) -> Trigger:
    """A user trigger from a .npy file: an H x W array; pixels where it is nonzero are stamped
    with its value (a bool array stamps 1.0)."""
    if not path:
        raise ValueError("trigger 'mask' needs trigger-file: a .npy H x W array")
    arr = np.load(path)
    if arr.shape != (height, width):
        raise ValueError(f"trigger-file {path}: shape {arr.shape}, the images are {height} x {width}")
    mask = torch.as_tensor(arr != 0)
    if arr.dtype == bool:
        return Trigger(mask=mask)
    return Trigger(mask=mask, value=torch.as_tensor(arr, dtype=torch.float32))


def trigger_mask(name: str, height: int, width: int) -> torch.Tensor:
    """The stamp mask of a named trigger (kept for callers that need only the mask)."""
    return make_trigger(name, (1, height, width)).mask


def apply_trigger(images: torch.Tensor, mask: torch.Tensor, value: float = 1.0) -> torch.Tensor:
    """Return a copy of ``images`` (N, C, H, W) with the masked pixels set to ``value``."""
    return Trigger(mask=mask, value=value).apply(images)
