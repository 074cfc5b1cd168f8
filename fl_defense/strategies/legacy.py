"""Adapter for Flower's legacy strategy API (``flwr.server.strategy``, ``aggregate_fit``).

One class per registered defense (``fl_defense.defenses.DEFENSES``), generated: ``RLR``,
``Krum``, ... and Flower's class names where Flower has the same rule (``FedMedian``,
``FedTrimmedAvg``, ``MultiKrum``: aliases of ``Median``, ``TrimmedMean``, ``Krum``).
"""

from __future__ import annotations

from logging import WARNING

import numpy as np
from flwr.common import FitIns, Parameters, Scalar, log, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg as FlowerFedAvg
from flwr.server.strategy.aggregate import aggregate_krum

from ..checkpoint import save_checkpoint
from ..defenses import DEFENSES
from ..defenses.base import Defense
from ..fisher import encode_fisher
from ..rounds import FISHER_REQUEST_KEY, INSTRUCTION_PREFIX, ClientResult, split_ground_truth
from ._common import DefenseAdapter, FlowerName, FlowerOnly, build_signature, client_metrics, strategy_doc

# Flower's legacy names for our defenses' parameters, per defense.
FLOWER_NAMES: dict[str, dict] = {
    "krum": {"num_malicious_clients": FlowerName("num_malicious", 0),
             "num_clients_to_keep": FlowerName("to_keep", 0)},
    "bulyan": {
        "num_malicious_clients": FlowerName("num_malicious", 0),
        # Flower passes these to its Krum; any other value makes Flower's own Bulyan fail.
        "to_keep": FlowerOnly(0, lambda v: {} if v == 0 else None,
                              "Bulyan selects with single Krum (Flower's own Bulyan fails with to_keep > 0 too)"),
        "first_aggregation_rule": FlowerOnly(aggregate_krum, lambda v: {} if v is aggregate_krum else None,
                                             "only Krum (Flower's aggregate_krum) is implemented as the selection"),
    },
}
# Flower's class for the same rule, named in the docstring (and aliased below).
FLOWER_EQUIVALENT = {"fedavg": "FedAvg", "krum": "Krum", "bulyan": "Bulyan", "median": "FedMedian",
                     "trimmed_mean": "FedTrimmedAvg"}


class DefenseStrategy(DefenseAdapter, FlowerFedAvg):
    """A Flower ``FedAvg`` whose ``aggregate_fit`` runs a defense from ``fl_defense.defenses``
    (given as ``defense=``; the concrete classes ``RLR``, ``Krum``, ... build theirs)."""

    # sampling_rng: the client manager's own random.Random (server_app.sampling), kept in the checkpoint
    adapter_extras = {"checkpoint_path": None, "round_offset": 0, "sampling_rng": None}

    def __init__(self, *args, **kwargs) -> None:
        fedavg, own, core, extras = self._split_arguments(args, kwargs)
        self._setup(own, core, extras.pop("defense", None))
        super().__init__(**fedavg)
        self._global: list[np.ndarray] | None = None
        self.checkpoint_path = extras.get("checkpoint_path")
        self.sampling_rng = extras.get("sampling_rng")
        # After a resume Flower counts rounds from 1 again; round_offset maps them to the run's.
        self.round_offset = extras.get("round_offset", 0)

    @classmethod
    def _flower_init(cls):
        return FlowerFedAvg.__init__

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        params = super().initialize_parameters(client_manager)
        if params is not None:
            self._global = parameters_to_ndarrays(params)
        return params

    def evaluate(self, server_round: int, parameters: Parameters):
        # A resumed run evaluates its checkpoint as the checkpoint's round (the recorder skips rounds
        # it already has).
        return super().evaluate(server_round + self.round_offset, parameters)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        server_round += self.round_offset
        self._global = parameters_to_ndarrays(parameters)
        sent = self.aggregation.broadcast(self._global)  # BackdoorIndicator's planted model, else None
        if sent is not None:
            parameters = ndarrays_to_parameters(sent)
        pairs = super().configure_fit(server_round, parameters, client_manager)
        self._check_sample_size(len(pairs))
        # Like the Message API, tell clients the round (seeds and attack schedules depend on it).
        extra = {"server-round": server_round}
        if self.defense.needs_fisher:
            extra[FISHER_REQUEST_KEY] = True
        out = []
        for proxy, ins in pairs:  # Flower shares one FitIns among all clients: each gets its own
            own = {INSTRUCTION_PREFIX + name: encode_fisher(value)
                   for name, value in self.aggregation.instructions_for(str(proxy.cid)).items()}
            out.append((proxy, FitIns(ins.parameters, {**ins.config, **extra, **own})))
        return out

    def _reference(self) -> list[np.ndarray] | None:
        """The global model the updates are taken against: the last one seen (configure_fit or
        the last aggregate), else the initial parameters; None when neither is known."""
        if self._global is None and self.initial_parameters is not None:
            self._global = parameters_to_ndarrays(self.initial_parameters)
        return self._global

    def aggregate_fit(self, server_round: int, results, failures) -> tuple[Parameters | None, dict[str, Scalar]]:
        server_round += self.round_offset
        if failures:
            log(WARNING, "round %d: %d clients failed: %s", server_round, len(failures),
                "; ".join(_failure_text(f) for f in failures[:5]))
        if not results or (failures and not self.accept_failures):  # as Flower's FedAvg
            reason = "no results" if not results else f"{len(failures)} failures and accept_failures=False"
            self.aggregation.skip_round(server_round, reason, failures=len(failures), had_replies=bool(failures))
            return None, {}
        client_results, ground_truth = [], {}
        for proxy, fit_res in results:
            metrics, gt = split_ground_truth(fit_res.metrics)
            if gt is not None:
                ground_truth[str(proxy.cid)] = gt
            try:
                arrays = parameters_to_ndarrays(fit_res.parameters)
            except Exception as err:  # a malformed payload is the client's fault, not the round's
                arrays = f"undecodable parameters ({err})"
            client_results.append(ClientResult(str(proxy.cid), arrays, fit_res.num_examples, metrics))
        new_arrays, ours = self.aggregation.aggregate(
            server_round, self._reference(), client_results, failures=len(failures), ground_truth=ground_truth)
        if new_arrays is not None:
            self._global = new_arrays
        if self.checkpoint_path and self._global is not None:
            save_checkpoint(self.checkpoint_path, server_round, self._global, self.aggregation.state_dict(),
                            sampling_rng=self.sampling_rng)
        metrics: dict[str, Scalar] = {}
        if self.fit_metrics_aggregation_fn:  # over the results that passed validation, as Flower's over all
            valid = self.aggregation.last_valid
            metrics = dict(self.fit_metrics_aggregation_fn(
                [(r.num_examples, client_metrics(r.metrics)) for r in valid]) or {}) if valid else {}
        elif server_round == 1:
            log(WARNING, "No fit_metrics_aggregation_fn provided")
        metrics.update(ours)
        return (None if new_arrays is None else ndarrays_to_parameters(new_arrays)), metrics


def _failure_text(f) -> str:
    if isinstance(f, BaseException):
        return f"{type(f).__name__}: {f}"
    return f"client {getattr(f[0], 'cid', '?')}"


def make_strategy(base: type, name: str, defense_class: type[Defense] | None, flower_names: dict,
                  flower_equivalent: str | None, api: str, module: str) -> type:
    """The strategy class of one registered defense, with its signature and docstring."""
    cls_name = defense_class.__name__ if defense_class is not None else base.__name__
    cls = type(cls_name, (base,), {
        "defense_class": defense_class, "flower_names": flower_names, "__module__": module,
        "__doc__": strategy_doc(cls_name, defense_class, api, flower_equivalent, flower_names)})
    extras = dict(base.adapter_extras)
    if defense_class is None:
        extras["defense"] = None
    cls.__signature__ = build_signature(base._flower_init(), defense_class, flower_names, extras,
                                        positional_flower=(api == "message"))
    return cls


def strategy_classes(base: type, flower_names: dict, api: str, module: str) -> tuple[dict, dict, list]:
    """Every registered defense's strategy class on ``base`` (and the generic ``base`` itself
    given its signature), Flower's class names for the same rules, and the module's ``__all__``."""
    extras = {**base.adapter_extras, "defense": None}
    base.__signature__ = build_signature(base._flower_init(), None, {}, extras, positional_flower=(api == "message"))
    classes = {name: make_strategy(base, name, cls, flower_names.get(name, {}), FLOWER_EQUIVALENT.get(name), api, module)
               for name, cls in DEFENSES.items()}
    aliases = {"FedMedian": classes["median"], "FedTrimmedAvg": classes["trimmed_mean"], "MultiKrum": classes["krum"]}
    names = ["STRATEGIES", "DefenseStrategy", *sorted(c.__name__ for c in classes.values()), *sorted(aliases)]
    return classes, aliases, names


STRATEGIES, FLOWER_ALIASES, __all__ = strategy_classes(DefenseStrategy, FLOWER_NAMES, "legacy", __name__)
globals().update({cls.__name__: cls for cls in STRATEGIES.values()}, **FLOWER_ALIASES)
