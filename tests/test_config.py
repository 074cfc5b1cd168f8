"""Run config: pyproject and the config class agree (the docs table is generated from the class); bad values fail naming the key."""

import tomllib
from pathlib import Path

import pytest

from fl_defense.config import ConfigError, ExperimentConfig

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_defaults_equal_the_config_class():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app_config = pyproject["tool"]["flwr"]["app"]["config"]
    assert set(app_config) == set(ExperimentConfig.keys())
    defaults = ExperimentConfig().as_run_config()
    assert app_config == defaults
    assert ExperimentConfig.from_run_config(app_config) == ExperimentConfig()


@pytest.mark.parametrize("override, key", [
    ({"defense": "krumm"}, "defense"),
    ({"dataset": "imagenet"}, "dataset"),
    ({"poison-rate": 1.5}, "poison-rate"),
    ({"rlr-theta": 0}, "rlr-theta"),
    ({"rlr-theta": 2.5}, "rlr-theta"),
    ({"num-server-rounds": "ten"}, "num-server-rounds"),
    ({"device": "tpu"}, "device"),
    ({"rlr-aggregator": "mode"}, "rlr-aggregator"),
])
def test_bad_values_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        ExperimentConfig.from_run_config(override)


def test_unknown_key_is_refused():
    with pytest.raises(ConfigError, match="rlr-thetta"):
        ExperimentConfig.from_run_config({"rlr-thetta": 4})
