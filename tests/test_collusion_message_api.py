"""The collusion step in Flower's Message API (server_app.collusion.ColludingMessageStrategy and
fl_defense.attacks.collusion.attach_honest_update): the same new global model as the legacy
wrapper over the same updates, the reserved record removed before any strategy sees a reply, the
knowledge boundary, blindness to ground truth, and malformed honest updates."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.serverapp.strategy import Strategy as MessageStrategy

from fl_defense import strategies
from fl_defense.attacks import make_colluding
from fl_defense.attacks.collusion import (HONEST_UPDATE_KEY, attach_honest_update, encode_update,
                                          honest_update_payload)
from fl_defense.config import ExperimentConfig
from fl_defense.rounds import GROUND_TRUTH_KEY
from fl_defense.strategies import message
from fl_defense.updates import ParamLayout
from server_app.collusion import ColludingMessageStrategy, ColludingStrategy, with_collusion
from tests.helpers import FakeGrid, arrayrecord, client_manager, legacy_results, message_replies, model_arrays

N, COLLUDERS = 9, (2, 5, 7)
TRAINABLE = [True, True, True, True, False, False]  # two layers, then a float buffer and a 0-d counter


def _model(rng):
    return model_arrays(rng) + [np.zeros(3, dtype=np.float32), np.array(4, dtype=np.int64)]


def _honest(arrays, g):
    layout = ParamLayout.from_arrays(g, TRAINABLE)
    return (layout.flatten(arrays) - layout.flatten(g)).numpy()


def _clients(g, rng, colluders=COLLUDERS, n=N):
    """(arrays, num_examples, metrics) per client; colluders carry the legacy bytes payload."""
    out = []
    for k in range(n):
        arrays = [a + 0.1 * rng.normal(size=a.shape).astype(np.float32) for a in g[:4]]
        arrays += [np.full(3, float(k), dtype=np.float32), np.array(4 + k, dtype=np.int64)]
        metrics = {"partition-id": k, GROUND_TRUTH_KEY: int(k in colluders), "train-loss": 0.1 * k}
        if k in colluders:
            metrics[HONEST_UPDATE_KEY] = encode_update(_honest(arrays, g))
        out.append((arrays, int(rng.integers(20, 60)), metrics))
    return out


def _records(clients):
    """The Message API's payload: an ArrayRecord per colluder, built by the client helper."""
    extra = {}
    for k, (_, _, metrics) in enumerate(clients):
        if HONEST_UPDATE_KEY in metrics:
            update = np.frombuffer(metrics[HONEST_UPDATE_KEY], dtype=np.float32)
            extra[k] = {HONEST_UPDATE_KEY: attach_honest_update(RecordDict(), update)[HONEST_UPDATE_KEY]}
    return extra


def _round(seed=0):
    rng = np.random.default_rng(seed)
    g = _model(rng)
    clients = _clients(g, rng)
    return g, clients, message_replies(clients, _records(clients))


class Recording(MessageStrategy):
    """A Message-API strategy that keeps what reaches it."""

    arrayrecord_key = "arrays"

    def __init__(self):
        self.received: list[list[Message]] = []

    def configure_train(self, server_round, arrays, config, grid):
        return []

    def aggregate_train(self, server_round, replies):
        self.received.append(list(replies))
        return None, None

    def configure_evaluate(self, server_round, arrays, config, grid):
        return []

    def aggregate_evaluate(self, server_round, replies):
        return None

    def summary(self):
        pass


def _wrap(inner, attack="min_max", knowledge="full", api="message", **params):
    cls = ColludingMessageStrategy if api == "message" else ColludingStrategy
    return cls(inner, make_colluding(attack, **params), knowledge, TRAINABLE, seed=11)


def _run_message(wrapped, g, replies, server_round=1):
    random.seed(0)
    wrapped.configure_train(server_round, arrayrecord(g), ConfigRecord(), FakeGrid(range(N)))
    arrays, metrics = wrapped.aggregate_train(server_round, replies)
    return (None if arrays is None else arrays.to_numpy_ndarrays()), metrics


def _run_legacy(wrapped, g, clients, server_round=1):
    random.seed(0)
    wrapped.configure_fit(server_round, ndarrays_to_parameters(g), client_manager(N))
    params, metrics = wrapped.aggregate_fit(server_round, legacy_results(clients), [])
    return parameters_to_ndarrays(params), metrics


@pytest.mark.parametrize("defense", ["FedAvg", "Krum"])
@pytest.mark.parametrize("attack, params", [("min_max", {}), ("alie", {}), ("ipm", {}),
                                            ("fang", {"target": "krum"})])
@pytest.mark.parametrize("knowledge", ["partial", "full"])
def test_the_message_wrapper_gives_the_legacy_wrappers_global_model(defense, attack, params, knowledge):
    g, clients, replies = _round(seed=1)
    legacy = _wrap(getattr(strategies, defense)(trainable=TRAINABLE), attack, knowledge, "legacy", **params)
    msg = _wrap(getattr(message, defense)(trainable=TRAINABLE), attack, knowledge, "message", **params)
    ours, _ = _run_message(msg, g, replies)
    theirs, _ = _run_legacy(legacy, g, clients)
    assert len(ours) == len(theirs) == len(g) and ours[5].shape == ()
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert msg.collusion_records == legacy.collusion_records
    assert msg.collusion_records[-1]["colluders"] == 3
    assert msg.records[-1].weights == legacy.records[-1].weights  # records pass through the wrapper
    # the colluders' crafted models, not their honest ones, went into the round
    plain, _ = _run_message(getattr(message, defense)(trainable=TRAINABLE), g, _round(seed=1)[2])
    if defense == "FedAvg":
        assert not np.array_equal(plain[0], ours[0])


def test_the_reserved_record_reaches_no_inner_strategy_and_other_replies_pass_as_they_came():
    g, clients, replies = _round(seed=2)
    failed = Message(Error(code=0, reason="boom"), reply_to=Message(RecordDict(), dst_node_id=99,
                                                                        message_type="train"))
    replies = replies + [failed]
    for r in replies[:3]:
        r.metadata.delivered_at = "2025-01-01T00:00:00"
    inner = Recording()
    _run_message(_wrap(inner, "alie"), g, replies)
    received, = inner.received
    assert len(received) == len(replies)
    assert received[-1] is failed  # an error reply passes through untouched
    for k, (before, after) in enumerate(zip(replies[:N], received[:N])):
        assert HONEST_UPDATE_KEY not in after.content
        if k not in COLLUDERS:
            assert after is before
            continue
        assert after is not before and HONEST_UPDATE_KEY in before.content  # the client's reply is not edited
        public = ("run_id", "message_id", "src_node_id", "dst_node_id", "reply_to_message_id", "group_id",
                  "created_at", "ttl", "message_type", "src_task_id", "dst_task_id", "delivered_at")
        assert all(getattr(after.metadata, f) == getattr(before.metadata, f) for f in public)
        assert list(after.content.keys()) == [key for key in before.content.keys() if key != HONEST_UPDATE_KEY]
        assert after.content["metrics"] is before.content["metrics"]
        crafted, own = after.content["arrays"], before.content["arrays"]
        assert list(crafted.keys()) == list(own.keys())
        crafted, own = crafted.to_numpy_ndarrays(), own.to_numpy_ndarrays()
        assert not np.array_equal(crafted[0], own[0])
        assert np.array_equal(crafted[4], own[4]) and crafted[5].shape == () and int(crafted[5]) == 4 + k
    # ALIE sends one model for all colluders
    models = [received[k].content["arrays"].to_numpy_ndarrays()[0] for k in COLLUDERS]
    assert all(np.array_equal(models[0], m) for m in models[1:])


def test_the_defense_strategy_never_sees_the_reserved_record(monkeypatch):
    seen = []
    original = message.DefenseStrategy._to_client_result

    def spy(self, cid, msg, ground_truth):
        seen.append(list(msg.content.keys()))
        return original(self, cid, msg, ground_truth)

    monkeypatch.setattr(message.DefenseStrategy, "_to_client_result", spy)
    g, _, replies = _round(seed=3)
    arrays, metrics = _run_message(_wrap(message.Krum(trainable=TRAINABLE)), g, replies)
    assert arrays is not None and metrics["fl-defense.num-valid"] == N
    assert len(seen) == N and not any(HONEST_UPDATE_KEY in keys for keys in seen)


@pytest.mark.parametrize("knowledge", ["partial", "full"])
def test_partial_knowledge_never_converts_a_benign_reply(monkeypatch, knowledge):
    g, _, replies = _round(seed=4)
    converted = []
    original = ArrayRecord.to_numpy_ndarrays

    def spy(self, *args, **kwargs):
        converted.append(id(self))
        return original(self, *args, **kwargs)

    wrapped = _wrap(Recording(), "min_sum", knowledge)
    random.seed(0)
    wrapped.configure_train(1, arrayrecord(g), ConfigRecord(), FakeGrid(range(N)))
    monkeypatch.setattr(ArrayRecord, "to_numpy_ndarrays", spy)
    wrapped.aggregate_train(1, replies)
    monkeypatch.undo()
    benign = {id(r.content["arrays"]) for k, r in enumerate(replies) if k not in COLLUDERS}
    own = {id(replies[k].content[key]) for k in COLLUDERS for key in ("arrays", HONEST_UPDATE_KEY)}
    assert own <= set(converted)
    if knowledge == "partial":
        assert not benign & set(converted)
        assert wrapped.collusion_records[-1]["known_updates"] == 3
    else:  # full knowledge does read them
        assert benign <= set(converted)
        assert wrapped.collusion_records[-1]["known_updates"] == N


def test_ground_truth_and_the_order_of_replies_do_not_change_the_output():
    g, clients, _ = _round(seed=5)
    extra = _records(clients)
    removed = [(a, n, {k: v for k, v in m.items() if k != GROUND_TRUTH_KEY}) for a, n, m in clients]
    flipped = [(a, n, {**m, GROUND_TRUTH_KEY: 1 - m[GROUND_TRUTH_KEY]}) for a, n, m in clients]
    base, _ = _run_message(_wrap(message.FedAvg(trainable=TRAINABLE)), g, message_replies(clients, extra))
    for variant in (removed, flipped):
        out, _ = _run_message(_wrap(message.FedAvg(trainable=TRAINABLE)), g, message_replies(variant, extra))
        for a, b in zip(base, out):
            np.testing.assert_array_equal(a, b)
    inner = Recording()
    _run_message(_wrap(inner), g, message_replies(clients, extra))
    shuffled = Recording()
    _run_message(_wrap(shuffled), g, message_replies(clients, extra)[::-1])  # completion order
    for k in COLLUDERS:
        a = inner.received[0][k].content["arrays"].to_numpy_ndarrays()
        b = shuffled.received[0][N - 1 - k].content["arrays"].to_numpy_ndarrays()
        assert all(np.array_equal(x, y) for x, y in zip(a, b))


MALFORMED = {
    "too short": lambda u: ArrayRecord({"update": Array(u[:-1])}),
    "not finite": lambda u: ArrayRecord({"update": Array(np.where(np.arange(u.size) == 3, np.nan, u).astype(np.float32))}),
    "float64": lambda u: ArrayRecord({"update": Array(u.astype(np.float64))}),
    "two arrays": lambda u: ArrayRecord({"a": Array(u[:10]), "b": Array(u[10:])}),
    "not flat": lambda u: ArrayRecord({"update": Array(u.reshape(1, -1))}),
    "bytes in a ConfigRecord": lambda u: ConfigRecord({"update": u.tobytes()}),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_honest_update_leaves_its_colluder_out_and_the_round_goes_on(caplog, case):
    g, clients, _ = _round(seed=6)
    extra = _records(clients)
    bad = COLLUDERS[1]
    update = honest_update_payload(extra[bad][HONEST_UPDATE_KEY])
    extra[bad] = {HONEST_UPDATE_KEY: MALFORMED[case](np.frombuffer(update, dtype=np.float32).copy())}
    assert honest_update_payload(extra[bad][HONEST_UPDATE_KEY]) is None or case in ("too short", "not finite")
    replies = message_replies(clients, extra)
    inner = Recording()
    wrapped = _wrap(inner)
    with caplog.at_level(logging.WARNING, logger="fl_defense"):
        _run_message(wrapped, g, replies)
    assert any(f"colluder {bad} left out of the collusion" in r.getMessage() for r in caplog.records)
    assert wrapped.collusion_records[-1]["colluders"] == 2
    passed = inner.received[0][bad]
    assert HONEST_UPDATE_KEY not in passed.content and passed.content["arrays"] is replies[bad].content["arrays"]
    # the round goes on, and agrees with the legacy path where that colluder sent no usable payload
    legacy_clients = [(a, n, {**m, HONEST_UPDATE_KEY: b"bad"} if k == bad else m)
                      for k, (a, n, m) in enumerate(clients)]
    ours, metrics = _run_message(_wrap(message.FedAvg(trainable=TRAINABLE)), g, replies)
    theirs, _ = _run_legacy(_wrap(strategies.FedAvg(trainable=TRAINABLE), api="legacy"), g, legacy_clients)
    assert metrics["fl-defense.num-valid"] == N
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)


def test_attach_honest_update_writes_what_the_server_reads():
    update = torch.randn(3, 7, dtype=torch.float64)
    content = RecordDict({"metrics": MetricRecord({"num-examples": 5})})
    assert attach_honest_update(content, update) is content
    record = content[HONEST_UPDATE_KEY]
    assert isinstance(record, ArrayRecord) and list(content.keys()) == ["metrics", HONEST_UPDATE_KEY]
    assert honest_update_payload(record) == encode_update(update)
    assert honest_update_payload(MetricRecord({"x": 1.0})) is None


def test_with_collusion_picks_the_wrapper_by_api_and_is_absent_unless_configured():
    on = ExperimentConfig.from_run_config({"model-poisoning": "ipm", "attacker-knowledge": "partial"})
    off = ExperimentConfig.from_run_config({"model-poisoning": "none"})
    inner = message.FedAvg()
    assert with_collusion(off, inner, None) is inner
    wrapped = with_collusion(on, inner, TRAINABLE)
    assert isinstance(wrapped, ColludingMessageStrategy) and wrapped.knowledge == "partial"
    assert wrapped.trainable == TRAINABLE and wrapped.attack.name == "ipm"
    assert wrapped.arrayrecord_key == inner.arrayrecord_key and wrapped.defense is inner.defense  # delegated
    assert type(with_collusion(on, strategies.FedAvg(), TRAINABLE)) is ColludingStrategy


class AnsweringGrid(FakeGrid):
    """Answers train messages as clients would (colluders attach their honest update)."""

    def __init__(self, rng):
        super().__init__(range(N))
        self.rng = rng

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            if msg.metadata.message_type != "train":
                continue
            k = msg.metadata.dst_node_id
            g = msg.content["arrays"].to_numpy_ndarrays()
            arrays = [a + 0.1 * self.rng.normal(size=a.shape).astype(np.float32) for a in g[:4]] + g[4:]
            content = RecordDict({"arrays": arrayrecord(arrays),
                                  "metrics": MetricRecord({"partition-id": k, "num-examples": 30})})
            if k in COLLUDERS:
                attach_honest_update(content, _honest(arrays, g))
            replies.append(Message(content=content, reply_to=msg))
        return replies


def test_flowers_start_loop_runs_the_collusion_step_every_round():
    rng = np.random.default_rng(7)
    g = _model(rng)
    wrapped = _wrap(message.FedAvg(trainable=TRAINABLE, fraction_evaluate=0.0), "ipm")
    random.seed(0)
    result = wrapped.start(grid=AnsweringGrid(rng), initial_arrays=arrayrecord(g), num_rounds=2)
    assert [r["round"] for r in wrapped.collusion_records] == [1, 2]
    assert all(r["colluders"] == 3 for r in wrapped.collusion_records)
    assert [r.server_round for r in wrapped.records] == [1, 2]
    final = result.arrays.to_numpy_ndarrays()
    assert len(final) == len(g) and final[5].shape == ()
