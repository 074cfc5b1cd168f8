"""The run configuration: every key, its default, its meaning, and validation at start-up.

The same keys live in ``pyproject.toml`` under ``[tool.flwr.app.config]`` (a test keeps the two and
the README's table in step). ``ExperimentConfig.from_run_config`` rejects a bad value with a
``ConfigError`` that names the key and the accepted values.
"""

from __future__ import annotations

import difflib
from dataclasses import MISSING, dataclass, field, fields

from .attacks import SOTA_BACKDOORS
from .attacks.chameleon import CHAMELEON_TRIGGERS
from .attacks import COLLUDING_ATTACKS, DATA_ATTACKS, DIRECTIONS, KNOWLEDGE, MODEL_ATTACKS, POOLS, TARGETS
from .attacks.adaptive import EVASION_DISTANCES, FISHER_FORGERIES
from .data import DATASETS, PARTITIONERS, DataConfig
from .defenses import DEFENSES, PRE_AGGREGATIONS
from .models import MODELS


class ConfigError(ValueError):
    """A run-config value that cannot work; the message names the key."""


def _key(doc: str, choices: tuple | None = None, check=None):
    return {"doc": doc, "choices": choices, "check": check}


def _positive(v):
    return v > 0


def _non_negative(v):
    return v >= 0


def _fraction(v):
    return 0.0 <= v <= 1.0


@dataclass(frozen=True)
class ExperimentConfig:
    num_server_rounds: int = field(default=10, metadata=_key("federated rounds", check=_positive))
    fraction_fit: float = field(default=1.0, metadata=_key("share of clients sampled per round", check=lambda v: 0 < v <= 1))
    min_fit_clients: int = field(default=2, metadata=_key("minimum clients sampled per round", check=_positive))
    min_available_clients: int = field(default=0, metadata=_key("clients that must be connected before a round is sampled (0: every node connected when the ServerApp starts)", check=_non_negative))
    min_valid_clients: int = field(default=1, metadata=_key("fewer valid results than this and the global model is kept", check=_positive))
    max_update_norm: float = field(default=0.0, metadata=_key("reject client updates with a larger L2 norm (0: off)", check=_non_negative))
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
    boost_factor: float = field(default=10.0, metadata=_key("model-poisoning=boost: update scale; signflip: its magnitude", check=_positive))
    attack_norm_bound: float = field(default=1.0, metadata=_key("model-poisoning=pgd: the L2 bound the attacker keeps to", check=_positive))
    neurotoxin_ratio: float = field(default=0.1, metadata=_key("model-poisoning=neurotoxin: share of top benign coordinates left alone", check=_fraction))
    gaussian_std: float = field(default=0.1, metadata=_key("model-poisoning=gaussian: std of the random update", check=_positive))
    # -- colluding model poisoning (model-poisoning in attacks.COLLUDING_ATTACKS) --
    attacker_knowledge: str = field(default="full", metadata=_key("colluding attacks: attackers know their own honest updates only (partial) or the round's benign updates too (full)", KNOWLEDGE))
    attack_target: str = field(default="agnostic", metadata=_key("colluding attacks: the aggregation rule a tailored attack targets (fang: any; min_max: agnostic, krum)", TARGETS))
    alie_z: float = field(default=0.0, metadata=_key("alie, alie_backdoor: z in mean + z * std (0: the paper's z_max for n and m)", check=_non_negative))
    ipm_epsilon: float = field(default=0.5, metadata=_key("ipm: attackers send -epsilon times the benign mean", check=_positive))
    minmax_direction: str = field(default="std", metadata=_key("min_max, min_sum: perturbation direction (inverse unit vector, std or sign)", DIRECTIONS))
    # --
    fisher_forgery: str = field(default="none", metadata=_key("attackers' Fisher: honest (none), computed on their clean samples only (clean), that one quantile-matched to their honest model's Fisher (mimic), or i.i.d. uniform [0, 1) noise (noise)", FISHER_FORGERIES))
    # -- adaptive attacks (fl_defense.attacks.adaptive); rlr_adaptive reads rlr-theta --
    fisher_penalty_lambda: float = field(default=1.0, metadata=_key("model-poisoning=fisher_penalty: lambda in loss + lambda * sum_i I_i (theta_i - theta_ref_i)^2", check=_positive))
    evasion_alpha: float = field(default=0.7, metadata=_key("model-poisoning=evasion: alpha in alpha * L_class + (1 - alpha) * L_ano, in (0, 1] (1: no evasion term)", check=lambda v: 0 < v <= 1))
    evasion_distance: str = field(default="l2", metadata=_key("model-poisoning=evasion: L_ano, the local model's L2 or cosine distance to the global model", EVASION_DISTANCES))
    evasion_norm_match: bool = field(default=True, metadata=_key("model-poisoning=evasion: rescale the update to the norm of the attacker's honest update"))
    # --
    # -- state-of-the-art backdoors (attack in attacks.SOTA_BACKDOORS) --
    edge_case_class: int = field(default=7, metadata=_key("attack=edge_case: the class whose tail images are relabelled target-label (mnist: usps digits of it, usps: mnist digits, other datasets: its images farthest from the class mean)", check=_non_negative))
    edge_case_samples: int = field(default=100, metadata=_key("attack=edge_case: tail images mixed into each attacker's data (the paper: 100)", check=_positive))
    edge_case_tail: float = field(default=0.1, metadata=_key("attack=edge_case on a dataset without a second source: share of the class (farthest from its mean) that forms the tail", check=lambda v: 0 < v <= 1))
    model_replacement: float = field(default=0.0, metadata=_key("model-poisoning=pgd: Wang et al.'s model replacement, the boost n/eta; training is projected to attack-norm-bound / it (0: off)", check=_non_negative))
    a3fl_trigger_size: int = field(default=5, metadata=_key("attack=a3fl: side of the trigger patch at 28x28 (scaled with the image)", check=_positive))
    a3fl_steps: int = field(default=20, metadata=_key("attack=a3fl: sign-gradient trigger steps per round (the paper: 100 epochs, scaled for 2 cores)", check=_positive))
    a3fl_lr: float = field(default=0.05, metadata=_key("attack=a3fl: trigger step size alpha", check=_positive))
    a3fl_lambda: float = field(default=1.0, metadata=_key("attack=a3fl: lambda_0, weight of the unlearned copy's loss (times its cosine similarity to the global model; 0: no copy)", check=_non_negative))
    a3fl_adv_steps: int = field(default=10, metadata=_key("attack=a3fl: SGD steps that unlearn the trigger in the adversarial copy", check=_non_negative))
    a3fl_adv_every: int = field(default=10, metadata=_key("attack=a3fl: trigger steps between refreshes of the adversarial copy", check=_positive))
    chameleon_trigger: str = field(default="plus", metadata=_key("attack=chameleon: the stamped trigger", CHAMELEON_TRIGGERS))
    chameleon_encoder_epochs: int = field(default=0, metadata=_key("attack=chameleon: epochs of contrastive encoder training (stage 1; 0: local-epochs)", check=_non_negative))
    chameleon_classifier_epochs: int = field(default=0, metadata=_key("attack=chameleon: epochs of classifier fine-tuning, encoder frozen (stage 2; 0: local-epochs)", check=_non_negative))
    chameleon_temperature: float = field(default=0.1, metadata=_key("attack=chameleon: contrastive temperature tau (SupCon's scale)", check=_positive))
    chameleon_push: float = field(default=2.0, metadata=_key("attack=chameleon: weight of a poisoned image's original-class peers in the contrastive denominator (1: plain SupCon)", check=_positive))
    iba_epsilon: float = field(default=0.2, metadata=_key("attack=iba: L-infinity bound of the generated trigger", check=lambda v: 0 < v <= 1))
    iba_steps: int = field(default=20, metadata=_key("attack=iba: Adam steps of the trigger generator per round", check=_positive))
    iba_lr: float = field(default=0.01, metadata=_key("attack=iba: the generator's learning rate", check=_positive))
    # --
    attack_start_round: int = field(default=1, metadata=_key("first round in which attackers attack", check=_positive))
    attack_every: int = field(default=1, metadata=_key("attack every k-th round from the start round", check=_positive))
    attack_stop_round: int = field(default=0, metadata=_key("last round in which attackers attack; the rounds after it measure the backdoor's lifespan (0: attackers never stop)", check=_non_negative))
    pretrain_rounds: int = field(default=0, metadata=_key("rounds of clean FedAvg (no attackers) before the run, cached by a hash of the keys that shape them and shared by every run with the same; the run's round 0 is the pre-trained model and the attack rounds count from it (0: off; built by python -m simulation.run and grids, flwr run . only reuses a cache)", check=_non_negative))
    pretrain_dir: str = field(default="", metadata=_key("folder of the pre-training cache (empty: <results-dir>/pretrain)"))
    attacker_pool: str = field(default="fixed", metadata=_key("the same attackers every round, or a fresh seeded pool per round", POOLS))
    malicious_fraction: float = field(default=0.1, metadata=_key("share of partitions that attack (seeded, fixed for the run)", check=_fraction))
    poison_rate: float = field(default=0.5, metadata=_key("share of an attacker's eligible samples it poisons", check=_fraction))
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
        """A defense's key as an attribute: ``cfg.rlr_theta`` is the run config's ``rlr-theta``."""
        params = self.__dict__.get("defense_params", {})
        key = name.replace("_", "-")
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
        unknown = sorted(set(run_config) - set(known) - set(DEFENSE_KEYS))
        if unknown:
            raise ConfigError("; ".join(_unknown_key(key, cls.keys()) for key in unknown))
        values = {}
        for key, f in known.items():
            value = run_config.get(key, f.default if f.default is not MISSING else None)
            values[f.name] = _checked(key, value, type(f.default), f.metadata["choices"], f.metadata["check"],
                                      f.metadata["doc"])
        values["defense_params"] = {
            key: _checked(key, run_config.get(key, spec.default), type(spec.default), spec.choices, spec.check, spec.doc)
            for key, spec in DEFENSE_KEYS.items()}
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
        if self.attack in SOTA_BACKDOORS:
            problem = SOTA_BACKDOORS[self.attack].check(self)
            if problem:
                raise ConfigError(f"run-config key '{problem[0]}': {problem[1]}")
        if self.model_replacement > 0 and self.model_poisoning != "pgd":
            raise ConfigError("run-config key 'model-replacement': Wang et al.'s model replacement boosts a PGD "
                              f"update; set model-poisoning=pgd (is {self.model_poisoning!r})")
        if self.attack == "mask" and not self.trigger_file:
            raise ConfigError("run-config key 'trigger-file': attack=mask needs a .npy H x W array")
        if self.model_poisoning == "fisher_penalty" and self.fisher_penalty_lambda * self.learning_rate >= 1:
            raise ConfigError(f"run-config key 'fisher-penalty-lambda': {self.fisher_penalty_lambda} times "
                              f"learning-rate {self.learning_rate} must be < 1 (SGD on the quadratic penalty "
                              f"diverges where 2 lr lambda I_i >= 2)")
        attack = COLLUDING_ATTACKS.get(self.model_poisoning)
        if attack is not None and self.attack_target not in attack.targets:
            raise ConfigError(f"run-config key 'attack-target': model-poisoning={self.model_poisoning} targets "
                              f"{', '.join(attack.targets)}, not {self.attack_target!r}")
        if self.model == "rlr_cnn" and DATASETS[self.dataset].shape[1] < 8:
            raise ConfigError("run-config key 'model': rlr_cnn needs images of at least 8x8 pixels")

    def check_federation(self, num_nodes: int) -> int:
        """Check the config against a federation of ``num_nodes``; return the clients per round."""
        available = self.min_available_clients or num_nodes
        per_round = max(int(available * self.fraction_fit), self.min_fit_clients)
        hint = (f"the federation has {num_nodes} SuperNodes; simulate a larger one with "
                f"--federation-config \"num-supernodes=N\" (flwr run) or --num-supernodes N "
                f"(fl-defense, python -m simulation.run)")
        if per_round > max(num_nodes, available):
            raise ConfigError(f"run-config key 'min-fit-clients': {self.min_fit_clients} clients per round, but {hint}")
        if self.defense == "rlr" and self.rlr_theta > per_round:
            raise ConfigError(f"run-config key 'rlr-theta': {self.rlr_theta} exceeds the {per_round} clients "
                              f"sampled per round (sign sums cannot reach it; {hint})")
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

    def colluding_params(self) -> dict:
        """Parameters of the colluding attacks (each takes those its constructor names)."""
        return {"z": self.alie_z, "epsilon": self.ipm_epsilon, "direction": self.minmax_direction,
                "target": self.attack_target, "theta": self.rlr_theta}

    @property
    def wraps_clip_noise(self) -> bool:
        """Clipping and noise wrap the defense, except where they are its own parameters."""
        return self.defense not in ("rlr", "norm_clipping") and (self.clip_norm > 0 or self.noise > 0)

    def as_run_config(self) -> dict:
        static = {f.name.replace("_", "-"): getattr(self, f.name) for f in self._static_fields()}
        return {key: static[key] if key in static else self.defense_params[key] for key in self.keys()}

    @classmethod
    def docs(cls) -> list[tuple[str, object, str]]:
        """(key, default, help) of every key, in pyproject order: the defenses' keys after
        ``bucket-size``."""
        rows = []
        for f in cls._static_fields():
            rows.append((f.name.replace("_", "-"), f.default, _with_choices(f.metadata["doc"], f.metadata["choices"])))
            if f.name == "bucket_size":
                rows += [(key, spec.default, _with_choices(spec.doc, spec.choices)) for key, spec in DEFENSE_KEYS.items()]
        return rows


@dataclass(frozen=True)
class DefenseKey:
    """One run-config key built from a defense's ``run_config`` declaration."""

    default: object
    doc: str
    choices: tuple | None
    check: object
    params: tuple[str, ...]  # "defense.parameter" it sets


def _defense_keys() -> dict[str, DefenseKey]:
    """Every registered defense's own keys (shared ones are ExperimentConfig fields); a key that
    two defenses declare must mean the same (default and kind)."""
    out: dict[str, DefenseKey] = {}
    for name, cls in DEFENSES.items():
        for param, key, default, spec in cls.run_config_keys():
            if spec is None:
                continue
            choices = spec.choices() if callable(spec.choices) else spec.choices
            if key in out:
                if out[key].default != default:
                    raise TypeError(f"run-config key {key!r}: {name}.{param} defaults to {default!r}, "
                                    f"{out[key].params[0]} to {out[key].default!r}")
                out[key] = DefenseKey(default, out[key].doc, out[key].choices, out[key].check,
                                      out[key].params + (f"{name}.{param}",))
                continue
            out[key] = DefenseKey(default, spec.doc, choices, spec.check, (f"{name}.{param}",))
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
