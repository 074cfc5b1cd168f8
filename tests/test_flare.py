"""FLARE (Wang et al., AsiaCCS 2022): the pairwise MMD of penultimate-layer representations
against a direct computation, the neighbour counts, the trust softmax, and the mechanism on a real
model: attackers that move the representations are bounded (a lone one is flagged), a benign
update that is an outlier in parameter space but not in representation space keeps its trust."""

import numpy as np
import pytest
import torch
from torch import nn

from fl_defense import strategies
from fl_defense.defenses import FLARE
from fl_defense.defenses.flare import mmd2_matrix, neighbour_counts
from fl_defense.models import build_model, penultimate
from fl_defense.server_tasks import PenultimateFeatures
from tests.helpers import round_updates


def test_mmd_matches_the_unbiased_estimator_computed_directly():
    gen = torch.Generator().manual_seed(0)
    plrs = torch.randn((5, 7, 3), generator=gen, dtype=torch.float64)
    plrs[3] += 1.5
    got, sigma = mmd2_matrix(plrs, chunk=2)
    gamma = 1 / (2 * sigma ** 2)

    def k(a, b):
        return np.exp(-gamma * ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    p = plrs.numpy()
    m = p.shape[1]
    for i in range(5):
        for j in range(5):
            if i == j:
                continue
            kxx, kyy, kxy = k(p[i], p[i]), k(p[j], p[j]), k(p[i], p[j])
            want = ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                    - 2 * kxy.mean())
            assert abs(float(got[i, j]) - want) < 1e-10
    assert torch.equal(got, got.T) and got[3].sum() > got[0].sum()  # the shifted set is far from all


def test_neighbour_counts_count_how_often_each_client_is_among_the_others_k_nearest():
    pos = torch.tensor([0.0, 0.1, 0.25, 0.4, 5.0])
    dist = (pos[:, None] - pos[None, :]).abs()
    # k = 2: 0 -> {1, 2}; 1 -> {0, 2}; 2 -> {1, 3}; 3 -> {2, 1}; 4 -> {3, 2}
    assert neighbour_counts(dist, 2).tolist() == [1, 3, 4, 2, 0]


def plr_setup():
    """A small MLP (6 -> 16 -> 3), its PLRs on 30 server samples, and the global vector."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    samples = torch.randn((30, 6), generator=torch.Generator().manual_seed(1))
    g = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    return PenultimateFeatures(model, samples, max_samples=30), g


def test_attackers_that_move_the_representations_are_bounded_and_a_parameter_outlier_is_kept():
    features, g = plr_setup()
    d = len(g)
    first_layer = slice(0, 6 * 16 + 16)  # what the PLRs depend on
    last_layer = slice(6 * 16 + 16, d)  # what they do not
    gen = torch.Generator().manual_seed(2)
    u = torch.randn((10, d), generator=gen) * 0.01
    u[6, last_layer] += torch.randn(d - 112, generator=gen) * 2.0  # benign outlier by norm, same PLRs
    shift = torch.randn(112, generator=gen) * 0.5  # the attackers' shared change of the features
    u[7:, first_layer] += shift
    assert u[6].norm() > u[7:].norm(dim=1).max()  # the outlier's update is the longest of all
    res = FLARE(features=features).aggregate(g, round_updates(u.numpy()))
    counts, trust = res.info["counts"], res.weights
    # the honest clients' 5 picks go to honest clients; the attackers count only each other
    assert max(counts[7:].tolist()) <= 2 and int(counts[:7].sum()) >= 7 * 5
    assert float(trust[7:].sum()) < 0.02  # the attackers' share is bounded
    torch.testing.assert_close(res.params, g + trust.to(torch.float32) @ u, rtol=1e-5, atol=1e-6)
    # the outlier's long step moves no representation: it gets exactly the trust it would get
    # without it (a parameter-space rule would single it out)
    without = u.clone()
    without[6, last_layer] = u[0, last_layer]
    ref = FLARE(features=features).aggregate(g, round_updates(without.numpy()))
    assert torch.equal(ref.weights, trust) and not res.flagged[6]


def test_a_lone_attacker_nobody_counts_is_flagged_with_the_lowest_trust():
    features, g = plr_setup()
    gen = torch.Generator().manual_seed(4)
    u = torch.randn((8, len(g)), generator=gen) * 0.01
    u[3, :112] += torch.randn(112, generator=gen) * 0.5
    res = FLARE(features=features).aggregate(g, round_updates(u.numpy()))
    assert res.flagged.tolist() == [False, False, False, True, False, False, False, False]
    assert res.info["counts"][3] == 0 and int(res.weights.argmin()) == 3
    # softmax of the counts with temperature tau
    counts = torch.as_tensor(res.info["counts"], dtype=torch.float64)
    torch.testing.assert_close(res.weights, torch.softmax(counts, 0))
    hot = FLARE(features=features, temperature=4.0).aggregate(g, round_updates(u.numpy()))
    torch.testing.assert_close(hot.weights, torch.softmax(counts / 4.0, 0))


def test_row_order_permutes_the_trust_scores():
    features, g = plr_setup()
    gen = torch.Generator().manual_seed(5)
    u = torch.randn((6, len(g)), generator=gen) * 0.05
    u[5, :112] += 0.3
    a = FLARE(features=features).aggregate(g, round_updates(u.numpy()))
    perm = [4, 2, 0, 5, 1, 3]
    b = FLARE(features=features).aggregate(g, round_updates(u[perm].numpy()))
    torch.testing.assert_close(b.weights, a.weights[perm])
    torch.testing.assert_close(b.params, a.params, rtol=1e-5, atol=1e-6)


def test_penultimate_is_the_input_of_every_models_last_linear_layer():
    x = torch.rand((4, 1, 28, 28))
    for name, width in (("mlp", 64), ("cnn_small", 64), ("rlr_cnn", 128)):
        model = build_model(name, (1, 28, 28), 10, seed=0)
        plr = penultimate(model, x)
        assert plr.shape == (4, width)
        last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        model.eval()
        torch.testing.assert_close(last(plr), model(x))


def test_missing_features_fail_at_construction():
    with pytest.raises(ValueError, match="features must be a callable"):
        strategies.FLARE()
    with pytest.raises(ValueError, match="neighbour_fraction"):
        FLARE(features=lambda p: p, neighbour_fraction=1.0).validate()
