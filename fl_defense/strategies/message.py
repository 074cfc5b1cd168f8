"""Adapter for Flower's Message API (``flwr.serverapp.strategy``, ``aggregate_train``).

Same classes, same names as ``fl_defense.strategies`` (the legacy adapter): swap
``from flwr.serverapp.strategy import FedAvg`` for ``from fl_defense.strategies.message import RLR``.
Clients reply with their "arrays" ArrayRecord and a MetricRecord holding ``num-examples``; a
Fisher diagonal, when the defense asks for it, travels as an extra ArrayRecord under
``fl-defense.fisher``.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from ..defenses.base import Defense
from ..rounds import FISHER_KEY, FISHER_REQUEST_KEY, ClientResult, split_ground_truth
from ._common import DefenseAdapter, split_kwargs
from .legacy import STRATEGIES as LEGACY_STRATEGIES


class DefenseStrategy(DefenseAdapter, FlowerFedAvg):
    """A Message-API ``FedAvg`` whose ``aggregate_train`` runs a defense (see the legacy twin)."""

    defense_class: type[Defense] | None = None

    def __init__(self, *, defense: Defense | None = None, **kwargs) -> None:
        self.aggregation, fedavg_kwargs = split_kwargs(self.defense_class, defense, kwargs)
        super().__init__(**fedavg_kwargs)
        self._global: list[np.ndarray] | None = None
        self._keys: list[str] | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._keys = list(arrays.keys())
        self._global = arrays.to_numpy_ndarrays()
        if self.defense.needs_fisher:
            config[FISHER_REQUEST_KEY] = True
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._check_sample_size(len(messages))
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._global is None:
            raise RuntimeError("aggregate_train called before configure_train: no global arrays known")
        client_results, ground_truth, failures = [], {}, 0
        for msg in replies:
            cid = str(msg.metadata.src_node_id)
            if msg.has_error():
                failures += 1
                log(WARNING, "round %d: node %s failed: %s", server_round, cid, msg.error.reason)
                continue
            client_results.append(self._to_client_result(cid, msg, ground_truth))
        new_arrays, metrics = self.aggregation.aggregate(
            server_round, self._global, client_results, failures=failures, ground_truth=ground_truth)
        if new_arrays is None:
            return None, MetricRecord(metrics)
        self._global = new_arrays
        return ArrayRecord({k: _array(v) for k, v in zip(self._keys, new_arrays)}), MetricRecord(metrics)

    def _to_client_result(self, cid: str, msg: Message, ground_truth: dict) -> ClientResult:
        content = msg.content
        metric_records = list(content.metric_records.values())
        raw_metrics = dict(metric_records[0]) if len(metric_records) == 1 else {}
        metrics, gt = split_ground_truth(raw_metrics)
        if gt is not None:
            ground_truth[cid] = gt
        num_examples = metrics.get(self.weighted_by_key, f"missing '{self.weighted_by_key}'")
        arrays: object
        if self.arrayrecord_key in content.array_records:
            try:
                arrays = content.array_records[self.arrayrecord_key].to_numpy_ndarrays()
            except Exception as err:
                arrays = f"undecodable ArrayRecord ({err})"
        else:
            arrays = f"no ArrayRecord under '{self.arrayrecord_key}'"
        if len(metric_records) != 1:
            num_examples = f"{len(metric_records)} MetricRecords, expected exactly one"
        if FISHER_KEY in content.array_records:
            fisher_arrays = content.array_records[FISHER_KEY].to_numpy_ndarrays()
            metrics[FISHER_KEY] = fisher_arrays[0] if len(fisher_arrays) == 1 else None
        return ClientResult(cid, arrays, _maybe_int(num_examples), metrics)


def _maybe_int(v: object) -> object:
    """MetricRecords carry counts as int or float; an integral float is accepted as a count."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def _array(v: np.ndarray) -> Array:
    return Array(np.ascontiguousarray(v))


# The Message-API twin of every legacy strategy: same name, same defense, same docstring.
def _twin(legacy_cls: type) -> type:
    return type(legacy_cls.__name__, (DefenseStrategy,), {
        "defense_class": legacy_cls.defense_class, "__doc__": legacy_cls.__doc__, "__module__": __name__})


STRATEGIES = {name: _twin(cls) for name, cls in LEGACY_STRATEGIES.items()}
globals().update({cls.__name__: cls for cls in STRATEGIES.values()})
__all__ = ["STRATEGIES", "DefenseStrategy", *sorted(cls.__name__ for cls in STRATEGIES.values())]
