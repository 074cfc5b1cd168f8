"""Attacks as defenses: one module plus one registry line. Each attack declares its run-config keys
beside its code (``run_config``); the keys, their checks, the attribute access, the colluding
attacks' constructor arguments and pyproject's keys all follow from the registries."""

from __future__ import annotations

import tomllib
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fl_defense import config as config_module
from fl_defense.attacks import (ADAPTIVE_LOCAL_ATTACKS, ALIE, COLLUDING_ATTACKS, LOCAL_MODEL_ATTACKS, SOTA_BACKDOORS,
                                ALIEBackdoor, ColludingAttack, LocalAttack, MinMax, MinSum, SotaBackdoor,
                                make_colluding)
from fl_defense.config import ATTACK_KEYS, ConfigError, ExperimentConfig, attack_readers
from fl_defense.run_keys import RunKey, attack_keys, positive

ROOT = Path(__file__).resolve().parents[1]
REGISTRIES = {"local": LOCAL_MODEL_ATTACKS, "adaptive": ADAPTIVE_LOCAL_ATTACKS, "colluding": COLLUDING_ATTACKS,
              "backdoor": SOTA_BACKDOORS}
EVERY_ATTACK = [(kind, name) for kind, registry in REGISTRIES.items() for name in registry]


@pytest.mark.parametrize("kind, name", EVERY_ATTACK)
def test_every_declared_key_of_every_attack_is_a_run_config_key(kind, name):
    attack = REGISTRIES[kind][name]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    keys = ExperimentConfig.keys()
    defaults = ExperimentConfig().as_run_config()
    for param, key, default, spec in attack_keys(attack):
        assert key in keys and key in pyproject, f"{name}.{param}: {key}"
        if spec is not None:  # its own declaration: the default is the run config's and pyproject's
            assert defaults[key] == pyproject[key] == default
            assert f"{name}.{param}" in config_module.ATTACK_KEYS[key].params
            assert getattr(ExperimentConfig(), key.replace("-", "_")) == default  # cfg.alie_z, cfg.a3fl_steps


def test_attack_keys_sit_where_pyproject_has_always_listed_them():
    keys = ExperimentConfig.keys()
    block = list(config_module.ATTACK_KEYS)
    first = keys.index("boost-factor")
    head = 11  # the one-attacker and colluding attacks' keys, before fisher-forgery
    assert keys[first - 1] == "dba-trigger" and keys[first:first + head] == block[:head]
    assert keys[first + head] == "fisher-forgery"
    assert keys[first + head + 1:first + head + 1 + len(block) - head] == block[head:]
    assert keys[first + 1 + len(block)] == "attack-start-round"


@pytest.mark.parametrize("overrides, key", [
    ({"alie-z": -0.5}, "alie-z"),
    ({"ipm-epsilon": 0.0}, "ipm-epsilon"),
    ({"attacker-knowledge": "none"}, "attacker-knowledge"),
    ({"attack-target": "bulyan"}, "attack-target"),
    ({"minmax-direction": "random"}, "minmax-direction"),
    ({"boost-factor": 0}, "boost-factor"),
    ({"neurotoxin-ratio": 1.5}, "neurotoxin-ratio"),
    ({"evasion-distance": "l1"}, "evasion-distance"),
    ({"evasion-norm-match": "yes"}, "evasion-norm-match"),
    ({"evasion-alpha": 0.0}, "evasion-alpha"),
    ({"a3fl-steps": 2.5}, "a3fl-steps"),
    ({"chameleon-trigger": "star"}, "chameleon-trigger"),
    ({"iba-epsilon": 1.5}, "iba-epsilon"),
    ({"edge-case-samples": 0}, "edge-case-samples"),
    ({"model-replacement": -1.0}, "model-replacement"),
    ({"minmax-trim-beta": 0.5}, "minmax-trim-beta"),
])
def test_a_bad_value_of_an_attack_key_fails_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        ExperimentConfig.from_run_config(overrides)


@pytest.mark.parametrize("overrides, key, message", [
    ({"model-poisoning": "min_sum", "attack-target": "krum"}, "attack-target", "min_sum targets agnostic, not 'krum'"),
    ({"model-poisoning": "alie", "attack-target": "median"}, "attack-target", "alie targets agnostic"),
    ({"model-poisoning": "fisher_penalty", "fisher-penalty-lambda": 10.0, "learning-rate": 0.1},
     "fisher-penalty-lambda", "must be < 1"),
    ({"model-poisoning": "min_max", "attack-target": "median", "minmax-trim-beta": 0.2}, "minmax-trim-beta",
     "only model-poisoning=min_max with attack-target=trimmed_mean"),
    ({"model-poisoning": "min_sum", "minmax-trim-beta": 0.2}, "minmax-trim-beta", "not model-poisoning=min_sum"),
])
def test_the_configured_attack_checks_the_run_config(overrides, key, message):
    with pytest.raises(ConfigError, match=f"'{key}': .*{message}"):
        ExperimentConfig.from_run_config(overrides)
    # without that attack the key is read by nothing: rejected as such, naming it
    with pytest.raises(ConfigError, match="changes nothing: only model-poisoning=.*read it"):
        ExperimentConfig.from_run_config({**overrides, "model-poisoning": "none"})


@pytest.mark.parametrize("key", sorted(ATTACK_KEYS))
def test_an_attack_key_set_for_an_attack_not_configured_fails_naming_the_key(key):
    """A key away from its default that neither attack= nor model-poisoning= reads changes nothing;
    the run stops at start-up naming it (a misplaced bundle, not a setting). With any attack that
    reads it chosen, that check passes it."""
    spec, readers = ATTACK_KEYS[key], attack_readers()[key]
    value = _another_valid_value(key)
    # (model-replacement's own check names the choice it needs: model-poisoning=pgd)
    with pytest.raises(ConfigError, match=f"run-config key '{key}': .*(changes nothing|set model-poisoning=pgd)"):
        ExperimentConfig.from_run_config({"attack": "plus", "model-poisoning": "none", key: value})
    ExperimentConfig.from_run_config({"attack": "plus", "model-poisoning": "none", key: spec.default})
    base = ExperimentConfig.from_run_config({})
    for reader in sorted(readers):  # each reader alone accepts it (its other checks aside)
        choice = {"attack": reader} if reader in SOTA_BACKDOORS else {"model_poisoning": reader}
        cfg = replace(base, **choice, attack_params={**base.attack_params, key: value})
        assert cfg._unread_attack_key() is None, reader


def _another_valid_value(key: str):
    """A value of ``key`` other than its default that its own check accepts."""
    spec = ATTACK_KEYS[key]
    d = spec.default
    more = {bool: lambda: [not d], int: lambda: [d + 1, d * 2], float: lambda: [d * 0.5, d + 0.5, 0.2]}
    candidates = list(spec.choices or ()) + more.get(type(d), lambda: [])()
    for value in candidates:
        if value != spec.default and (spec.check is None or spec.check(value)):
            return value
    raise AssertionError(f"no other valid value of {key!r} found")


@pytest.mark.parametrize("name", sorted(COLLUDING_ATTACKS))
def test_a_colluding_attack_is_built_from_its_declarations(name):
    cls = COLLUDING_ATTACKS[name]
    keys = {"alie-z": 1.5, "ipm-epsilon": 0.3, "minmax-direction": "sign"}
    cfg = ExperimentConfig.from_run_config({"model-poisoning": name, "rlr-theta": 6,
                                            **{k: v for k, v in keys.items() if name in attack_readers()[k]}})
    kwargs = cfg.colluding_params()
    assert set(kwargs) <= set(cls.param_names())
    expected = {"z": 1.5, "epsilon": 0.3, "direction": "sign", "target": "agnostic", "theta": 6, "trim_beta": 0.0,
                "boost": 1.0}
    assert kwargs == {p: v for p, v in expected.items() if p in cls.param_names()}
    attack = make_colluding(name, **kwargs)
    assert all(getattr(attack, p) == v for p, v in kwargs.items())


def test_a_subclass_keeps_its_base_declarations_and_keys():
    assert attack_keys(ALIEBackdoor) == attack_keys(ALIE)
    assert [k for _, k, _, _ in attack_keys(MinSum)] == [k for _, k, _, _ in attack_keys(MinMax)] == [
        "attacker-knowledge", "attack-target", "minmax-direction", "minmax-trim-beta"]


# -- a contributor's attack: its module and one registry line -----------------------------------

class Tiny(ColludingAttack):
    """A colluding attack a contributor adds."""

    name = "tiny"
    paper = "nobody, 2026"
    run_config = {"scale": RunKey("tiny: scale of the mean", check=positive)}

    def __init__(self, scale: float = 0.5, unconfigured: int = 3) -> None:
        self.scale, self.unconfigured = scale, unconfigured

    def craft(self, known, rnd):
        return known.mean(0) * self.scale


class TinyBackdoor(SotaBackdoor):
    name = "tiny_backdoor"
    run_config = {"size": RunKey("attack=tiny_backdoor: patch side", check=positive, default=3)}


def _with_attack_keys(monkeypatch):
    keys = config_module._attack_keys()
    monkeypatch.setattr(config_module, "ATTACK_KEYS", keys)
    return keys


def test_a_new_attack_needs_only_its_module_and_a_registry_line(monkeypatch):
    monkeypatch.setitem(COLLUDING_ATTACKS, "tiny", Tiny)
    monkeypatch.setitem(SOTA_BACKDOORS, "tiny_backdoor", TinyBackdoor)
    monkeypatch.setitem(LOCAL_MODEL_ATTACKS, "wobble", LocalAttack("wobble", "nobody, 2026", {
        "amount": RunKey("model-poisoning=wobble: how much", choices=(1, 2, 3), default=2)}))
    keys = _with_attack_keys(monkeypatch)
    assert keys["tiny-scale"].default == 0.5 and keys["tiny-scale"].doc == "tiny: scale of the mean"
    assert "tiny.knowledge" in keys["attacker-knowledge"].params  # the colluding attacks' keys are inherited
    assert keys["tiny-backdoor-size"].default == 3 and keys["wobble-amount"].choices == (1, 2, 3)

    rows = [k for k, _, _ in ExperimentConfig.docs()]
    assert rows.index("wobble-amount") < rows.index("tiny-scale") < rows.index("fisher-forgery")
    assert rows.index("iba-lr") < rows.index("tiny-backdoor-size") < rows.index("attack-start-round")
    # a new attack's keys are read by it alone: without it chosen they change nothing and fail
    with pytest.raises(ConfigError, match="'tiny-scale': 2.0 changes nothing: only model-poisoning=tiny read it"):
        ExperimentConfig.from_run_config({"tiny-scale": 2.0})
    with pytest.raises(ConfigError, match="'tiny-backdoor-size': 4 changes nothing: only attack=tiny_backdoor"):
        ExperimentConfig.from_run_config({"tiny-backdoor-size": 4})
    base = ExperimentConfig.from_run_config({})
    cfg = replace(base, model_poisoning="tiny", attack_params={**base.attack_params, "tiny-scale": 2.0})
    assert cfg._unread_attack_key() is None
    assert ExperimentConfig.from_run_config({"model-poisoning": "none", "wobble-amount": 2}).wobble_amount == 2
    assert cfg.tiny_scale == 2.0 and cfg.wobble_amount == 2 and cfg.tiny_backdoor_size == 3
    assert cfg.colluding_params("tiny") == {"scale": 2.0}  # "unconfigured" keeps its default
    attack = make_colluding("tiny", **cfg.colluding_params("tiny"))
    assert attack.scale == 2.0 and attack.unconfigured == 3
    assert torch.equal(attack.craft(torch.ones(2, 3), None), torch.full((3,), 2.0))
    with pytest.raises(ConfigError, match="'tiny-scale'"):
        ExperimentConfig.from_run_config({"tiny-scale": -1.0})
    with pytest.raises(ConfigError, match="'wobble-amount'"):
        ExperimentConfig.from_run_config({"wobble-amount": 4})


@pytest.mark.parametrize("default", [7.0, 1])  # another default, and the same value of another kind
def test_two_attacks_declaring_one_key_must_agree(monkeypatch, default):
    monkeypatch.setitem(LOCAL_MODEL_ATTACKS, "first", LocalAttack("first", "", {
        "factor": RunKey("a factor", key="shared-factor", check=positive, default=1.0)}))
    monkeypatch.setitem(COLLUDING_ATTACKS, "second", type("Second", (ColludingAttack,), {
        "name": "second", "run_config": {"factor": RunKey("its factor", key="shared-factor", default=default)}}))
    with pytest.raises(TypeError, match=f"run-config key 'shared-factor': second.factor defaults to {default!r}"):
        config_module._attack_keys()
    monkeypatch.setitem(COLLUDING_ATTACKS, "second", type("Second", (ColludingAttack,), {
        "name": "second", "run_config": {"factor": RunKey("its factor", key="shared-factor", default=1.0)}}))
    assert config_module._attack_keys()["shared-factor"].params == ("first.factor", "second.factor")


def test_a_shared_declaration_agrees():
    # boost and signflip declare boost-factor with one RunKey; every colluding attack reads
    # attacker-knowledge and attack-target from the base class's
    keys = config_module.ATTACK_KEYS
    assert keys["boost-factor"].params == ("boost.factor", "signflip.factor")
    assert {f"{name}.knowledge" for name in COLLUDING_ATTACKS} == set(keys["attacker-knowledge"].params)


@pytest.mark.parametrize("declaration, match", [
    ({"run_config": {"seed": RunKey("mine", key="seed", default=1)}}, "'seed' is declared elsewhere"),
    ({"run_config": {"theta": RunKey("mine", key="rlr-theta", default=4)}}, "'rlr-theta' is declared elsewhere"),
    ({"shared_keys": {"theta": "rlr-thetaa"}}, "'rlr-thetaa' is declared nowhere"),
    ({"run_config": {"size": RunKey("no default anywhere")}}, r"Odd\.size: give its default"),
])
def test_a_bad_declaration_fails_naming_the_attack(monkeypatch, declaration, match):
    monkeypatch.setitem(COLLUDING_ATTACKS, "odd", type("Odd", (ColludingAttack,), {"name": "odd", **declaration}))
    with pytest.raises(TypeError, match=match):
        config_module._attack_keys()


def test_minmax_trim_beta_reaches_the_tailored_attack_and_0_is_the_papers_cut():
    import torch

    from fl_defense.attacks import COLLUDING_ATTACKS
    from fl_defense.attacks.base import AttackRound

    known = torch.randn(20, 200, generator=torch.Generator().manual_seed(1))

    def crafted(**keys):
        cfg = ExperimentConfig.from_run_config({"model-poisoning": "min_max", "attack-target": "trimmed_mean", **keys})
        attack = COLLUDING_ATTACKS["min_max"](**cfg.colluding_params())
        return attack, attack.craft(known, AttackRound(20, 4, "full"))

    told, by_key = crafted(**{"minmax-trim-beta": 0.1})
    paper, by_default = crafted()
    assert told.trim_beta == 0.1 and paper.trim_beta == 0.0
    for beta, expected in ((0.1, by_key), (None, by_default)):  # the attack as the library builds it
        assert torch.equal(MinMax(target="trimmed_mean", trim_beta=beta).craft(known, AttackRound(20, 4, "full")), expected)
    assert not torch.equal(by_key, by_default)  # int(0.1 * 20) = 2 cut (the copies stay inside), not the attackers' 4
