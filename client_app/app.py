"""ClientApp: local SGD on the client's partition; attackers poison their data first.

Whether a partition attacks is a seeded choice fixed for the run (``malicious-fraction`` of the
partitions). The client reports, for evaluation only, whether it attacked under the reserved
metrics key ``fl-defense.malicious``; the server's adapter strips it before any defense runs.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Context
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp

from fl_defense.attacks import poison_with_trigger, select_attackers, trigger_mask
from fl_defense.config import ExperimentConfig
from fl_defense.data import load_partition
from fl_defense.fisher import empirical_fisher, encode_fisher
from fl_defense.metrics import accuracy
from fl_defense.models import build_model, get_arrays, set_arrays
from fl_defense.rounds import FISHER_KEY, FISHER_REQUEST_KEY, GROUND_TRUTH_KEY, PARTITION_KEY
from fl_defense.training import train


class DefenseClient(NumPyClient):
    """Trains locally; if ``malicious``, first poisons its data with the configured trigger."""

    def __init__(self, cfg: ExperimentConfig, partition_id: int, num_partitions: int) -> None:
        self.cfg = cfg
        self.partition_id = partition_id
        data_cfg = cfg.data_config(num_partitions)
        spec = data_cfg.spec
        self.model = build_model(cfg.model_name, spec.shape, spec.num_classes, seed=cfg.seed)
        self.device = cfg.device if cfg.device == "cpu" or torch.cuda.is_available() else "cpu"
        images, labels = load_partition(data_cfg, partition_id)
        self.malicious = cfg.attack != "none" and partition_id in select_attackers(
            num_partitions, cfg.malicious_fraction, cfg.seed)
        self.num_poisoned = 0
        if self.malicious:
            mask = trigger_mask(cfg.attack, spec.shape[1], spec.shape[2])
            images, labels, idx = poison_with_trigger(images, labels, mask, cfg.poison_rate, cfg.target_label,
                                                      cfg.base_label, seed=_seed(cfg.seed, partition_id))
            self.num_poisoned = len(idx)
        self.images, self.labels = images, labels

    def get_parameters(self, config):
        return get_arrays(self.model)

    def fit(self, parameters, config):
        set_arrays(self.model, parameters)  # copies: the global arrays are never aliased
        server_round = int(config.get("server-round", 0))
        seed = _seed(self.cfg.seed, self.partition_id, server_round)
        torch.manual_seed(seed)  # dropout masks
        loss = train(self.model, self.images, self.labels, self.cfg.local_epochs, self.cfg.batch_size,
                     self.cfg.learning_rate, self.cfg.momentum, self.device, seed)
        self.model.to("cpu")
        metrics = {PARTITION_KEY: self.partition_id, "train-loss": loss, "num-poisoned": self.num_poisoned,
                   GROUND_TRUTH_KEY: int(self.malicious)}
        if config.get(FISHER_REQUEST_KEY):
            fisher = empirical_fisher(self.model, self.images, self.labels, max_samples=self.cfg.fisher_samples)
            metrics[FISHER_KEY] = encode_fisher(fisher)
        return get_arrays(self.model), len(self.images), metrics

    def evaluate(self, parameters, config):
        set_arrays(self.model, parameters)
        acc = accuracy(self.model, self.images, self.labels)
        return 1.0 - acc, len(self.images), {"accuracy": acc}


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def client_fn(context: Context):
    return build_client(dict(context.run_config), context.node_config)


def build_client(run_config: dict, node_config: dict):
    """The client for one node: ``node_config`` names its partition (``partition-id``, ``num-partitions``)."""
    cfg = ExperimentConfig.from_run_config(run_config)
    partition_id = int(node_config["partition-id"])
    num_partitions = int(node_config["num-partitions"])
    return DefenseClient(cfg, partition_id, num_partitions).to_client()


app = ClientApp(client_fn=client_fn)
