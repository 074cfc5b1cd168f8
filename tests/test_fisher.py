"""The diagonal empirical Fisher: the layer-wise computation equals per-sample gradients."""

import numpy as np
import pytest
import torch
from torch import nn

from fl_defense.fisher import empirical_fisher
from fl_defense.models import build_model


def naive_fisher(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """The definition, one sample at a time: mean over i of (d -log p(y_i|x_i) / d w)^2."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        loss = nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        for t, g in zip(total, torch.autograd.grad(loss, params, allow_unused=True)):
            if g is not None:  # None: the parameter does not reach the loss (zero gradient)
                t += g * g
    return torch.cat([(t / len(x)).reshape(-1) for t in total]).numpy()


def data(shape, classes, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("name,shape", [("mlp", (1, 8, 8)), ("cnn_small", (1, 28, 28)),
                                        ("rlr_cnn", (1, 28, 28)), ("cifar_cnn", (3, 32, 32))])
def test_layerwise_fisher_equals_per_sample_gradients(name, shape):
    model = build_model(name, shape, 10, seed=1)
    x, y = data(shape, 10)
    want = naive_fisher(model, x, y)
    for method in ("layers", "vmap", "auto"):
        got = empirical_fisher(model, x, y, batch_size=5, method=method)  # batches of 5, 5, 2
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-9 * want.max())


class Odd(nn.Module):
    """Strided, dilated, padded convolution without bias, a frozen layer, and an optional
    BatchNorm (not covered layer-wise) or in-place ReLU after a linear layer."""

    def __init__(self, batchnorm=False, inplace=False):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, (3, 2), stride=2, dilation=(1, 2), padding=(1, 2), bias=False)
        self.bn = nn.BatchNorm2d(3) if batchnorm else nn.Identity()
        self.frozen = nn.Linear(3 * 5 * 6, 7)
        self.frozen.requires_grad_(False)
        self.fc = nn.Linear(7, 4)
        self.act = nn.ReLU(inplace=inplace)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        h = self.frozen(torch.tanh(self.bn(self.conv(x))).flatten(1))
        return self.out(self.act(self.fc(h)))


@pytest.mark.parametrize("variant", ["plain", "batchnorm", "inplace"])
def test_layerwise_fisher_covers_what_it_can_and_falls_back_otherwise(variant):
    torch.manual_seed(0)
    model = Odd(batchnorm=variant == "batchnorm", inplace=variant == "inplace")
    x, y = data((2, 9, 9), 3, n=7)
    want = naive_fisher(model, x, y)
    assert want.size == 3 * 2 * 3 * 2 + (7 * 4 + 4) + (4 * 3 + 3) + (6 if variant == "batchnorm" else 0)
    np.testing.assert_allclose(empirical_fisher(model, x, y, method="auto"), want, rtol=2e-4, atol=1e-12)
    if variant == "plain":
        np.testing.assert_allclose(empirical_fisher(model, x, y, method="layers"), want, rtol=2e-4, atol=1e-12)
    else:
        with pytest.raises(ValueError, match="vmap"):
            empirical_fisher(model, x, y, method="layers")


def test_unknown_method_is_refused():
    model = build_model("mlp", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="method"):
        empirical_fisher(model, *data((1, 8, 8), 10), method="exact")


class Tied(nn.Module):
    """Two linear layers sharing one weight: the squared sum of both uses is not the sum of squares."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)
        self.b.weight = self.a.weight
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.b(torch.tanh(self.a(x)))))


class LoRALinear(nn.Linear):
    """A Linear subclass with parameters of its own beyond weight and bias."""

    def __init__(self, i, o):
        super().__init__(i, o)
        self.lora = nn.Parameter(torch.randn(o, i) * 0.1)

    def forward(self, x):
        return super().forward(x) + x @ self.lora.T


class Folded(nn.Module):
    """A linear layer over positions: samples folded into the batch axis (N*T rows)."""

    def __init__(self):
        super().__init__()
        self.step, self.out = nn.Linear(3, 4), nn.Linear(4 * 2, 3)

    def forward(self, x):
        n = x.shape[0]
        return self.out(torch.tanh(self.step(x.reshape(n * 2, 3))).reshape(n, 8))


class UnusedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.out, self.aux = nn.Linear(6, 5), nn.Linear(5, 3), nn.Linear(5, 2)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        self.aux(h)  # computed, never reaches the loss
        return self.out(h)


@pytest.mark.parametrize("make,covered", [
    (Tied, False), (lambda: nn.Sequential(LoRALinear(6, 4), nn.Tanh(), nn.Linear(4, 3)), False),
    (Folded, False), (lambda: nn.utils.parametrizations.weight_norm(nn.Linear(6, 3)), False), (UnusedHead, True)])
def test_layerwise_fisher_refuses_what_it_would_get_wrong(make, covered):
    torch.manual_seed(0)
    model = make()
    x, y = data((6,), 3, n=9)
    want = naive_fisher(model, x, y)
    np.testing.assert_allclose(empirical_fisher(model, x, y, batch_size=4), want, rtol=2e-4, atol=1e-12)
    if covered:
        np.testing.assert_allclose(empirical_fisher(model, x, y, method="layers"), want, rtol=2e-4, atol=1e-12)
    else:
        with pytest.raises(ValueError, match="vmap"):
            empirical_fisher(model, x, y, method="layers")
