"""Adapter for Flower's Message API (``flwr.serverapp.strategy``, ``aggregate_train``).

Same classes, same names as ``fl_defense.strategies`` (the legacy adapter), plus Flower's class
names where Flower has the same rule (``FedMedian``, ``FedTrimmedAvg``, ``MultiKrum``): swap
``from flwr.serverapp.strategy import FedAvg`` for ``from fl_defense.strategies.message import RLR``.
Clients reply with their "arrays" ArrayRecord and a MetricRecord holding ``num-examples``; a
Fisher diagonal, when the defense asks for it, travels as an extra ArrayRecord under
``fl-defense.fisher`` (``fl_defense.client.add_fisher``).
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.serverapp.strategy.multikrum import select_multikrum

from ..defenses import DEFENSES
from ..rounds import FISHER_KEY, FISHER_REQUEST_KEY, INSTRUCTIONS_KEY, ClientResult, split_ground_truth
from ._common import DefenseAdapter, FlowerName, FlowerOnly, client_metrics
from .legacy import strategy_classes

# Flower's Message-API names for our defenses' parameters, per defense.
FLOWER_NAMES: dict[str, dict] = {
    "krum": {"num_malicious_nodes": FlowerName("num_malicious", 0),
             # MultiKrum's count; 1 is Krum itself (our to_keep=0: the chosen model, bit for bit)
             "num_nodes_to_select": FlowerName("to_keep", 1, translate=lambda v: 0 if v == 1 else v)},
    "bulyan": {
        "num_malicious_nodes": FlowerName("num_malicious", 0),
        # Flower's default (None) is one Multi-Krum pass; ours is the paper's repeated Krum. Passing
        # Flower's select_multikrum asks for Flower's rule.
        "selection_rule": FlowerOnly(None, lambda v: {} if v is None else
                                     {"selection": "multi_krum"} if v is select_multikrum else None,
                                     "pass None (the paper's repeated Krum) or Flower's select_multikrum "
                                     "(or selection='multi_krum')"),
    },
}


class DefenseStrategy(DefenseAdapter, FlowerFedAvg):
    """A Message-API ``FedAvg`` whose ``aggregate_train`` runs a defense (see the legacy twin)."""

    adapter_extras: dict = {}

    def __init__(self, *args, **kwargs) -> None:
        fedavg, own, core, extras = self._split_arguments(args, kwargs)
        self._setup(own, core, extras.pop("defense", None))
        super().__init__(**fedavg)
        self._global: list[np.ndarray] | None = None
        self._keys: list[str] | None = None

    @classmethod
    def _flower_init(cls):
        return FlowerFedAvg.__init__

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._keys = list(arrays.keys())
        self._global = arrays.to_numpy_ndarrays()
        sent = self.aggregation.broadcast(self._global)  # BackdoorIndicator's planted model, else None
        if sent is not None:
            arrays = ArrayRecord({k: _array(v) for k, v in zip(self._keys, sent)})
        if self.defense.needs_fisher:
            config[FISHER_REQUEST_KEY] = True
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._check_sample_size(len(messages))
        return [self._with_instructions(msg) for msg in messages]

    def _with_instructions(self, msg: Message) -> Message:
        """The message itself, or (when the defense has instructions for its node) a copy whose
        content adds them: Flower's messages share one RecordDict."""
        own = self.aggregation.instructions_for(str(msg.metadata.dst_node_id))
        if not own:
            return msg
        content = RecordDict(dict(msg.content.items()))
        content[INSTRUCTIONS_KEY] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in own.items()})
        return Message(content=content, dst_node_id=msg.metadata.dst_node_id, message_type=msg.metadata.message_type)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if not replies:  # as Flower's FedAvg
            self.aggregation.skip_round(server_round, "no replies")
            return None, None
        client_results, ground_truth, failures = [], {}, 0
        for msg in replies:
            cid = str(msg.metadata.src_node_id)
            if msg.has_error():
                failures += 1
                log(WARNING, "round %d: node %s failed: %s", server_round, cid, msg.error.reason)
                continue
            client_results.append(self._to_client_result(cid, msg, ground_truth))
        if not client_results:
            self.aggregation.skip_round(server_round, f"every reply ({failures}) is an error", failures=failures,
                                        had_replies=True)
            return None, None
        if self._keys is None:  # a direct call: the first reply's keys, as Flower's strategies take them
            first = client_results[0].source.content.array_records
            self._keys = list(first[self.arrayrecord_key].keys()) if self.arrayrecord_key in first else None
        new_arrays, ours = self.aggregation.aggregate(
            server_round, self._global, client_results, failures=failures, ground_truth=ground_truth)
        if new_arrays is None:
            return None, MetricRecord(ours)
        self._global = new_arrays
        keys = self._keys if self._keys is not None and len(self._keys) == len(new_arrays) \
            else [str(i) for i in range(len(new_arrays))]
        # Client metrics as Flower aggregates them: over the replies that went into the model (all of
        # them for FedAvg, the selected ones for Krum and Bulyan, as Flower's MultiKrum and Bulyan).
        weights = self.records[-1].weights
        contributing = [self._metrics_view(r.source) for r, w in zip(self.aggregation.last_valid, weights)
                        if w > 0]
        metrics = self.train_metrics_aggr_fn(contributing, self.weighted_by_key) if contributing else None
        metrics = MetricRecord() if metrics is None else metrics
        for k, v in ours.items():
            metrics[k] = v
        return ArrayRecord({k: _array(v) for k, v in zip(keys, new_arrays)}), metrics

    def _to_client_result(self, cid: str, msg: Message, ground_truth: dict) -> ClientResult:
        content = msg.content
        metric_records = list(content.metric_records.values())
        raw_metrics = dict(metric_records[0]) if len(metric_records) == 1 else {}
        metrics, gt = split_ground_truth(raw_metrics)
        if gt is not None:
            ground_truth[cid] = gt
        num_examples = metrics.get(self.weighted_by_key, f"missing '{self.weighted_by_key}'")
        arrays = model_arrays(content, self.arrayrecord_key)
        if len(metric_records) != 1:
            num_examples = f"{len(metric_records)} MetricRecords, expected exactly one"
        if FISHER_KEY in content.array_records:
            fisher_arrays = content.array_records[FISHER_KEY].to_numpy_ndarrays()
            metrics[FISHER_KEY] = fisher_arrays[0] if len(fisher_arrays) == 1 else None
        return ClientResult(cid, arrays, _maybe_int(num_examples), metrics, source=msg)

    @staticmethod
    def _metrics_view(msg: Message) -> RecordDict:
        """The reply as Flower's metric aggregation sees it: without our Fisher ArrayRecord and
        the reserved simulation keys."""
        view = RecordDict()
        for key, record in msg.content.items():
            if key == FISHER_KEY:
                continue
            view[key] = MetricRecord(client_metrics(dict(record))) if isinstance(record, MetricRecord) else record
        return view


def model_arrays(content: RecordDict, key: str) -> list[np.ndarray] | str:
    """The model arrays of a reply's ArrayRecord ``key``, or the reason there are none (a string,
    which the adapter rejects the result with)."""
    if key not in content.array_records:
        return f"no ArrayRecord under '{key}'"
    try:
        return content.array_records[key].to_numpy_ndarrays()
    except Exception as err:
        return f"undecodable ArrayRecord ({err})"


def _maybe_int(v: object) -> object:
    """MetricRecords carry counts as int or float; an integral float is accepted as a count."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def _array(v: np.ndarray) -> Array:
    # np.require keeps 0-d arrays 0-d (np.ascontiguousarray makes them shape (1,)).
    return Array(np.require(v, requirements="C"))


STRATEGIES, FLOWER_ALIASES, __all__ = strategy_classes(DefenseStrategy, FLOWER_NAMES, "message", __name__)
globals().update({cls.__name__: cls for cls in STRATEGIES.values()}, **FLOWER_ALIASES)
