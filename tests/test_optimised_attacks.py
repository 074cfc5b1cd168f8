"""Colluding model poisoning (ALIE, IPM, Min-Max/Min-Sum, Fang) and label flipping: each attack's
defining property on constructed updates, and the collusion step's knowledge boundaries."""

import math

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from fl_defense.attacks import (ALIE, COLLUDING_ATTACKS, IPM, ALIEBackdoor, AttackRound, Fang, MinMax, MinSum,
                                alie_z, flip_labels, label_flip, make_colluding, poison_data)
from fl_defense.attacks.collusion import HONEST_UPDATE_KEY, collude, encode_update
from fl_defense.attacks.fang import krum_lambda_bound
from fl_defense.attacks.min_max import perturbation
from fl_defense.config import ConfigError, ExperimentConfig
from fl_defense.defenses import Krum
from fl_defense.rounds import GROUND_TRUTH_KEY, ClientResult
from fl_defense.updates import ParamLayout


def _known(k=24, d=300, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return (0.2 + torch.randn(k, d, generator=gen, dtype=dtype)) * torch.linspace(0.5, 2, d, dtype=dtype)


def test_alie_is_mean_plus_z_std_with_the_papers_z():
    # n = 20, m = 4: s = floor(20/2 + 1) - 4 = 7, z = Phi^-1(13/20)
    assert alie_z(20, 4) == pytest.approx(0.38532046640756773, abs=1e-12)
    assert alie_z(50, 12) == pytest.approx(0.5828415072712162, abs=1e-12)  # s = 14, Phi^-1(0.72)
    known = _known(20)
    out = ALIE().craft(known, AttackRound(num_clients=20, num_attackers=4))
    torch.testing.assert_close(out, known.mean(0) + alie_z(20, 4) * known.std(0))
    torch.testing.assert_close(ALIE(z=1.5).craft(known, AttackRound(20, 4)), known.mean(0) + 1.5 * known.std(0))


def test_alie_backdoor_keeps_the_poisoned_update_inside_the_allowed_range():
    known, z = _known(20), alie_z(20, 4)
    poisoned = 3 * torch.randn(4, known.shape[1], dtype=known.dtype)
    out = ALIEBackdoor().craft(known, AttackRound(20, 4, poisoned=poisoned))
    lo, hi = known.mean(0) - z * known.std(0), known.mean(0) + z * known.std(0)
    assert bool(((out >= lo - 1e-12) & (out <= hi + 1e-12)).all())
    inside = (poisoned >= lo) & (poisoned <= hi)
    assert inside.any() and torch.equal(out[inside], poisoned[inside])


def test_ipm_is_minus_epsilon_times_the_benign_mean():
    known = _known(10)
    torch.testing.assert_close(IPM(epsilon=0.7).craft(known, AttackRound(10, 2)), -0.7 * known.mean(0))


def _pairwise(x):
    return torch.cdist(x, x)


def _gamma_star(known, p, objective):
    """The largest feasible gamma in closed form: a root of each quadratic in gamma."""
    mu = known.mean(0)
    base = ((mu - known) ** 2).sum(1)
    cross = (mu - known) @ p
    a = float(p @ p)
    if objective == "max":
        bound = float(_pairwise(known).max()) ** 2
        roots = (-cross + torch.sqrt(cross ** 2 - a * (base - bound))) / a
        return float(roots.min())
    bound = float((_pairwise(known) ** 2).sum(1).max())
    k = len(known)
    A, B, C = k * a, float(cross.sum()), float(base.sum()) - bound
    return (-B + math.sqrt(B * B - A * C)) / A


@pytest.mark.parametrize("direction", ["unit", "std", "sign"])
def test_min_max_stays_within_the_benign_diameter_at_the_largest_gamma(direction):
    known = _known()
    attack = MinMax(direction=direction, tol=1e-6)
    out = attack.craft(known, AttackRound(num_clients=24, num_attackers=4, knowledge="partial"))
    p = perturbation(known, known.mean(0), direction)
    torch.testing.assert_close(out, known.mean(0) + attack.last_gamma * p)
    assert float(torch.cdist(out[None], known).max()) <= float(_pairwise(known).max()) * (1 + 1e-9)
    star = _gamma_star(known, p, "max")
    assert star - 1e-6 - 1e-9 <= attack.last_gamma <= star + 1e-9


@pytest.mark.parametrize("direction", ["unit", "std", "sign"])
def test_min_sum_stays_within_the_largest_benign_sum_at_the_largest_gamma(direction):
    known = _known()
    attack = MinSum(direction=direction, tol=1e-6)
    out = attack.craft(known, AttackRound(num_clients=24, num_attackers=4, knowledge="partial"))
    p = perturbation(known, known.mean(0), direction)
    sums = (_pairwise(known) ** 2).sum(1)
    assert float((torch.cdist(out[None], known) ** 2).sum()) <= float(sums.max()) * (1 + 1e-9)
    star = _gamma_star(known, p, "sum")
    assert star - 1e-6 - 1e-9 <= attack.last_gamma <= star + 1e-9


class _BigTensorCalls(TorchFunctionMode):
    """Counts torch calls that take the n x d matrix (or a view of it)."""

    def __init__(self, big):
        super().__init__()
        self.big, self.count = big, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if any(isinstance(a, torch.Tensor) and a.numel() >= self.big for a in args):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name, target", [("min_max", "agnostic"), ("min_sum", "agnostic"),
                                          ("min_max", "trimmed_mean"), ("min_max", "median")])
def test_the_search_does_not_pass_over_the_matrix_per_step(name, target):
    known = _known(30, 2000, dtype=torch.float32)
    counts = []
    for tol in (1e-1, 1e-9):  # ~5 against ~35 bisection steps
        with _BigTensorCalls(known.numel()) as mode:
            make_colluding(name, direction="std", tol=tol, target=target).craft(known, AttackRound(34, 4))
        counts.append(mode.count)
    assert counts[0] == counts[1]  # the same passes for 5 or 35 steps


# -- Min-Max tailored to the trimmed mean and the median (sec. IV-A) -----------------------------

def _rule_by_sorting(benign, copies, m, cut):
    """The trimmed mean (cut at each end) of every column of ``benign`` plus m copies of each
    candidate row of ``copies`` (G x d), by sorting: G x d."""
    g = len(copies)
    cols = np.concatenate([np.broadcast_to(benign, (g, *benign.shape)), np.repeat(copies[:, None], m, axis=1)], axis=1)
    n = cols.shape[1]
    return np.sort(cols, axis=1)[:, cut:n - cut].mean(axis=1)


def _defense_output(defense, benign, crafted, m):
    from tests.helpers import round_updates

    d = benign.shape[1]
    rows = torch.cat([benign, crafted.expand(m, d)]).numpy()
    return defense.aggregate(torch.zeros(d), round_updates(rows)).params.double()


def test_the_closed_form_is_the_sorted_trimmed_mean_for_every_shape():
    from fl_defense.attacks.agr_tailored import TrimmedObjective

    rng = np.random.default_rng(0)
    gammas = np.linspace(-6, 6, 25)
    for k in range(1, 8):
        for m in range(0, 7):
            for cut in range(0, (k + m - 1) // 2 + 1):
                benign = rng.integers(-4, 4, size=(k, 12)) + rng.random((k, 12)) * (k % 2)  # ties in half
                zero, one = torch.zeros(12, dtype=torch.float64), torch.ones(12, dtype=torch.float64)
                backend = "torch" if (k + m) % 2 else None  # the other devices' sort, on the CPU
                obj = TrimmedObjective.build(torch.from_numpy(benign), m, cut, zero, one, backend=backend)
                expected = _rule_by_sorting(benign, gammas[:, None] * np.ones(12), m, cut)
                got = np.stack([obj.aggregate(float(g)).numpy() for g in gammas])
                np.testing.assert_allclose(got, expected, atol=1e-12, err_msg=f"k={k} m={m} cut={cut}")


@pytest.mark.parametrize("rule, beta, n", [("trimmed_mean", 0.2, 30), ("trimmed_mean", 0.2, 31),
                                           ("trimmed_mean", 0.1, 31), ("trimmed_mean", None, 30),
                                           ("median", None, 30), ("median", None, 31)])
def test_the_closed_form_is_what_trimmed_mean_and_median_aggregate(rule, beta, n):
    from fl_defense.defenses import Median, TrimmedMean

    m = 6
    known = _known(n, 300, seed=n, dtype=torch.float32)
    attack = MinMax(target=rule, trim_beta=beta)
    mean, p, obj = attack.objective(known, AttackRound(n, m, "full"))
    # beta None: the paper's cut of m at each end (m + 0.5 keeps int(beta n) clear of rounding)
    defense = Median() if rule == "median" else TrimmedMean(beta=(m + 0.5) / n if beta is None else beta)
    for gamma in (0.0, 0.4, 1.3, 3.0, 25.0):
        crafted = mean.clone().add_(p, alpha=gamma)  # as craft sends it
        expected = _defense_output(defense, known[m:], crafted, m)
        torch.testing.assert_close(obj.aggregate(gamma), expected, rtol=1e-5, atol=1e-6)


def _symmetric_round(k=24, m=6, d=40, seed=0):
    """Own honest updates at mu and benign ones in pairs mu +- z: with the copies at mu both rules
    return mu, and the deviation grows with gamma until every copy is cut, then stays."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=d)
    z = rng.normal(size=(k // 2, d)) * rng.uniform(0.5, 2, size=d)
    return torch.from_numpy(np.concatenate([np.repeat(mu[None], m, 0), mu + z, mu - z]))


@pytest.mark.parametrize("rule, beta", [("trimmed_mean", None), ("median", None), ("trimmed_mean", 0.1)])
def test_the_tailored_gamma_is_a_best_gamma_of_a_fine_grid(rule, beta):
    known, m, tol = _symmetric_round(), 6, 1e-4
    n = len(known)
    mean, p, _ = MinMax(target=rule, trim_beta=beta).objective(known, AttackRound(n, m, "full"))
    cut = (n - 1) // 2 if rule == "median" else m if beta is None else int(beta * n)
    benign, mu = known[m:].numpy(), mean.numpy()

    def deviation(gammas):
        return np.square(_rule_by_sorting(benign, mu + np.asarray(gammas)[:, None] * p.numpy(), m, cut) - mu).sum(1)

    coarse = np.linspace(0, 8, 801)
    on_coarse = deviation(coarse)
    if beta == 0.1:  # cut 3 < m: copies stay inside, the deviation grows without bound
        assert np.all(np.diff(on_coarse) > 0)
    saturated = coarse[np.argmax(on_coarse >= on_coarse.max() * (1 - 1e-9))]
    # from below the point where every copy is cut (the search climbs to it), and from above
    for gamma_init in (0.6 * saturated, 1.3 * saturated, 2.0):
        attack = MinMax(target=rule, trim_beta=beta, gamma_init=gamma_init, tol=tol)
        out = attack.craft(known, AttackRound(n, m, "full"))
        gamma = attack.last_gamma
        torch.testing.assert_close(out, mean + gamma * p)
        grid = np.linspace(0, 2 * gamma_init, 8001)[:-1]  # the search's range
        on_grid = deviation(grid)
        best = on_grid.max()
        assert deviation([gamma])[0] >= best * (1 - 1e-9)  # as deviating as the grid's best ...
        nearest = np.abs(grid[on_grid >= best * (1 - 1e-9)] - gamma).min()
        assert nearest <= tol + grid[1]  # ... and within the search's tolerance of one of them


# The median's deviation stops growing once the copies pass a column's lower middle value; with 6
# of 30 attackers the agnostic gamma (about 1 std) is past that in every column here, so the two
# tie; with 10 of 30 that value lies further out and the agnostic update falls short of it.
@pytest.mark.parametrize("rule, m, gain", [("trimmed_mean", 6, 1.2), ("median", 10, 1.001)])
def test_the_tailored_update_moves_the_rule_more_than_the_agnostic_one(rule, m, gain):
    from fl_defense.defenses import Median, TrimmedMean

    n = 30
    known = _known(n, 2000, seed=3, dtype=torch.float32)
    defense = Median() if rule == "median" else TrimmedMean(beta=0.2)
    mu = known.double().mean(0)
    rnd = AttackRound(n, m, "full")
    moved = {}
    for target in ("agnostic", rule):
        attack = MinMax(target=target, trim_beta=0.2)
        out = _defense_output(defense, known[m:], attack.craft(known, rnd), m)
        moved[target] = float(torch.linalg.vector_norm(out - mu))
    assert moved[rule] > gain * moved["agnostic"]


@pytest.mark.parametrize("rule", ["trimmed_mean", "median"])
def test_tailored_min_max_with_partial_knowledge_models_the_round_with_the_attackers_own_updates(rule):
    from fl_defense.defenses import Median, TrimmedMean

    n, m = 30, 6
    own = _known(m, 300, seed=5, dtype=torch.float32)  # all partial knowledge holds
    rnd = AttackRound(n, m, "partial")
    attack = MinMax(target=rule, trim_beta=0.25)
    out = attack.craft(own, rnd)
    mean, p, obj = attack.objective(own, rnd)
    torch.testing.assert_close(out, mean + attack.last_gamma * p)
    # the rule over the 2m values the attackers can model: their own updates and m copies
    defense = Median() if rule == "median" else TrimmedMean(beta=0.25)  # cuts int(0.25 * 12) = 3
    for gamma in (0.0, 1.0, attack.last_gamma):
        expected = _defense_output(defense, own, mean.clone().add_(p, alpha=gamma), m)
        torch.testing.assert_close(obj.aggregate(gamma), expected, rtol=1e-5, atol=1e-6)
    # and the collusion step never reads a benign client's update for it
    g, layout, plain = _round()
    _, _, untouchable = _round(benign_arrays=lambda a: _Untouchable(a))
    outs = [collude(res, g, layout, MinMax(target=rule), "partial", 1, seed=5)[0] for res in (plain, untouchable)]
    for a, b in zip(outs[0][6:], outs[1][6:]):
        assert all(np.array_equal(x, y) for x, y in zip(a.arrays, b.arrays))


def test_the_tailored_search_folds_coordinates_and_keeps_the_exact_objective():
    from fl_defense.attacks.agr_tailored import most_damaging_gamma

    known = _known(30, 3000, seed=7)
    # skewed columns, both ways: the mean lies beyond some order statistics on the far side too
    known[:, :300] = torch.relu(known[:, :300]) ** 3
    known[:, 300:600] = -torch.relu(known[:, 300:600]) ** 3
    attack = MinMax(target="trimmed_mean", direction="unit", trim_beta=0.2)
    mean, p, obj = attack.objective(known, AttackRound(30, 6, "full"))
    live, errors = [], []

    class Checked:
        def value(self, gamma):
            v = obj.value(gamma)
            exact = float((obj.aggregate(gamma) - obj.mean).square().sum())
            errors.append(abs(v - exact) / exact)
            live.append(len(obj.mean) if obj.live is None else len(obj.live))
            return v

        def narrow(self, lo, hi):
            obj.narrow(lo, hi)

    most_damaging_gamma(Checked(), attack.gamma_init, attack.tol)
    assert max(errors) < 1e-9
    assert live[0] == 3000 and live[-1] < 30  # later steps evaluate only the coordinates near a kink


def test_tailored_min_max_checks_its_parameters():
    known = _known(20)
    with pytest.raises(ValueError, match="trim_beta"):
        MinMax(target="trimmed_mean", trim_beta=0.5).craft(known, AttackRound(20, 4))
    with pytest.raises(ValueError, match="gamma_init"):
        MinMax(target="median", tol=0.0).craft(known, AttackRound(20, 4))
    with pytest.raises(ValueError, match="min_sum targets agnostic"):
        MinSum(target="median").craft(known, AttackRound(20, 4))


def test_fang_krum_attack_is_what_krum_selects():
    gen = torch.Generator().manual_seed(3)
    d, m = 200, 4
    # SGD-like updates: a small common step under larger per-client noise
    others = 0.1 + 0.3 * torch.randn(16, d, generator=gen, dtype=torch.float64)
    own = 0.1 + 0.3 * torch.randn(m, d, generator=gen, dtype=torch.float64)
    known = torch.cat([own, others])
    krum = Krum(num_malicious=m)
    honest_round = torch.cat([others, own])
    assert int(krum.select(honest_round)) < len(honest_round)  # without the attack a benign update wins
    attack = Fang(target="krum")
    crafted = attack.craft(known, AttackRound(num_clients=20, num_attackers=m, knowledge="full"))
    attacked = torch.cat([others, crafted.expand(m, d)])
    assert int(krum.select(attacked)) >= len(others)  # Krum selects the crafted update
    assert attack.last_lambda > 1e-5
    torch.testing.assert_close(crafted, -attack.last_lambda * torch.sign(known.mean(0)))
    assert float(crafted @ known.mean(0)) < 0  # against the direction of the benign step
    assert attack.last_lambda <= krum_lambda_bound(others @ others.T, 20, m, d) + 1e-12


def test_fang_trim_attack_samples_beyond_the_benign_extremes():
    known = _known(20, 500)
    out = Fang().craft(known, AttackRound(num_clients=20, num_attackers=4, knowledge="full", seed=1))
    s = torch.sign(known.mean(0))
    w_min, w_max = known.min(0).values, known.max(0).values
    assert out.shape == (4, 500)
    assert bool((out[:, s > 0] <= w_min[s > 0]).all()) and bool((out[:, s < 0] >= w_max[s < 0]).all())
    assert bool((out[:, s > 0] >= torch.minimum(2 * w_min, w_min / 2)[s > 0]).all())
    again = Fang().craft(known, AttackRound(20, 4, "full", seed=1))
    assert torch.equal(out, again)  # seeded


def test_label_flipping_changes_exactly_the_intended_labels():
    y = torch.arange(100) % 10
    torch.testing.assert_close(flip_labels(y, 10), 9 - y)
    new, idx = label_flip(y, 10, poison_rate=1.0, source=-1, target=-1, seed=0)
    assert torch.equal(new, 9 - y) and len(idx) == 100
    new, idx = label_flip(y, 10, poison_rate=0.4, source=-1, target=-1, seed=0)
    changed = torch.nonzero(new != y).flatten()
    assert len(changed) == 40 and torch.equal(changed, idx) and torch.equal(new[idx], 9 - y[idx])
    new, idx = label_flip(y, 10, poison_rate=1.0, source=3, target=8, seed=0)
    assert torch.equal(torch.nonzero(new != y).flatten(), torch.nonzero(y == 3).flatten())
    assert bool((new[y == 3] == 8).all())
    x = torch.rand(100, 1, 8, 8)
    px, py, pidx = poison_data(x, y, "labelflip", (1, 8, 8), poison_rate=1.0, target_label=7, base_label=-1,
                               seed=0, num_classes=10)
    assert torch.equal(px, x) and torch.equal(py, 9 - y)


# -- the collusion step ------------------------------------------------------------------------

class _Untouchable(list):
    """A benign client's arrays that fail loudly when anything reads them."""

    def _fail(self, *a, **k):
        raise AssertionError("a benign client's update was read")

    __iter__ = __len__ = __getitem__ = __array__ = _fail


def _round(num_benign=6, num_colluders=3, d=(4, 5), seed=0, benign_arrays=None):
    gen = np.random.default_rng(seed)
    global_arrays = [gen.standard_normal(d).astype(np.float32), gen.standard_normal(d[1]).astype(np.float32)]
    layout = ParamLayout.from_arrays(global_arrays)
    results = []
    for k in range(num_benign + num_colluders):
        arrays = [a + 0.1 * gen.standard_normal(a.shape).astype(np.float32) for a in global_arrays]
        metrics = {"partition-id": k, GROUND_TRUTH_KEY: int(k >= num_benign)}
        if k >= num_benign:
            metrics[HONEST_UPDATE_KEY] = encode_update(layout.flatten(arrays) - layout.flatten(global_arrays))
        elif benign_arrays is not None:
            arrays = benign_arrays(arrays)
        results.append(ClientResult(f"c{k}", arrays, 10, metrics))
    return global_arrays, layout, results


@pytest.mark.parametrize("name", sorted(set(COLLUDING_ATTACKS) - {"alie_backdoor"}))
def test_partial_knowledge_never_reads_a_benign_update(name):
    attack = make_colluding(name)
    g, layout, plain = _round()
    _, _, untouchable = _round(benign_arrays=lambda a: _Untouchable(a))
    _, _, nan = _round(benign_arrays=lambda a: [np.full_like(x, np.nan) for x in a])
    outs = [collude(res, g, layout, attack, "partial", 1, seed=5)[0] for res in (plain, untouchable, nan)]
    for out in outs[1:]:
        for a, b in zip(outs[0][6:], out[6:]):
            for x, y in zip(a.arrays, b.arrays):
                assert np.isfinite(y).all() and np.array_equal(x, y)
    with pytest.raises(AssertionError, match="benign"):  # full knowledge does read them
        collude(untouchable, g, layout, attack, "full", 1, seed=5)


def test_collusion_strips_the_reserved_key_and_ignores_ground_truth():
    g, layout, results = _round()
    out, record, _ = collude(results, g, layout, MinMax(), "full", 2, seed=5)
    assert all(HONEST_UPDATE_KEY not in r.metrics for r in out)
    assert record["colluders"] == 3 and record["known_updates"] == 9 and record["knowledge"] == "full"
    assert all(out[k] is results[k] for k in range(6))  # benign results pass as they came
    crafted = layout.flatten(out[6].arrays) - layout.flatten(g)
    assert all(np.array_equal(out[6].arrays[i], out[k].arrays[i]) for k in (7, 8) for i in range(2))
    shuffled = [ClientResult(r.client_id, r.arrays, r.num_examples, {**r.metrics, GROUND_TRUTH_KEY: 1 - r.metrics[GROUND_TRUTH_KEY]})
                for r in results]
    out2, _, _ = collude(shuffled, g, layout, MinMax(), "full", 2, seed=5)
    torch.testing.assert_close(layout.flatten(out2[6].arrays) - layout.flatten(g), crafted)
    # a result order shuffled by completion gives the same crafted updates
    out3, _, _ = collude(results[::-1], g, layout, MinMax(), "full", 2, seed=5)
    assert np.array_equal(out3[0].arrays[0], out[8].arrays[0])


def test_no_colluders_no_rewrite():
    g, layout, results = _round(num_colluders=0)
    out, record, _ = collude(results, g, layout, IPM(), "full", 1, seed=0)
    assert record["colluders"] == 0 and all(a is b for a, b in zip(out, results))


def test_the_hook_is_absent_unless_a_colluding_attack_is_configured():
    from server_app.collusion import ColludingStrategy, with_collusion

    sentinel = object()
    for mp in ("none", "boost"):
        assert with_collusion(ExperimentConfig.from_run_config({"model-poisoning": mp}), sentinel, []) is sentinel
    cfg = ExperimentConfig.from_run_config({"model-poisoning": "fang", "attack-target": "krum",
                                            "attacker-knowledge": "partial"})
    wrapped = with_collusion(cfg, sentinel, [])
    assert isinstance(wrapped, ColludingStrategy) and wrapped.knowledge == "partial"
    assert wrapped.attack.target == "krum"


def test_attack_target_is_checked_against_the_attack():
    with pytest.raises(ConfigError, match="'attack-target'"):
        ExperimentConfig.from_run_config({"model-poisoning": "min_sum", "attack-target": "krum"})
    with pytest.raises(ConfigError, match="'attacker-knowledge'"):
        ExperimentConfig.from_run_config({"attacker-knowledge": "omniscient"})


def test_a_colluding_client_reports_its_honest_update_under_the_reserved_key():
    from client_app.app import DefenseClient
    from fl_defense.attacks import select_attackers

    cfg = ExperimentConfig.from_run_config({"local-epochs": 1, "malicious-fraction": 0.2, "model-poisoning": "ipm"})
    attacker, = [p for p in select_attackers(10, 0.2, 42)][:1]
    benign = next(p for p in range(10) if p not in select_attackers(10, 0.2, 42))
    client = DefenseClient(cfg, attacker, num_partitions=10)
    params = client.get_parameters({})
    arrays, _, metrics = client.fit(params, {"server-round": 1})
    flat = lambda a: np.concatenate([x.reshape(-1) for x in a])  # the mlp has no buffers
    honest = np.frombuffer(metrics[HONEST_UPDATE_KEY], dtype=np.float32)
    np.testing.assert_allclose(honest, flat(arrays) - flat(params), atol=1e-6)
    assert metrics["num-poisoned"] == 0  # it trained on its clean data
    _, _, m2 = DefenseClient(cfg, benign, num_partitions=10).fit(params, {"server-round": 1})
    assert HONEST_UPDATE_KEY not in m2


@pytest.mark.slow
@pytest.mark.parametrize("knowledge", ["partial", "full"])
def test_a_colluding_attack_runs_end_to_end_and_the_defense_never_sees_the_reserved_key(tmp_path, monkeypatch,
                                                                                         knowledge):
    import json

    from flwr.client import ClientApp
    from flwr.server import ServerApp
    from flwr.simulation import run_simulation

    import client_app.app as ca
    import server_app.app as sa
    from fl_defense.rounds import DefendedAggregation

    seen = []
    original = DefendedAggregation.aggregate

    def spy(self, server_round, global_arrays, results, *args, **kwargs):
        seen.append([sorted(r.metrics) for r in results])
        return original(self, server_round, global_arrays, results, *args, **kwargs)

    monkeypatch.setattr(DefendedAggregation, "aggregate", spy)
    overrides = {"num-server-rounds": 2, "results-dir": str(tmp_path), "run-name": "collude", "defense": "krum",
                 "num-malicious": 2, "malicious-fraction": 0.34, "model-poisoning": "min_max",
                 "attacker-knowledge": knowledge, "local-epochs": 1}

    def server_fn(context):
        return sa.build_components({**context.run_config, **overrides}, num_nodes=6)

    def client_fn(context):
        return ca.build_client({**context.run_config, **overrides}, context.node_config)

    run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
                   num_supernodes=6, backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    rows = [json.loads(line) for line in (tmp_path / "collude" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert len(seen) == 2 and all(len(keys) == 6 for keys in seen)
    assert not any(HONEST_UPDATE_KEY in k for keys in seen for k in keys)
    for r in rows[1:]:
        assert r["collusion"]["knowledge"] == knowledge and r["collusion"]["colluders"] == 2
        assert r["collusion"]["known_updates"] == (2 if knowledge == "partial" else 6)
        assert r["collusion"]["gamma"] >= 0 and sum(bool(c["malicious"]) for c in r["clients"]) == 2


@pytest.mark.parametrize("name, target", [("alie", "agnostic"), ("fang", "trimmed_mean")])
def test_colluders_keep_their_own_buffers(name, target):
    """One crafted model for all (ALIE) or one each (Fang's sampling): the trainable arrays are
    crafted, each attacker's BatchNorm statistics and counters stay its own."""
    g, layout, results = _round()
    g = g + [np.zeros(3, dtype=np.float32), np.array(0, dtype=np.int64)]
    layout = ParamLayout.from_arrays(g, [True, True, False, False])
    results = [ClientResult(r.client_id, r.arrays + [np.full(3, k, dtype=np.float32), np.array(k)],
                            r.num_examples, r.metrics) for k, r in enumerate(results)]
    out, _, _ = collude(results, g, layout, make_colluding(name, target=target), "full", 1, seed=0)
    for k in (6, 7, 8):
        assert np.array_equal(out[k].arrays[2], np.full(3, k, dtype=np.float32)) and int(out[k].arrays[3]) == k
        assert out[k].arrays[3].shape == () and not np.array_equal(out[k].arrays[0], results[k].arrays[0])


def test_the_fused_pass_equals_its_definitions_on_both_paths():
    from fl_defense.attacks.base import column_pass

    x = _known(12, 40000, dtype=torch.float32)
    x64 = x.double()
    rows = slice(3, None)
    for backend in (None, "torch"):  # numpy on the CPU; torch is what other devices run
        out = column_pass(x, std=True, extremes=True, direction=lambda st: -st["std"], gram=True, rows=rows,
                          norms=True, backend=backend)
        torch.testing.assert_close(out["mean"], x.mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["std"], x.std(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["min"], x.min(0).values)
        torch.testing.assert_close(out["max"], x.max(0).values)
        torch.testing.assert_close(out["p"], -x.std(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["bp"], x64[rows] @ -x64.std(0), rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(out["gram"], x64[rows] @ x64[rows].T, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(out["sq"], (x64[rows] ** 2).sum(1), rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(out["bmu"], x64[rows] @ x64.mean(0), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("cls", [MinMax, MinSum])
def test_min_max_and_min_sum_with_one_known_update_send_it_with_gamma_zero(cls):
    """A round with one colluder under partial knowledge: the std of one update is 0, so p = 0 and
    every gamma is feasible; the attack sends the update itself and records gamma 0 (not the
    doubling search's cap)."""
    own = torch.randn(1, 40, generator=torch.Generator().manual_seed(5))
    attack = cls(direction="std")
    out = attack.craft(own, AttackRound(num_clients=10, num_attackers=1, knowledge="partial"))
    assert torch.equal(out, own[0]) and attack.last_gamma == 0.0
