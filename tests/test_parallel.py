"""Column-parallel CPU work gives the same result for any thread count."""

import threading

import numpy as np
import pytest
import torch

from fl_defense.defenses import parallel
from fl_defense.defenses.aggregators import median_of_rows, reduce_sorted_columns
from fl_defense.defenses.krum import GRAM_CHUNK, closest_to_median_mean, gram_matrix


@pytest.fixture
def threads():
    """Run a body with a given torch thread count, restoring the count afterwards."""
    before = torch.get_num_threads()

    def use(k):
        torch.set_num_threads(k)

    yield use
    torch.set_num_threads(before)


def test_parallel_map_keeps_order_uses_threads_and_does_not_nest(threads):
    threads(2)
    names = parallel.parallel_map(lambda x: (x, threading.current_thread().name), range(8))
    assert [x for x, _ in names] == list(range(8))
    assert all(name.startswith("fl-defense-columns") for _, name in names)
    # a section started inside a worker runs serially in that worker instead of waiting on the
    # pool (which would deadlock: run with a timeout so a regression fails instead of hanging)
    result = []
    t = threading.Thread(target=lambda: result.append(parallel.parallel_map(
        lambda x: parallel.parallel_map(lambda y: threading.current_thread().name, [x, x]), [0, 1])), daemon=True)
    t.start()
    t.join(timeout=30)
    assert not t.is_alive(), "nested parallel_map deadlocked"
    assert all(len(set(names)) == 1 for names in result[0])
    threads(1)
    assert {name for _, name in parallel.parallel_map(lambda x: (x, threading.current_thread().name), range(3))} \
        == {threading.current_thread().name}


def test_an_error_in_a_worker_is_raised_after_every_item_ran(threads):
    threads(2)
    ran = []

    def fn(x):
        ran.append(x)
        if x in (1, 3):
            raise ValueError(f"item {x}")
        return x

    with pytest.raises(ValueError, match="item 1"):
        parallel.parallel_map(fn, range(6))
    assert sorted(ran) == list(range(6))
    assert parallel.parallel_map(lambda x: x * 2, range(4)) == [0, 2, 4, 6]  # the pool still works


def test_split_evenly():
    assert parallel.split_evenly(list(range(7)), 3) == [[0, 1], [2, 3], [4, 5, 6]]
    assert parallel.split_evenly([1, 2], 5) == [[1], [2]]
    assert parallel.split_evenly([], 4) == []


def test_blas_limit_is_restored_after_a_section(threads):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    threads(2)

    def blas_threads():
        return [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]

    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):  # so the limit has something to change
        before = blas_threads()
        assert before and all(n == 2 for n in before)
        inside = parallel.parallel_map(lambda _: blas_threads(), [0, 1])
        assert all(n == 1 for ns in inside for n in ns)
        assert blas_threads() == before


def test_gram_and_order_statistics_do_not_depend_on_the_thread_count(threads):
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((7, 3 * GRAM_CHUNK + 123), dtype=np.float32))
    out = {}
    for k in (1, 2, 3):
        threads(k)
        out[k] = (gram_matrix(x), median_of_rows(x),
                  reduce_sorted_columns(x, lambda s: closest_to_median_mean(s, 3), rows=[0, 2, 3, 5, 6]))
    for k in (2, 3):
        for a, b in zip(out[1], out[k]):
            assert torch.equal(a, b)
    xd = x.double().numpy()
    np.testing.assert_allclose(out[1][0].numpy(), xd @ xd.T, rtol=1e-5, atol=1e-2)
    np.testing.assert_array_equal(out[1][1].numpy(), np.median(x.numpy(), axis=0))


def test_amgrad_gram_and_l1_do_not_depend_on_the_thread_count(threads):
    from fl_defense.defenses.fedward import amgrad, amgrad_gram

    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((9, 70_000), dtype=np.float32))
    layers = [slice(0, 50_000), slice(50_000, 69_990), slice(69_990, 70_000)]
    out = {}
    for k in (1, 2):
        threads(k)
        l1 = torch.zeros(9, dtype=torch.float64)
        out[k] = (amgrad_gram(x, layers, l1), l1)
    assert torch.equal(out[1][0], out[2][0]) and torch.equal(out[1][1], out[2][1])
    a = amgrad(x, layers).double()
    torch.testing.assert_close(out[1][0], a @ a.T, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out[1][1], x.double().abs().sum(dim=1), rtol=1e-6, atol=0)


def test_sign_passes_do_not_depend_on_the_thread_count(threads):
    """signSGD's / RLR's sign sums and Fedward's c @ sign(delta) run block by block on the
    threads; the same numbers for 1 and 2 threads, and the direct formulas'."""
    from fl_defense.defenses.aggregators import column_blocks, sign_sum, signed_combination

    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.standard_normal((9, 1_500_000), dtype=np.float32))
    x[:, :1000] = 0.0
    c = torch.from_numpy(rng.random(9, dtype=np.float32))
    assert len(list(column_blocks(x))) > 2
    out = {}
    for k in (1, 2):
        threads(k)
        out[k] = (sign_sum(x), signed_combination(c, x))
    assert torch.equal(out[1][0], out[2][0]) and torch.equal(out[1][1], out[2][1])
    torch.testing.assert_close(out[1][0], torch.sign(x).sum(dim=0))
    torch.testing.assert_close(out[1][1], c @ torch.sign(x))


def test_row_extremes_and_fdcr_discrepancy_do_not_depend_on_the_thread_count(threads):
    """Row minima/maxima (FDCR's Fisher normalisation, Fedward's layer maxima) and FDCR's
    discrepancy, block by block on the threads: equal for 1 and 2 threads and to the formulas."""
    from fl_defense.defenses import FDCR
    from fl_defense.defenses.aggregators import column_blocks, row_min_max
    from fl_defense.updates import RoundUpdates

    rng = np.random.default_rng(4)
    n, d = 7, 1_300_000
    x = torch.from_numpy(rng.standard_normal((n, d), dtype=np.float32))
    fisher = torch.from_numpy(rng.random((n, d), dtype=np.float32))
    x[3, d - 5] = 50.0  # each row's extreme in a different block
    x[4, 10] = -50.0
    assert len(list(column_blocks(x))) > 2
    out = {}
    for k in (1, 2):
        threads(k)
        ru = RoundUpdates(updates=x, num_examples=torch.arange(1.0, n + 1, dtype=torch.float64),
                          client_ids=[str(i) for i in range(n)], layer_slices=[slice(0, d)], fisher=fisher.clone())
        out[k] = (*row_min_max(x), FDCR().discrepancy(ru))
    for a, b in zip(out[1], out[2]):
        assert torch.equal(a, b)
    torch.testing.assert_close(out[1][0], x.min(dim=1).values, rtol=0, atol=0)
    torch.testing.assert_close(out[1][1], x.max(dim=1).values, rtol=0, atol=0)
    imp = (fisher - fisher.min(dim=1, keepdim=True).values) / (fisher.max(dim=1, keepdim=True).values
                                                                - fisher.min(dim=1, keepdim=True).values)
    g = (imp * x).double()
    w = ru.sample_weights.double()
    torch.testing.assert_close(out[1][2], torch.linalg.vector_norm(g - w @ g, dim=1).float(), rtol=1e-4, atol=0)


def test_sections_leave_the_torch_thread_count_of_later_threads_alone(threads):
    threads(2)
    parallel._executor(3)  # a fresh pool: its workers start (and set their own count) in the next section
    parallel.parallel_map(lambda x: torch.ones(4).sum(), range(6))
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert torch.get_num_threads() == 2 and seen == [2]
    # and the workers themselves run torch on one thread
    assert set(parallel.parallel_map(lambda _: torch.get_num_threads(), range(4))) == {1}


def test_rows_flattened_on_the_threads_close_up_around_rejected_ones(threads):
    """Candidates are flattened and checked on the threads (``rounds._flatten_checked``); rows
    rejected for their values (NaN, an overflowing delta, a norm above the bound) leave no gap:
    the defense gets exactly the accepted rows, in order, for any thread count."""
    from fl_defense.defenses.fedavg import FedAvg
    from fl_defense.rounds import ClientResult, DefendedAggregation

    class Recording(FedAvg):
        def aggregate(self, global_params, round_updates):
            self.seen = round_updates.updates.clone()
            return super().aggregate(global_params, round_updates)

    rng = np.random.default_rng(3)
    g = [rng.standard_normal((40, 30), dtype=np.float32), rng.standard_normal(7000, dtype=np.float32)]
    results = [ClientResult(str(k), [a + rng.normal(0, 0.01, a.shape).astype(np.float32) for a in g], 10 + k)
               for k in range(9)]
    results[1].arrays[0][3, 4] = np.nan
    results[4].arrays[1][:] = 3e38  # finite, but w_k - w overflows float32
    results[8].arrays[1][5] += 1e3  # over the norm bound
    expected = torch.stack([torch.from_numpy(np.concatenate([(a - b).ravel() for a, b in zip(r.arrays, g)]))
                            for k, r in enumerate(results) if k not in (1, 4, 8)])
    for k in (1, 2, 3):
        threads(k)
        defense = Recording()
        agg = DefendedAggregation(defense, max_update_norm=100.0)
        agg.aggregate(1, g, results)
        rejected = agg.records[-1].rejected
        assert [r["client_id"] for r in rejected] == ["1", "4", "8"]
        assert "NaN" in rejected[0]["reason"] and "overflow" in rejected[1]["reason"]
        assert "exceeds the bound" in rejected[2]["reason"]
        assert agg.records[-1].client_ids == [str(k) for k in range(9) if k not in (1, 4, 8)]
        assert torch.equal(defense.seen, expected)
