"""The models used in the papers, sized for any image shape the datasets module produces.

The convolutional models max-pool before their ReLU. The two commute exactly (both are monotone
and round nothing), so outputs and gradients are bitwise those of the usual conv-ReLU-pool order
(tests/test_models.py), while the ReLU and its backward run on a quarter of the activations: on
one CPU thread, inference about 2x and training about 1.4x faster (benchmarks/local_training.py).
"""

from __future__ import annotations

import torch
from torch import nn

MODELS = ("mlp", "cnn_small", "rlr_cnn", "cifar_cnn")


class MLP(nn.Module):
    """Two-layer perceptron; the default for 8x8 digits."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, hidden: int = 64) -> None:
        super().__init__()
        c, h, w = in_shape
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Two 3x3 conv blocks (16, 32 channels) with 2x2 pooling and a 64-unit head: quick runs on
    28x28, 16x16 or 8x8 inputs (about 0.1M parameters at 28x28)."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        c, h, w = in_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, 16, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * (h // 4) * (w // 4), 64), nn.ReLU(),
                                  nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class RLRCNN(nn.Module):
    """The CNN of the RLR paper's (Fashion-)MNIST experiments: conv 32 -> conv 64 (3x3), max-pool,
    dropout 0.25, fc 128, dropout 0.5, fc 10 (about 1.2M parameters at 28x28)."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        c, h, w = in_shape
        self.net = nn.Sequential(
            nn.Conv2d(c, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.MaxPool2d(2), nn.ReLU(),
            nn.Dropout(0.25), nn.Flatten(), nn.Linear(64 * ((h - 4) // 2) * ((w - 4) // 2), 128),
            nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CifarCNN(nn.Module):
    """A CNN for 32x32x3: three conv blocks (32, 64, 128) with pooling, fc 256 (about 0.6M params)."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        c, h, w = in_shape
        def block(i, o):
            return [nn.Conv2d(i, o, 3, padding=1), nn.MaxPool2d(2), nn.ReLU()]
        self.net = nn.Sequential(*block(c, 32), *block(32, 64), *block(64, 128), nn.Flatten(),
                                 nn.Linear(128 * (h // 8) * (w // 8), 256), nn.ReLU(), nn.Linear(256, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def relu_before_pool(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every (MaxPool2d, ReLU) pair of its Sequentials in the usual order,
    ReLU then MaxPool2d: the reference the shipped order is checked against (tests/test_models.py)
    and timed against (benchmarks/local_training.py). The weights are copied, not shared."""
    import copy

    out = copy.deepcopy(model)
    for seq in [m for m in out.modules() if isinstance(m, nn.Sequential)]:
        layers = list(seq)
        for i in range(len(layers) - 1):
            if isinstance(layers[i], nn.MaxPool2d) and isinstance(layers[i + 1], nn.ReLU):
                layers[i], layers[i + 1] = layers[i + 1], layers[i]
        for i, layer in enumerate(layers):
            seq[i] = layer
    return out


_CLASSES = {"mlp": MLP, "cnn_small": SmallCNN, "rlr_cnn": RLRCNN, "cifar_cnn": CifarCNN}


def default_model(dataset: str) -> str:
    return {"digits": "mlp", "cifar10": "cifar_cnn", "cifar100": "cifar_cnn"}.get(dataset, "cnn_small")


def build_model(name: str, in_shape: tuple[int, int, int], num_classes: int, seed: int | None = None) -> nn.Module:
    """Build a model by name; with ``seed`` its initial weights are reproducible."""
    if name not in _CLASSES:
        raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return _CLASSES[name](in_shape, num_classes)
    return _CLASSES[name](in_shape, num_classes)


def trainable_mask(model: nn.Module) -> list[bool]:
    """For each entry of ``state_dict()``, in order: is it a trainable parameter (vs a buffer)?"""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return [name in trainable for name in model.state_dict()]


def get_arrays(model: nn.Module) -> list:
    return [v.detach().cpu().numpy().copy() for v in model.state_dict().values()]


def set_arrays(model: nn.Module, arrays: list) -> None:
    """Load arrays into the model by copying (never aliasing the caller's buffers)."""
    state = {k: torch.tensor(a) for k, a in zip(model.state_dict().keys(), arrays, strict=True)}
    model.load_state_dict(state, strict=True)


@torch.no_grad()
def penultimate(model: nn.Module, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Penultimate-layer representations (FLARE's PLRs): the input of the model's last ``Linear``
    layer, flattened, in eval mode (every model here ends in one)."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ValueError(f"{type(model).__name__} has no Linear layer to take the penultimate representation before")
    captured: list[torch.Tensor] = []
    handle = last[-1].register_forward_hook(lambda _m, inp, _out: captured.append(inp[0].detach().flatten(1)))
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(images), batch_size):
            model(images[s:s + batch_size])
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(captured) if captured else torch.empty(0)
