"""Clean pre-training, cached: ``pretrain-rounds`` rounds of FedAvg without attackers, whose final
model every run sharing the same pre-training configuration starts from.

The cache key is a hash of exactly what determines the pre-trained model: the number of clients
and how they are sampled, the data and its partition (with the active partitioner's own
parameter only), the model, local training, the seed and the number of rounds. Defense and attack
keys are not in it: runs that differ only in those share one pre-trained model. Round numbering:
the run's round 0 is the pre-trained model; its rounds 1.. follow the pre-training, and the attack
schedule (attack-start-round, attack-stop-round) counts those rounds.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .config import ExperimentConfig

# what the pre-training federation reads besides the data partition's own parameter
SHAPING_KEYS = ("fraction-fit", "min-fit-clients", "min-available-clients", "min-valid-clients", "max-update-norm",
                "dataset", "data-dir", "partitioner", "server-fraction", "local-epochs", "batch-size",
                "learning-rate", "momentum", "seed", "pretrain-rounds")
PARTITIONER_KEYS = {"dirichlet": ("dirichlet-alpha",), "pathological": ("classes-per-client",), "nir": ("nir",)}
# How clients are sampled, when that changes what a seed samples: "node-order" since clients are
# drawn in node-id order, "node-order-own-rng" since with the client manager's own RNG, which Ray's
# draws from the random module no longer shift (server_app/sampling.py); an older cache is not reused.
CLIENT_SAMPLING = "node-order-own-rng"


def pretrain_key(cfg: ExperimentConfig, num_supernodes: int) -> dict:
    """The values that determine the pre-trained model (the hash's input)."""
    run_config = cfg.as_run_config()
    key = {k: run_config[k] for k in SHAPING_KEYS + PARTITIONER_KEYS.get(cfg.partitioner, ())}
    key["model"] = cfg.model_name  # "auto" resolved: the same network either way
    key["num-supernodes"] = num_supernodes
    key["client-sampling"] = CLIENT_SAMPLING
    return key


def pretrain_id(cfg: ExperimentConfig, num_supernodes: int) -> str:
    """The cache folder's name: readable parts and a hash of ``pretrain_key``."""
    digest = hashlib.sha1(json.dumps(pretrain_key(cfg, num_supernodes), sort_keys=True).encode()).hexdigest()[:12]
    return f"{cfg.dataset}-{cfg.model_name}-{cfg.pretrain_rounds}r-{digest}"


def cache_folder(cfg: ExperimentConfig, num_supernodes: int, relative_to: Path | None = None) -> Path:
    """Where the pre-training of this run is (or will be) cached. A relative folder is taken from
    ``relative_to`` (default: the working directory, where the run itself resolves it)."""
    root = Path(cfg.pretrain_dir or Path(cfg.results_dir) / "pretrain").expanduser()
    if relative_to is not None and not root.is_absolute():
        root = Path(relative_to) / root
    return root.resolve() / pretrain_id(cfg, num_supernodes)


def is_cached(folder: Path) -> bool:
    """A finished pre-training: its summary and final checkpoint exist."""
    return (folder / "summary.json").exists() and (folder / "checkpoint.pkl").exists()


def pretrain_run_config(cfg: ExperimentConfig, num_supernodes: int) -> dict:
    """The run config of the pre-training federation: the shaping keys, clean FedAvg, no attackers,
    writing its results and checkpoint into the cache folder (resumed if a checkpoint is there)."""
    folder = cache_folder(cfg, num_supernodes)
    key = pretrain_key(cfg, num_supernodes)
    for not_a_run_config_key in ("num-supernodes", "client-sampling"):
        del key[not_a_run_config_key]
    return {**key, "model": cfg.model, "num-server-rounds": cfg.pretrain_rounds, "pretrain-rounds": 0,
            "defense": "fedavg", "attack": "none", "model-poisoning": "none", "malicious-fraction": 0.0,
            "pre-aggregation": "none", "clip-norm": 0.0, "noise": 0.0, "device": cfg.device,
            "results-dir": str(folder.parent), "run-name": folder.name, "checkpoint": True,
            "resume": (folder / "checkpoint.pkl").exists() and not is_cached(folder)}


__all__ = ["PARTITIONER_KEYS", "SHAPING_KEYS", "cache_folder", "is_cached", "pretrain_id", "pretrain_key",
           "pretrain_run_config"]
