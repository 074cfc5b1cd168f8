"""fl_defense.training's SGD is torch.optim.SGD step for step (the oracle, imported), and local
training no longer imports torch._dynamo (torch.optim's first use does, ~0.9 CPU s per process)."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fl_defense.models import build_model
from fl_defense.training import SGD

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_is_torch_sgd_bitwise(momentum):
    model = build_model("cnn_small", (1, 28, 28), 10, seed=2)
    model.head[-1].bias.requires_grad_(False)  # a frozen parameter: neither touches it
    twin = copy.deepcopy(model)
    ours = SGD(model.parameters(), lr=0.05, momentum=momentum)
    oracle = torch.optim.SGD([p for p in twin.parameters() if p.requires_grad], lr=0.05, momentum=momentum)
    gen = torch.Generator().manual_seed(0)
    for step in range(12):
        x, y = torch.randn(16, 1, 28, 28, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        for m, opt in ((model, ours), (twin, oracle)):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            if step == 5:  # a parameter without a gradient this step keeps its value and its buffer
                m.features[0].weight.grad = None
            opt.step()
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            assert torch.equal(p, q), (step, name)


def test_local_training_does_not_import_torch_dynamo():
    code = ("import sys, torch\n"
            "from fl_defense.models import build_model\n"
            "from fl_defense.training import train\n"
            "m = build_model('cnn_small', (1, 28, 28), 10, seed=0)\n"
            "train(m, torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,)), 1, 32, 0.01, momentum=0.9)\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
