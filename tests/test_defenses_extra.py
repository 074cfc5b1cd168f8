"""The robust-aggregation baselines of issue 19 (RFA, centered clipping, bucketing, NNM, DnC,
SignGuard, Multi-metrics, RFLBAT, AlignIns) on constructed rounds: each one's mechanism against
a direct computation of its paper's rule, the attacker it must catch or bound and the benign
outlier it must keep; row order, ground truth and checkpoints do not change what it does."""

import numpy as np
import pytest
import torch

from fl_defense import strategies
from fl_defense.defenses import FedAvg, Krum, Median
from fl_defense.defenses.alignins import AlignIns, mz_scores
from fl_defense.defenses.bucketing import Bucketing
from fl_defense.defenses.centered_clipping import CenteredClipping
from fl_defense.defenses.dnc import DnC, top_direction_scores
from fl_defense.defenses.multimetrics import MultiMetrics, manhattan_row_sums, multi_metric_features
from fl_defense.defenses.nnm import NNM, mixing_matrix
from fl_defense.defenses.rfa import RFA
from fl_defense.defenses.rflbat import RFLBAT, pca_2d_from_gram
from fl_defense.defenses.signguard import SignGuard
from fl_defense.rounds import GROUND_TRUTH_KEY
from fl_defense.strategies import message
from tests.helpers import round_updates as _round_updates
from tests.test_adapters import _round, run_legacy, run_message

D = 400


def round_updates(u, num_examples=None):
    """A round over a copy of ``u`` (the helper shares float32 memory, and NNM mixes in place)."""
    return _round_updates(np.array(u, dtype=np.float32, copy=True), num_examples)


def benign_and_attackers(n_benign=12, n_attackers=4, seed=0, d=D, spread=0.3):
    """Benign updates around a common direction with their own noise; attackers (the last rows)
    all push one shared backdoor direction: alike among themselves, unlike the honest ones."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=d) / np.sqrt(d)
    benign = direction + spread * rng.normal(size=(n_benign, d)) / np.sqrt(d)
    backdoor = rng.normal(size=d) / np.sqrt(d)
    attackers = 0.5 * direction + backdoor + 0.02 * rng.normal(size=(n_attackers, d)) / np.sqrt(d)
    return np.vstack([benign, attackers]).astype(np.float32), direction


def permuted(ru, perm):
    out = round_updates(ru.updates.numpy()[perm], ru.num_examples.numpy()[perm])
    out.client_ids[:] = [ru.client_ids[i] for i in perm]
    return out


def fresh(name):
    return {
        "rfa": lambda: RFA(),
        "centered_clipping": lambda: CenteredClipping(tau=0.5, iterations=3),
        "nnm": lambda: NNM(Median(), num_malicious=3),
        "dnc": lambda: DnC(num_malicious=4, subsample_dim=100, seed=3),
        "signguard": lambda: SignGuard(seed=3),
        "multi_metrics": lambda: MultiMetrics(),
        "rflbat": lambda: RFLBAT(seed=1),
        "alignins": lambda: AlignIns(),
        "bucketing": lambda: Bucketing(Median(), bucket_size=2, seed=5),
    }[name]()


PERMUTATION_INVARIANT = ["rfa", "centered_clipping", "nnm", "dnc", "signguard", "multi_metrics", "rflbat", "alignins"]
ALL = PERMUTATION_INVARIANT + ["bucketing"]


# --- what every rule shares -------------------------------------------------------------------

@pytest.mark.parametrize("name", PERMUTATION_INVARIANT)
def test_row_order_does_not_change_the_aggregate(name):
    """Rules that treat clients symmetrically give the same step, and each client the same weight
    and flag, whichever order the rows come in (seeded sampling draws the same coordinates)."""
    u, _ = benign_and_attackers(seed=2)
    sizes = np.random.default_rng(0).integers(20, 80, size=len(u))
    ru = round_updates(u, sizes)
    perm = np.random.default_rng(1).permutation(len(u))
    g = torch.full((D,), 0.01)
    a = fresh(name).aggregate(g, round_updates(u, sizes))
    b = fresh(name).aggregate(g, permuted(ru, perm))
    torch.testing.assert_close(a.params, b.params, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.weights[perm], b.weights, rtol=1e-5, atol=1e-7)
    assert a.flagged[perm].tolist() == b.flagged.tolist()


@pytest.mark.parametrize("name", ALL)
def test_same_rows_same_result_and_adapters_agree_without_ground_truth(name):
    """Through both Flower adapters: the output is identical with the ground-truth key present,
    removed or flipped, and the two APIs give the same parameters."""
    g, clients = _round(seed=5)
    base, _ = run_legacy(strategies.DefenseStrategy(defense=fresh(name)), g, clients)
    removed = [(a, n, {k: v for k, v in m.items() if k != GROUND_TRUTH_KEY}) for a, n, m in clients]
    flipped = [(a, n, {**m, GROUND_TRUTH_KEY: 1 - m[GROUND_TRUTH_KEY]}) for a, n, m in clients]
    for variant in (clients, removed, flipped):
        out, _ = run_legacy(strategies.DefenseStrategy(defense=fresh(name)), g, variant)
        out_m, _ = run_message(message.DefenseStrategy(defense=fresh(name)), g, variant)
        for a, b, c in zip(base, out, out_m):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("name", ALL)
def test_float64_models_are_aggregated_in_float64(name):
    g32, clients32 = _round(seed=6)
    g = [a.astype(np.float64) for a in g32]
    clients = [([a.astype(np.float64) for a in arrays], n, m) for arrays, n, m in clients32]
    out, _ = run_legacy(strategies.DefenseStrategy(defense=fresh(name)), g, clients)
    assert all(a.dtype == np.float64 and np.isfinite(a).all() for a in out)


@pytest.mark.parametrize("name", ["centered_clipping", "dnc", "signguard", "bucketing"])
def test_state_survives_a_checkpoint(name):
    """A defense restored from round 1's state_dict does in round 2 exactly what the one that ran
    round 1 does (the kept centre; the generator that draws coordinates or buckets)."""
    u1, _ = benign_and_attackers(seed=3)
    u2, _ = benign_and_attackers(seed=4)
    g = torch.zeros(D)
    ran = fresh(name)
    ran.aggregate(g, round_updates(u1))
    state = ran.state_dict()
    assert state, f"{name} saved no state"
    restored = fresh(name)
    restored.load_state_dict(state)
    a, b = ran.aggregate(g, round_updates(u2)), restored.aggregate(g, round_updates(u2))
    torch.testing.assert_close(a.params, b.params, rtol=0, atol=0)
    assert a.flagged.tolist() == b.flagged.tolist()
    # and a defense that did not run round 1 does something else: the state matters
    c = fresh(name).aggregate(g, round_updates(u2))
    assert not torch.equal(a.params, c.params) or a.info != c.info


@pytest.mark.parametrize("name", ALL)
def test_validation_names_the_parameter(name):
    bad = {
        "rfa": RFA(nu=0), "centered_clipping": CenteredClipping(tau=-1), "nnm": NNM(Median(), num_malicious=-1),
        "dnc": DnC(iterations=0), "signguard": SignGuard(lower=2, upper=1), "multi_metrics": MultiMetrics(keep_fraction=0),
        "rflbat": RFLBAT(k_max=1), "alignins": AlignIns(direction="sideways"), "bucketing": Bucketing(Median(), bucket_size=0),
    }[name]
    fresh(name).validate()
    with pytest.raises(ValueError):
        bad.validate()


# --- RFA --------------------------------------------------------------------------------------

def weiszfeld_directly(points, alpha, nu, iters, tol):
    v = alpha @ points
    obj = alpha @ np.linalg.norm(points - v, axis=1)
    for _ in range(iters):
        beta = alpha / np.maximum(nu, np.linalg.norm(points - v, axis=1))
        v = beta @ points / beta.sum()
        new = alpha @ np.linalg.norm(points - v, axis=1)
        if abs(obj - new) <= tol * new:
            break
        obj = new
    return v


def test_rfa_is_the_smoothed_weiszfeld_geometric_median_and_bounds_far_attackers():
    rng = np.random.default_rng(0)
    benign = rng.normal(size=(9, 50))
    attackers = benign[:3] + 100.0  # far away: they drag the mean by ~25 per coordinate
    u = np.vstack([benign, attackers])
    sizes = rng.integers(10, 60, size=12)
    ru = round_updates(u, sizes)
    alpha = sizes / sizes.sum()
    res = RFA(max_iter=50, tol=0).aggregate(torch.zeros(50), ru)
    want = weiszfeld_directly(u.astype(np.float32).astype(np.float64), alpha, 1e-5, 50, 0)
    np.testing.assert_allclose(res.params.numpy(), want, rtol=1e-4, atol=1e-4)
    # the geometric median stays with the majority: far closer to the benign mean than the mean is
    benign_mean = benign.mean(0)
    assert np.linalg.norm(res.params.numpy() - benign_mean) < 0.1 * np.linalg.norm(alpha @ u - benign_mean)
    assert res.weights[9:].sum() < 0.05 and torch.isclose(res.weights.sum(), torch.tensor(1.0))
    torch.testing.assert_close(res.params, res.weights @ ru.updates)
    # the default (4 iterations) already beats the mean by far, and its objective only falls
    short = RFA().aggregate(torch.zeros(50), round_updates(u, sizes))
    assert all(a >= b - 1e-9 for a, b in zip(short.info["objective"], short.info["objective"][1:]))
    assert np.linalg.norm(short.params.numpy() - benign_mean) < 0.5 * np.linalg.norm(alpha @ u - benign_mean)


# --- centered clipping --------------------------------------------------------------------------

def test_centered_clipping_follows_its_recursion_and_bounds_an_attacker_per_round():
    rng = np.random.default_rng(1)
    benign = 0.1 * rng.normal(size=(9, 30)) + 0.2
    attacker = np.full((1, 30), 50.0)
    u = np.vstack([benign, attacker]).astype(np.float32)
    tau, n = 0.5, 10
    cc = CenteredClipping(tau=tau, iterations=2)
    res = cc.aggregate(torch.zeros(30), round_updates(u))
    v = np.zeros(30)
    for _ in range(2):
        dist = np.linalg.norm(u - v, axis=1)
        v = v + ((u - v) * np.minimum(1, tau / dist)[:, None]).mean(0)
    np.testing.assert_allclose(res.params.numpy(), v, rtol=1e-5, atol=1e-6)
    # the attacker moves the aggregate by at most tau / n per iteration, whatever its size
    clean = CenteredClipping(tau=tau, iterations=2).aggregate(torch.zeros(30), round_updates(u[:9]))
    assert np.linalg.norm(res.params.numpy() - clean.params.numpy()) <= 2 * 2 * tau / n + 1e-5
    torch.testing.assert_close(cc.center, res.params)
    # next round starts from this round's aggregate: identical rows at the centre are not moved
    u2 = np.tile(res.params.numpy(), (5, 1))
    again = cc.aggregate(torch.zeros(30), round_updates(u2))
    torch.testing.assert_close(again.params, res.params)
    assert again.info["center-share"] == pytest.approx(0.0, abs=1e-6) or torch.allclose(again.params, res.params)


def test_centered_clipping_refuses_a_centre_of_another_size():
    cc = CenteredClipping()
    cc.aggregate(torch.zeros(5), round_updates(np.ones((3, 5))))
    with pytest.raises(ValueError, match="centre"):
        cc.aggregate(torch.zeros(6), round_updates(np.ones((3, 6))))
    with pytest.raises(ValueError, match="unknown state"):
        cc.load_state_dict({"nonsense": 1})


# --- bucketing ------------------------------------------------------------------------------

def test_bucketing_hands_the_inner_rule_the_bucket_means():
    rng = np.random.default_rng(2)
    u = rng.normal(size=(7, 20)).astype(np.float32)
    b = Bucketing(Median(), bucket_size=3, seed=4)
    groups = Bucketing(Median(), bucket_size=3, seed=4).buckets(7)
    assert sorted(k for m in groups for k in m) == list(range(7)) and [len(m) for m in groups] == [3, 3, 1]
    res = b.aggregate(torch.zeros(20), round_updates(u))
    means = np.stack([u[m].mean(0) for m in groups])
    np.testing.assert_allclose(res.params.numpy(), np.median(means, axis=0), rtol=1e-6, atol=1e-6)
    # weights: a bucket's weight is shared by its members; over a linear inner rule exact
    fed = Bucketing(FedAvg(), bucket_size=3, seed=4).aggregate(torch.zeros(20), round_updates(u, [5, 1, 2, 8, 3, 3, 9]))
    torch.testing.assert_close(fed.params, fed.weights @ torch.from_numpy(u), rtol=1e-5, atol=1e-6)
    # the next round draws other buckets; another seed, other buckets
    assert b.buckets(7) != groups or Bucketing(Median(), 3, seed=5).buckets(7) != groups


def test_bucketing_flags_a_bucket_holding_an_attacker_and_keeps_krum_near_the_mean():
    """Krum alone picks one heterogeneous benign client; over buckets of 3 it picks a bucket mean,
    which is closer to the honest mean. A far attacker's bucket is flagged with it."""
    rng = np.random.default_rng(3)
    u = rng.normal(size=(12, 40)).astype(np.float32)
    u[11] += 30
    res = Bucketing(Krum(num_malicious=1), bucket_size=3, seed=0).aggregate(torch.zeros(40), round_updates(u))
    assert res.flagged[11]
    groups = res.info["buckets"]
    with_attacker = next(m for m in groups if "11" in m)
    assert all(res.flagged[int(c)] for c in with_attacker)
    honest_mean = u[:11].mean(0)
    alone = Krum(num_malicious=1).aggregate(torch.zeros(40), round_updates(u)).params.numpy()
    assert np.linalg.norm(res.params.numpy() - honest_mean) < np.linalg.norm(alone - honest_mean)


# --- NNM --------------------------------------------------------------------------------------

def test_nnm_mixes_each_update_with_its_nearest_neighbours_in_place():
    rng = np.random.default_rng(4)
    u = rng.normal(size=(9, 3000)).astype(np.float32)
    u[8] += 20  # an attacker far from everyone
    f = 2
    d2 = ((u[:, None].astype(np.float64) - u[None]) ** 2).sum(-1)
    np.fill_diagonal(d2, -1)
    nearest = np.argsort(d2, axis=1, kind="stable")[:, :9 - f]
    mixed = np.stack([u[nb].mean(0) for nb in nearest])
    torch.testing.assert_close(mixing_matrix(torch.from_numpy(u), f),
                               torch.from_numpy(np.stack([np.isin(np.arange(9), nb) / 7.0 for nb in nearest])))
    ru = round_updates(u)
    res = NNM(FedAvg(), num_malicious=f).aggregate(torch.zeros(3000), ru)
    np.testing.assert_allclose(ru.updates.numpy(), mixed, rtol=1e-5, atol=1e-5)  # the workspace holds the mixed rows
    torch.testing.assert_close(res.params, res.weights @ torch.from_numpy(u), rtol=1e-5, atol=1e-5)
    # mixed, the attacker's row is 6/7 honest: the median over mixed rows barely sees it
    med = NNM(Median(), num_malicious=f).aggregate(torch.zeros(3000), round_updates(u)).params.numpy()
    plain = np.median(u, axis=0)
    assert np.abs(mixed[8] - u[:8].mean(0)).mean() < 20 / 7 + 0.5
    assert np.abs(med - np.median(u[:8], axis=0)).mean() < np.abs(plain - np.median(u[:8], axis=0)).mean() + 0.2


def test_nnm_needs_an_honest_majority():
    with pytest.raises(ValueError, match="n > 2f"):
        NNM(Median(), num_malicious=5).check_num_clients(10)


def test_nnm_mixing_on_numpy_blocks_equals_the_torch_product():
    from fl_defense.defenses.nnm import mix_rows_in_place
    rng = np.random.default_rng(4)
    u = rng.normal(size=(9, 70_000)).astype(np.float32)  # several column blocks
    mix = mixing_matrix(torch.from_numpy(u), 2)
    on_numpy, on_torch = torch.from_numpy(u.copy()), torch.from_numpy(u.copy())
    mix_rows_in_place(on_numpy, mix)
    mix_rows_in_place(on_torch, mix, backend="torch")
    np.testing.assert_allclose(on_numpy.numpy(), on_torch.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(on_numpy.numpy(), mix.numpy() @ u.astype(np.float64), rtol=1e-5, atol=1e-6)


# --- DnC --------------------------------------------------------------------------------------

def test_dnc_removes_the_updates_along_the_top_singular_direction():
    u, _ = benign_and_attackers(n_benign=12, n_attackers=4, seed=5)
    u[0] *= 1.5  # a benign client with a larger norm in the honest direction (at 2x it is removed too)
    res = DnC(num_malicious=4, subsample_dim=200, seed=0).aggregate(torch.zeros(D), round_updates(u))
    assert res.flagged[12:].all() and not res.flagged[:12].any()
    w = np.zeros(16)
    w[:12] = 1 / 12
    torch.testing.assert_close(res.params, torch.from_numpy(w.astype(np.float32)) @ torch.from_numpy(u))
    # scores: squared projections on the top right singular vector of the centred rows
    x = u[:, :50].astype(np.float64)
    c = x - x.mean(0)
    _, s, vt = np.linalg.svd(c, full_matrices=False)
    np.testing.assert_allclose(top_direction_scores(torch.from_numpy(u[:, :50])).numpy(), (c @ vt[0]) ** 2, rtol=1e-6)


# --- SignGuard ----------------------------------------------------------------------------------

def test_signguard_filters_by_norm_and_by_sign_statistics_and_clips_to_the_median():
    rng = np.random.default_rng(6)
    d = 5000
    benign = np.abs(rng.normal(size=(10, d))) * np.where(rng.random((10, d)) < 0.6, 1, -1)  # ~60% positive
    benign[0] *= 2.0  # a benign client with twice the norm: kept, clipped
    sign_flippers = -benign[1:4].copy()  # ~60% negative: their norms are ordinary
    huge = benign[4:5] * 10  # an ordinary sign pattern with 10x the norm
    u = np.vstack([benign, sign_flippers, huge]).astype(np.float32)
    res = SignGuard(seed=0).aggregate(torch.zeros(d), round_updates(u))
    flagged = res.flagged.numpy()
    assert flagged[10:].all() and not flagged[:10].any()
    assert res.info["norm-filter"][13] is False and all(res.info["norm-filter"][10:13])  # sign flippers pass the norm test
    assert not any(res.info["sign-filter"][10:13]) and res.info["sign-filter"][13]  # and fail the sign test
    norms = np.linalg.norm(u, axis=1)
    m = np.median(norms)
    want = (u[:10] * np.minimum(1, m / norms[:10])[:, None]).mean(0)
    np.testing.assert_allclose(res.params.numpy(), want, rtol=1e-4, atol=1e-5)


def test_sign_statistics_on_numpy_rows_equal_the_torch_gather():
    from fl_defense.defenses.sampling import sample_columns
    from fl_defense.defenses.signguard import sign_statistics
    rng = np.random.default_rng(6)
    u = rng.normal(size=(6, 150_000)).astype(np.float32)
    u[1, ::2] = 0
    u[2] = 0
    cols = sample_columns(np.random.default_rng(1), u.shape[1], 70_000)  # more than one gathered piece
    got = sign_statistics(torch.from_numpy(u), cols)
    np.testing.assert_array_equal(got, sign_statistics(torch.from_numpy(u), cols, backend="torch"))
    x = u[:, cols]
    np.testing.assert_array_equal(got[:, 0] * len(cols), (x > 0).sum(1))
    np.testing.assert_array_equal(got[:, 2] * len(cols), (x < 0).sum(1))


# --- Multi-metrics -------------------------------------------------------------------------------

def test_multimetrics_features_equal_the_pairwise_sums_and_scores_the_whitened_form():
    u, _ = benign_and_attackers(n_benign=12, n_attackers=4, seed=7)
    x = u.astype(np.float64)
    norms = np.linalg.norm(x, axis=1)
    cos = x @ x.T / np.outer(norms, norms)
    manhattan = np.abs(x[:, None] - x[None]).sum(-1).sum(1)
    want = np.stack([((1 - cos) ** 2 * (1 - np.eye(16))).sum(1), manhattan,
                     np.abs(norms[:, None] - norms[None]).sum(1)], axis=1)
    np.testing.assert_allclose(multi_metric_features(torch.from_numpy(u)), want, rtol=1e-4)
    res = MultiMetrics(keep_fraction=0.3).aggregate(torch.zeros(D), round_updates(u))
    feats = np.array(res.info["features"])
    scores = np.einsum("ij,jk,ik->i", feats, np.linalg.inv(np.cov(feats.T)), feats)
    np.testing.assert_allclose(res.info["scores"], scores, rtol=1e-6)
    kept = np.sort(np.argsort(scores)[:4])  # int(0.3 * 16) lowest
    assert np.flatnonzero(~res.flagged.numpy()).tolist() == kept.tolist()
    w = np.zeros(16)
    w[kept] = 1 / 4
    torch.testing.assert_close(res.params, torch.from_numpy(w.astype(np.float32)) @ torch.from_numpy(u))


@pytest.mark.parametrize("seed", range(4))
def test_multimetrics_keeps_only_honest_updates_against_boosted_opposite_attackers(seed):
    """Heterogeneous benign updates (directions and norms vary, so every metric varies) and a
    30% minority of boosted updates pointing the other way: the lowest-scored 30% are honest."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=D) / np.sqrt(D)
    benign = (direction + rng.normal(size=(14, D)) / np.sqrt(D)) * rng.uniform(0.3, 1.7, size=(14, 1))
    attackers = (-direction + 0.05 * rng.normal(size=(6, D)) / np.sqrt(D)) * 4
    res = MultiMetrics().aggregate(torch.zeros(D), round_updates(np.vstack([benign, attackers])))
    assert res.flagged[14:].all() and int((~res.flagged).sum()) == 6


def test_manhattan_row_sums_over_many_blocks_and_ties():
    rng = np.random.default_rng(8)
    u = rng.integers(-3, 4, size=(7, 300_000)).astype(np.float32)  # many ties
    got = manhattan_row_sums(torch.from_numpy(u)).numpy()
    want = np.array([np.abs(u - u[i]).astype(np.float64).sum() for i in range(7)])
    np.testing.assert_allclose(got, want, rtol=1e-12)


# --- RFLBAT -------------------------------------------------------------------------------------

def test_rflbat_drops_the_tight_cluster_and_far_outliers():
    u, _ = benign_and_attackers(n_benign=12, n_attackers=4, seed=9, spread=1.0)
    far = u[:1] * 40  # an update 40x out: removed by the first outlier filter
    u = np.vstack([u, far]).astype(np.float32)
    res = RFLBAT(seed=0).aggregate(torch.zeros(D), round_updates(u))
    assert res.flagged[12:].all(), res.flagged
    assert not res.flagged[:12].all()  # some honest clients are kept (CH may split them: the rule keeps one cluster)
    assert 16 not in res.info["first-filter"]
    medians = res.info["clusters"]
    assert medians[max(medians, key=lambda c: -medians[c])] == min(medians.values())
    attackers_cluster_similarity = max(v for v in medians.values() if np.isfinite(v))
    assert attackers_cluster_similarity > 0.99  # the tight attackers' cluster, not chosen
    kept = ~res.flagged.numpy()
    np.testing.assert_allclose(res.params.numpy(), u[kept].mean(0), rtol=1e-5, atol=1e-6)
    # the 2-D coordinates are PCA's (pairwise distances equal scikit-learn's projection)
    from sklearn.decomposition import PCA
    x = u.astype(np.float64)
    ref = PCA(n_components=2).fit_transform(x)
    ours = np.array(res.info["pca"])
    dist = lambda p: np.linalg.norm(p[:, None] - p[None], axis=-1)
    np.testing.assert_allclose(dist(ours), dist(ref), rtol=1e-4, atol=1e-4)


# --- AlignIns ------------------------------------------------------------------------------------

def test_alignins_mpsa_and_tda_catch_sign_and_direction_outliers_and_clip():
    rng = np.random.default_rng(10)
    d = 2000
    global_params = torch.from_numpy(rng.normal(size=d).astype(np.float32))
    honest = 0.05 * global_params.numpy()  # benign updates lean along the model (TDA ~ 0.45)
    benign = honest + 0.1 * rng.normal(size=(10, d))
    benign[0] *= 3  # a larger benign update: same alignment, kept and clipped
    backdoor = honest + 0.1 * rng.normal(size=(3, d))
    top = np.argsort(-np.abs(backdoor), axis=1)[:, : int(0.3 * d)]
    for i in range(3):  # flip the signs of their largest coordinates: principal-sign outliers
        backdoor[i, top[i][: len(top[i]) // 2]] *= -1
    u = np.vstack([benign, backdoor]).astype(np.float32)
    ru = round_updates(u)
    res = AlignIns().aggregate(global_params, ru)
    assert res.flagged[10:].all() and not res.flagged[:10].any(), res.info
    # MPSA against the definition (top-k by magnitude, agreement with the sign of the sign sum)
    k = int(0.3 * d)
    principal = np.sign(np.sign(u).sum(0))
    want = [(np.sign(u[i][np.argsort(-np.abs(u[i]))[:k]]) == principal[np.argsort(-np.abs(u[i]))[:k]]).mean() for i in range(13)]
    np.testing.assert_allclose(res.info["mpsa"], want, rtol=1e-6)
    g = global_params.numpy().astype(np.float64)
    tda = u @ g / (np.linalg.norm(u, axis=1) * np.linalg.norm(g))
    np.testing.assert_allclose(res.info["tda"], tda, rtol=1e-4)
    norms = np.linalg.norm(u[:10], axis=1)
    bound = np.sort(norms)[4]  # torch's median of ten: the lower middle
    want_step = (u[:10] * np.minimum(1, bound / norms)[:, None]).mean(0)
    np.testing.assert_allclose(res.params.numpy() - g, want_step, rtol=1e-4, atol=1e-5)


def test_alignins_mz_scores_and_ties_at_the_threshold():
    np.testing.assert_allclose(mz_scores(np.array([1.0, 1.0, 4.0])), [0.0, 0.0, 3.0 / np.std([1, 1, 4])])
    assert (mz_scores(np.ones(4)) == 0).all()
    from fl_defense.defenses.alignins import masked_sign_alignment
    u = torch.tensor([[1.0, -1.0, 1.0, -1.0]])  # all tied: two of the k = 2 places, half agree
    assert masked_sign_alignment(u, torch.ones(4), 2)[0] == pytest.approx(0.5)


def test_mpsa_counts_equal_the_direct_formula_on_long_rows_with_ties_and_zeros():
    """The one-product counting and the bracketed threshold (``kth_smallest``) against the
    direct rule (sign equality, np.partition threshold) on rows long enough for the bracket."""
    from fl_defense.defenses.aggregators import sign_sum
    from fl_defense.defenses.alignins import kth_smallest, masked_sign_alignment

    def direct(x, p, k):
        out = []
        for row in x:
            mag = np.abs(row)
            t = np.partition(mag, len(row) - k)[len(row) - k]
            agree, above, at = np.sign(row) == p, mag > t, mag == t
            need = k - int(above.sum())
            out.append((float((agree & above).sum()) + need * float((agree & at).sum()) / int(at.sum())) / k)
        return np.array(out)

    rng = np.random.default_rng(5)
    d = 150_000
    u = (0.01 * rng.standard_normal((8, d))).astype(np.float32)
    u[0, : d // 2] = 0  # zeros reach the threshold at large k
    u[1] = np.round(u[1] * 100) / 100  # many ties at the threshold
    u[2] = np.sort(u[2])  # a sorted row: the strided sample still brackets
    u[3, ::3] = 0
    p = torch.sign(sign_sum(torch.from_numpy(u)))
    p[:500] = 0
    for k in (1, 1500, d // 3, d // 2 + 10, d - 1, d):
        np.testing.assert_array_equal(masked_sign_alignment(torch.from_numpy(u), p, k), direct(u, p.numpy(), k))
    for row in (u[0], u[1], u[2], np.full(d, 2.0, dtype=np.float32)):
        for r in (0, 17, d // 2, d - 1):
            t = np.partition(row, r)[r]
            assert kth_smallest(row, r) == (t, np.count_nonzero(row > t), np.count_nonzero(row == t))


@pytest.mark.parametrize("wrap", ["nnm", "bucketing"])
def test_a_wrapped_krum_returns_the_row_it_picked_not_a_clients_own_model(wrap):
    """Krum alone returns the picked client's own arrays (``DefenseResult.selected``). Over NNM it
    picks a mixed row, over bucketing a bucket's mean: no client's model, so the round's new model
    is global + that row (the defense's params), never the arrays of the client with its index."""
    from fl_defense.rounds import ClientResult, DefendedAggregation

    rng = np.random.default_rng(7)
    g = [rng.normal(size=(6, 5)).astype(np.float32), rng.normal(size=5).astype(np.float32)]
    deltas = rng.normal(size=(10, 35)).astype(np.float32)
    deltas[8:] += 3.0  # two attackers that push the same way: each other's nearest neighbours
    results = [ClientResult(str(k), [g[0] + d[:30].reshape(6, 5), g[1] + d[30:]], 10) for k, d in enumerate(deltas)]
    defense = (NNM(Krum(num_malicious=1), num_malicious=1) if wrap == "nnm"
               else Bucketing(Krum(num_malicious=1), bucket_size=2, seed=0))
    new, _ = DefendedAggregation(defense).aggregate(1, g, results)
    got = np.concatenate([new[0].ravel(), new[1]]) - np.concatenate([g[0].ravel(), g[1]])
    if wrap == "nnm":  # Krum over the mixed rows, by hand
        mixed = mixing_matrix(torch.from_numpy(deltas), 1).numpy() @ deltas.astype(np.float64)
        rows = mixed
    else:
        groups = Bucketing(Krum(num_malicious=1), bucket_size=2, seed=0).buckets(10)
        rows = np.stack([deltas[m].mean(0) for m in groups])
    picked = Krum(num_malicious=1).aggregate(torch.zeros(35), round_updates(rows.astype(np.float32))).selected
    np.testing.assert_allclose(got, rows[picked], rtol=1e-4, atol=1e-5)
    assert not any(np.allclose(got, d, atol=1e-4) for d in deltas)  # no client's own update
