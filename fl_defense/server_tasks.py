"""Server-side model work that defenses call with a parameter vector: BackdoorIndicator's
indicator task (plant it, measure each client model's accuracy on it) and FLARE's
penultimate-layer representations. Plain torch, no Flower; each holds a private model copy and
loads vectors into it cloned (never aliased: DESIGN.md's ``vector_to_parameters`` trap)."""

from __future__ import annotations

import torch
from torch import nn

from .models import penultimate


def _load(model: nn.Module, vector: torch.Tensor) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(vector.detach().to("cpu", torch.float32).clone(), params)
    return params


class IndicatorTask:
    """BackdoorIndicator's indicator task (Li & Dai, USENIX Security 2024, sec. 5): out-of-
    distribution samples ``ood_images`` with indicator labels spread evenly over the classes and
    shuffled with ``seed`` (the authors' code assigns them so).

    ``plant(G, epochs, lr, mu)`` fine-tunes the global model on the indicator samples, minimising
    CE(f_w(x_ood), y_ind) + (mu / 2) * ||w - G||_2 (the authors' regulariser: the L2 distance, not
    squared) with SGD (``lr``, the authors' ``momentum`` 0.9 and ``weight_decay`` 5e-4, batches of
    ``batch_size`` 64) for ``epochs`` epochs, and returns the planted vector. ``label_accuracy(w)`` is, per indicator label, the share of that label's
    indicator samples the model w classifies as it (the authors' per-label watermark accuracy).
    """

    def __init__(self, model: nn.Module, ood_images: torch.Tensor, num_classes: int, momentum: float = 0.9,
                 weight_decay: float = 5e-4, batch_size: int = 64, seed: int = 0) -> None:
        if len(ood_images) < num_classes:
            raise ValueError(f"need at least one indicator sample per class ({num_classes}), got {len(ood_images)}")
        self.model, self.images, self.num_classes = model, ood_images, num_classes
        self.momentum, self.weight_decay = momentum, weight_decay
        self.batch_size, self.seed = batch_size, seed
        gen = torch.Generator().manual_seed(seed)
        balanced = torch.arange(len(ood_images)) % num_classes
        self.labels = balanced[torch.randperm(len(ood_images), generator=gen)]
        self.calls = 0  # planting is seeded per call; checkpointed by the defense

    def plant(self, global_params: torch.Tensor, epochs: int, lr: float, mu: float) -> torch.Tensor:
        start = global_params.detach().to("cpu", torch.float32).clone()
        params = _load(self.model, start)
        self.calls += 1
        gen = torch.Generator().manual_seed(self.seed + self.calls)
        opt = torch.optim.SGD(params, lr=lr, momentum=self.momentum, weight_decay=self.weight_decay)
        anchor = _split(start, params)
        self.model.train()
        n = len(self.images)
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen)
            for s in range(0, n, self.batch_size):
                idx = order[s:s + self.batch_size]
                opt.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(self.model(self.images[idx]), self.labels[idx])
                if mu:
                    # vector_norm's gradient at w = G is 0 (a plain sqrt's would be nan)
                    dist = torch.linalg.vector_norm(torch.cat([(p - q).flatten() for p, q in zip(params, anchor)]))
                    loss = loss + mu / 2 * dist
                loss.backward()
                opt.step()
        return torch.nn.utils.parameters_to_vector(params).detach().to(global_params.dtype)

    @torch.no_grad()
    def label_accuracy(self, params: torch.Tensor) -> torch.Tensor:
        _load(self.model, params)
        self.model.eval()
        pred = torch.cat([self.model(self.images[s:s + 1024]).argmax(1) for s in range(0, len(self.images), 1024)])
        hits = torch.zeros(self.num_classes).index_add_(0, self.labels, (pred == self.labels).float())
        return hits / torch.bincount(self.labels, minlength=self.num_classes).clamp_min(1)


def _split(vector: torch.Tensor, like: list[nn.Parameter]) -> list[torch.Tensor]:
    out, at = [], 0
    for p in like:
        out.append(vector[at:at + p.numel()].view_as(p))
        at += p.numel()
    return out


class PenultimateFeatures:
    """FLARE's PLRs (Wang et al., AsiaCCS 2022, sec. 4.1): load a trainable vector into a private
    model copy and return its penultimate-layer representations of the server's samples
    (``images``, at most ``max_samples`` of them), one row per sample."""

    def __init__(self, model: nn.Module, images: torch.Tensor, max_samples: int = 100) -> None:
        if len(images) == 0:
            raise ValueError("the server's sample set is empty (raise server-fraction)")
        self.model, self.images = model, images[:max_samples]

    def __call__(self, params: torch.Tensor) -> torch.Tensor:
        _load(self.model, params)
        return penultimate(self.model, self.images)
