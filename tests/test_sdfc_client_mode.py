"""SDFC's calibration where the authors' code puts it: the server sends each client its own D_k,
the client trains with lambda * sum D_k (theta - theta_prev)^2 against its previous local model."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common import ndarrays_to_parameters

from fl_defense import strategies
from fl_defense.client import SDFCCalibration, instructions
from fl_defense.fisher import decode_fisher
from fl_defense.rounds import GROUND_TRUTH_KEY, INSTRUCTION_PREFIX, INSTRUCTIONS_KEY
from fl_defense.strategies import message
from fl_defense.training import train
from tests.helpers import FakeGrid, client_manager, client_models, legacy_results, message_replies, model_arrays


def val_fisher(params):  # a fixed stand-in for the server's validation-set Fisher
    return torch.linspace(0.0, 1.0, params.numel())


def strategy(api="legacy", **kw):
    cls = strategies.SDFC if api == "legacy" else message.SDFC
    return cls(validation_fisher=val_fisher, calibration_mode="client", **kw)


def first_round(s, api, clients, g):
    random.seed(0)
    if api == "legacy":
        s.configure_fit(1, ndarrays_to_parameters(g), client_manager(len(clients)))
        return s.aggregate_fit(1, legacy_results(clients), [])
    s.configure_train(1, _record(g), ConfigRecord(), FakeGrid(range(len(clients))))
    return s.aggregate_train(1, message_replies(clients))


def _record(g):
    from tests.helpers import arrayrecord
    return arrayrecord(g)


def test_penalty_gradient_is_2_lambda_d_times_the_distance_to_the_previous_model():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    dim = sum(p.numel() for p in model.parameters())
    d, prev = torch.rand(dim), torch.randn(dim)
    state = RecordDict({SDFCCalibration.STATE_KEY: ArrayRecord({"theta": Array(prev.numpy())})})
    calib = SDFCCalibration({"sdfc-discrepancy": d.numpy(), "sdfc-lambda": np.array([0.7])}, state, model)
    assert calib.active
    calib.penalty(model).backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(grad, 2 * 0.7 * d * (theta - prev))


def test_without_discrepancy_or_previous_model_training_is_plain():
    model = torch.nn.Linear(3, 2)
    dim = sum(p.numel() for p in model.parameters())
    assert not SDFCCalibration({}, RecordDict(), model).active  # first round: no D_k yet
    assert not SDFCCalibration({"sdfc-discrepancy": np.ones(dim), "sdfc-lambda": np.array([1.0])},
                               RecordDict(), model).active  # no previous local model
    assert float(SDFCCalibration({}, None, model).penalty(model)) == 0.0


def test_the_penalty_keeps_training_near_the_previous_model_where_d_is_large():
    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    start = torch.nn.Linear(4, 3)
    dim = sum(p.numel() for p in start.parameters())
    prev = torch.cat([p.detach().reshape(-1) for p in start.parameters()])
    state = RecordDict({SDFCCalibration.STATE_KEY: ArrayRecord({"theta": Array(prev.numpy().copy())})})
    moved = {}
    for lam in (0.0, 5.0):  # 2 * lr * lambda < 2: the penalised steps stay stable
        model = torch.nn.Linear(4, 3)
        model.load_state_dict(start.state_dict())
        calib = SDFCCalibration({"sdfc-discrepancy": np.ones(dim, np.float32), "sdfc-lambda": np.array([lam])},
                                state, model)
        train(model, x, y, epochs=3, batch_size=16, lr=0.05, penalty=calib.penalty if calib.active else None)
        moved[lam] = float((torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - prev).norm())
    assert moved[5.0] < 0.5 * moved[0.0]


@pytest.mark.parametrize("api", ["legacy", "message"])
def test_each_client_gets_only_its_own_discrepancy(api):
    rng = np.random.default_rng(0)
    g = model_arrays(rng)
    clients = client_models(g, 6, rng, malicious=(1,))
    s = strategy(api)
    first_round(s, api, clients, g)
    kept = s.defense._discrepancies
    assert set(kept) == {f"partition-{k}" for k in range(6)}
    random.seed(1)
    if api == "legacy":
        pairs = s.configure_fit(2, ndarrays_to_parameters(g), client_manager(7))  # node 6 never replied
        got = {str(proxy.cid): instructions(ins.config) for proxy, ins in pairs}
        assert all(sum(k.startswith(INSTRUCTION_PREFIX) for k in ins.config) in (0, 2) for _, ins in pairs)
    else:
        msgs = s.configure_train(2, _record(g), ConfigRecord(), FakeGrid(range(7)))
        got = {str(m.metadata.dst_node_id): instructions(m.content) for m in msgs}
    assert got["6"] == {}
    for k in range(6):
        d = got[str(k)]["sdfc-discrepancy"]
        np.testing.assert_array_equal(d, kept[f"partition-{k}"].astype(np.float32))
        assert float(got[str(k)]["sdfc-lambda"][0]) == 1.0
    assert not np.array_equal(got["0"]["sdfc-discrepancy"], got["1"]["sdfc-discrepancy"])


def test_discrepancy_is_the_fisher_difference_and_survives_rounds_without_the_client():
    rng = np.random.default_rng(1)
    g = model_arrays(rng)
    clients = client_models(g, 5, rng)
    s = strategy()
    first_round(s, "legacy", clients, g)
    d = sum(a.size for a in g)
    for k, (_, _, metrics) in enumerate(clients):
        expected = np.abs(decode_fisher(metrics["fl-defense.fisher"], d) - val_fisher(torch.zeros(d)).numpy())
        np.testing.assert_allclose(s.defense._discrepancies[f"partition-{k}"], expected, rtol=1e-3, atol=1e-4)
    before = s.defense._discrepancies["partition-4"].copy()
    random.seed(0)
    s.configure_fit(2, ndarrays_to_parameters(g), client_manager(5))
    s.aggregate_fit(2, legacy_results(clients[:3]), [])  # clients 3 and 4 not sampled
    np.testing.assert_array_equal(s.defense._discrepancies["partition-4"], before)
    restored = strategies.SDFC(validation_fisher=val_fisher, calibration_mode="client")
    restored.defense.load_state_dict(s.defense.state_dict())  # checkpointed
    np.testing.assert_array_equal(restored.defense._discrepancies["partition-4"], before)


@pytest.mark.parametrize("mode", ["client", "server"])
def test_both_modes_are_blind_to_ground_truth(mode):
    rng = np.random.default_rng(2)
    g = model_arrays(rng)
    clients = client_models(g, 6, rng, malicious=(0, 3))
    variants = [clients,
                [(a, n, {k: v for k, v in m.items() if k != GROUND_TRUTH_KEY}) for a, n, m in clients],
                [(a, n, {**m, GROUND_TRUTH_KEY: 1 - m[GROUND_TRUTH_KEY]}) for a, n, m in clients]]
    outs = []
    for variant in variants:
        s = strategies.SDFC(validation_fisher=val_fisher, calibration_mode=mode)
        params, _ = first_round(s, "legacy", variant, g)
        outs.append((params.tensors, sorted((k, v.tobytes()) for k, v in s.defense._discrepancies.items())))
    assert outs[0] == outs[1] == outs[2]


def test_client_mode_aggregates_without_the_server_side_factor():
    rng = np.random.default_rng(3)
    g = model_arrays(rng)
    clients = client_models(g, 5, rng)
    p_client, _ = first_round(strategy(), "legacy", clients, g)
    p_server, _ = first_round(strategies.SDFC(validation_fisher=val_fisher), "legacy", clients, g)
    p_plain, _ = first_round(strategies.SDFC(validation_fisher=val_fisher, calibration=0.0), "legacy", clients, g)
    assert p_client.tensors == p_plain.tensors and p_client.tensors != p_server.tensors


def test_our_client_trains_with_its_discrepancy_against_its_previous_model():
    from client_app.app import DefenseClient
    from fl_defense.config import ExperimentConfig
    from fl_defense.fisher import encode_fisher
    from fl_defense.models import get_arrays

    cfg = ExperimentConfig.from_run_config({"defense": "sdfc", "sdfc-calibration-mode": "client",
                                            "server-fraction": 0.05, "local-epochs": 1, "malicious-fraction": 0.0})
    state = RecordDict()
    client = DefenseClient(cfg, 0, 5, state)
    g = get_arrays(client.model)
    first, _, _ = client.fit(g, {"server-round": 1})
    assert SDFCCalibration.STATE_KEY in state.array_records  # theta_prev for its next round
    dim = sum(p.numel() for p in client.model.parameters() if p.requires_grad)
    told = {INSTRUCTION_PREFIX + "sdfc-discrepancy": encode_fisher(np.full(dim, 2.0, np.float32), half=True),
            INSTRUCTION_PREFIX + "sdfc-lambda": encode_fisher(np.array([1.0], np.float32))}
    plain = DefenseClient(cfg, 0, 5, RecordDict({SDFCCalibration.STATE_KEY: state[SDFCCalibration.STATE_KEY]}))
    free, _, _ = plain.fit(g, {"server-round": 2})
    held, _, _ = client.fit(g, {"server-round": 2, **told})
    dist = lambda arrays: sum(float(np.square(a - b).sum()) for a, b in zip(arrays, first))
    assert client.calibration.active and dist(held) < dist(free)
