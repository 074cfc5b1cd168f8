"""BackdoorIndicator (Li & Dai, USENIX Security 2024): the planted indicator task, the read-back
rule (best-kept label at or above the threshold is flagged, FedAvg over the rest), the broadcast
hook in both Flower APIs (clients get the planted model, updates are taken against the true global
model), checkpoints and the OOD loader."""

from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from torch import nn

from fl_defense import strategies
from fl_defense.data import load_ood
from fl_defense.defenses import BackdoorIndicator, ClipNoise
from fl_defense.server_tasks import IndicatorTask
from fl_defense.strategies import message
from tests.helpers import FakeGrid, arrayrecord, client_manager, legacy_results, message_replies, round_updates
from tests.server_task_helpers import tiny_indicator

DATA = Path("/work/shared/data")


def small_mlp(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def flat(model: nn.Module) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


@lru_cache(maxsize=1)
def indicator_and_models():
    """A global model G trained on in-distribution data (inputs near the origin), the indicator
    task over OOD inputs (far from it) and the planted model W."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((300, 6), generator=gen) * 0.5
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    g = flat(model)
    ood = torch.randn((15, 6), generator=torch.Generator().manual_seed(1)) * 8 + 4
    task = IndicatorTask(small_mlp(1), ood, num_classes=3, seed=0)
    w = task.plant(g, epochs=100, lr=0.1, mu=0.1)
    # a large benign update: the global model trained on in-distribution data much further
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return task, g, w, flat(model) - g


def test_planting_teaches_the_indicator_labels_and_stays_near_the_global_model():
    task, g, w, _ = indicator_and_models()
    assert torch.bincount(task.labels).tolist() == [5, 5, 5]  # spread evenly over the classes
    assert task.label_accuracy(w).min() >= 0.9  # every indicator label planted
    assert task.label_accuracy(g).mean() < 0.7  # the global model did not know them
    far = task.plant(g, epochs=100, lr=0.1, mu=0.0)
    near = task.plant(g, epochs=100, lr=0.1, mu=20.0)
    assert (near - g).norm() < (far - g).norm()  # mu pulls the planted model towards G


def test_the_model_that_keeps_the_indicator_is_flagged_and_a_benign_outlier_is_kept():
    task, g, w, big_step = indicator_and_models()
    d = len(g)
    gen = torch.Generator().manual_seed(3)
    # Benign training erodes the planted mapping: their models sit back near G. One benign client
    # has a large update (an outlier by norm: much longer in-distribution training). The attacker's
    # backdoor training keeps the indicator: its model is W plus its backdoor step.
    benign = [torch.randn(d, generator=gen) * 0.01 for _ in range(6)]
    outlier = big_step + torch.randn(d, generator=gen) * 0.01
    attacker = (w - g) + torch.randn(d, generator=gen) * 0.01
    u = torch.stack(benign + [outlier, attacker])
    assert (outlier.norm() > (u[:6].norm(dim=1)).max() * 5)
    ru = round_updates(u.numpy(), num_examples=[10, 20, 30, 40, 50, 60, 70, 80])
    defense = BackdoorIndicator(indicator=task, threshold=0.85)
    res = defense.aggregate(g, ru)
    vir = res.info["vir"]
    assert res.flagged.tolist() == [False] * 7 + [True]
    assert vir[7] >= 0.85 > vir[:7].max()
    # FedAvg over the unflagged, weighted by their samples
    kept = torch.tensor([10, 20, 30, 40, 50, 60, 70.0])
    expected = g + (kept / kept.sum()) @ u[:7]
    torch.testing.assert_close(res.params, expected, rtol=1e-5, atol=1e-6)
    assert res.weights[7] == 0 and abs(float(res.weights.sum()) - 1) < 1e-9


class ScriptedIndicator:
    """Per-label accuracies read from the first coordinates of the model vector."""

    calls = 0

    def plant(self, global_params, epochs, lr, mu):
        return global_params + 1.0

    def label_accuracy(self, params):
        return params[:3].clamp(0, 1)


def test_the_best_kept_label_decides_and_all_flagged_keeps_the_global_model():
    g = torch.zeros(4)
    u = np.array([[0.2, 0.9, 0.1, 0.0],    # one label kept at 0.9: flagged
                  [0.8, 0.8, 0.8, 0.0],    # every label 0.8, none reaches 0.85: kept
                  [0.85, 0.0, 0.0, 0.0]],  # at the threshold: flagged
                 dtype=np.float32)
    res = BackdoorIndicator(indicator=ScriptedIndicator(), threshold=0.85).aggregate(g, round_updates(u))
    assert res.flagged.tolist() == [True, False, True]
    assert res.info["vir_label"].tolist() == [1, 0, 0]
    torch.testing.assert_close(res.params, torch.tensor(u[1]))
    everyone = BackdoorIndicator(indicator=ScriptedIndicator(), threshold=0.5).aggregate(g, round_updates(u[[0, 2]]))
    assert everyone.flagged.all() and torch.equal(everyone.params, g) and float(everyone.weights.sum()) == 0


def test_clients_get_the_planted_model_and_updates_are_taken_against_the_true_global_model():
    rng = np.random.default_rng(0)
    g = [rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(4,)).astype(np.float32),
         rng.normal(size=(2, 4)).astype(np.float32), rng.normal(size=(2,)).astype(np.float32)]
    planted = [a + 1.0 for a in g]
    # every client sends back the true global model: the aggregate is exactly G, not W
    clients = [([a.copy() for a in g], 10, {"partition-id": k}) for k in range(4)]

    legacy = strategies.BackdoorIndicator(indicator=ScriptedIndicator(), threshold=0.99)
    pairs = legacy.configure_fit(1, ndarrays_to_parameters(g), client_manager(4))
    for _, ins in pairs:
        for sent, want in zip(parameters_to_ndarrays(ins.parameters), planted):
            np.testing.assert_array_equal(sent, want)
    out, _ = legacy.aggregate_fit(1, legacy_results(clients), [])
    for a, b in zip(parameters_to_ndarrays(out), g):
        np.testing.assert_array_equal(a, b)

    msg = message.BackdoorIndicator(indicator=ScriptedIndicator(), threshold=0.99)
    messages = list(msg.configure_train(1, arrayrecord(g), ConfigRecord(), FakeGrid(range(4))))
    assert len(messages) == 4
    for m in messages:
        for sent, want in zip(m.content["arrays"].to_numpy_ndarrays(), planted):
            np.testing.assert_array_equal(sent, want)
    arrays, _ = msg.aggregate_train(1, message_replies(clients))
    for a, b in zip(arrays.to_numpy_ndarrays(), g):
        np.testing.assert_array_equal(a, b)
    # a defense without an indicator task sends the global model itself
    plain = strategies.FedAvg()
    for _, ins in plain.configure_fit(1, ndarrays_to_parameters(g), client_manager(4)):
        for sent, want in zip(parameters_to_ndarrays(ins.parameters), g):
            np.testing.assert_array_equal(sent, want)


def test_a_wrapper_passes_the_broadcast_on():
    inner = BackdoorIndicator(indicator=ScriptedIndicator())
    torch.testing.assert_close(ClipNoise(inner, clip_norm=1.0).broadcast(torch.zeros(3)), torch.ones(3))


def test_a_resumed_run_plants_as_the_uninterrupted_one():
    g = torch.zeros(26)
    a = BackdoorIndicator(indicator=tiny_indicator(), epochs=3, lr=0.1)
    a.broadcast(g)
    b = BackdoorIndicator(indicator=tiny_indicator(), epochs=3, lr=0.1)
    b.load_state_dict(a.state_dict())
    assert a.state_dict() == {"indicator-calls": 1}
    torch.testing.assert_close(a.broadcast(g + 0.1), b.broadcast(g + 0.1), rtol=0, atol=0)


def test_a_missing_indicator_fails_at_construction():
    with pytest.raises(ValueError, match="indicator must provide plant"):
        strategies.BackdoorIndicator()
    with pytest.raises(ValueError, match="threshold"):
        BackdoorIndicator(indicator=ScriptedIndicator(), threshold=1.5).validate()


def test_ood_samples_are_shaped_like_the_task_and_seeded():
    noise = load_ood("noise", (1, 8, 8), 20, seed=3)
    assert noise.shape == (20, 1, 8, 8) and torch.equal(noise, load_ood("noise", (1, 8, 8), 20, seed=3))
    if not (DATA / "mnist" / "test.parquet").is_file():
        pytest.skip("no offline MNIST copy")
    digits = load_ood("mnist", (3, 32, 32), 12, str(DATA), seed=0)
    assert digits.shape == (12, 3, 32, 32) and 0 <= digits.min() and digits.max() <= 1
    assert torch.equal(digits[:, 0], digits[:, 2])  # grey copied to the three channels
    small = load_ood("mnist", (1, 16, 16), 12, str(DATA), seed=0)
    assert small.shape == (12, 1, 16, 16) and small.std() > 0.1


def test_runs_without_a_server_split():
    """Its indicator samples come from another dataset, so server-fraction may stay 0; SDFC,
    which validates on the server split, is still refused without one."""
    from fl_defense.config import ConfigError, ExperimentConfig

    cfg = ExperimentConfig.from_run_config({"defense": "backdoor_indicator", "server-fraction": 0.0})
    assert cfg.defense == "backdoor_indicator"
    with pytest.raises(ConfigError, match="server-fraction"):
        ExperimentConfig.from_run_config({"defense": "sdfc", "server-fraction": 0.0})
