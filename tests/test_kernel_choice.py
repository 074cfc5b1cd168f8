"""Kernels chosen by what the CPU does (``cpu_kernels``): the choice is the mechanism's (measured
once, cached, forced or set from the environment), and every branch gives identical numbers."""

import threading
from unittest import mock

import numpy as np
import pytest
import torch

from fl_defense.defenses import cpu_kernels
from fl_defense.defenses.fedward import Fedward, amgrad_gram, ternary_gram, ternary_gram_float32, ternary_gram_int8
from tests.helpers import round_updates


class FakeClock:
    """thread_time for ``cpu_kernels``: candidates advance it by what they declare they cost,
    so the measured choice is tested without depending on this machine's speed."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def task():
    """A registered task whose candidates cost what the test says (on the fake clock), and that
    record every call and the thread it ran on."""
    clock = FakeClock()
    calls = []
    cost = {}

    def candidate(name):
        def run(x):
            calls.append((name, threading.current_thread().name))
            clock.now += cost[name]
            return x * 2

        return run

    def make(plain_cost, special_cost):
        cost.update(plain=plain_cost, special=special_cost)
        cpu_kernels.register("test-task", {"plain": candidate("plain"), "special": candidate("special")},
                             lambda: (3,))
        return calls

    with mock.patch.object(cpu_kernels, "thread_time", clock):
        yield make
    cpu_kernels._tasks.pop("test-task", None)
    cpu_kernels._chosen.pop("test-task", None)
    cpu_kernels._timings.pop("test-task", None)


@pytest.mark.parametrize("plain_cost, special_cost, want", [
    (10.0, 1.0, "special"),   # the special kernel clearly faster (VNNI's int8 GEMM)
    (1.0, 10.0, "plain"),     # the special kernel slower (int8 without VNNI): never taken
    (1.0, 0.9, "plain"),      # faster, but within the margin: the plain one stays
    (1.0, 0.75, "special"),
])
def test_the_choice_is_measured_once_and_cached(task, plain_cost, special_cost, want):
    calls = task(plain_cost, special_cost)
    assert cpu_kernels.choice("test-task") == want
    measured = len(calls)
    assert {name for name, _ in calls} == {"plain", "special"}
    assert cpu_kernels.kernel("test-task")(5) == 10
    assert cpu_kernels.choice("test-task") == want
    assert len(calls) == measured + 1  # the kernel's own call: nothing measured again
    assert want in cpu_kernels.summary()["test-task"] and "measured" in cpu_kernels.summary()["test-task"]


def test_candidates_are_timed_on_a_worker_thread(task):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        calls = task(1.0, 2.0)
        cpu_kernels.choice("test-task")
        assert calls and all(thread.startswith("fl-defense-columns") for _, thread in calls)
    finally:
        torch.set_num_threads(before)


def test_forced_and_environment_choices_skip_the_measurement(task, monkeypatch):
    calls = task(10.0, 1.0)
    with cpu_kernels.forced("test-task", "plain"):
        assert cpu_kernels.choice("test-task") == "plain"
        assert "forced" in cpu_kernels.summary()["test-task"]
    monkeypatch.setenv(cpu_kernels.ENV, "other=x, test-task=plain")
    assert cpu_kernels.choice("test-task") == "plain"
    assert calls == []
    monkeypatch.setenv(cpu_kernels.ENV, "test-task=nonsense")
    with pytest.raises(ValueError, match="test-task must be one of"):
        cpu_kernels.choice("test-task")
    monkeypatch.setenv(cpu_kernels.ENV, "test-task")
    with pytest.raises(ValueError, match="task=candidate"):
        cpu_kernels.choice("test-task")
    monkeypatch.delenv(cpu_kernels.ENV)
    with pytest.raises(ValueError, match="no candidate"):
        with cpu_kernels.forced("test-task", "nonsense"):
            pass
    assert cpu_kernels.choice("test-task") == "special"  # measured once nothing overrides it


def test_the_real_choice_on_this_cpu_is_a_measured_candidate():
    cpu_kernels.forget()
    chosen = cpu_kernels.choice("ternary_gram")
    assert chosen in ("float32", "int8")
    assert cpu_kernels.summary()["ternary_gram"].startswith(f"{chosen} (measured: float32 ")


def _ternary_cases():
    rng = np.random.default_rng(3)
    yield rng.integers(-1, 2, size=(9, 5001), dtype=np.int8)
    yield np.zeros((4, 100), dtype=np.int8)
    yield np.ones((3, 70_000), dtype=np.int8)  # counts far beyond int8 and float16
    sparse = np.zeros((100, 10_485), dtype=np.int8)
    sparse[rng.random(sparse.shape) < 0.02] = 1
    sparse[rng.random(sparse.shape) < 0.02] = -1
    yield sparse
    yield rng.integers(-1, 2, size=(1, 1), dtype=np.int8)


@pytest.mark.parametrize("t", list(_ternary_cases()), ids=lambda t: "x".join(map(str, t.shape)))
def test_both_ternary_gram_kernels_give_the_exact_counts(t):
    want = (t.astype(np.float64) @ t.astype(np.float64).T).astype(np.int64)  # exact: small integers
    for name, fn in (("float32", ternary_gram_float32), ("int8", ternary_gram_int8)):
        got = fn(t)
        assert got.dtype == np.int32, name
        np.testing.assert_array_equal(got, want, err_msg=name)
        with cpu_kernels.forced("ternary_gram", name):
            assert torch.equal(ternary_gram(torch.from_numpy(t)), torch.from_numpy(want.astype(np.int32)))


def test_the_forced_branch_is_the_one_that_runs():
    """Forcing float32 keeps torch's int8 GEMM out of the round entirely; forcing int8 uses it."""
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.standard_normal((12, 40_000), dtype=np.float32))
    layers = [slice(0, 30_000), slice(30_000, 40_000)]
    real = torch._int_mm
    used = []

    def counting(a, b):
        used.append(a.shape)
        return real(a, b)

    with mock.patch.object(torch, "_int_mm", counting):
        with cpu_kernels.forced("ternary_gram", "float32"):
            amgrad_gram(x, layers)
        assert used == []
        with cpu_kernels.forced("ternary_gram", "int8"):
            amgrad_gram(x, layers)
        assert used


@pytest.mark.parametrize("threads", [1, 2])
def test_fedward_is_identical_with_either_kernel(threads):
    """The whole defense, not only the Gram: same distances, clusters, weights and model."""
    rng = np.random.default_rng(6)
    u = 0.01 * rng.standard_normal((20, 250_000)).astype(np.float32)
    u[15:] = 0.05 * np.sign(rng.standard_normal((5, 250_000))).astype(np.float32)  # a coordinated group
    ru = round_updates(u, layer_sizes=[200_000, 49_990, 10])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = {}
        for name in ("float32", "int8"):
            with cpu_kernels.forced("ternary_gram", name):
                l1 = torch.zeros(ru.n, dtype=torch.float64)
                gram = amgrad_gram(ru.updates, ru.layer_slices, l1)
                out[name] = (gram, l1, Fedward().aggregate(torch.zeros(ru.d), ru))
    finally:
        torch.set_num_threads(before)
    (g1, l1a, r1), (g2, l1b, r2) = out["float32"], out["int8"]
    assert torch.equal(g1, g2) and torch.equal(l1a, l1b)
    assert torch.equal(r1.params, r2.params) and torch.equal(r1.weights, r2.weights)
    assert torch.equal(r1.flagged, r2.flagged) and r1.info == r2.info
    assert r1.flagged[15:].all() and not r1.flagged[:15].any()  # and the rule did its job


@pytest.mark.parametrize("n", [5, 100, 130])
@pytest.mark.parametrize("density", [0.0, 0.002, 0.02, 0.3, 1.0])
def test_ternary_block_gram_skips_only_columns_without_shared_signs(n, density):
    """The compressed product (columns with two or more nonzero signs, the diagonal from each
    row's count) gives the plain product's integers at every density, through either kernel."""
    from fl_defense.defenses.fedward import ternary_block_gram, ternary_gram_float32

    rng = np.random.default_rng(n)
    t = (rng.choice([-1, 1], size=(n, 3000)) * (rng.random((n, 3000)) < density)).astype(np.int8)
    expected = (t.astype(np.int64) @ t.T.astype(np.int64))
    for name in ("float32", "int8"):
        with cpu_kernels.forced("ternary_gram", name):
            np.testing.assert_array_equal(ternary_block_gram(t), expected)
    np.testing.assert_array_equal(ternary_gram_float32(t), expected)


def test_sparse_signs_take_the_compressed_product(monkeypatch):
    """At the density of trained models' AmGrad (well under 1%) the kernel sees only the
    columns two rows share; at Gaussian density (2%) the whole block."""
    from fl_defense.defenses import fedward

    seen = []

    def spy(t):
        seen.append(t.shape[1])
        return fedward.ternary_gram_float32(t)

    rng = np.random.default_rng(0)
    sparse = (rng.choice([-1, 1], size=(100, 4096)) * (rng.random((100, 4096)) < 0.002)).astype(np.int8)
    dense = (rng.choice([-1, 1], size=(100, 4096)) * (rng.random((100, 4096)) < 0.02)).astype(np.int8)
    fedward.ternary_block_gram(sparse, spy)
    fedward.ternary_block_gram(dense, spy)
    assert seen[0] < 0.05 * 4096 and seen[1] == 4096
