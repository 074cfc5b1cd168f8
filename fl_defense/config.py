"""The run configuration: every key, its default, its meaning, and validation at start-up.

The same keys live in ``pyproject.toml`` under ``[tool.flwr.app.config]`` (a test keeps the two and
the README's table in step). ``ExperimentConfig.from_run_config`` rejects a bad value with a
``ConfigError`` that names the key and the accepted values.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import MISSING, dataclass, field, fields, replace

from .attacks import (ADAPTIVE_LOCAL_ATTACKS, COLLUDING_ATTACKS, DATA_ATTACKS, LOCAL_MODEL_ATTACKS, MODEL_ATTACKS,
                      POOLS, SOTA_BACKDOORS)
from .attacks.adaptive import FISHER_FORGERIES
from .data import DATASETS, PARTITIONERS, DataConfig
from .defenses import DEFENSES, PRE_AGGREGATIONS
from .models import MODELS
from .run_keys import RunKey, attack_keys
from .run_keys import fraction as _fraction, non_negative as _non_negative, positive as _positive


class ConfigError(ValueError):
    """A run-config value that cannot work; the message names the key. ``reason``, where given, is
    the message without its advice (what a table of cells a config cannot run shows); else the
    message itself."""

    def __init__(self, *args, reason: str | None = None) -> None:
        super().__init__(*args)
        self.reason = reason if reason is not None else (str(args[0]) if args else "")


def _key(doc: str, choices: tuple | None = None, check=None):
    return {"doc": doc, "choices": choices, "check": check}


@dataclass(frozen=True)
class ExperimentConfig:
    num_server_rounds: int = field(default=10, metadata=_key("federated rounds", check=_positive))
    fraction_fit: float = field(default=1.0, metadata=_key("share of clients sampled per round", check=lambda v: 0 < v <= 1))
    min_fit_clients: int = field(default=2, metadata=_key("minimum clients sampled per round", check=_positive))
    min_available_clients: int = field(default=0, metadata=_key("clients that must be connected before a round is sampled (0: every node connected when the ServerApp starts)", check=_non_negative))
    min_valid_clients: int = field(default=1, metadata=_key("fewer valid results than this and the global model is kept", check=_positive))
    max_update_norm: float = field(default=0.0, metadata=_key("reject client updates with a larger L2 norm (0: off)", check=_non_negative))
    max_rounds_without_valid: int = field(default=3, metadata=_key("stop the run after this many consecutive rounds in which every client result was rejected or failed (0: never; a grid cell runs to its last round with the kept model)", check=_non_negative))
    keep_workspace: bool = field(default=True, metadata=_key("keep the server's n x d updates matrix allocated between rounds (faster; false frees it after each round)"))
    dataset: str = field(default="digits", metadata=_key("dataset name", tuple(DATASETS)))
    data_dir: str = field(default="", metadata=_key("folder with <dataset>/{train,test}.parquet; empty: the hub id (digits: bundled)"))
    partitioner: str = field(default="iid", metadata=_key("how training data is split over clients", PARTITIONERS))
    dirichlet_alpha: float = field(default=0.5, metadata=_key("Dirichlet concentration (partitioner=dirichlet)", check=_positive))
    classes_per_client: int = field(default=2, metadata=_key("classes per client (partitioner=pathological)", check=_positive))
    nir: float = field(default=0.5, metadata=_key("non-IID rate in [0, 1] (partitioner=nir, Fedward's setting)", check=_fraction))
    server_fraction: float = field(default=0.0, metadata=_key("share of training data held out for the server, never given to clients", check=lambda v: 0 <= v < 1))
    model: str = field(default="auto", metadata=_key("model; auto picks mlp for digits, cifar_cnn for 32x32x3, cnn_small otherwise", ("auto",) + MODELS))
    local_epochs: int = field(default=2, metadata=_key("local epochs E", check=_positive))
    batch_size: int = field(default=16, metadata=_key("local batch size", check=_positive))
    learning_rate: float = field(default=0.1, metadata=_key("client SGD learning rate", check=_positive))
    momentum: float = field(default=0.0, metadata=_key("client SGD momentum", check=lambda v: 0 <= v < 1))
    attack: str = field(default="plus", metadata=_key("attackers' data poisoning: a trigger, dba (pieces of dba-trigger), semantic (relabel base-label, no trigger), labelflip (l -> L-1-l, or base-label -> target-label), none; the state-of-the-art backdoors edge_case, a3fl, chameleon, iba (attacks.SOTA_BACKDOORS)", DATA_ATTACKS + tuple(SOTA_BACKDOORS)))
    model_poisoning: str = field(default="none", metadata=_key("how attackers alter their update", MODEL_ATTACKS))
    trigger_file: str = field(default="", metadata=_key("attack=mask: a .npy H x W array; nonzero pixels are stamped with their value"))
    blend_ratio: float = field(default=0.1, metadata=_key("attack=blend: mixing ratio of the seeded noise pattern", check=_fraction))
    dba_pieces: int = field(default=4, metadata=_key("attack=dba: pieces the trigger is split into", check=_positive))
    dba_trigger: str = field(default="plus", metadata=_key("attack=dba: the full trigger", ("plus", "square", "corner")))
    # The attacks' own keys follow dba-trigger (one attacker's model poisoning, then the colluding
    # attacks') and fisher-forgery (the adaptive attacks', then the backdoors'), built from each
    # attack's run_config declaration (ATTACK_KEYS); read as attributes (cfg.alie_z) too.
    fisher_forgery: str = field(default="none", metadata=_key("attackers' Fisher: honest (none), computed on their clean samples only (clean), that one quantile-matched to their honest model's Fisher (mimic), or i.i.d. uniform [0, 1) noise (noise)", FISHER_FORGERIES))
    attack_start_round: int = field(default=1, metadata=_key("first round in which attackers attack", check=_positive))
    attack_every: int = field(default=1, metadata=_key("attack every k-th round from the start round", check=_positive))
    attack_stop_round: int = field(default=0, metadata=_key("last round in which attackers attack; the rounds after it measure the backdoor's lifespan (0: attackers never stop)", check=_non_negative))
    pretrain_rounds: int = field(default=0, metadata=_key("rounds of clean FedAvg (no attackers) before the run, cached by a hash of the keys that shape them and shared by every run with the same; the run's round 0 is the pre-trained model and the attack rounds count from it (0: off; built by python -m simulation.run and grids, flwr run . only reuses a cache)", check=_non_negative))
    pretrain_dir: str = field(default="", metadata=_key("folder of the pre-training cache (empty: <results-dir>/pretrain)"))
    attacker_pool: str = field(default="fixed", metadata=_key("the same attackers every round, or a fresh seeded pool per round", POOLS))
    malicious_fraction: float = field(default=0.1, metadata=_key("share of partitions that attack (seeded, fixed for the run)", check=_fraction))
    poison_rate: float = field(default=0.5, metadata=_key("share of an attacker's eligible samples it poisons", check=_fraction))
    attacker_local_epochs: int = field(default=0, metadata=_key("local epochs of an attacking client's own training (0: local-epochs, as a benign client; more, a backdoor attacker that trains harder, as in Bagdasaryan et al. 2020); what it would send honestly is still trained for local-epochs", check=_non_negative))
    target_label: int = field(default=7, metadata=_key("label the backdoor redirects to", check=_non_negative))
    base_label: int = field(default=-1, metadata=_key("only this class is poisoned and measured (-1: every non-target class)", check=lambda v: v >= -1))
    defense: str = field(default="rlr", metadata=_key("server defense", tuple(DEFENSES)))
    server_lr: float = field(default=1.0, metadata=_key("server learning rate eta", check=_positive))
    clip_norm: float = field(default=0.0, metadata=_key("clip each update to this L2 norm before the defense (0: off; RLR's eq. 6, norm_clipping's M, a wrapper for the others)", check=_non_negative))
    noise: float = field(default=0.0, metadata=_key("Gaussian noise sigma added to the step, times clip-norm when clipping (0: off)", check=_non_negative))
    num_malicious: int = field(default=1, metadata=_key("f, the number of attackers a rule tolerates (Krum, Bulyan, DnC; NNM's mixing)", check=_non_negative))
    pre_aggregation: str = field(default="none", metadata=_key("a pre-aggregation step before the defense: bucketing (Karimireddy et al., ICLR 2022) or nnm (nearest-neighbour mixing, Allouah et al., AISTATS 2023)", ("none",) + tuple(PRE_AGGREGATIONS)))
    bucket_size: int = field(default=2, metadata=_key("pre-aggregation=bucketing: updates averaged per bucket", check=_positive))
    # The defenses' own keys (rlr-theta, krum-keep, ...) follow here, built from each defense's
    # run_config declaration (DEFENSE_KEYS); they are read as attributes (cfg.rlr_theta) too.
    defense_params: dict = field(default_factory=lambda: {k: spec.default for k, spec in DEFENSE_KEYS.items()},
                                 metadata={"internal": True}, repr=False)
    attack_params: dict = field(default_factory=lambda: {k: spec.default for k, spec in ATTACK_KEYS.items()},
                                metadata={"internal": True}, repr=False)
    fisher_half: bool = field(default=False, metadata=_key("clients send Fisher diagonals in float16 (half the payload)"))
    fisher_samples: int = field(default=512, metadata=_key("samples a client (and the server) uses for a Fisher diagonal", check=_positive))
    # -- CRFL's certification (fl_defense.certify), evaluation at the final round --
    crfl_certify_samples: int = field(default=0, metadata=_key("defense=crfl: M, noisy models sampled to certify the final model by parameter smoothing (0: off)", check=_non_negative))
    crfl_certify_sigma: float = field(default=0.01, metadata=_key("crfl-certify-samples: sigma_T, std of the smoothing noise on the final model's parameters", check=_positive))
    crfl_certify_alpha: float = field(default=0.001, metadata=_key("crfl-certify-samples: alpha, the Clopper-Pearson bound on p_A holds with probability 1 - alpha", check=lambda v: 0 < v < 1))
    crfl_certify_examples: int = field(default=500, metadata=_key("crfl-certify-samples: test images certified (a seeded subset)", check=_positive))
    crfl_certify_lipschitz: float = field(default=4.1231, metadata=_key("crfl-certify-samples: L_Z in Theorem 2, Lipschitz constant of the loss gradient in the backdoor pattern (the authors' sqrt(17))", check=_positive))
    # --
    device: str = field(default="cpu", metadata=_key("device of the server's updates matrix and of client training (cpu, cuda, cuda:N)"))
    seed: int = field(default=42, metadata=_key("seed of partitions, attackers, model init, training and noise"))
    results_dir: str = field(default="results", metadata=_key("where each run writes its folder of results"))
    run_name: str = field(default="", metadata=_key("name of the results folder (empty: defense-dataset-timestamp)"))
    checkpoint: bool = field(default=True, metadata=_key("save checkpoint.pkl (model, defense state, round, RNG) in the results folder after every round"))
    resume: bool = field(default=False, metadata=_key("continue the run in results-dir/run-name from its checkpoint"))

    def __getattr__(self, name: str) -> object:
        """A defense's or an attack's key as an attribute: ``cfg.rlr_theta`` is the run config's
        ``rlr-theta``, ``cfg.alie_z`` its ``alie-z``."""
        key = name.replace("_", "-")
        for params in (self.__dict__.get("defense_params", {}), self.__dict__.get("attack_params", {})):
            if key in params:
                return params[key]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @classmethod
    def _static_fields(cls) -> list:
        return [f for f in fields(cls) if not f.metadata.get("internal")]

    @classmethod
    def keys(cls) -> list[str]:
        return [key for key, _, _ in cls.docs()]

    @classmethod
    def from_run_config(cls, run_config: dict) -> "ExperimentConfig":
        known = {f.name.replace("_", "-"): f for f in cls._static_fields()}
        unknown = sorted(set(run_config) - set(known) - set(DEFENSE_KEYS) - set(ATTACK_KEYS))
        if unknown:
            raise ConfigError("; ".join(_unknown_key(key, cls.keys()) for key in unknown))
        values = {}
        for key, f in known.items():
            value = run_config.get(key, f.default if f.default is not MISSING else None)
            values[f.name] = _checked(key, value, type(f.default), f.metadata["choices"], f.metadata["check"],
                                      f.metadata["doc"])
        for params, declared in (("defense_params", DEFENSE_KEYS), ("attack_params", ATTACK_KEYS)):
            values[params] = {
                key: _checked(key, run_config.get(key, spec.default), type(spec.default), spec.choices, spec.check,
                              spec.doc)
                for key, spec in declared.items()}
        cfg = cls(**values)
        cfg._cross_check()
        return cfg

    def _cross_check(self) -> None:
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ConfigError(f"run-config key 'device': {self.device!r} is not cpu, cuda or cuda:N")
        uses = {self.defense, self.rlr_aggregator}
        # what the server app builds for a defense needs a server-held dataset unless the defense
        # says otherwise (DeepSight's forward passes run on random inputs)
        for needs in sorted(d for d in uses if d in DEFENSES and DEFENSES[d].server_provided
                            and DEFENSES[d].needs_server_data):
            if self.server_fraction <= 0:
                raise ConfigError(f"run-config key 'server-fraction': {needs} needs a server-held dataset; set it > 0 (e.g. 0.02)")
        if self.defense == "norm_clipping" and self.clip_norm <= 0:
            raise ConfigError("run-config key 'clip-norm': norm_clipping needs a bound > 0")
        if self.crfl_certify_samples > 0 and self.defense != "crfl":
            raise ConfigError(f"run-config key 'crfl-certify-samples': certification needs defense='crfl' "
                              f"(its clipping and noise), not {self.defense!r}")
        if self.resume and not self.run_name:
            raise ConfigError("run-config key 'run-name': resume needs the name of the run to continue")
        if self.attack_stop_round and self.attack_stop_round < self.attack_start_round:
            raise ConfigError(f"run-config key 'attack-stop-round': {self.attack_stop_round} is before "
                              f"attack-start-round {self.attack_start_round} (0: attackers never stop)")
        if self.attack == "semantic" and self.base_label < 0:
            raise ConfigError("run-config key 'base-label': attack=semantic needs the class it redirects (>= 0)")
        if self.attack in SOTA_BACKDOORS:  # its own keys, then the model poisoning it runs with (attacks.sota)
            backdoor = SOTA_BACKDOORS[self.attack]
            self._raise(backdoor.check(self) or backdoor.check_model_poisoning(self))
        if self.model_replacement > 0 and self.model_poisoning != "pgd":
            raise ConfigError("run-config key 'model-replacement': Wang et al.'s model replacement boosts a PGD "
                              f"update; set model-poisoning=pgd (is {self.model_poisoning!r})")
        self._raise(self._unread_attack_key())
        self._raise(self._unread_defense_key())
        if self.attack == "mask" and not self.trigger_file:
            raise ConfigError("run-config key 'trigger-file': attack=mask needs a .npy H x W array")
        # the configured model attack's own check (fisher_penalty's lambda, a colluding attack's target)
        self._raise(_model_attack(self.model_poisoning).check(self))
        if self.model == "rlr_cnn" and DATASETS[self.dataset].shape[1] < 8:
            raise ConfigError("run-config key 'model': rlr_cnn needs images of at least 8x8 pixels")

    def _unread_attack_key(self) -> tuple[str, str] | None:
        """The first attack key set away from its default that neither the configured attack nor
        the configured model poisoning reads (``attack_readers``): a key that would change nothing
        is a mistake (a misplaced bundle, a forgotten choice), not a setting."""
        chosen, readers_of = {self.attack, self.model_poisoning}, attack_readers()
        for key, spec in ATTACK_KEYS.items():
            if self.attack_params[key] != spec.default and not chosen & readers_of[key]:
                by_key: dict[str, list[str]] = {}
                for name in sorted(readers_of[key]):
                    by_key.setdefault(_choice_key(name), []).append(name)
                readers = " or ".join(f"{choice}={'|'.join(names)}" for choice, names in sorted(by_key.items()))
                return key, (f"{self.attack_params[key]!r} changes nothing: only {readers} read it, and this run has "
                             f"attack={self.attack}, model-poisoning={self.model_poisoning} (leave it at {spec.default!r})")
        return None

    def _unread_defense_key(self) -> tuple[str, str] | None:
        """The first defense key set away from its default that the configured defense does not
        read (nor, under RLR, the defense it runs over: ``rlr-aggregator``), or ``bucket-size``
        without bucketing: like an attack key nobody reads, a setting that would change nothing."""
        runs = {self.defense} | ({self.rlr_aggregator} if self.defense == "rlr" else set())
        attacks = {self.attack, self.model_poisoning}
        changed = [key for key, spec in DEFENSE_KEYS.items() if self.defense_params[key] != spec.default]
        attack_readers_of = defense_key_attack_readers() if changed else {}
        for key in changed:
            spec, value = DEFENSE_KEYS[key], self.defense_params[key]
            readers = sorted(key_owners(spec))
            attackers = sorted(attack_readers_of.get(key, ()))
            if not runs & set(readers) and not attacks & set(attackers):
                via = " (or defense=rlr with rlr-aggregator naming it)" if readers != ["rlr"] else ""
                also = "".join(f" or {_choice_key(a)}={a}" for a in attackers)
                return key, (f"{value!r} changes nothing: only defense={'|'.join(readers)}{via}{also} read it, and this "
                             f"run has defense={self.defense} (leave it at {spec.default!r})")
        default_bucket = _field_default("bucket_size")
        if self.bucket_size != default_bucket and self.pre_aggregation != "bucketing":
            return "bucket-size", (f"{self.bucket_size!r} changes nothing without pre-aggregation=bucketing (this run "
                                   f"has pre-aggregation={self.pre_aggregation}; leave it at {default_bucket!r})")
        return None

    @staticmethod
    def _raise(problem: tuple[str, str] | None) -> None:
        """Raise an attack's ``check(cfg)`` finding, (key, message), as a ConfigError naming the key."""
        if problem:
            raise ConfigError(f"run-config key '{problem[0]}': {problem[1]}")

    def check_federation(self, num_nodes: int) -> int:
        """Check the config against a federation of ``num_nodes``; return the clients per round."""
        available = self.min_available_clients or num_nodes
        per_round = max(int(available * self.fraction_fit), self.min_fit_clients)
        size = f"the federation has {num_nodes} SuperNodes"
        grow = ("simulate a larger one with --federation-config \"num-supernodes=N\" (flwr run) or --num-supernodes N "
                "(fl-defense, python -m simulation.run)")
        hint = f"{size}; {grow}"

        def fail(reason: str, advice: str):
            return ConfigError(f"{reason} ({advice})", reason=reason)

        if per_round > max(num_nodes, available):
            raise fail(f"run-config key 'min-fit-clients': {self.min_fit_clients} clients per round, but {size}",
                       grow)
        if self.defense == "rlr" and self.rlr_theta > per_round:
            raise fail(f"run-config key 'rlr-theta': {self.rlr_theta} exceeds the {per_round} clients sampled per round",
                       f"sign sums cannot reach it; {hint}")
        cls = DEFENSES.get(self.defense)
        if cls is not None and not cls.server_provided:  # the rule's own bound (Bulyan's n >= 4f + 3, ...)
            try:
                cls(**self.defense_kwargs()).check_num_clients(per_round)
            except ValueError as err:
                keys = "'num-malicious'" if "num_malicious" in cls.param_names() else f"of defense {self.defense!r}"
                raise fail(f"run-config key {keys}: {err}", f"{per_round} clients sampled per round; {hint}") from None
        return per_round

    def data_config(self, num_partitions: int) -> DataConfig:
        return DataConfig(dataset=self.dataset, data_dir=self.data_dir, partitioner=self.partitioner,
                          num_partitions=num_partitions, dirichlet_alpha=self.dirichlet_alpha,
                          classes_per_client=self.classes_per_client, nir=self.nir, server_fraction=self.server_fraction,
                          seed=self.seed)

    @property
    def model_name(self) -> str:
        from .models import default_model

        return default_model(self.dataset) if self.model == "auto" else self.model

    def defense_kwargs(self, name: str | None = None) -> dict:
        """The parameters of defense ``name`` (default: the configured one) from the run config,
        as its ``run_config`` declaration maps them (server-provided ones are the caller's)."""
        name = name or self.defense
        if name not in DEFENSES:
            raise ConfigError(f"run-config key 'defense': {name!r} is not one of {', '.join(DEFENSES)}")
        return {param: self.value(key) for param, key, _, _ in DEFENSES[name].run_config_keys()}

    def value(self, key: str) -> object:
        """The value of run-config key ``key``."""
        return self.as_run_config()[key]

    def colluding_params(self, name: str | None = None) -> dict:
        """The constructor arguments of colluding attack ``name`` (default: the configured
        ``model-poisoning``) from the run config, as its ``run_config`` and ``shared_keys`` map
        them; constructor parameters declared nowhere keep their defaults."""
        name = name or self.model_poisoning
        if name not in COLLUDING_ATTACKS:
            raise ConfigError(f"run-config key 'model-poisoning': {name!r} is not one of the colluding attacks "
                              f"{', '.join(COLLUDING_ATTACKS)}")
        cls = COLLUDING_ATTACKS[name]
        takes = set(cls.param_names())
        return {param: self.value(key) for param, key, _, _ in attack_keys(cls) if param in takes}

    @property
    def reads_fisher(self) -> bool:
        """Whether the configured defense asks the clients for Fisher diagonals: its class says so, or,
        for RLR, the defense it runs over (the pre-aggregation and clip/noise wrappers pass their
        inner defense's need through). ``fisher-forgery`` acts only then."""
        names = [self.defense] + ([self.rlr_aggregator] if self.defense == "rlr" else [])
        # a class attribute (a property, like RLR's, depends on the instance: its base is named above)
        return any(isinstance(flag := inspect.getattr_static(DEFENSES[d], "needs_fisher", False), bool) and flag
                   for d in names if d in DEFENSES)

    @property
    def wraps_clip_noise(self) -> bool:
        """Clipping and noise wrap the defense, except where they are its own parameters."""
        return self.defense not in ("rlr", "norm_clipping") and (self.clip_norm > 0 or self.noise > 0)

    def as_run_config(self) -> dict:
        values = {f.name.replace("_", "-"): getattr(self, f.name) for f in self._static_fields()}
        values.update(self.defense_params, **self.attack_params)
        return {key: values[key] for key in self.keys()}

    @classmethod
    def docs(cls) -> list[tuple[str, object, str]]:
        """(key, default, help) of every key, in pyproject order: each declared key after the
        general key its registry names (``DeclaredKey.after``): the defenses' after
        ``bucket-size``, the attacks' as ``ATTACK_REGISTRIES`` places them."""
        declared: dict[str, list] = {}
        for key, spec in {**DEFENSE_KEYS, **ATTACK_KEYS}.items():
            declared.setdefault(spec.after, []).append((key, spec.default, _with_choices(spec.doc, spec.choices)))
        rows = []
        for f in cls._static_fields():
            key = f.name.replace("_", "-")
            rows.append((key, f.default, _with_choices(f.metadata["doc"], f.metadata["choices"])))
            rows += declared.get(key, [])
        return rows


@dataclass(frozen=True)
class DeclaredKey:
    """One run-config key built from a defense's or an attack's ``run_config`` declaration."""

    default: object
    doc: str
    choices: tuple | None
    check: object
    params: tuple[str, ...]  # "defense.parameter" / "attack.parameter" it sets (declared, then shared_keys)
    after: str  # the general key it follows in pyproject's order and the docs


# The attack registries ATTACK_KEYS is built from, in order, each with the general key its keys
# follow (pyproject's order): one attacker's model poisoning and the colluding attacks after
# dba-trigger, the adaptive one-attacker attacks and the backdoors after fisher-forgery.
ATTACK_REGISTRIES = (("dba-trigger", LOCAL_MODEL_ATTACKS), ("dba-trigger", COLLUDING_ATTACKS),
                     ("fisher-forgery", ADAPTIVE_LOCAL_ATTACKS), ("fisher-forgery", SOTA_BACKDOORS))


def _declare(out: dict[str, DeclaredKey], key: str, default: object, spec: RunKey, owner: str, after: str) -> None:
    """Add ``owner``'s declaration of ``key`` to ``out``; a key declared twice must mean the same
    (default, its type and the accepted values); the first declaration's help is kept."""
    choices = spec.choices() if callable(spec.choices) else spec.choices
    first = out.get(key)
    if first is None:
        out[key] = DeclaredKey(default, spec.doc, choices, spec.check, (owner,), after)
        return
    if first.default != default or type(first.default) is not type(default):
        raise TypeError(f"run-config key {key!r}: {owner} defaults to {default!r}, "
                        f"{first.params[0]} to {first.default!r}")
    if first.choices != choices:
        raise TypeError(f"run-config key {key!r}: {owner} accepts {choices!r}, {first.params[0]} {first.choices!r}")
    out[key] = replace(first, params=first.params + (owner,))


def _defense_keys() -> dict[str, DeclaredKey]:
    """Every registered defense's own keys (shared ones are ExperimentConfig fields); a key that
    two defenses declare must mean the same (default and kind)."""
    out: dict[str, DeclaredKey] = {}
    for name, cls in DEFENSES.items():
        for param, key, default, spec in cls.run_config_keys():
            if spec is not None:
                _declare(out, key, default, spec, f"{name}.{param}", "bucket-size")
    return out


def _model_attack(name: str):
    """The registry entry of ``model-poisoning=name`` (a LocalAttack or a colluding attack class)."""
    return {**LOCAL_MODEL_ATTACKS, **ADAPTIVE_LOCAL_ATTACKS, **COLLUDING_ATTACKS}[name]


def _attack_keys() -> dict[str, DeclaredKey]:
    """Every registered attack's own keys (``fl_defense.run_keys.attack_keys``), registry by
    registry (``ATTACK_REGISTRIES``); a key that two attacks declare must mean the same (default
    and kind). An attack key may not be a general or a defense's key (read those through
    ``shared_keys``), and a shared key must exist."""
    general = {f.name.replace("_", "-") for f in ExperimentConfig._static_fields()}
    out: dict[str, DeclaredKey] = {}
    shared = []
    for after, registry in ATTACK_REGISTRIES:
        for name, attack in registry.items():
            for param, key, default, spec in attack_keys(attack):
                if spec is None:
                    shared.append((f"{name}.{param}", key))
                    continue
                if key in general or key in DEFENSE_KEYS:
                    raise TypeError(f"{name}.{param}: run-config key {key!r} is declared elsewhere; read it "
                                    f"through shared_keys")
                _declare(out, key, default, spec, f"{name}.{param}", after)
    for owner, key in shared:
        if key in out:  # another attack's key: this one reads it too
            out[key] = replace(out[key], params=out[key].params + (owner,))
        elif key not in general and key not in DEFENSE_KEYS:
            raise TypeError(f"{owner}: shared run-config key {key!r} is declared nowhere")
    return out


def _with_choices(doc: str, choices: tuple | None) -> str:
    return f"{doc} ({', '.join(map(str, choices))})" if choices else doc


def _checked(key: str, value: object, kind: type, choices, check, doc: str) -> object:
    value = _coerce(key, value, kind)
    if choices is not None and value not in choices:
        raise ConfigError(f"run-config key '{key}': {value!r} is not one of {', '.join(map(str, choices))}")
    if check is not None and not check(value):
        raise ConfigError(f"run-config key '{key}': {value!r} is out of range ({doc})")
    return value


DEFENSE_KEYS = _defense_keys()
ATTACK_KEYS = _attack_keys()


def attack_readers() -> dict[str, frozenset[str]]:
    """Run-config key -> the attack and model-poisoning choices that read it: every attack whose
    parameter it sets (``ATTACK_KEYS``' params: declared, or read through ``shared_keys``)."""
    return {key: key_owners(spec) for key, spec in ATTACK_KEYS.items()}


def key_owners(spec: DeclaredKey) -> frozenset[str]:
    """The defenses or attacks whose parameters a declared key sets ("name.parameter" -> name)."""
    return frozenset(owner.split(".")[0] for owner in spec.params)


def defense_key_attack_readers() -> dict[str, frozenset[str]]:
    """Defense key -> the attacks that read it through ``shared_keys`` (rlr_adaptive reads
    rlr-theta: it plays against RLR's threshold)."""
    out: dict[str, set[str]] = {}
    for _, registry in ATTACK_REGISTRIES:
        for name, attack in registry.items():
            for _, key, _, spec in attack_keys(attack):
                if spec is None and key in DEFENSE_KEYS:
                    out.setdefault(key, set()).add(name)
    return {key: frozenset(names) for key, names in out.items()}


def _field_default(name: str) -> object:
    """The default of ExperimentConfig's general field ``name``."""
    return next(f.default for f in fields(ExperimentConfig) if f.name == name)


def _choice_key(name: str) -> str:
    """The general key that chooses registered attack ``name``: attack= for the backdoors,
    model-poisoning= for the others."""
    return "attack" if name in SOTA_BACKDOORS else "model-poisoning"


def _unknown_key(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else "the keys are those of pyproject.toml's [tool.flwr.app.config]"
    return f"run-config key '{key}' is unknown; {hint}"


def _coerce(key: str, value: object, kind: type) -> object:
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            raise TypeError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"run-config key '{key}': {value!r} is not a valid {kind.__name__}") from None


def sync_files(root: str = ".") -> None:
    """Rewrite pyproject.toml's [tool.flwr.app.config] from this class (``python -m
    fl_defense.config``); a test checks they stay in step. The docs' run-config table is generated
    from the same class when the site is built (docs/hooks.py)."""
    from pathlib import Path

    rows = ExperimentConfig.docs()
    pyproject = Path(root) / "pyproject.toml"
    text = pyproject.read_text()
    head = text.index("[tool.flwr.app.config]\n") + len("[tool.flwr.app.config]\n")
    tail = text.find("\n[", head)
    body = "\n".join(f"{k} = {_toml(v)}" for k, v, _ in rows) + "\n"
    pyproject.write_text(text[:head] + body + (text[tail:] if tail >= 0 else ""))


def _toml(v: object) -> str:
    return f'"{v}"' if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else repr(v)


if __name__ == "__main__":
    sync_files()
