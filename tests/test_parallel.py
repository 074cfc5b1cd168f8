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
    # a section started inside a worker runs serially in that worker instead of waiting on the pool
    inner = parallel.parallel_map(lambda x: parallel.parallel_map(lambda y: threading.current_thread().name, [x, x]), [0, 1])
    assert all(len(set(names)) == 1 for names in inner)
    threads(1)
    assert {name for _, name in parallel.parallel_map(lambda x: (x, threading.current_thread().name), range(3))} \
        == {threading.current_thread().name}


def test_blas_limit_is_restored_after_a_section(threads):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    threads(2)
    before = [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
    inside = parallel.parallel_map(
        lambda _: [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"], [0, 1])
    assert all(n == 1 for ns in inside for n in ns)
    assert [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"] == before


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
