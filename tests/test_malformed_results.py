"""Property-based: malformed client results thrown at every defense, in both Flower APIs, are
rejected with a reason while the valid ones are still aggregated."""

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl_defense.defenses import DEFENSES
from fl_defense.rounds import FISHER_KEY
from tests.helpers import FakeGrid, FakeProxy, arrayrecord, client_manager, client_models, message_replies, model_arrays
from tests.test_adapters import make

N_GOOD = 9
SHAPES = [(4, 3), (4,), (2, 4), (2,)]


def corruptions():
    """A strategy of functions that break one client result, each named by what it breaks."""
    def arrays_fn(kind):
        def f(arrays, n, metrics, draw_val):
            a = [x.copy() for x in arrays]
            if kind == "nan":
                a[draw_val % 4].flat[0] = np.nan
            elif kind == "inf":
                a[draw_val % 4].flat[0] = -np.inf
            elif kind == "missing":
                a = a[:3]
            elif kind == "extra":
                a = a + [np.zeros(3, dtype=np.float32)]
            elif kind == "shape":
                a[draw_val % 4] = np.zeros((draw_val % 5 + 5,), dtype=np.float32)
            elif kind == "dtype":
                a[0] = a[0].astype(np.complex64)
            elif kind == "huge":
                a[1] = a[1] + 1e30
            return a, n, metrics
        return f

    def meta_fn(kind):
        def f(arrays, n, metrics, draw_val):
            m = dict(metrics)
            if kind == "zero-samples":
                n = 0
            elif kind == "negative-samples":
                n = -draw_val - 1
            elif kind == "fisher-missing":
                m.pop(FISHER_KEY)
            elif kind == "fisher-short":
                m[FISHER_KEY] = m[FISHER_KEY][:-4]
            elif kind == "fisher-garbage":
                m[FISHER_KEY] = b"\x00" * (draw_val % 40)
            return arrays, n, m
        return f

    kinds = [(k, arrays_fn(k)) for k in ("nan", "inf", "missing", "extra", "shape", "dtype", "huge")]
    kinds += [(k, meta_fn(k)) for k in ("zero-samples", "negative-samples", "fisher-missing", "fisher-short",
                                         "fisher-garbage")]
    return st.sampled_from(kinds)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(sorted(DEFENSES)), breaks=st.lists(st.tuples(corruptions(), st.integers(0, 1000)),
                                                                min_size=1, max_size=3),
       seed=st.integers(0, 10_000))
def test_malformed_results_are_rejected_in_both_apis(name, breaks, seed):
    rng = np.random.default_rng(seed)
    g = model_arrays(rng)
    clients = client_models(g, N_GOOD + len(breaks), rng)
    for i, ((_, corrupt), val) in enumerate(breaks):
        clients[N_GOOD + i] = corrupt(*clients[N_GOOD + i], val)
    # a broken Fisher only invalidates a result for the defenses that read Fisher
    legacy = make(name, max_update_norm=1e6)
    expected_rejected = sum(1 for (kind, _), _ in breaks
                            if not kind.startswith("fisher") or legacy.defense.needs_fisher)
    legacy.configure_fit(1, ndarrays_to_parameters(g), client_manager(len(clients)))
    results = [(FakeProxy(str(k)), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(a), n, dict(m)))
               for k, (a, n, m) in enumerate(clients)]
    params, metrics = legacy.aggregate_fit(1, results, [])
    assert metrics["fl-defense.num-rejected"] == expected_rejected
    assert metrics["fl-defense.num-valid"] == len(clients) - expected_rejected
    assert all(r["reason"] for r in legacy.records[-1].rejected)
    out = parameters_to_ndarrays(params)
    assert [a.shape for a in out] == SHAPES and all(np.isfinite(a).all() for a in out)

    msg = make(name, "message", max_update_norm=1e6)
    msg.configure_train(1, arrayrecord(g), ConfigRecord(), FakeGrid(range(len(clients))))
    replies = _safe_replies(clients)
    arrays, m2 = msg.aggregate_train(1, replies)
    assert m2["fl-defense.num-valid"] == len(clients) - expected_rejected
    if arrays is not None:
        assert all(np.isfinite(a).all() for a in arrays.to_numpy_ndarrays())


def _safe_replies(clients):
    """Message replies; a Fisher payload that cannot be decoded is carried as a wrong-length array
    (the Message API has no raw bytes here), a missing one as absent."""
    from fl_defense.fisher import FisherDecodeError, decode_fisher
    from flwr.app import Array

    d = sum(int(np.prod(s)) for s in SHAPES)
    prepared, extra = [], {}
    for k, (a, n, m) in enumerate(clients):
        m = dict(m)
        payload = m.pop(FISHER_KEY, None)
        if payload is not None:
            try:
                fisher = decode_fisher(payload, d)
            except FisherDecodeError:
                fisher = np.zeros(max(1, len(payload) // 4), dtype=np.float32) if len(payload) // 4 != d \
                    else np.full(d, -1.0, dtype=np.float32)
            extra[k] = {FISHER_KEY: ArrayRecord({"fisher": Array(fisher)})}
        prepared.append(([np.asarray(x) for x in a], n, m))
    return message_replies(prepared, extra_records=extra)
