"""Local training and batched prediction (plain torch, no Flower)."""

from __future__ import annotations

import torch
from torch import nn


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int, batch_size: int,
          lr: float, momentum: float = 0.0, device: str = "cpu", seed: int = 0) -> float:
    """SGD on cross-entropy for ``epochs`` epochs with seeded shuffling; returns the mean loss of the
    last epoch."""
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    gen = torch.Generator().manual_seed(seed)
    n, last = len(images), 0.0
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            x, y = images[idx].to(device), labels[idx].to(device)
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        last = total / max(1, n)
    return last


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 1024, device: str = "cpu") -> torch.Tensor:
    model.to(device).eval()
    out = [model(images[s:s + batch_size].to(device)).argmax(dim=1).cpu() for s in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)
