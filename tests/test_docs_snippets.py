"""The code snippets of docs/own-flower-app.md run as written, and the strategies they build
aggregate a round (so the page cannot drift from the API)."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

from fl_defense.client import add_fisher, collect_samples, fisher_metrics
from fl_defense.fisher import decode_fisher, empirical_fisher
from fl_defense.rounds import FISHER_KEY, FISHER_REQUEST_KEY
from tests.helpers import FakeProxy, client_manager

PAGE = Path(__file__).resolve().parents[1] / "docs" / "own-flower-app.md"


def snippet(name: str) -> str:
    match = re.search(rf"<!-- snippet: {name} -->\n```python\n(.*?)```", PAGE.read_text(), re.S)
    assert match, f"no snippet {name!r} in {PAGE.name}"
    return match.group(1)


def _round_through(strategy, net, n=10, seed=0):
    from flwr.common import Code, FitRes, Status
    rng = np.random.default_rng(seed)
    g = [p.detach().numpy().copy() for p in net.parameters()]
    random.seed(0)
    strategy.configure_fit(1, ndarrays_to_parameters(g), client_manager(n))
    results = []
    for k in range(n):
        arrays = [a + 0.01 * rng.normal(size=a.shape).astype(np.float32) for a in g]
        x, y = torch.rand(20, 1, 8, 8), torch.randint(0, 10, (20,))
        metrics = fisher_metrics(net, (x, y), {FISHER_REQUEST_KEY: True}) if strategy.defense.needs_fisher else {}
        results.append((FakeProxy(str(k)), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 20, metrics)))
    params, metrics = strategy.aggregate_fit(1, results, [])
    return params, metrics


@pytest.mark.parametrize("name", ["sdfc", "fltrust"])
def test_snippet_runs_and_its_strategy_aggregates(name):
    namespace: dict = {}
    exec(compile(snippet(name), f"own-flower-app.md:{name}", "exec"), namespace)
    strategy, net = namespace["strategy"], namespace["net"]
    params, metrics = _round_through(strategy, net)
    assert params is not None and metrics["fl-defense.num-valid"] == 10 and metrics["fl-defense.num-rejected"] == 0


def test_fisher_helpers_compute_what_the_server_checks_and_only_when_asked():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    x, y = torch.rand(40, 1, 8, 8), torch.randint(0, 10, (40,))
    d = sum(p.numel() for p in net.parameters())
    assert fisher_metrics(net, (x, y), {}) == {}  # the server did not ask
    payload = fisher_metrics(net, (x, y), {FISHER_REQUEST_KEY: True})[FISHER_KEY]
    np.testing.assert_allclose(decode_fisher(payload, d), empirical_fisher(net, x, y), rtol=1e-6)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    dict_batches = [{"img": a, "label": b} for a, b in loader]
    for data in (loader, dict_batches):
        xs, ys = collect_samples(data, max_samples=30)
        assert torch.equal(xs, x[:30]) and torch.equal(ys, y[:30])
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict
    content = add_fisher(RecordDict({"arrays": ArrayRecord(net.state_dict())}), net, loader,
                         ConfigRecord({FISHER_REQUEST_KEY: True}))
    np.testing.assert_allclose(content[FISHER_KEY].to_numpy_ndarrays()[0], empirical_fisher(net, x, y), rtol=1e-6)
    assert FISHER_KEY not in add_fisher(RecordDict(), net, loader, ConfigRecord({}))
    with pytest.raises(ValueError, match="input_key"):
        collect_samples([{"img": x, "aux": x, "label": y}])
