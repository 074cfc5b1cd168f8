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


@pytest.mark.parametrize("name", ["min_max", "min_sum"])
def test_the_search_does_not_pass_over_the_matrix_per_step(name):
    known = _known(30, 2000, dtype=torch.float32)
    counts = []
    for tol in (1e-1, 1e-9):  # ~5 against ~35 bisection steps
        with _BigTensorCalls(known.numel()) as mode:
            make_colluding(name, direction="std", tol=tol).craft(known, AttackRound(34, 4))
        counts.append(mode.count)
    assert counts[0] == counts[1]  # the same passes for 5 or 35 steps


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
