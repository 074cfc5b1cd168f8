"""The convolutional models pool before their ReLU (fl_defense/models.py): max-pooling and ReLU
commute exactly, so each model computes, and trains to, bitwise what the usual conv-ReLU-pool order
does, with the ReLU on a quarter of the activations. Checked against that order
(``models.relu_before_pool``)."""

import pytest
import torch
from torch import nn

from fl_defense.models import build_model, relu_before_pool
from fl_defense.training import predict, train

SHAPES = {"cnn_small": (1, 28, 28), "rlr_cnn": (1, 28, 28), "cifar_cnn": (3, 32, 32)}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_pooling_before_relu_computes_and_trains_bitwise_as_the_conventional_order(name):
    shape = SHAPES[name]
    model = build_model(name, shape, 10, seed=3)
    assert any(isinstance(a, nn.MaxPool2d) and isinstance(b, nn.ReLU) for seq in model.modules()
               if isinstance(seq, nn.Sequential) for a, b in zip(seq, list(seq)[1:])), \
        "the model has no pooling before a ReLU"
    reference = relu_before_pool(model)
    assert [k for k, _ in model.state_dict().items()] == [k for k, _ in reference.state_dict().items()]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(96, *shape, generator=gen)  # negative activations too: the ReLU's zeros reach the pool
    y = torch.randint(0, 10, (96,), generator=gen)
    model.eval(), reference.eval()
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    assert torch.equal(predict(model, x), predict(reference, x))
    model.train(), reference.train()
    for m in (model, reference):
        torch.manual_seed(0)  # dropout (rlr_cnn) draws the same masks
        nn.functional.cross_entropy(m(x), y).backward()
    for (k, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad), k
    for m in (model, reference):
        m.zero_grad()
        torch.manual_seed(1)
        train(m, x, y, epochs=2, batch_size=32, lr=0.05, momentum=0.9, seed=4)
    for (k, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), k
