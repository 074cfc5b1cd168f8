"""One module plus one registry line: the strategies, the run-config keys (with their help and
checks) and pyproject's keys all follow from a defense's own declaration."""

from __future__ import annotations

import inspect
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fl_defense import config as config_module
from fl_defense.config import ConfigError, ExperimentConfig
from fl_defense.defenses import DEFENSES, PRE_AGGREGATIONS, Bucketing, ClipNoise, Defense, DefenseResult, NNM, RunKey
from fl_defense.defenses.base import no_flags
from fl_defense.strategies import legacy, message

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_every_parameter_of_every_defense_reaches_the_run_config(name):
    cls = DEFENSES[name]
    declared = {param for param, *_ in cls.run_config_keys()}
    assert declared | set(cls.server_provided) == set(cls.param_names())
    cfg = ExperimentConfig.from_run_config({"defense": name, "server-fraction": 0.05, "clip-norm": 1.0})
    kwargs = cfg.defense_kwargs()
    assert set(kwargs) == declared
    if not cls.server_provided:  # the run config's values make a valid defense
        cls(**kwargs).validate()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert {key for _, key, _, _ in cls.run_config_keys()} <= set(pyproject)
    assert name in legacy.STRATEGIES and name in message.STRATEGIES


@pytest.mark.parametrize("overrides, attr, value", [
    ({"defense": "dnc", "dnc-iterations": 3}, "iterations", 3),
    ({"defense": "krum", "krum-keep": 4, "num-malicious": 2}, "to_keep", 4),
    ({"defense": "alignins", "alignins-direction": "mean"}, "direction", "mean"),
    ({"defense": "bulyan", "bulyan-selection": "multi_krum"}, "selection", "multi_krum"),
    ({"defense": "signsgd", "sign-lr": 0.01}, "server_lr", 0.01),
])
def test_a_run_config_value_reaches_its_defense(overrides, attr, value):
    cfg = ExperimentConfig.from_run_config(overrides)
    defense = DEFENSES[cfg.defense](**cfg.defense_kwargs())
    assert getattr(defense, attr) == value


@pytest.mark.parametrize("overrides, key", [
    ({"rfa-max-iter": 0}, "rfa-max-iter"),
    ({"alignins-direction": "up"}, "alignins-direction"),
    ({"multi-metrics-keep-fraction": 1.5}, "multi-metrics-keep-fraction"),
    ({"pre-aggregation": "median"}, "pre-aggregation"),
    ({"fdcr-rescale": "yes"}, "fdcr-rescale"),
])
def test_bad_values_of_declared_keys_fail_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        ExperimentConfig.from_run_config(overrides)


class Tiny(Defense):
    """A defense a contributor adds: one module and one registry line."""

    name = "tiny"
    paper = "nobody, 2026"
    run_config = {"scale": RunKey("Tiny: step scale", check=lambda v: v > 0)}

    def __init__(self, scale: float = 0.5, server_lr: float = 1.0) -> None:
        self.scale, self.server_lr = scale, server_lr

    def aggregate(self, global_params, round_updates):
        ru = round_updates
        return DefenseResult(params=global_params + self.scale * ru.updates.mean(0),
                             weights=torch.full((ru.n,), 1.0 / ru.n), flagged=no_flags(ru.n, ru.device))


def test_a_new_defense_needs_only_its_module_and_a_registry_line(monkeypatch):
    monkeypatch.setitem(DEFENSES, "tiny", Tiny)
    keys = config_module._defense_keys()
    assert keys["tiny-scale"].default == 0.5 and keys["tiny-scale"].doc == "Tiny: step scale"
    cls = legacy.make_strategy(legacy.DefenseStrategy, "tiny", Tiny, {}, None, "legacy", legacy.__name__)
    sig = inspect.signature(cls)
    assert {"scale", "server_lr", "fraction_fit", "trainable"} <= set(sig.parameters)
    assert cls(scale=2.0).defense.scale == 2.0

    class Undeclared(Tiny):
        def __init__(self, scale: float = 0.5, mystery: int = 3) -> None:
            super().__init__(scale)

    with pytest.raises(TypeError, match="Undeclared.mystery: declare it in run_config"):
        Undeclared.run_config_keys()


@pytest.mark.parametrize("pre, cls", [("bucketing", Bucketing), ("nnm", NNM)])
def test_pre_aggregation_wraps_the_configured_defense(pre, cls):
    from server_app.app import build_defense
    cfg = ExperimentConfig.from_run_config({"defense": "median", "pre-aggregation": pre, "clip-norm": 1.0})
    defense = build_defense(cfg, torch.nn.Linear(2, 2))
    assert isinstance(defense, ClipNoise) and isinstance(defense.inner, cls) and defense.inner.inner.name == "median"
    assert set(PRE_AGGREGATIONS) == {"bucketing", "nnm"}


class Probe:
    """A server part: a private model copy run on the server's first images."""

    def __init__(self, model: torch.nn.Module, images: torch.Tensor) -> None:
        self.model, self.images = model, images

    def __call__(self, params: torch.Tensor) -> torch.Tensor:
        torch.nn.utils.vector_to_parameters(params.clone(), self.model.parameters())
        return self.model(self.images)


class Probed(Tiny):
    """A contributor's defense that needs a part only the server can build: it declares how."""

    name = "probed"
    run_config = {"samples": RunKey("Probed: server samples the probe runs on", check=lambda v: v >= 1)}
    server_provided = ("probe",)

    def __init__(self, probe: Probe | None = None, samples: int = 3, server_lr: float = 1.0) -> None:
        super().__init__(server_lr=server_lr)
        self.probe, self.samples = probe, samples

    @classmethod
    def server_parts(cls, ctx):
        return {"probe": Probe(ctx.model(), ctx.held_out()[0][:ctx.kwargs["samples"]])}


def test_a_defense_declares_its_server_parts_and_build_defense_supplies_them(monkeypatch):
    from dataclasses import replace

    from server_app.app import build_defense

    monkeypatch.setitem(DEFENSES, "probed", Probed)
    monkeypatch.setattr(config_module, "DEFENSE_KEYS", config_module._defense_keys())
    cfg = ExperimentConfig.from_run_config({"defense": "rlr", "rlr-aggregator": "probed", "probed-samples": 4,
                                            "server-fraction": 0.1})
    model = torch.nn.Linear(3, 2)
    before = model.weight.detach().clone()
    images = torch.randn(10, 3)
    server_data = (images, torch.zeros(10, dtype=torch.long))

    defense = build_defense(replace(cfg, defense="probed"), model, server_data)
    assert isinstance(defense, Probed) and defense.samples == 4  # its run-config value reached the part too
    assert torch.equal(defense.probe.images, images[:4])
    assert defense.probe.model is not model and torch.equal(defense.probe.model.weight, before)
    assert defense.probe(torch.ones(8)).shape == (4, 2)
    assert torch.equal(model.weight, before)  # the probe loads vectors into its own copy only

    # RLR's declaration builds its base defense through ctx.build, server part included
    rlr = build_defense(cfg, model, server_data)
    assert isinstance(rlr.aggregator, Probed) and torch.equal(rlr.aggregator.probe.images, images[:4])
    assert rlr.aggregator.probe.model is not defense.probe.model

    # a part that needs the server split: start-up refuses a run without one, naming the key
    with pytest.raises(ConfigError, match="'server-fraction'"):
        ExperimentConfig.from_run_config({"defense": "rlr", "rlr-aggregator": "probed"})
    with pytest.raises(ConfigError, match="'server-fraction'"):
        build_defense(replace(cfg, defense="probed"), model, None)


SERVER_BUILT = sorted(name for name, cls in DEFENSES.items() if cls.server_provided)


def _small_probes(name: str) -> dict:
    """DeepSight's and BackdoorIndicator's probe sizes cut for a test, for that defense only (a
    defense key under a defense that does not read it is refused)."""
    return {"deepsight": {"deepsight-num-samples": 20},
            "backdoor_indicator": {"backdoor-indicator-ood-samples": 20}}.get(name, {})


@pytest.mark.parametrize("name", SERVER_BUILT)
def test_every_server_provided_parameter_comes_from_its_defenses_declaration(name):
    from dataclasses import replace

    from server_app.app import build_defense

    cls = DEFENSES[name]
    assert cls.server_parts.__func__ is not Defense.server_parts.__func__
    cfg = ExperimentConfig.from_run_config({"defense": "rlr", "rlr-aggregator": name, "server-fraction": 0.1,
                                            **_small_probes(name)})
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    server_data = (torch.rand(30, 1, 8, 8), torch.arange(30) % 10)
    for defense in (build_defense(replace(cfg, defense=name), model, server_data),
                    build_defense(cfg, model, server_data).aggregator):
        assert type(defense) is cls
        for param in cls.server_provided:
            part = getattr(defense, param)
            assert part is not None and getattr(part, "model", None) is not model
        defense.validate()


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_reads_fisher_says_what_the_built_defense_asks_the_clients_for(name):
    """``ExperimentConfig.reads_fisher`` (the leaderboard reads it without building a defense) agrees
    with the built defense's ``needs_fisher``: alone, as RLR's base, and inside both wrappers."""
    from server_app.app import build_defense

    base = {"defense": name, "server-fraction": 0.1, **_small_probes(name),
            **({"clip-norm": 1.0} if name == "norm_clipping" else {})}
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    server_data = (torch.rand(30, 1, 8, 8), torch.arange(30) % 10)
    variants = [base, {**base, "pre-aggregation": "bucketing"}, {**base, "noise": 0.01}]
    if name != "rlr":
        variants.append({**base, "defense": "rlr", "rlr-aggregator": name})
    for keys in variants:
        cfg = ExperimentConfig.from_run_config(keys)
        assert cfg.reads_fisher is bool(build_defense(cfg, model, server_data).needs_fisher), keys
    assert ExperimentConfig.from_run_config(base).reads_fisher is (name in ("fdcr", "sdfc"))


def _another_defense_value(key: str):
    """A value of defense key ``key`` other than its default that its own check accepts."""
    spec = config_module.DEFENSE_KEYS[key]
    d = spec.default
    more = {bool: lambda: [not d], int: lambda: [d + 1, d * 2, 2], float: lambda: [d * 0.5, d + 0.5, 0.2, 2.0]}
    for value in list(spec.choices or ()) + more.get(type(d), lambda: [])():
        if value != d and (spec.check is None or spec.check(value)):
            return value
    raise AssertionError(f"no other valid value of {key!r} found")


@pytest.mark.parametrize("key", sorted(config_module.DEFENSE_KEYS))
def test_a_defense_key_set_for_a_defense_not_configured_fails_naming_the_key(key):
    """A defense's own key away from its default, under a defense that does not read it, changes
    nothing: start-up stops naming it and its readers. Each reader accepts it, and so does RLR
    running over a reader (rlr-aggregator), and an attack that reads it (rlr_adaptive: rlr-theta)."""
    spec = config_module.DEFENSE_KEYS[key]
    readers = sorted(config_module.key_owners(spec))
    value = _another_defense_value(key)
    with pytest.raises(ConfigError, match=f"run-config key '{key}': {value!r} changes nothing: only "
                                          f"defense={'|'.join(readers)}"):
        ExperimentConfig.from_run_config({"defense": "fedavg", key: value})
    ExperimentConfig.from_run_config({"defense": "fedavg", key: spec.default})
    base = ExperimentConfig.from_run_config({"defense": "fedavg"})
    params = {**base.defense_params, key: value}
    for reader in readers:
        assert replace(base, defense=reader, defense_params=params)._unread_defense_key() is None, reader
        if reader in DEFENSES and reader != "rlr":
            under_rlr = replace(base, defense="rlr", defense_params={**params, "rlr-aggregator": reader})
            assert under_rlr._unread_defense_key() is None, reader
    for attack in config_module.defense_key_attack_readers().get(key, ()):
        assert replace(base, model_poisoning=attack, defense_params=params)._unread_defense_key() is None


def test_bucket_size_without_bucketing_fails_naming_the_key():
    with pytest.raises(ConfigError, match="'bucket-size': 4 changes nothing without pre-aggregation=bucketing"):
        ExperimentConfig.from_run_config({"defense": "krum", "bucket-size": 4})
    with pytest.raises(ConfigError, match="'bucket-size'"):
        ExperimentConfig.from_run_config({"defense": "krum", "pre-aggregation": "nnm", "bucket-size": 4})
    ExperimentConfig.from_run_config({"defense": "krum", "pre-aggregation": "bucketing", "bucket-size": 4})
