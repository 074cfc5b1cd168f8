"""Baselines: equal to Flower's own strategies where Flower has them; mechanisms shown otherwise."""

import random

import numpy as np
import pytest
import torch
from flwr.common import parameters_to_ndarrays
from flwr.server.strategy import Bulyan as FlowerBulyan
from flwr.server.strategy import FedMedian as FlowerMedian
from flwr.server.strategy import FedTrimmedAvg as FlowerTrimmed
from flwr.server.strategy import Krum as FlowerKrum

from fl_defense import strategies
from fl_defense.defenses import (FLAME, RLR, ClipNoise, FLTrust, FoolsGold, Krum, Median, NormClipping,
                                 SignSGD)
from fl_defense.defenses.krum import krum_scores, squared_distances
from tests.helpers import client_models, legacy_results, model_arrays, round_updates
from tests.test_adapters import run_legacy

N = 11


def _round(seed):
    rng = np.random.default_rng(seed)
    g = model_arrays(rng)
    clients = client_models(g, N, rng, malicious=(3, 8))
    return g, clients


def _assert_same(ours, theirs):
    for a, b in zip(ours, parameters_to_ndarrays(theirs)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("ours, theirs", [
    (lambda: strategies.Krum(num_malicious=2), lambda: FlowerKrum(num_malicious_clients=2)),
    (lambda: strategies.Krum(num_malicious=2, to_keep=5), lambda: FlowerKrum(num_malicious_clients=2, num_clients_to_keep=5)),
    (lambda: strategies.Bulyan(num_malicious=2), lambda: FlowerBulyan(num_malicious_clients=2, to_keep=0)),
    (lambda: strategies.Median(), lambda: FlowerMedian()),
    (lambda: strategies.TrimmedMean(beta=0.2), lambda: FlowerTrimmed(beta=0.2)),
    (lambda: strategies.TrimmedMean(beta=0.1), lambda: FlowerTrimmed(beta=0.1)),
], ids=["krum", "multikrum", "bulyan", "median", "trimmed0.2", "trimmed0.1"])
def test_equal_to_flowers_strategy(ours, theirs, seed):
    g, clients = _round(seed)
    out, _ = run_legacy(ours(), g, clients)
    flower_params, _ = theirs().aggregate_fit(1, legacy_results(clients), [])
    _assert_same(out, flower_params)


def test_krum_picks_the_update_with_the_smallest_neighbour_distance_score():
    rng = np.random.default_rng(0)
    u = rng.normal(size=(7, 20))
    u[5] = u[:5].mean(0)  # the centre of the crowd
    u[6] += 10  # far away
    ru = round_updates(u)
    res = Krum(num_malicious=1).aggregate(torch.zeros(20), ru)
    scores = krum_scores(squared_distances(ru.updates), 1)
    assert int(torch.argmin(scores)) == 5 and not res.flagged[5] and int(res.flagged.sum()) == 6
    torch.testing.assert_close(res.params, ru.updates[5])
    # the score is the sum over the n - f - 2 = 4 nearest neighbours
    d2 = ((u[:, None] - u[None]) ** 2).sum(-1)
    np.testing.assert_allclose(scores.numpy(), np.sort(d2, 1)[:, 1:5].sum(1), rtol=1e-6)


def test_foolsgold_zeroes_colluding_identical_updates_and_keeps_diverse_benign():
    rng = np.random.default_rng(1)
    fg = FoolsGold()
    for _ in range(3):  # histories accumulate across rounds
        benign = rng.normal(size=(6, 50))
        sybil = np.tile(rng.normal(size=50) * 0.1 + np.linspace(1, 2, 50), (3, 1)) + rng.normal(scale=1e-3, size=(3, 50))
        res = fg.aggregate(torch.zeros(50), round_updates(np.vstack([benign, sybil])))
    alpha = res.info["alpha"]
    assert (alpha[6:] == 0).all() and res.flagged[6:].all()
    assert (alpha[:6] > 0.5).all() and not res.flagged[:6].any()
    state = fg.state_dict()
    fg2 = FoolsGold()
    fg2.load_state_dict(state)
    assert set(fg2.history) == set(fg.history)


def test_foolsgold_with_partial_participation_compares_only_sampled_histories():
    fg = FoolsGold()
    rng = np.random.default_rng(2)
    ru = round_updates(rng.normal(size=(4, 10)))
    ru.client_ids[:] = ["a", "b", "c", "d"]
    fg.aggregate(torch.zeros(10), ru)
    ru2 = round_updates(rng.normal(size=(2, 10)))
    ru2.client_ids[:] = ["b", "e"]
    res = fg.aggregate(torch.zeros(10), ru2)
    assert res.weights.shape == (2,) and set(fg.history) == {"a", "b", "c", "d", "e"}


def test_foolsgold_histories_are_rows_of_one_matrix_summed_in_place():
    from fl_defense.defenses.foolsgold import history_gram

    rng = np.random.default_rng(5)
    fg = FoolsGold()
    rounds = [("a", "b", "c"), ("c", "a", "b"), ("d", "b"), ("e", "f", "a", "g")]
    expected: dict[str, np.ndarray] = {}
    storage = None
    for ids in rounds:
        u = rng.normal(size=(len(ids), 3000)).astype(np.float32)
        ru = round_updates(u)
        ru.client_ids[:] = list(ids)
        fg.aggregate(torch.zeros(3000), ru)
        for cid, row in zip(ids, u):
            expected[cid] = expected.get(cid, 0) + row
        if ids == ("c", "a", "b"):  # same clients again: summed in place, nothing reallocated
            assert fg._rows.untyped_storage().data_ptr() == storage
        storage = fg._rows.untyped_storage().data_ptr()
    assert set(fg.history) == set(expected)
    for cid, row in expected.items():
        np.testing.assert_allclose(fg.history[cid].numpy(), row, rtol=1e-5, atol=1e-5)
    # the Gram matrix of scattered rows, block by block (three blocks of columns here), equals the gathered rows' product
    rows = [fg._index[c] for c in ("g", "a", "d", "b")]
    gathered = fg._rows[rows].double()
    torch.testing.assert_close(history_gram(fg._rows, rows, block_bytes=4096), gathered @ gathered.T, rtol=1e-5, atol=1e-3)
    consecutive = list(range(1, 4))
    block = fg._rows[1:4].double()
    torch.testing.assert_close(history_gram(fg._rows, consecutive), block @ block.T, rtol=1e-5, atol=1e-3)
    # a checkpoint restores the same histories
    fg2 = FoolsGold()
    fg2.load_state_dict(fg.state_dict())
    for cid in expected:
        torch.testing.assert_close(fg2.history[cid], fg.history[cid])


def test_flame_drops_an_outlier_direction_and_clips_to_the_median_norm():
    rng = np.random.default_rng(3)
    direction = rng.normal(size=40)
    benign = direction + rng.normal(scale=0.15, size=(7, 40))
    benign[0] *= 4  # a benign client with a large norm but the same direction
    attackers = -direction + rng.normal(scale=0.3, size=(3, 40))
    ru = round_updates(np.vstack([benign, attackers]))
    res = FLAME(noise_lambda=0.0).aggregate(torch.zeros(40), ru)
    # the opposite direction is dropped; the 4x-norm benign client is kept (cosine ignores norm).
    # HDBSCAN's excess-of-mass selection may leave the last benign point to join as noise too.
    assert res.flagged[7:].all() and not res.flagged[0] and int(res.flagged[:7].sum()) <= 1
    adm = ~res.flagged
    norms = torch.linalg.vector_norm(ru.updates, dim=1)
    clipped = ru.updates[adm] * torch.clamp(norms.median() / norms[adm], max=1.0)[:, None]
    torch.testing.assert_close(res.params, clipped.mean(0))
    assert float(torch.linalg.vector_norm(clipped, dim=1).max()) <= float(norms.median()) + 1e-5
    noisy = FLAME(noise_lambda=0.01, seed=1).aggregate(torch.zeros(40), ru).params
    assert 0 < float((noisy - res.params).std()) < 0.05 * float(norms.median())


def test_fltrust_trusts_by_direction_and_normalises_magnitude():
    g0 = torch.tensor([1.0, 0.0, 0.0])
    u = np.array([[2.0, 0.0, 0.0], [10.0, 10.0, 0.0], [-1.0, 0.0, 0.0]])
    res = FLTrust(server_update=lambda p: g0).aggregate(torch.zeros(3), round_updates(u))
    ts = torch.tensor([1.0, np.cos(np.pi / 4), 0.0])
    expected = (ts[0] * torch.tensor([1.0, 0, 0]) + ts[1] * torch.tensor([1.0, 1.0, 0]) / np.sqrt(2)) / ts.sum()
    torch.testing.assert_close(res.params, expected.float())
    assert res.flagged.tolist() == [False, False, True]


def test_norm_clipping_signsgd_and_the_clip_noise_wrapper():
    u = np.array([[3.0, 4.0], [0.3, 0.4]])
    ru = round_updates(u, num_examples=[1, 1])
    torch.testing.assert_close(NormClipping(clip_norm=1.0).aggregate(torch.zeros(2), ru).params,
                               torch.tensor([0.45, 0.6]))
    torch.testing.assert_close(SignSGD(server_lr=0.1).aggregate(torch.zeros(2), ru).params, torch.tensor([0.1, 0.1]))
    wrapped = ClipNoise(Median(), clip_norm=1.0)
    torch.testing.assert_close(wrapped.aggregate(torch.zeros(2), ru).params, torch.tensor([0.45, 0.6]))
    a = ClipNoise(Median(), clip_norm=1.0, noise=0.1, seed=5).aggregate(torch.zeros(2), ru).params
    b = ClipNoise(Median(), clip_norm=1.0, noise=0.1, seed=5).aggregate(torch.zeros(2), ru).params
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, torch.tensor([0.45, 0.6]))


def test_rlr_composes_with_any_base_defense():
    rng = np.random.default_rng(4)
    u = rng.normal(size=(9, 30))
    ru = round_updates(u)
    g = torch.zeros(30)
    rlr_krum = RLR(theta=4, aggregator="krum")
    rlr_krum.validate()
    res = rlr_krum.aggregate(g, ru)
    krum = Krum().aggregate(g, ru)
    lr = RLR(theta=4).robust_lr(ru.updates)
    torch.testing.assert_close(res.params, lr * krum.params)
    assert res.flagged.tolist() == krum.flagged.tolist() and rlr_krum.detects
    with pytest.raises(ValueError, match="aggregator"):
        RLR(aggregator="nonsense").validate()


def test_bulyan_needs_4f_plus_3_clients():
    with pytest.raises(ValueError, match="4f \\+ 3"):
        strategies.Bulyan(num_malicious=3).defense.check_num_clients(11)


def test_rlr_checkpoints_the_state_of_its_base_defense():
    rng = np.random.default_rng(5)
    rlr = RLR(theta=2, aggregator="foolsgold")
    rlr.aggregate(torch.zeros(10), round_updates(rng.normal(size=(4, 10))))
    state = rlr.state_dict()
    assert set(state["base"]["history"]) == {"0", "1", "2", "3"}
    fresh = RLR(theta=2, aggregator="foolsgold")
    fresh.load_state_dict(state)
    assert set(fresh._base().history) == {"0", "1", "2", "3"}


@pytest.mark.parametrize("n", [5, 6, 7, 12])
def test_sorted_column_reductions_match_numpy_across_blocks(n):
    """Median, trimmed mean and Bulyan's closest-to-median mean are computed block by block over
    sorted columns; over several blocks (d spans more than one) they equal the direct formulas."""
    from fl_defense.defenses.aggregators import median_of_rows, reduce_sorted_columns
    from fl_defense.defenses.krum import closest_to_median_mean

    rng = np.random.default_rng(n)
    u = rng.standard_normal((n, 300_000)).astype(np.float32)
    t = torch.from_numpy(u)
    np.testing.assert_allclose(median_of_rows(t).numpy(), np.median(u, axis=0), rtol=0, atol=0)
    cut = n // 5
    trimmed = reduce_sorted_columns(t, lambda s: s[cut:n - cut].mean(dim=0)).numpy()
    np.testing.assert_allclose(trimmed, np.sort(u, axis=0)[cut:n - cut].mean(axis=0), rtol=1e-5, atol=1e-6)
    med = np.median(u[:, :2000], axis=0)
    for beta in range(1, n + 1):
        got = reduce_sorted_columns(t[:, :2000], lambda s: closest_to_median_mean(s, beta)).numpy()
        dev = np.abs(u[:, :2000] - med)
        order = np.argsort(dev, axis=0, kind="stable")
        want = np.take_along_axis(u[:, :2000], order[:beta], axis=0).mean(axis=0)
        # where the beta-th and next-nearest values are equally far (an even n's two middle
        # values), either choice is Bulyan's; compare where the nearest set is unique
        sorted_dev = np.take_along_axis(dev, order, axis=0)
        unique = np.ones(2000, bool) if beta == n else sorted_dev[beta - 1] < sorted_dev[beta]
        assert unique.mean() > 0.4
        np.testing.assert_allclose(got[unique], want[unique], rtol=1e-5, atol=1e-6)


def test_device_paths_of_sorting_and_gram_agree_on_cpu():
    """The torch paths that GPUs take (per-block torch.sort, torch GEMM) give the numpy paths'
    results; run here on the CPU, since CI has no GPU."""
    from fl_defense.defenses.aggregators import reduce_sorted_columns
    from fl_defense.defenses.krum import closest_to_median_mean, gram_matrix

    rng = np.random.default_rng(0)
    u = torch.from_numpy(rng.standard_normal((11, 150_000)).astype(np.float32))
    rows = [0, 2, 3, 5, 7, 8, 10]
    for fn in (lambda s: s[s.shape[0] // 2], lambda s: s[1:-1].mean(dim=0)):
        a = reduce_sorted_columns(u, fn, rows=rows, backend="numpy")
        b = reduce_sorted_columns(u, fn, rows=rows, backend="torch")
        torch.testing.assert_close(a, b)
    for beta in (1, 3, 6, 7):  # Bulyan's window: numpy over the transposed block vs the torch loop
        a = reduce_sorted_columns(u, lambda s: closest_to_median_mean(s, beta), rows=rows, backend="numpy")
        b = reduce_sorted_columns(u, lambda s: closest_to_median_mean(s, beta, backend="torch"), rows=rows,
                                  backend="torch")
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gram_matrix(u, backend="numpy"), gram_matrix(u, backend="torch"), rtol=1e-5, atol=1e-2)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_bulyans_window_mean_never_touches_the_values_it_leaves_out(backend):
    """The beta values closest to the median are summed alone: attackers at +-1e30 around small
    benign values leave no rounding trace in the mean (a window sum taken as a difference of
    running sums would lose the benign values entirely), and the chosen window is the nearest."""
    from fl_defense.defenses.aggregators import reduce_sorted_columns
    from fl_defense.defenses.krum import closest_to_median_mean

    rng = np.random.default_rng(3)
    benign = rng.random((20, 4000)).astype(np.float32) * 1e-3
    u = np.concatenate([benign, np.full((3, 4000), 1e30, np.float32), np.full((3, 4000), -1e30, np.float32)])
    got = reduce_sorted_columns(torch.from_numpy(u), lambda s: closest_to_median_mean(s, 20, backend=backend),
                                backend=backend).numpy()
    np.testing.assert_allclose(got, benign.mean(axis=0), rtol=1e-5)
    # beta = 18 of the 20 benign: the two dropped are the ones farthest from the median
    u2 = np.concatenate([benign, np.full((3, 4000), 1e30, np.float32), np.full((3, 4000), -1e30, np.float32)])
    got18 = reduce_sorted_columns(torch.from_numpy(u2), lambda s: closest_to_median_mean(s, 18, backend=backend),
                                  backend=backend).numpy()
    med = np.median(u2, axis=0)
    near = np.take_along_axis(u2, np.argsort(np.abs(u2 - med), axis=0, kind="stable")[:18], axis=0)
    np.testing.assert_allclose(got18, near.mean(axis=0), rtol=1e-5)
