"""Simulation only: the hook that runs ``fl_defense.attacks.collusion.collude`` between the
clients' replies and the defense strategy, when a colluding attack is configured (and only then).

Both Flower APIs are covered: ``ColludingStrategy`` wraps a legacy strategy (``aggregate_fit``;
the honest update travels as bytes in the FitRes metrics), ``ColludingMessageStrategy`` a
Message-API one (``aggregate_train``; the honest update is an ArrayRecord in the reply's
RecordDict, see ``fl_defense.attacks.collusion.attach_honest_update``). ``with_collusion`` picks
the wrapper by the strategy's API.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import Strategy
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy as MessageStrategy

from fl_defense.attacks import COLLUDING_ATTACKS, ColludingAttack, make_colluding
from fl_defense.attacks.collusion import HONEST_UPDATE_KEY, collude, honest_update_payload
from fl_defense.config import ExperimentConfig
from fl_defense.rounds import PARTITION_KEY, ClientResult
from fl_defense.strategies.message import model_arrays
from fl_defense.updates import ParamLayout


class _CollusionStep:
    """What both wrappers share: the attack and its knowledge, the global arrays of the round
    (recorded when the round is configured), the known-updates buffer reused across rounds, one
    record per round in ``collusion_records`` (attack, knowledge, target, colluders), and
    delegation of every attribute the wrapper does not have to the wrapped strategy."""

    def __init__(self, inner, attack: ColludingAttack, knowledge: str, trainable: list[bool] | None,
                 seed: int) -> None:
        self.inner = inner
        self.attack = attack
        self.knowledge = knowledge
        self.trainable = trainable
        self.seed = seed
        self.collusion_records: list[dict] = []
        self._global = None
        self._workspace = None

    def __getattr__(self, name):  # only reached for attributes this wrapper does not have
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"{self.inner!r} under {self.attack!r} ({self.knowledge} knowledge)"

    def _collude(self, server_round: int, client_results: list[ClientResult]) -> list[ClientResult]:
        if self._global is None:
            raise RuntimeError(f"{type(self).__name__}: the round was not configured through this wrapper, "
                               "so the global model the colluders start from is unknown")
        server_round += getattr(self.inner, "round_offset", 0)
        layout = ParamLayout.from_arrays(self._global, self.trainable)
        rewritten, record, self._workspace = collude(client_results, self._global, layout, self.attack,
                                                     self.knowledge, server_round, self.seed, self._workspace)
        self.collusion_records.append(record)
        return rewritten


class ColludingStrategy(_CollusionStep, Strategy):
    """Wraps a legacy-API strategy: before its ``aggregate_fit`` the colluders' results are
    rewritten and the reserved key removed from every result; everything else is the wrapped
    strategy's (attributes such as ``records``, ``defense`` and ``aggregation`` pass through).
    ``collusion_records`` holds one record per round (attack, knowledge, target, colluders)."""

    def initialize_parameters(self, client_manager):
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager):
        self._global = parameters_to_ndarrays(parameters)
        return self.inner.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results, failures):
        return self.inner.aggregate_fit(server_round, self.rewrite(server_round, results), failures)

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager):
        return self.inner.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round: int, results, failures):
        return self.inner.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round: int, parameters: Parameters):
        return self.inner.evaluate(server_round, parameters)

    def rewrite(self, server_round: int, results: list) -> list:
        """The (proxy, FitRes) pairs as the colluders would have sent them. Only the colluders'
        payloads are decoded, plus, with full knowledge, the others'."""
        full = self.knowledge == "full"
        client_results = []
        for proxy, res in results:
            metrics = dict(res.metrics or {})
            arrays = None
            if full or HONEST_UPDATE_KEY in metrics:
                try:
                    arrays = parameters_to_ndarrays(res.parameters)
                except Exception as err:  # the adapter rejects it later, with the same reason
                    arrays = f"undecodable parameters ({err})"
            client_results.append(ClientResult(str(proxy.cid), arrays, res.num_examples, metrics))
        rewritten = self._collude(server_round, client_results)
        out = []
        for (proxy, res), before, after in zip(results, client_results, rewritten):
            if after is before:  # untouched: the client's own reply, as it came
                out.append((proxy, res))
                continue
            params = res.parameters if after.arrays is before.arrays else ndarrays_to_parameters(after.arrays)
            out.append((proxy, FitRes(status=res.status, parameters=params, num_examples=res.num_examples,
                                      metrics=after.metrics)))
        return out


class ColludingMessageStrategy(_CollusionStep, MessageStrategy):
    """Wraps a Message-API strategy: ``configure_train`` records the global arrays, then
    delegates; before the wrapped ``aggregate_train`` the colluders' replies are rewritten and the
    reserved ArrayRecord ``HONEST_UPDATE_KEY`` removed from every reply.

    A reply that carries the reserved record comes back as a new Message with the same metadata
    and the same records less that one; a colluder's model ArrayRecord (under the wrapped
    strategy's ``arrayrecord_key``, "arrays" by default) holds the crafted arrays under its own
    keys. Every other reply, error replies included, is passed on as the same Message object. With
    ``partial`` knowledge only the colluders' ArrayRecords are converted to numpy.

    ``trainable`` marks, per array of the model ArrayRecord, the trainable parameters the honest
    update covers (``fl_defense.models.trainable_mask``); None counts every floating array, right
    for models without floating buffers (BatchNorm statistics are floating buffers). ``start`` is
    Flower's own loop over this wrapper's methods; everything else is the wrapped strategy's."""

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = arrays.to_numpy_ndarrays()
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(server_round, self.rewrite(server_round, replies))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()

    def rewrite(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The replies as the colluders would have sent them (see the class doc)."""
        replies = list(replies)
        key = getattr(self.inner, "arrayrecord_key", "arrays")
        full = self.knowledge == "full"
        positions, client_results = [], []
        for pos, msg in enumerate(replies):
            if msg.has_error():
                continue
            content = msg.content
            metrics = {}
            partition = next((r[PARTITION_KEY] for r in content.metric_records.values() if PARTITION_KEY in r), None)
            if partition is not None:  # the order collude crafts in, as the legacy path has it
                metrics[PARTITION_KEY] = partition
            if HONEST_UPDATE_KEY in content:  # None when malformed: collude leaves it out, with a warning
                metrics[HONEST_UPDATE_KEY] = honest_update_payload(content[HONEST_UPDATE_KEY])
            arrays = None
            if full or HONEST_UPDATE_KEY in content:
                arrays = model_arrays(content, key)
            positions.append(pos)
            client_results.append(ClientResult(str(msg.metadata.src_node_id), arrays, None, metrics))
        rewritten = self._collude(server_round, client_results)
        out = list(replies)
        for pos, before, after in zip(positions, client_results, rewritten):
            msg = replies[pos]
            if HONEST_UPDATE_KEY not in msg.content:  # untouched: the client's own reply, as it came
                continue
            content = RecordDict({k: r for k, r in msg.content.items() if k != HONEST_UPDATE_KEY})
            if after.arrays is not before.arrays:  # crafted, under the colluder's own array keys
                names = list(msg.content.array_records[key].keys())
                content[key] = ArrayRecord({k: Array(np.require(a, requirements="C"))  # 0-d stays 0-d
                                            for k, a in zip(names, after.arrays)})
            out[pos] = _with_content(msg, content)
        return out


def _with_content(msg: Message, content: RecordDict) -> Message:
    """A copy of ``msg`` with other content and the same metadata (Flower's constructor resets
    ``delivered_at``; it is restored)."""
    out = Message(content=content, metadata=copy.copy(msg.metadata))
    out.metadata.delivered_at = msg.metadata.delivered_at
    return out


def with_collusion(cfg: ExperimentConfig, strategy, trainable: list[bool] | None):
    """``strategy`` wrapped in the collusion step of its Flower API (``ColludingMessageStrategy``
    for a Message-API strategy, else ``ColludingStrategy``) when ``model-poisoning`` is a colluding
    attack, else ``strategy`` itself."""
    if cfg.model_poisoning not in COLLUDING_ATTACKS:
        return strategy
    attack = make_colluding(cfg.model_poisoning, **cfg.colluding_params())
    wrapper = ColludingMessageStrategy if isinstance(strategy, MessageStrategy) else ColludingStrategy
    return wrapper(strategy, attack, cfg.attacker_knowledge, trainable, cfg.seed)
