"""A malformed client result is rejected with a reason and the round goes on."""

import random

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from fl_defense import strategies
from fl_defense.fisher import FisherDecodeError, decode_fisher, encode_fisher
from fl_defense.rounds import DefendedAggregation, ClientResult
from fl_defense.defenses import FedAvg
from tests.helpers import FakeProxy, client_manager, client_models, legacy_results, model_arrays
from tests.test_adapters import run_legacy


def _bad_variants(g):
    yield "expected 4 arrays", [g[0]]
    yield "shape", [g[0].T, g[1], g[2], g[3]]
    yield "NaN", [np.full_like(g[0], np.nan), g[1], g[2], g[3]]
    yield "dtype", [g[0].astype(np.complex64), g[1], g[2], g[3]]


@pytest.mark.parametrize("i", range(4))
def test_malformed_arrays_are_rejected_and_round_goes_on(i):
    rng = np.random.default_rng(0)
    g = model_arrays(rng)
    clients = client_models(g, 5, rng)
    reason, bad = list(_bad_variants(g))[i]
    clients[2] = (bad, clients[2][1], clients[2][2])
    strategy = strategies.FedAvg()
    out, metrics = run_legacy(strategy, g, clients)
    assert metrics["fl-defense.num-rejected"] == 1 and metrics["fl-defense.num-valid"] == 4
    rec = strategy.records[-1]
    assert rec.rejected[0]["client_id"] == "2" and reason in rec.rejected[0]["reason"]
    good = [c for k, c in enumerate(clients) if k != 2]
    expected, _ = run_legacy(strategies.FedAvg(), g, good)
    for a, b in zip(out, expected):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_zero_samples_and_absurd_norm_rejected():
    rng = np.random.default_rng(1)
    g = model_arrays(rng)
    agg = DefendedAggregation(FedAvg(), max_update_norm=10.0)
    results = [ClientResult("a", [a + 0.01 for a in g], 0), ClientResult("b", [a + 100 for a in g], 5),
               ClientResult("c", [a + 0.01 for a in g], 5), ClientResult("d", [a + 0.01 for a in g], 2.5)]
    new, metrics = agg.aggregate(1, g, results)
    reasons = {r["client_id"]: r["reason"] for r in agg.records[-1].rejected}
    assert set(reasons) == {"a", "b", "d"}
    assert "positive" in reasons["a"] and "exceeds the bound" in reasons["b"] and "integer" in reasons["d"]
    np.testing.assert_allclose(new[0], g[0] + 0.01, rtol=1e-6)


def test_too_few_valid_results_keep_the_global_model():
    rng = np.random.default_rng(2)
    g = model_arrays(rng)
    clients = client_models(g, 3, rng)
    strategy = strategies.FedAvg(min_valid_clients=3)
    clients[0] = ([g[0]], clients[0][1], clients[0][2])
    random.seed(0)
    strategy.configure_fit(1, ndarrays_to_parameters(g), client_manager(len(clients)))
    params, metrics = strategy.aggregate_fit(1, legacy_results(clients), [])
    # As Flower's strategies: no new parameters, so the server keeps the global model.
    assert params is None and metrics["fl-defense.kept-global"] == 1
    assert "fewer than the minimum of 3" in strategy.records[-1].reason


def test_undecodable_parameters_are_rejected():
    rng = np.random.default_rng(3)
    g = model_arrays(rng)
    clients = client_models(g, 3, rng)
    results = legacy_results(clients)
    results[1][1].parameters.tensors[0] = b"garbage"
    strategy = strategies.FedAvg()
    from tests.helpers import client_manager
    strategy.configure_fit(1, ndarrays_to_parameters(g), client_manager(3))
    params, metrics = strategy.aggregate_fit(1, results, [RuntimeError("node died")])
    assert metrics["fl-defense.num-rejected"] == 1 and metrics["fl-defense.num-failures"] == 1 and metrics["fl-defense.num-valid"] == 2
    assert params is not None


def test_fisher_round_trip_and_rejections():
    f = np.abs(np.random.default_rng(0).normal(size=100)).astype(np.float32)
    np.testing.assert_array_equal(decode_fisher(encode_fisher(f), 100), f)
    np.testing.assert_allclose(decode_fisher(encode_fisher(f, half=True), 100), f, rtol=1e-3)
    with pytest.raises(FisherDecodeError, match="missing"):
        decode_fisher(None, 100)
    with pytest.raises(FisherDecodeError, match="99 entries"):
        decode_fisher(encode_fisher(f[:99]), 100)
    with pytest.raises(FisherDecodeError, match="negative"):
        decode_fisher(encode_fisher(-f), 100)
    with pytest.raises(FisherDecodeError, match="NaN"):
        decode_fisher(encode_fisher(np.full(100, np.inf)), 100)
    with pytest.raises(FisherDecodeError, match="header"):
        decode_fisher(b"abc", 100)
    with pytest.raises(FisherDecodeError, match="length"):
        decode_fisher(encode_fisher(f)[:-4], 100)


def test_metrics_of_the_wrong_type_are_rejected():
    rng = np.random.default_rng(4)
    g = model_arrays(rng)
    clients = client_models(g, 4, rng)
    results = legacy_results(clients)
    results[2][1].metrics = ["not", "a", "dict"]
    strategy = strategies.FedAvg()
    from tests.helpers import client_manager
    strategy.configure_fit(1, ndarrays_to_parameters(g), client_manager(4))
    _, metrics = strategy.aggregate_fit(1, results, [])
    assert metrics["fl-defense.num-rejected"] == 1 and "metrics must be a mapping" in strategy.records[-1].rejected[0]["reason"]


def test_flower_config_records_are_accepted_as_metrics():
    from flwr.app import ConfigRecord

    from fl_defense.rounds import GROUND_TRUTH_KEY, split_ground_truth

    clean, gt = split_ground_truth(ConfigRecord({"partition-id": 3, GROUND_TRUTH_KEY: 1, "fl-defense.fisher": b"x"}))
    assert clean == {"partition-id": 3, "fl-defense.fisher": b"x"} and gt is True


@pytest.mark.parametrize("keep", [True, False])
def test_workspace_is_reused_or_freed_and_results_do_not_depend_on_it(keep):
    """The updates matrix is refilled in place between rounds (keep_workspace) or freed after each
    round; a round with fewer clients uses the first rows of the kept one. Results are identical
    either way, and a rejected result in a later round does not leave stale rows behind."""
    from fl_defense.defenses import FDCR

    rng = np.random.default_rng(0)
    glob = model_arrays(rng)
    dim = sum(a.size for a in glob)

    def results(n, seed):
        r = np.random.default_rng(seed)
        return [ClientResult(str(k), [a + r.normal(size=a.shape).astype(np.float32) for a in glob], 10 + k,
                             {"partition-id": k, "fl-defense.fisher": encode_fisher(np.abs(r.normal(size=dim)))})
                for k in range(n)]

    agg = DefendedAggregation(FDCR(), keep_workspace=keep)
    fresh = lambda: DefendedAggregation(FDCR(), keep_workspace=keep)  # noqa: E731
    first, _ = agg.aggregate(1, glob, results(6, 1))
    buf = agg._workspace.get("updates")
    assert (buf is not None) == keep
    smaller = results(4, 2)
    smaller[1].arrays[0] = smaller[1].arrays[0] * np.nan  # rejected: 3 valid rows
    second, metrics = agg.aggregate(2, glob, smaller)
    assert metrics["fl-defense.num-rejected"] == 1
    if keep:
        assert agg._workspace["updates"].data_ptr() == buf.data_ptr()
    for got, want in ((first, fresh().aggregate(1, glob, results(6, 1))[0]),
                      (second, fresh().aggregate(2, glob, smaller)[0])):
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)


def test_values_are_checked_on_the_flattened_update():
    """Values are checked on delta_k = w_k - w in float32, the row the defenses see: NaN or Inf
    names its array, a finite update whose difference or norm overflows float32 is rejected
    (it would give Krum or FLAME infinite distances), non-finite buffers are rejected, and
    accepted rows are packed so the round equals one without the rejected clients."""
    from fl_defense.defenses import Krum

    rng = np.random.default_rng(5)
    g = model_arrays(rng)
    g[3] = g[3].astype(np.float32)
    ok = [ClientResult(str(k), [a + rng.normal(scale=0.01, size=a.shape).astype(a.dtype) for a in g], 5)
          for k in range(6)]
    bad = {
        "inf": [g[0], g[1], np.full_like(g[2], np.inf), g[3]],
        "diff": [g[0], np.where(g[1] > 0, 3e38, -3e38).astype(np.float32), g[2], g[3]],  # finite, w - g overflows
        "norm": [np.full_like(g[0], 1e20), g[1], g[2], g[3]],  # finite, ||delta||^2 overflows
    }
    glob = [g[0], np.zeros_like(g[1]) - np.where(g[1] > 0, 1e38, -1e38).astype(np.float32), g[2], g[3]]
    results = [ok[0], ClientResult("inf", bad["inf"], 5), ok[1], ClientResult("diff", bad["diff"], 5)]
    results += [ClientResult("norm", bad["norm"], 5)] + ok[2:]
    shifted = lambda res: ClientResult(res.client_id, [res.arrays[0], res.arrays[1] + glob[1], *res.arrays[2:]], 5)  # noqa: E731
    results = [shifted(r) if r.client_id not in bad else r for r in results]
    for k, r in enumerate(results):  # rounds take results in partition order: bad rows between good ones
        r.metrics = {"partition-id": k}
    agg = DefendedAggregation(Krum(num_malicious=1, to_keep=4))
    new, metrics = agg.aggregate(1, glob, results)
    reasons = {r["client_id"]: r["reason"] for r in agg.records[-1].rejected}
    assert set(reasons) == {"inf", "diff", "norm"} and metrics["fl-defense.num-valid"] == 6
    assert "array 2 contains NaN or Inf" in reasons["inf"]
    assert "array 1" in reasons["diff"] and "overflow" in reasons["diff"]
    assert "norm overflows" in reasons["norm"]
    want, _ = DefendedAggregation(Krum(num_malicious=1, to_keep=4)).aggregate(
        1, glob, [r for r in results if r.client_id not in bad])
    for a, b in zip(new, want):
        np.testing.assert_array_equal(a, b)


def test_non_finite_buffers_are_rejected():
    rng = np.random.default_rng(6)
    g = model_arrays(rng)
    trainable = [True, True, True, False]
    results = [ClientResult(str(k), [a + 0.01 for a in g], 5) for k in range(3)]
    results[1].arrays[3] = np.full_like(g[3], np.nan)
    agg = DefendedAggregation(FedAvg(), trainable=trainable)
    _, metrics = agg.aggregate(1, g, results)
    assert metrics["fl-defense.num-rejected"] == 1 and "array 3 contains NaN" in agg.records[-1].rejected[0]["reason"]


def test_rejected_attackers_still_count_as_sampled():
    """The records say how many attackers a round sampled even when their results were rejected:
    a federation whose model blew up (every update overflows) still sampled its attackers. The
    count is the evaluation layer's (ground truth); the defense never sees it."""
    rng = np.random.default_rng(3)
    g = model_arrays(rng)
    agg = DefendedAggregation(FedAvg())
    ok = [a + 0.01 for a in g]
    overflowing = [np.full_like(a, 3e38) for a in g]
    results = [ClientResult("a", ok, 5), ClientResult("b", overflowing, 5), ClientResult("c", ok, 5)]
    agg.aggregate(1, g, results, ground_truth={"a": False, "b": True, "c": True})
    rec = agg.records[-1]
    assert [r["client_id"] for r in rec.rejected] == ["b"] and rec.client_ids == ["a", "c"]
    assert rec.num_attackers() == 2  # c, accepted, and b, rejected
    assert rec.detection()["fn"] == 1  # detection counts the aggregated clients only
    agg.aggregate(2, g, [ClientResult("b", overflowing, 5)], ground_truth={"b": True})
    assert agg.records[-1].kept_global and agg.records[-1].num_attackers() == 1


def test_the_record_keeps_each_accepted_update_norm_from_the_check():
    """The finiteness check's dot product is ||w_k - w||^2: the record keeps its root for every
    accepted update, in the order of ``client_ids``, and none for a rejected one (the gap a
    rejected row leaves in the updates matrix is closed, and so is its norm's)."""
    rng = np.random.default_rng(4)
    g = model_arrays(rng)
    shifts = {"a": 0.01, "b": 0.5, "c": float("nan"), "d": 2.0}
    results = [ClientResult(cid, [a + np.float32(s) for a in g], 5) for cid, s in shifts.items()]
    agg = DefendedAggregation(FedAvg())
    agg.aggregate(1, g, results)
    rec = agg.records[-1]
    assert rec.client_ids == ["a", "b", "d"] and [r["client_id"] for r in rec.rejected] == ["c"]
    d = sum(a.size for a in g)
    expected = [np.linalg.norm(np.concatenate([(a + np.float32(shifts[c]) - a).ravel() for a in g]))
                for c in rec.client_ids]
    np.testing.assert_allclose(rec.update_norms, expected, rtol=1e-5)
    np.testing.assert_allclose(rec.update_norms, [0.01 * d ** 0.5, 0.5 * d ** 0.5, 2.0 * d ** 0.5], rtol=1e-4)
    kept = DefendedAggregation(FedAvg(), min_clients=4)  # three valid: the global model is kept
    assert kept.aggregate(1, g, results)[0] is None and kept.records[-1].kept_global
    np.testing.assert_allclose(kept.records[-1].update_norms, rec.update_norms, rtol=1e-6)
