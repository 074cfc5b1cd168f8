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
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from .. import defenses
from ..defenses.base import Defense
from ..rounds import FISHER_KEY, FISHER_REQUEST_KEY, ClientResult, split_ground_truth
from ._common import split_kwargs


class DefenseStrategy(FlowerFedAvg):
    """A Message-API ``FedAvg`` whose ``aggregate_train`` runs a defense (see the legacy twin)."""

    defense_class: type[Defense] | None = None

    def __init__(self, *, defense: Defense | None = None, **kwargs) -> None:
        self.aggregation, fedavg_kwargs = split_kwargs(self.defense_class, defense, kwargs)
        super().__init__(**fedavg_kwargs)
        self._global: list[np.ndarray] | None = None
        self._keys: list[str] | None = None
        self._checked_sample_size: int | None = None

    @property
    def defense(self) -> Defense:
        return self.aggregation.defense

    @property
    def records(self):
        return self.aggregation.records

    def __repr__(self) -> str:
        return f"{type(self).__name__}(defense={self.defense!r})"

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._keys = list(arrays.keys())
        self._global = arrays.to_numpy_ndarrays()
        if self.defense.needs_fisher:
            config[FISHER_REQUEST_KEY] = True
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if messages and self._checked_sample_size != len(messages):
            self.defense.check_num_clients(len(messages))
            self._checked_sample_size = len(messages)
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


def _array(v: np.ndarray):
    from flwr.app import Array

    return Array(np.ascontiguousarray(v))


class FedAvg(DefenseStrategy):
    """FedAvg through the defense core; same result as Flower's Message-API FedAvg."""

    defense_class = defenses.FedAvg


class RLR(DefenseStrategy):
    """Robust learning rate (Ozdayi et al., AAAI 2021); see ``fl_defense.defenses.RLR``."""

    defense_class = defenses.RLR


class Fedward(DefenseStrategy):
    """Fedward (Chen et al., arXiv 2307.00356); see ``fl_defense.defenses.Fedward``."""

    defense_class = defenses.Fedward


class FDCR(DefenseStrategy):
    """FDCR (Huang et al., NeurIPS 2024); asks clients for Fisher; see ``fl_defense.defenses.FDCR``."""

    defense_class = defenses.FDCR


class SDFC(DefenseStrategy):
    """SDFC (Huang et al., ECCV 2024); asks clients for Fisher and needs ``validation_fisher``
    (``fl_defense.fisher.ValidationFisher(model, images, labels)``); see ``fl_defense.defenses.SDFC``."""

    defense_class = defenses.SDFC


class Krum(DefenseStrategy):
    """Krum / Multi-Krum (Blanchard et al. 2017): ``Krum(num_malicious=f, to_keep=m)``."""

    defense_class = defenses.Krum


class Bulyan(DefenseStrategy):
    """Bulyan (El Mhamdi et al. 2018) over Krum: ``Bulyan(num_malicious=f)``."""

    defense_class = defenses.Bulyan


class Median(DefenseStrategy):
    """Coordinate-wise median (Yin et al. 2018)."""

    defense_class = defenses.Median


class TrimmedMean(DefenseStrategy):
    """Coordinate-wise trimmed mean (Yin et al. 2018): ``TrimmedMean(beta=0.2)``."""

    defense_class = defenses.TrimmedMean


class NormClipping(DefenseStrategy):
    """Norm clipping with Gaussian noise (Sun et al. 2019)."""

    defense_class = defenses.NormClipping


class SignSGD(DefenseStrategy):
    """signSGD with majority vote (Bernstein et al. 2019)."""

    defense_class = defenses.SignSGD


class FoolsGold(DefenseStrategy):
    """FoolsGold (Fung et al. 2020); keeps per-client histories across rounds."""

    defense_class = defenses.FoolsGold


class FLAME(DefenseStrategy):
    """FLAME (Nguyen et al. 2022): HDBSCAN on cosine distances, median-norm clipping, noise."""

    defense_class = defenses.FLAME


class FLTrust(DefenseStrategy):
    """FLTrust (Cao et al. 2021); needs ``server_update`` (``fl_defense.training.ServerUpdate``)."""

    defense_class = defenses.FLTrust
