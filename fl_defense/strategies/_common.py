"""What both Flower adapters share: each strategy's signature, argument handling and records.

Every strategy class is generated from the defense registry (``fl_defense.defenses.DEFENSES``):
its signature lists Flower's ``FedAvg`` arguments (legacy or Message API), Flower's own names
for the defense's parameters where Flower has the same strategy (``num_malicious_clients``,
``num_nodes_to_select``, ...), the defense's parameters and the core's, all with defaults, so
``help()``, ``inspect.signature`` and IDE completion show them. A misspelt argument is a
``TypeError`` naming the class and the arguments it accepts.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

from ..defenses.base import Defense
from ..rounds import RESERVED_METRICS, DefendedAggregation

# Arguments of the adapters themselves (not of Flower's FedAvg, not of the defense): name -> default.
CORE_PARAMS: dict[str, object] = {
    "trainable": None,
    "device": "cpu",
    "min_valid_clients": 1,
    "max_update_norm": 0.0,
    "keep_workspace": True,
    "max_rounds_without_valid": 3,
}
CORE_DOC = """Arguments of every fl-defense strategy, beside Flower's and the defense's:

    trainable : list[bool] | None
        Which arrays are trainable parameters (defended); the others (BatchNorm statistics) are
        buffers, averaged with the weights the defense gave. Default: every floating-point array.
    device : str
        Where the round's updates matrix lives ("cpu", "cuda", "cuda:1").
    min_valid_clients : int
        Fewer valid results than this and the global model is kept unchanged.
    max_update_norm : float
        Reject client updates with a larger L2 norm (0: no bound).
    keep_workspace : bool
        Keep the n x d updates matrix allocated between rounds (faster; False frees it).
    max_rounds_without_valid : int
        Stop the run (``NoValidResultsError``) after this many consecutive rounds that received
        replies but no valid result, naming the reasons; 0 never stops.
"""


@dataclass(frozen=True)
class FlowerName:
    """One of Flower's constructor arguments that means one of the defense's parameters."""

    ours: str
    default: object
    # Flower's value -> ours (identity unless Flower counts differently).
    translate: Callable[[object], object] = field(default=lambda v: v)


@dataclass(frozen=True)
class FlowerOnly:
    """A Flower argument we accept with the values whose meaning we implement; others are refused."""

    default: object
    check: Callable[[object], dict | None]  # -> defense kwargs it implies, or None if unsupported
    refusal: str


def _positional_names(sig: inspect.Signature) -> list[str]:
    return [p.name for p in sig.parameters.values() if p.name != "self" and p.kind != p.VAR_KEYWORD]


def build_signature(flower_init: Callable, defense_class: type[Defense] | None, flower_names: dict,
                    extra: dict[str, object], positional_flower: bool) -> inspect.Signature:
    """Flower's FedAvg arguments (positional where Flower's are), then Flower's names for the
    defense's parameters, the defense's own, the core's and the adapter's extras, keyword-only."""
    flower_sig = inspect.signature(flower_init)
    params: list[inspect.Parameter] = []
    for p in flower_sig.parameters.values():
        if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        kind = p.POSITIONAL_OR_KEYWORD if positional_flower and p.kind == p.POSITIONAL_OR_KEYWORD else p.KEYWORD_ONLY
        params.append(p.replace(kind=kind))
    kw = inspect.Parameter.KEYWORD_ONLY
    seen = {p.name for p in params}

    def add(name: str, default: object, annotation: object = inspect.Parameter.empty) -> None:
        if name in seen:
            raise TypeError(f"argument {name!r} is both Flower's and the defense's")
        seen.add(name)
        params.append(inspect.Parameter(name, kw, default=default, annotation=annotation))

    for name, spec in flower_names.items():
        add(name, spec.default)
    if defense_class is not None:
        for p in inspect.signature(defense_class.__init__).parameters.values():
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                add(p.name, p.default, p.annotation)
    for name, default in {**CORE_PARAMS, **extra}.items():
        add(name, default)
    return inspect.Signature(params)


class DefenseAdapter:
    """What both adapters expose on top of Flower's FedAvg: argument handling, the defense, its
    per-round records, and a one-time check that the configuration can work with the number of
    clients sampled."""

    aggregation: DefendedAggregation
    defense_class: type[Defense] | None = None
    flower_names: dict = {}  # our class's Flower-name aliases (FlowerName / FlowerOnly)
    adapter_extras: dict[str, object] = {}
    __signature__: inspect.Signature
    _checked_sample_size: int | None = None

    @classmethod
    def _split_arguments(cls, args: tuple, kwargs: dict) -> tuple[dict, dict, dict, dict]:
        """Bind the call to the class's signature and split it into Flower's FedAvg arguments,
        the defense's, the core's and the adapter's extras."""
        sig = cls.__signature__
        accepted = [p.name for p in sig.parameters.values()]
        for name in kwargs:
            if name not in sig.parameters:
                close = difflib.get_close_matches(name, accepted, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise TypeError(f"{cls.__name__}() got an unexpected keyword argument {name!r}{hint}; "
                                f"it accepts: {', '.join(accepted)}")
        try:
            given = dict(sig.bind(*args, **kwargs).arguments)
        except TypeError as err:
            raise TypeError(f"{cls.__name__}(): {err}") from None
        flower_args = set(_positional_names(inspect.signature(cls._flower_init())))
        defense_names = set(cls.defense_class.param_names()) if cls.defense_class else set()
        fedavg, own, core, extras = {}, {}, {}, {}
        for name, value in given.items():
            spec = cls.flower_names.get(name)
            if isinstance(spec, FlowerName):
                if spec.ours in given:
                    raise TypeError(f"{cls.__name__}(): pass {name!r} (Flower's name) or {spec.ours!r}, not both")
                own[spec.ours] = spec.translate(value)
            elif isinstance(spec, FlowerOnly):
                implied = spec.check(value)
                if implied is None:
                    raise ValueError(f"{cls.__name__}(): {name}={value!r} is not supported: {spec.refusal}")
                own.update(implied)
            elif name in flower_args:
                fedavg[name] = value
            elif name in defense_names:
                own[name] = value
            elif name in CORE_PARAMS:
                core[name] = value
            else:
                extras[name] = value
        return fedavg, own, core, extras

    @classmethod
    def _flower_init(cls) -> Callable:
        raise NotImplementedError

    def _setup(self, own: dict, core: dict, defense: Defense | None) -> None:
        if defense is None:
            if self.defense_class is None:
                raise TypeError(f"{type(self).__name__}: pass defense=<a Defense instance> or use a concrete "
                                "strategy class (fl_defense.strategies.RLR, ...)")
            defense = self.defense_class(**own)
        elif own:
            raise TypeError(f"{type(self).__name__}: defense parameters {sorted(own)} given beside defense=")
        core = {**CORE_PARAMS, **core}
        self.aggregation = DefendedAggregation(
            defense, trainable=core["trainable"], device=core["device"], min_clients=core["min_valid_clients"],
            max_update_norm=core["max_update_norm"], keep_workspace=core["keep_workspace"],
            max_rounds_without_valid=core["max_rounds_without_valid"])

    @property
    def defense(self) -> Defense:
        return self.aggregation.defense

    @property
    def records(self):
        return self.aggregation.records

    def __repr__(self) -> str:
        return f"{type(self).__name__}(defense={self.defense!r})"

    def _check_sample_size(self, n: int) -> None:
        """A configuration that cannot work with ``n`` clients fails when the round is configured,
        not silently later (checked again only when the sample size changes)."""
        if n and self._checked_sample_size != n:
            self.defense.check_num_clients(n)
            self._checked_sample_size = n


def client_metrics(metrics: dict) -> dict:
    """A client's metrics as Flower's metric aggregation should see them: without the reserved
    simulation and Fisher keys."""
    return {k: v for k, v in metrics.items() if k not in RESERVED_METRICS}


def strategy_doc(cls_name: str, defense_class: type[Defense] | None, api: str, flower_equivalent: str | None,
                 flower_names: dict) -> str:
    """The generated class docstring: what the class is, its arguments, then the defense's own."""
    base = "flwr.server.strategy.FedAvg" if api == "legacy" else "flwr.serverapp.strategy.FedAvg"
    method = "aggregate_fit" if api == "legacy" else "aggregate_train"
    if defense_class is None:
        head = (f"{cls_name}: a Flower strategy ({api} API, ``{method}``) running any ``Defense`` instance "
                f"given as ``defense=``.")
    else:
        head = (f"{cls_name}: a Flower strategy ({api} API, ``{method}``) running "
                f"``fl_defense.defenses.{defense_class.__name__}`` ({defense_class.paper}).")
    lines = [head, "", f"A drop-in for ``{base}``"
             + (f" and Flower's ``{flower_equivalent}``" if flower_equivalent else "")
             + f": it accepts every argument of Flower's FedAvg"
             + (", Flower's names " + ", ".join(f"``{k}``" for k in flower_names) if flower_names else "")
             + ", the defense's parameters and the arguments below. ``self.records`` holds each round's "
               "per-client weights, flags and rejections.", "", CORE_DOC]
    if defense_class is not None and defense_class.__doc__:
        lines += ["The defense:", "", inspect.cleandoc(defense_class.__doc__)]
    return "\n".join(lines)
