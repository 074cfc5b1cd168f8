"""RLR (Ozdayi et al. 2021): the learning rate flips exactly where the sign vote falls below theta."""

import numpy as np
import pytest
import torch

from fl_defense.defenses import RLR, FedAvg
from tests.helpers import round_updates


def test_flips_exactly_the_coordinates_whose_vote_is_below_theta():
    # 5 clients, 4 coordinates with sign sums 5, 3, 1, -5 (|.| = 5, 3, 1, 5).
    u = np.array([
        [1.0, 1.0, 1.0, -1.0],
        [1.0, 1.0, 1.0, -1.0],
        [1.0, 1.0, 1.0, -1.0],
        [1.0, 1.0, -1.0, -1.0],
        [1.0, -1.0, -1.0, -1.0],
    ]) * np.array([0.5, 0.2, 0.3, 0.4])
    ru = round_updates(u, num_examples=[1, 1, 1, 1, 1])
    g = torch.zeros(4)
    mean = torch.as_tensor(u.mean(axis=0), dtype=torch.float32)
    for theta, flipped in [(1, []), (2, [2]), (3, [2]), (4, [1, 2]), (5, [1, 2]), ]:
        res = RLR(theta=theta, server_lr=1.0).aggregate(g, ru)
        expected = mean.clone()
        expected[flipped] *= -1
        torch.testing.assert_close(res.params, expected)
        assert res.info["flipped-coordinates"] == len(flipped)
        assert not res.flagged.any()


def test_backdoor_coordinates_are_pushed_back():
    """One attacker moves coordinate 0 that honest clients leave alone; RLR reverses the step there."""
    honest = np.tile(np.array([0.0, 1.0, -1.0]), (9, 1)) * 0.1
    honest[:, 0] = 1e-3 * np.array([1, -1, 1, -1, 1, -1, 1, -1, 1])  # no consistent direction
    attacker = np.array([[5.0, 0.1, -0.1]])
    ru = round_updates(np.vstack([honest, attacker]))
    g = torch.zeros(3)
    fedavg = FedAvg().aggregate(g, ru).params
    rlr = RLR(theta=4).aggregate(g, ru).params
    assert fedavg[0] > 0.3  # the attacker's step goes through plain averaging
    assert rlr[0] < 0  # RLR moves against it
    torch.testing.assert_close(rlr[1:], fedavg[1:])  # agreed coordinates untouched


@pytest.mark.parametrize("theta", [0, -1, 0.5, 2.5, True])
def test_theta_must_be_a_positive_integer(theta):
    with pytest.raises(ValueError, match="theta"):
        RLR(theta=theta).validate()


def test_theta_larger_than_round_is_refused():
    with pytest.raises(ValueError, match="theta=4 exceeds the 3 clients"):
        RLR(theta=4).check_num_clients(3)


def test_median_and_sign_aggregators():
    u = np.array([[1.0, -2.0], [2.0, -1.0], [10.0, 3.0], [3.0, -4.0]])
    ru = round_updates(u)
    g = torch.zeros(2)
    med = RLR(theta=1, aggregator="median").aggregate(g, ru).params
    torch.testing.assert_close(med, torch.tensor([2.5, -1.5]))
    sign = RLR(theta=1, aggregator="sign", server_lr=0.01).aggregate(g, ru).params
    torch.testing.assert_close(sign, torch.tensor([0.01, -0.01]))
    # vote on coordinate 1 is |-1-1+1-1| = 2 < 3: flipped
    sign3 = RLR(theta=3, aggregator="sign", server_lr=0.01).aggregate(g, ru).params
    torch.testing.assert_close(sign3, torch.tensor([0.01, 0.01]))


def test_clipping_bounds_every_update_and_noise_is_seeded():
    rng = np.random.default_rng(1)
    u = rng.normal(size=(6, 50)) * np.array([[1], [2], [5], [10], [0.1], [3]])
    ru = round_updates(u)
    g = torch.zeros(50)
    clipped = RLR(theta=1, clip_norm=1.0).aggregate(g, ru).params
    assert float(torch.linalg.vector_norm(clipped)) <= 1.0 + 1e-5  # mean of vectors with norm <= 1
    a = RLR(theta=1, clip_norm=1.0, noise=0.5, seed=3).aggregate(g, ru).params
    b = RLR(theta=1, clip_norm=1.0, noise=0.5, seed=3).aggregate(g, ru).params
    c = RLR(theta=1, clip_norm=1.0, noise=0.5, seed=4).aggregate(g, ru).params
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    assert 0.2 < float((a - clipped).std()) < 0.8  # noise std = sigma * C = 0.5


def test_weighted_mean_uses_sample_counts():
    u = np.array([[1.0], [3.0]])
    res = RLR(theta=1).aggregate(torch.zeros(1), round_updates(u, num_examples=[3, 1]))
    torch.testing.assert_close(res.params, torch.tensor([1.5]))
    torch.testing.assert_close(res.weights, torch.tensor([0.75, 0.25]))
