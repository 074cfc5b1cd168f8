"""Builders of constructed rounds for both Flower APIs."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy

from fl_defense.fisher import decode_fisher, encode_fisher
from fl_defense.rounds import FISHER_KEY, GROUND_TRUTH_KEY
from fl_defense.updates import RoundUpdates


class FakeProxy(ClientProxy):
    def get_properties(self, ins, timeout, group_id):
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):
        raise NotImplementedError

    def fit(self, ins, timeout, group_id):
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):
        raise NotImplementedError


class FakeGrid:
    def __init__(self, node_ids):
        self._ids = list(node_ids)

    def get_node_ids(self):
        return self._ids


def client_manager(n: int) -> SimpleClientManager:
    cm = SimpleClientManager()
    for i in range(n):
        cm.register(FakeProxy(str(i)))
    return cm


def round_updates(updates, num_examples=None, fisher=None, layer_sizes=None) -> RoundUpdates:
    u = torch.as_tensor(np.asarray(updates, dtype=np.float32))
    n, d = u.shape
    ne = torch.as_tensor(num_examples if num_examples is not None else [10.0] * n, dtype=torch.float64)
    sizes = layer_sizes or [d]
    slices, s = [], 0
    for size in sizes:
        slices.append(slice(s, s + size))
        s += size
    f = None if fisher is None else torch.as_tensor(np.asarray(fisher, dtype=np.float32))
    return RoundUpdates(updates=u, num_examples=ne, client_ids=[str(i) for i in range(n)], layer_slices=slices, fisher=f)


def model_arrays(rng: np.random.Generator) -> list[np.ndarray]:
    """A small 'model': two layers of weights and biases."""
    return [rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(4,)).astype(np.float32),
            rng.normal(size=(2, 4)).astype(np.float32), rng.normal(size=(2,)).astype(np.float32)]


def client_models(global_arrays, n, rng, scale=0.1, malicious=()):
    """n clients' arrays, each the global plus noise, malicious ones shifted, with a Fisher diagonal
    in the legacy wire encoding; returns a list of (arrays, num_examples, metrics)."""
    out = []
    d = sum(a.size for a in global_arrays)
    for k in range(n):
        shift = 0.5 if k in malicious else 0.0
        arrays = [a + shift + scale * rng.normal(size=a.shape).astype(np.float32) for a in global_arrays]
        fisher = np.abs(rng.normal(size=d)).astype(np.float32) * (3.0 if k in malicious else 1.0)
        metrics = {"partition-id": k, GROUND_TRUTH_KEY: int(k in malicious), FISHER_KEY: encode_fisher(fisher)}
        out.append((arrays, int(rng.integers(20, 60)), metrics))
    return out


def legacy_results(clients):
    return [
        (FakeProxy(str(k)), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n, dict(metrics)))
        for k, (arrays, n, metrics) in enumerate(clients)
    ]


def message_replies(clients, extra_records=None):
    replies = []
    for k, (arrays, n, metrics) in enumerate(clients):
        md = Metadata(run_id=1, message_id="", src_node_id=k, dst_node_id=0, reply_to_message_id="m",
                      group_id="1", created_at=0.0, ttl=100.0, message_type=MessageType.TRAIN)
        content = RecordDict({
            "arrays": ArrayRecord({str(i): Array(a) for i, a in enumerate(arrays)}),
            "metrics": MetricRecord({**{m: v for m, v in metrics.items() if isinstance(v, (int, float))}, "num-examples": n}),
        })
        if FISHER_KEY in metrics:  # the Message API carries Fisher as its own ArrayRecord
            fisher = decode_fisher(metrics[FISHER_KEY], sum(a.size for a in arrays))
            content[FISHER_KEY] = ArrayRecord({"fisher": Array(fisher)})
        for key, rec in (extra_records or {}).get(k, {}).items():
            content[key] = rec
        replies.append(Message(content=content, metadata=md))
    return replies


def arrayrecord(arrays) -> ArrayRecord:
    return ArrayRecord({str(i): Array(a) for i, a in enumerate(arrays)})
