"""Simulation only: the hook that runs ``fl_defense.attacks.collusion.collude`` between the
clients' replies and the defense strategy, when a colluding attack is configured (and only then).
"""

from __future__ import annotations

from flwr.common import FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import Strategy

from fl_defense.attacks import COLLUDING_ATTACKS, ColludingAttack, make_colluding
from fl_defense.attacks.collusion import HONEST_UPDATE_KEY, collude
from fl_defense.config import ExperimentConfig
from fl_defense.rounds import ClientResult
from fl_defense.updates import ParamLayout


class ColludingStrategy(Strategy):
    """Wraps a legacy-API strategy: before its ``aggregate_fit`` the colluders' results are
    rewritten and the reserved key removed from every result; everything else is the wrapped
    strategy's (attributes such as ``records``, ``defense`` and ``aggregation`` pass through).
    ``collusion_records`` holds one record per round (attack, knowledge, target, colluders)."""

    def __init__(self, inner: Strategy, attack: ColludingAttack, knowledge: str, trainable: list[bool],
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
        server_round += getattr(self.inner, "round_offset", 0)
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
        layout = ParamLayout.from_arrays(self._global, self.trainable)
        rewritten, record, self._workspace = collude(client_results, self._global, layout, self.attack,
                                                     self.knowledge, server_round, self.seed, self._workspace)
        self.collusion_records.append(record)
        out = []
        for (proxy, res), before, after in zip(results, client_results, rewritten):
            if after is before:  # untouched: the client's own reply, as it came
                out.append((proxy, res))
                continue
            params = res.parameters if after.arrays is before.arrays else ndarrays_to_parameters(after.arrays)
            out.append((proxy, FitRes(status=res.status, parameters=params, num_examples=res.num_examples,
                                      metrics=after.metrics)))
        return out


def with_collusion(cfg: ExperimentConfig, strategy: Strategy, trainable: list[bool]) -> Strategy:
    """``strategy`` wrapped in the collusion step when ``model-poisoning`` is a colluding attack,
    else ``strategy`` itself."""
    if cfg.model_poisoning not in COLLUDING_ATTACKS:
        return strategy
    attack = make_colluding(cfg.model_poisoning, **cfg.colluding_params())
    return ColludingStrategy(strategy, attack, cfg.attacker_knowledge, trainable, cfg.seed)
