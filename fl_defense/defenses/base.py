"""The contract every defense implements (see DESIGN.md, "The contract of a defense")."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch

from ..run_keys import RunKey
from ..updates import RoundUpdates

if TYPE_CHECKING:
    from ..config import ExperimentConfig
    from ..data import DatasetSpec


# Parameters several defenses share keep one run-config key each (and the run's seed).
SHARED_KEYS = {"server_lr": "server-lr", "clip_norm": "clip-norm", "noise": "noise", "seed": "seed",
               "num_malicious": "num-malicious"}


@dataclass
class DefenseResult:
    """What a defense returns for one round.

    ``params`` is the new global trainable vector. ``weights[k]`` is the share client k ended up
    with in the aggregate (0 for a dropped client) and ``flagged[k]`` says whether the defense
    judged it malicious; together they make detection metrics uniform across defenses.
    ``selected``, when set, says the new model is client ``selected``'s own (Krum): the adapter
    then returns that client's arrays exactly, not ``global + delta`` rounded.
    """

    params: torch.Tensor
    weights: torch.Tensor
    flagged: torch.Tensor
    info: dict = field(default_factory=dict)
    selected: int | None = None


@dataclass(frozen=True)
class ServerContext:
    """What the server app offers a defense's ``server_parts``: the run config ``cfg``, ``model()``
    (a private deep copy of the server's model per call, to load parameter vectors into),
    ``server_data`` (the held-out server split, images and labels, or ``None`` when
    ``server-fraction`` is 0), the dataset's ``spec``, ``data_dir``, the run's ``seed``,
    ``build(name)``, which builds another registered defense as the server app builds any (RLR's
    base defense), and the defense's own run-config values ``kwargs`` (by ``__init__`` parameter;
    the server app fills the rest once and sets ``kwargs`` per defense)."""

    cfg: "ExperimentConfig"
    model: Callable[[], torch.nn.Module]
    server_data: tuple[torch.Tensor, torch.Tensor] | None
    spec: "DatasetSpec"
    data_dir: str
    seed: int
    build: Callable[[str], "Defense"]
    kwargs: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))

    def held_out(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``server_data``, or a ``ConfigError`` naming ``server-fraction`` when there is none."""
        if self.server_data is None:
            from ..config import ConfigError  # config imports the defenses

            raise ConfigError("run-config key 'server-fraction': this defense needs a server-held dataset; "
                              "set it > 0 (e.g. 0.02)")
        return self.server_data


class Defense:
    """Base class: a server-side rule over a round's updates matrix. Knows nothing of Flower.

    Subclasses set ``name``, ``paper``, ``detects`` (whether ``flagged`` carries a judgement, so
    TPR/FPR are meaningful) and ``needs_fisher`` (clients must ship Fisher diagonals), take their
    parameters in ``__init__`` and validate them in ``validate``.
    """

    name: str = "defense"
    paper: str = ""
    detects: bool = False
    needs_fisher: bool = False
    # True when the rule commutes with translation (rule(x + c) = rule(x) + c: FedAvg, Krum,
    # median, ...): then the reference point does not matter and a round can be aggregated
    # without knowing the current global model (Flower's own strategies never need it).
    reference_free: bool = False
    # The run config: each ``__init__`` parameter is a shared key (SHARED_KEYS), built by the
    # server app (``server_provided``: SDFC's validation Fisher, FLTrust's root update, each built
    # by the class's own ``server_parts``), or declared here with its help (``RunKey``); config.py
    # builds every key from these.
    run_config: dict[str, RunKey] = {}
    server_provided: tuple[str, ...] = ()
    # Whether what ``server_parts`` builds needs the held-out server split
    # (``server-fraction`` > 0): SDFC's validation set and FLTrust's root set do; DeepSight's
    # random inputs and BackdoorIndicator's out-of-distribution samples do not.
    needs_server_data: bool = True

    def validate(self) -> None:
        """Raise ``ValueError`` naming the parameter when the configuration is unusable."""

    def check_num_clients(self, n: int) -> None:
        """Raise ``ValueError`` when ``n`` sampled clients cannot work with this configuration."""

    def aggregate(self, global_params: torch.Tensor, round_updates: RoundUpdates) -> DefenseResult:
        raise NotImplementedError

    def client_instructions(self, client_id: str) -> dict:
        """Per-client instructions to send with the client's next training round (name -> 1-d
        float array), by the client's stable identity; SDFC's authors' mode sends each client its
        own discrepancy D_k. Empty for every other defense."""
        return {}

    def broadcast(self, global_params: torch.Tensor) -> torch.Tensor | None:
        """The trainable vector to send the clients this round in place of the global model's, or
        ``None`` to send the global model itself (every defense but BackdoorIndicator, which plants
        its indicator task first). Updates are still taken against the true global model. A
        wrapper (``inner``, RLR's ``aggregator``) passes the call on to the defense it wraps."""
        child = self.wrapped()
        return child.broadcast(global_params) if child is not None else None

    def wrapped(self) -> "Defense | None":
        """The defense this one wraps (a wrapper's ``inner``, RLR's ``aggregator`` when it is a
        defense), or None."""
        for attr in ("inner", "aggregator"):
            child = getattr(self, attr, None)
            if isinstance(child, Defense):
                return child
        return None

    def first_active_round(self) -> int:
        """The first round of a run (counting from 1, the first this instance aggregates) in which
        the rule can act on what it has learned from earlier rounds: 1 for a rule that judges
        each round on its own; later for one that must first fill a history (FLDetector's
        L-BFGS window). Before it the rule aggregates without judging, so an attack that ends
        earlier meets the undefended aggregate (``server_app`` says so at start-up). A wrapper
        reports the defense it wraps."""
        child = self.wrapped()
        return child.first_active_round() if child is not None else 1

    # State kept across rounds (none by default); saved with checkpoints.
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got keys {sorted(state)}")

    @classmethod
    def server_parts(cls, ctx: ServerContext) -> dict:
        """The constructor arguments the server app builds for this defense, by parameter name,
        from ``ctx`` (called once per run, before construction): every ``server_provided``
        parameter, and any run-config value it replaces (RLR's base defense by name -> the built
        defense). Server-only imports go inside the override, so a client never loads them.
        None by default."""
        return {}

    @classmethod
    def param_names(cls) -> list[str]:
        """The constructor's named parameters (none for a class without its own ``__init__``)."""
        params = inspect.signature(cls.__init__).parameters.values()
        return [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]

    @classmethod
    def run_config_keys(cls) -> list[tuple[str, str, object, RunKey | None]]:
        """(parameter, run-config key, default, declaration) for every parameter the run config
        sets; shared parameters come with ``None`` as declaration."""
        out = []
        defaults = {p.name: p.default for p in inspect.signature(cls.__init__).parameters.values()}
        for name in cls.param_names():
            if name in cls.server_provided:
                continue
            spec = cls.run_config.get(name)
            if spec is None and name not in SHARED_KEYS:
                raise TypeError(f"{cls.__name__}.{name}: declare it in run_config (a RunKey), in "
                                f"server_provided, or use a shared name ({', '.join(SHARED_KEYS)})")
            if spec is None:
                out.append((name, SHARED_KEYS[name], defaults[name], None))
                continue
            key = spec.key or f"{cls.name}-{name}".replace("_", "-")
            out.append((name, key, defaults[name] if spec.default is None else spec.default, spec))
        return out

    def get_params(self) -> dict:
        return {p: getattr(self, p) for p in self.param_names()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


class SeededNoise:
    """Mixin: Gaussian noise from a generator seeded with ``self.seed`` (the run's seed), whose
    state is saved with checkpoints so a resumed run draws the same noise."""

    _gen: torch.Generator | None = None

    def _noise(self, shape, device) -> torch.Tensor:
        if self._gen is None:
            self._gen = torch.Generator().manual_seed(self.seed)
        return torch.randn(shape, generator=self._gen).to(device)

    def state_dict(self) -> dict:
        return {"noise-rng": self._gen.get_state()} if self._gen is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if "noise-rng" in state:
            self._gen = torch.Generator()
            self._gen.set_state(state["noise-rng"])


def no_flags(n: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.bool, device=device)
