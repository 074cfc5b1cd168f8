"""Local training and batched prediction (plain torch, no Flower)."""

from __future__ import annotations

import torch
from torch import nn


def uses_channels_last(model: nn.Module, images: torch.Tensor, device: str) -> bool:
    """Channels-last memory format pays on the CPU for convolutions over 4-d images (oneDNN's
    native layout; issue 20 measured cnn_small at 1.7k samples/s on one core, 2.4k in this format);
    elsewhere it is left alone."""
    return (str(device).startswith("cpu") and images.dim() == 4
            and any(isinstance(m, nn.Conv2d) for m in model.modules()))


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int, batch_size: int,
          lr: float, momentum: float = 0.0, device: str = "cpu", seed: int = 0,
          before_step=None, after_step=None, penalty=None, channels_last: bool = True) -> float:
    """SGD on cross-entropy for ``epochs`` epochs with seeded shuffling; returns the mean loss of the
    last epoch. ``before_step(model)`` runs after backward (e.g. to mask gradients),
    ``after_step(model)`` after each optimiser step (e.g. to project the weights), and
    ``penalty(model)``, a scalar tensor, is added to every batch's loss (SDFC's calibration).
    With ``channels_last`` (and a convolutional model on the CPU) weights and batches use that
    memory format during training, the same numbers within float tolerance; the model leaves in
    the default (contiguous) format, so flattening its parameters works as before."""
    model.to(device).train()
    fast = channels_last and uses_channels_last(model, images, device)
    if fast:
        model.to(memory_format=torch.channels_last)  # parameters keep their identity (optimiser, hooks)
    try:
        return _sgd(model, images, labels, epochs, batch_size, lr, momentum, device, seed, before_step,
                    after_step, penalty, fast)
    finally:
        if fast:
            model.to(memory_format=torch.contiguous_format)


class SGD:
    """SGD with heavy-ball momentum, step for step what ``torch.optim.SGD(params, lr, momentum)``
    computes on the CPU (its single-tensor path: the buffer starts as a copy of the first gradient,
    then buf = momentum * buf + grad, and p -= lr * buf; bitwise equal, tests/test_training.py).
    Written out because ``torch.optim`` imports ``torch._dynamo`` on its first use, about 0.9 CPU s
    in every fresh process: each Ray actor of every cell paid it once (benchmarks/local_training.py
    measures it)."""

    def __init__(self, params, lr: float, momentum: float = 0.0) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.momentum = lr, momentum
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            grad = p.grad
            if grad is None:
                continue
            if self.momentum != 0:
                buf = self.buffers[i]
                if buf is None:
                    buf = self.buffers[i] = torch.clone(grad).detach()
                else:
                    buf.mul_(self.momentum).add_(grad)
                grad = buf
            p.add_(grad, alpha=-self.lr)


def _sgd(model, images, labels, epochs, batch_size, lr, momentum, device, seed, before_step, after_step, penalty,
         fast: bool) -> float:
    opt = SGD(model.parameters(), lr=lr, momentum=momentum)
    gen = torch.Generator().manual_seed(seed)
    n, last = len(images), 0.0
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            x, y = images[idx].to(device), labels[idx].to(device)
            if fast:
                x = x.contiguous(memory_format=torch.channels_last)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            if penalty is not None:
                loss = loss + penalty(model)
            loss.backward()
            if before_step is not None:
                before_step(model)
            opt.step()
            if after_step is not None:
                after_step(model)
            total += loss.item() * len(idx)
        last = total / max(1, n)
    return last


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 256, device: str = "cpu") -> torch.Tensor:
    """Predicted classes, in batches; convolutional models on the CPU in channels-last format. Batches
    of 256 in that format run cnn_small's evaluation about 3.5x faster than batches of 1024 in the
    default one (one thread; the activations of a batch stay in cache), the same predictions."""
    model.to(device).eval()
    fast = uses_channels_last(model, images, device)
    if fast:
        model.to(memory_format=torch.channels_last)
    try:
        out = []
        for s in range(0, len(images), batch_size):
            x = images[s:s + batch_size].to(device)
            out.append(model(x.contiguous(memory_format=torch.channels_last) if fast else x).argmax(dim=1).cpu())
    finally:
        if fast:
            model.to(memory_format=torch.contiguous_format)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


class ServerUpdate:
    """The server's own training step on its root dataset (FLTrust's g_0): load the global
    trainable vector into a private model copy (cloned, never aliased), train it like a client
    would, and return the update (trained minus global)."""

    def __init__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int,
                 batch_size: int, lr: float, momentum: float = 0.0, seed: int = 0) -> None:
        if len(labels) == 0:
            raise ValueError("the server's root dataset is empty (raise server-fraction)")
        self.model, self.images, self.labels = model, images, labels
        self.epochs, self.batch_size, self.lr, self.momentum, self.seed = epochs, batch_size, lr, momentum, seed
        self.calls = 0

    def __call__(self, global_params: torch.Tensor) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.requires_grad]
        start = global_params.detach().to("cpu", torch.float32).clone()
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(start.clone(), params)
        self.calls += 1
        train(self.model, self.images, self.labels, self.epochs, self.batch_size, self.lr, self.momentum,
              seed=self.seed + self.calls)
        return torch.nn.utils.parameters_to_vector(params).detach() - start
