"""The clean pre-training cache: what its key holds, reuse by a run with another defense, and
invalidation when a key that shapes the pre-training changes."""

import json

import pytest

from fl_defense.config import ConfigError, ExperimentConfig
from fl_defense.pretrain import cache_folder, pretrain_id, pretrain_run_config

BASE = {"pretrain-rounds": 2, "dataset": "digits", "partitioner": "dirichlet", "dirichlet-alpha": 0.5}


def _id(n=4, **changes):
    return pretrain_id(ExperimentConfig.from_run_config({**BASE, **changes}), n)


@pytest.mark.parametrize("change", [
    {"defense": "flame"}, {"attack": "square"}, {"model-poisoning": "boost"}, {"malicious-fraction": 0.3},
    {"attack-start-round": 3, "attack-stop-round": 5}, {"rlr-theta": 3}, {"num-server-rounds": 30},
    {"clip-norm": 2.0}, {"target-label": 1}, {"nir": 0.9}, {"classes-per-client": 3}, {"model": "mlp"},
    {"run-name": "other", "results-dir": "elsewhere"},
])
def test_defense_attack_and_unused_keys_do_not_change_the_key(change):
    assert _id(**change) == _id()


@pytest.mark.parametrize("change", [
    {"learning-rate": 0.05}, {"seed": 7}, {"dirichlet-alpha": 0.3}, {"partitioner": "iid"}, {"local-epochs": 1},
    {"batch-size": 32}, {"momentum": 0.9}, {"fraction-fit": 0.5}, {"pretrain-rounds": 3}, {"model": "cnn_small"},
    {"server-fraction": 0.05}, {"min-fit-clients": 3},
])
def test_keys_that_shape_pre_training_change_the_key(change):
    assert _id(**change) != _id()


def test_the_number_of_clients_changes_the_key():
    assert _id(n=4) != _id(n=10)


def test_a_cache_built_before_node_order_sampling_is_not_reused(monkeypatch):
    import fl_defense.pretrain as pretrain

    now = _id()
    monkeypatch.setattr(pretrain, "CLIENT_SAMPLING", "flower-order")
    assert _id() != now


def test_the_pre_training_run_is_clean_fedavg():
    cfg = ExperimentConfig.from_run_config({**BASE, "defense": "rlr", "attack": "square",
                                            "model-poisoning": "boost", "learning-rate": 0.05})
    pre = ExperimentConfig.from_run_config(pretrain_run_config(cfg, 4))
    assert (pre.defense, pre.attack, pre.model_poisoning, pre.malicious_fraction) == ("fedavg", "none", "none", 0.0)
    assert pre.num_server_rounds == 2 and pre.pretrain_rounds == 0 and pre.learning_rate == 0.05
    assert pre.dirichlet_alpha == 0.5 and pre.checkpoint
    assert cache_folder(cfg, 4).name == pre.run_name


def test_a_bad_value_fails_naming_the_key():
    with pytest.raises(ConfigError, match="'pretrain-rounds'"):
        ExperimentConfig.from_run_config({"pretrain-rounds": -1})


@pytest.mark.slow
def test_a_second_run_reuses_the_cache_and_a_shaping_change_retrains(tmp_path, monkeypatch):
    import flwr.simulation

    import simulation.run as sr

    federations = []
    real = flwr.simulation.run_simulation

    def counting(*args, **kwargs):
        federations.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(flwr.simulation, "run_simulation", counting)
    common = {**BASE, "num-server-rounds": 1, "local-epochs": 1, "results-dir": str(tmp_path),
              "pretrain-dir": str(tmp_path / "cache"), "malicious-fraction": 0.25}

    def cell(name, **changes):
        federations.clear()
        folder = sr.run({**common, "run-name": name, **changes}, num_supernodes=4)
        rounds = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()]
        return len(federations), rounds, json.loads((folder / "summary.json").read_text())

    n, rounds, summary = cell("a", defense="fedavg")
    assert n == 2  # pre-training, then the run
    (cache,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    pre = [json.loads(line) for line in (cache / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in pre] == [0, 1, 2]
    assert all(r["num_attackers_sampled"] == 0 for r in pre[1:])  # clean: no attackers sampled
    assert rounds[0]["accuracy"] == pre[-1]["accuracy"] > pre[0]["accuracy"]  # the run starts from it
    assert summary["pretrained_from"] == cache.name
    mtime = (cache / "checkpoint.pkl").stat().st_mtime_ns

    n, rounds_b, summary_b = cell("b", defense="flame")  # another defense: the cache is hit
    assert n == 1 and (cache / "checkpoint.pkl").stat().st_mtime_ns == mtime
    assert rounds_b[0]["accuracy"] == pre[-1]["accuracy"] and summary_b["pretrained_from"] == cache.name

    n, rounds_c, summary_c = cell("c", defense="fedavg", **{"learning-rate": 0.05})  # shapes it: retrains
    assert n == 2 and summary_c["pretrained_from"] != cache.name
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2
