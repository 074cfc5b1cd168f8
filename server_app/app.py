"""ServerApp: build the configured defense strategy and evaluate centrally every round."""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch
from flwr.app import Context
from flwr.common import ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig

from fl_defense.config import ExperimentConfig
from fl_defense.data import load_split
from fl_defense.models import build_model, get_arrays, trainable_mask
from fl_defense.strategies import STRATEGIES

from .recorder import RunRecorder


def build_strategy(cfg: ExperimentConfig, model: torch.nn.Module, evaluate_fn=None):
    """The legacy-API strategy for ``cfg.defense``, starting from ``model``'s parameters."""
    return STRATEGIES[cfg.defense](
        **cfg.defense_kwargs(),
        fraction_fit=cfg.fraction_fit,
        fraction_evaluate=0.0,  # evaluation is central, on the server's test split
        min_fit_clients=cfg.min_fit_clients,
        min_available_clients=cfg.min_fit_clients,
        initial_parameters=ndarrays_to_parameters(get_arrays(model)),
        evaluate_fn=evaluate_fn,
        trainable=trainable_mask(model),
        device=_device(cfg.device),
        min_valid_clients=cfg.min_valid_clients,
        max_update_norm=cfg.max_update_norm,
    )


def results_folder(cfg: ExperimentConfig) -> Path:
    name = cfg.run_name or f"{cfg.defense}-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.results_dir).expanduser().resolve() / name


def _device(device: str) -> str:
    return device if device == "cpu" or torch.cuda.is_available() else "cpu"


def server_fn(context: Context) -> ServerAppComponents:
    cfg = ExperimentConfig.from_run_config(dict(context.run_config))
    random.seed(cfg.seed)  # Flower's client sampling draws from Python's random module
    torch.manual_seed(cfg.seed)
    data_cfg = cfg.data_config(num_partitions=1)  # the server needs only the test split
    spec = data_cfg.spec
    model = build_model(cfg.model_name, spec.shape, spec.num_classes, seed=cfg.seed)
    recorder = RunRecorder(cfg, model, load_split(data_cfg, "test"), results_folder(cfg))
    strategy = build_strategy(cfg, model, evaluate_fn=recorder.evaluate)
    recorder.strategy = strategy
    print(f"[fl-defense] {strategy!r} on {cfg.dataset}; results in {recorder.out_dir}", flush=True)
    return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=cfg.num_server_rounds))


app = ServerApp(server_fn=server_fn)
