"""ServerApp: build the configured defense strategy and evaluate centrally every round."""

from __future__ import annotations

import copy
import random
import time
from pathlib import Path

import torch
from flwr.app import Context
from flwr.common import ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.compat import start_grid
from flwr.serverapp import Grid

from fl_defense.config import ExperimentConfig
from fl_defense.data import load_split
from fl_defense.fisher import ValidationFisher
from fl_defense.models import build_model, get_arrays, trainable_mask
from fl_defense.strategies import STRATEGIES

from .recorder import RunRecorder


def build_strategy(cfg: ExperimentConfig, model: torch.nn.Module, evaluate_fn=None, min_available: int = 0,
                   validation: tuple[torch.Tensor, torch.Tensor] | None = None):
    """The legacy-API strategy for ``cfg.defense``, starting from ``model``'s parameters.

    ``validation`` is the server's held-out split, used by SDFC's validation Fisher."""
    extra = {}
    if cfg.defense == "sdfc":
        # A private copy of the model: the validation Fisher loads parameter vectors into it.
        extra["validation_fisher"] = ValidationFisher(copy.deepcopy(model), *validation, max_samples=cfg.fisher_samples)
    return STRATEGIES[cfg.defense](
        **cfg.defense_kwargs(),
        **extra,
        fraction_fit=cfg.fraction_fit,
        fraction_evaluate=0.0,  # evaluation is central, on the server's test split
        min_fit_clients=cfg.min_fit_clients,
        min_available_clients=max(min_available, cfg.min_fit_clients),
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


def build_components(run_config: dict, num_nodes: int) -> ServerAppComponents:
    """Everything the ServerApp runs, from a run-config dict (validated here, at start-up) and the
    number of nodes in the federation."""
    cfg = ExperimentConfig.from_run_config(run_config)
    cfg.check_federation(num_nodes)
    min_available = cfg.min_available_clients or num_nodes
    random.seed(cfg.seed)  # Flower's client sampling draws from Python's random module
    torch.manual_seed(cfg.seed)
    data_cfg = cfg.data_config(num_partitions=1)  # the server needs only the test split
    spec = data_cfg.spec
    model = build_model(cfg.model_name, spec.shape, spec.num_classes, seed=cfg.seed)
    recorder = RunRecorder(cfg, model, load_split(data_cfg, "test"), results_folder(cfg))
    validation = load_split(data_cfg, "server") if cfg.defense == "sdfc" else None
    strategy = build_strategy(cfg, model, evaluate_fn=recorder.evaluate, min_available=min_available,
                              validation=validation)
    recorder.strategy = strategy
    print(f"[fl-defense] {strategy!r} on {cfg.dataset}; results in {recorder.out_dir}", flush=True)
    return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=cfg.num_server_rounds))


def connected_nodes(grid: Grid, settle_seconds: float = 3.0) -> int:
    """Nodes connected now, after waiting until the count stops growing for ``settle_seconds``."""
    count, stable_since = len(list(grid.get_node_ids())), time.monotonic()
    while time.monotonic() - stable_since < settle_seconds or count == 0:
        time.sleep(0.5)
        now = len(list(grid.get_node_ids()))
        if now != count:
            count, stable_since = now, time.monotonic()
    return count


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    components = build_components(dict(context.run_config), connected_nodes(grid))
    start_grid(grid=grid, strategy=components.strategy, config=components.config)
