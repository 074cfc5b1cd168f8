"""The NumPyClient: trains without aliasing the global arrays, attacks when chosen, ships Fisher on request."""

import numpy as np

from client_app.app import DefenseClient
from fl_defense.attacks import select_attackers
from fl_defense.config import ExperimentConfig
from fl_defense.fisher import decode_fisher
from fl_defense.models import trainable_mask
from fl_defense.rounds import FISHER_KEY, FISHER_REQUEST_KEY, GROUND_TRUTH_KEY
from fl_defense.updates import ParamLayout


def _client(partition_id, **over):
    cfg = ExperimentConfig.from_run_config({"local-epochs": 1, **over})
    return DefenseClient(cfg, partition_id, num_partitions=10)


def test_fit_returns_a_real_update_and_leaves_the_global_arrays_untouched():
    c = _client(0)
    g = c.get_parameters({})
    g_copy = [a.copy() for a in g]
    arrays, n, metrics = c.fit(g, {"server-round": 1})
    for a, b in zip(g, g_copy):
        np.testing.assert_array_equal(a, b)  # the caller's arrays were not trained in place
    assert sum(float(np.abs(a - b).sum()) for a, b in zip(arrays, g)) > 0
    assert n == len(c.labels) and metrics["partition-id"] == 0 and FISHER_KEY not in metrics


def test_attacker_poisons_and_reports_ground_truth_for_evaluation_only():
    attacker = select_attackers(10, 0.1, 42)[0]
    c = _client(attacker)
    _, _, metrics = c.fit(c.get_parameters({}), {"server-round": 1})
    assert metrics[GROUND_TRUTH_KEY] == 1 and metrics["num-poisoned"] > 0
    honest = _client((attacker + 1) % 10)
    _, _, m2 = honest.fit(honest.get_parameters({}), {"server-round": 1})
    assert m2[GROUND_TRUTH_KEY] == 0 and m2["num-poisoned"] == 0


def test_fisher_is_shipped_when_the_server_asks():
    c = _client(1)
    g = c.get_parameters({})
    arrays, _, metrics = c.fit(g, {"server-round": 1, FISHER_REQUEST_KEY: True})
    layout = ParamLayout.from_arrays(g, trainable_mask(c.model))
    fisher = decode_fisher(metrics[FISHER_KEY], layout.dim)
    assert fisher.shape == (layout.dim,) and (fisher >= 0).all() and fisher.sum() > 0


def test_same_seed_same_update():
    a = _client(2).fit(_client(2).get_parameters({}), {"server-round": 3})[0]
    b = _client(2).fit(_client(2).get_parameters({}), {"server-round": 3})[0]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_attackers_train_their_own_epochs_and_everything_honest_trains_local_epochs(monkeypatch):
    import client_app.app as ca

    attacker = select_attackers(10, 0.1, 42)[0]
    real_train, epochs = ca.train, []

    def counting(model, images, labels, e, *a, **k):
        epochs.append(e)
        return real_train(model, images, labels, e, *a, **k)

    monkeypatch.setattr(ca, "train", counting)
    c = _client(attacker, **{"attacker-local-epochs": 3})
    c.fit(c.get_parameters({}), {"server-round": 1})
    assert epochs == [3]
    honest = _client((attacker + 1) % 10, **{"attacker-local-epochs": 3})
    epochs.clear()
    honest.fit(honest.get_parameters({}), {"server-round": 1})
    assert epochs == [1]  # local-epochs
    # a colluding attacker's honest update (what it would have sent) trains local-epochs too
    epochs.clear()
    c = _client(attacker, **{"attacker-local-epochs": 3, "model-poisoning": "alie_backdoor"})
    c.fit(c.get_parameters({}), {"server-round": 1})
    assert sorted(epochs) == [1, 3]
    # 0: as a benign client
    epochs.clear()
    c = _client(attacker)
    c.fit(c.get_parameters({}), {"server-round": 1})
    assert epochs == [1]


def test_a_forged_fisher_changes_nothing_when_the_server_asks_for_no_fisher():
    """What lets the leaderboard give a forged-Fisher column the plus cell of every defense that reads
    no Fisher (simulation.leaderboard.effective_config): without the request an attacker's reply is
    the same whatever fisher-forgery says; with it, the Fisher differs."""
    attacker = select_attackers(10, 0.1, 42)[0]
    replies = {}
    for forgery in ("none", "clean", "mimic", "noise"):
        for request in (False, True):
            c = _client(attacker, **{"fisher-forgery": forgery, "defense": "fedavg"})
            replies[forgery, request] = c.fit(c.get_parameters({}), {"server-round": 1, FISHER_REQUEST_KEY: request})
    for forgery in ("clean", "mimic", "noise"):
        (a, n, m), (b, n0, m0) = replies[forgery, False], replies["none", False]
        assert n == n0 and m == m0 and FISHER_KEY not in m
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
        assert replies[forgery, True][2][FISHER_KEY] != replies["none", True][2][FISHER_KEY]
