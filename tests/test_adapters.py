"""The two Flower adapters: equal to Flower's FedAvg, equal to each other, blind to ground truth."""

import random

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg as FlowerFedAvg
from flwr.serverapp.strategy import FedAvg as FlowerMessageFedAvg

from fl_defense import strategies
from fl_defense.defenses import DEFENSES
from fl_defense.rounds import FISHER_KEY, FISHER_REQUEST_KEY, GROUND_TRUTH_KEY
from fl_defense.strategies import message
from tests.server_task_helpers import tiny_features, tiny_indicator
from tests.helpers import (FakeGrid, arrayrecord, client_manager, client_models, legacy_results,
                           message_replies, model_arrays)

N = 10


def make(name, api="legacy", **extra):
    """A strategy for defense ``name``; SDFC gets a stand-in validation Fisher."""
    kwargs = dict(extra)
    if name == "sdfc":
        kwargs["validation_fisher"] = lambda params: torch.ones_like(params)
    if name == "fltrust":
        kwargs["server_update"] = lambda params: torch.full_like(params, 0.01)
    if name == "backdoor_indicator":
        kwargs["indicator"] = tiny_indicator()
    if name == "flare":
        kwargs["features"] = tiny_features()
    cls = strategies.STRATEGIES[name]
    if api == "message":
        cls = getattr(message, cls.__name__)
    return cls(**kwargs)


def _round(seed=0, malicious=(2, 7)):
    rng = np.random.default_rng(seed)
    g = model_arrays(rng)
    return g, client_models(g, N, rng, malicious=malicious)


def run_legacy(strategy, g, clients, server_round=1):
    random.seed(0)
    strategy.configure_fit(server_round, ndarrays_to_parameters(g), client_manager(len(clients)))
    params, metrics = strategy.aggregate_fit(server_round, legacy_results(clients), [])
    return parameters_to_ndarrays(params), metrics


def run_message(strategy, g, clients, server_round=1, extra_records=None):
    random.seed(0)
    strategy.configure_train(server_round, arrayrecord(g), ConfigRecord(), FakeGrid(range(N)))
    arrays, metrics = strategy.aggregate_train(server_round, message_replies(clients, extra_records))
    return (None if arrays is None else arrays.to_numpy_ndarrays()), metrics


def test_fedavg_matches_flowers_legacy_fedavg():
    g, clients = _round()
    ours, _ = run_legacy(strategies.FedAvg(), g, clients)
    theirs, _ = FlowerFedAvg().aggregate_fit(1, legacy_results(clients), [])
    for a, b in zip(ours, parameters_to_ndarrays(theirs)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fedavg_matches_flowers_message_fedavg():
    g, clients = _round()
    clients = [(a, n, {k: v for k, v in m.items() if k != FISHER_KEY}) for a, n, m in clients]
    ours, _ = run_message(message.FedAvg(), g, clients)
    theirs, _ = FlowerMessageFedAvg().aggregate_train(1, message_replies(clients))
    for a, b in zip(ours, theirs.to_numpy_ndarrays()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_both_adapters_give_identical_parameters(name):
    g, clients = _round(seed=3)
    legacy, _ = run_legacy(make(name), g, clients)
    msg, _ = run_message(make(name, "message"), g, clients)
    for a, b in zip(legacy, msg):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_ground_truth_key_never_reaches_the_defense(name):
    """Output is unchanged when the reserved key is removed or its values shuffled."""
    g, clients = _round(seed=5)
    base, _ = run_legacy(make(name), g, clients)
    removed = [(a, n, {k: v for k, v in m.items() if k != GROUND_TRUTH_KEY}) for a, n, m in clients]
    flipped = [(a, n, {**m, GROUND_TRUTH_KEY: 1 - m[GROUND_TRUTH_KEY]}) for a, n, m in clients]
    for variant in (removed, flipped):
        out, _ = run_legacy(make(name), g, variant)
        for a, b in zip(base, out):
            np.testing.assert_array_equal(a, b)
        out_m, _ = run_message(make(name, "message"), g, variant)
        for a, b in zip(base, out_m):
            np.testing.assert_array_equal(a, b)


def test_defense_sees_no_ground_truth_and_record_keeps_it_for_evaluation():
    seen = []

    class Spy(DEFENSES["fedavg"]):
        def aggregate(self, global_params, round_updates):
            seen.append(round_updates)
            return super().aggregate(global_params, round_updates)

    g, clients = _round(malicious=(1,))
    strategy = strategies.DefenseStrategy(defense=Spy())
    run_legacy(strategy, g, clients)
    ru = seen[0]
    assert not any(GROUND_TRUTH_KEY in str(v) for v in vars(ru).values())
    rec = strategy.records[-1]
    assert rec.ground_truth == {str(k): k == 1 for k in range(N)}
    assert rec.detection()["tpr"] is None  # FedAvg does not detect: no TPR to report


def test_rlr_theta_above_sample_size_fails_when_the_round_is_configured():
    g, _ = _round()
    with pytest.raises(ValueError, match="theta=12 exceeds the 10 clients"):
        strategies.RLR(theta=12).configure_fit(1, ndarrays_to_parameters(g), client_manager(N))
    with pytest.raises(ValueError, match="theta=12 exceeds the 10 clients"):
        message.RLR(theta=12).configure_train(1, arrayrecord(g), ConfigRecord(), FakeGrid(range(N)))


def test_strategy_kwargs_split_between_defense_and_flower():
    s = strategies.RLR(theta=3, server_lr=0.5, fraction_fit=0.5, min_fit_clients=3)
    assert (s.defense.theta, s.defense.server_lr, s.fraction_fit, s.min_fit_clients) == (3, 0.5, 0.5, 3)
    assert "theta=3" in repr(s)
    with pytest.raises(TypeError):
        strategies.RLR(not_an_argument=1)


def test_clients_are_told_the_round_and_asked_for_fisher_only_when_needed():
    g, _ = _round()
    pairs = strategies.FedAvg().configure_fit(3, ndarrays_to_parameters(g), client_manager(N))
    assert all(ins.config["server-round"] == 3 and FISHER_REQUEST_KEY not in ins.config for _, ins in pairs)
    pairs = make("fdcr").configure_fit(4, ndarrays_to_parameters(g), client_manager(N))
    assert all(ins.config[FISHER_REQUEST_KEY] is True for _, ins in pairs)


def test_result_order_does_not_change_the_aggregate():
    g, clients = _round(seed=9)
    a, _ = run_legacy(strategies.RLR(theta=3), g, clients)
    b, _ = run_legacy(strategies.RLR(theta=3), g, list(reversed(clients)))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_every_defense_has_a_strategy_in_both_apis():
    assert set(strategies.STRATEGIES) == set(DEFENSES) == set(message.STRATEGIES)
    for name, cls in strategies.STRATEGIES.items():
        twin = message.STRATEGIES[name]
        assert twin.__name__ == cls.__name__ and twin.defense_class is cls.defense_class
        assert cls.defense_class.paper or name == "clip_noise"


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_every_strategy_prints_its_defense(name):
    text = repr(make(name))
    assert text.startswith(strategies.STRATEGIES[name].__name__) and DEFENSES[name].__name__ in text
