"""The ServerApp: Flower's legacy strategy API, with RLR where FedAvg was."""

import torch
from flwr.app import Context
from flwr.common import ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig

from rlrapp.client_app import get_weights
from rlrapp.task import Net
from fl_defense.strategies import RLR  # was: from flwr.server.strategy import FedAvg


def weighted_average(metrics):
    total = sum(n for n, _ in metrics)
    return {"train_loss": sum(n * m["train_loss"] for n, m in metrics) / total}


def server_fn(context: Context) -> ServerAppComponents:
    torch.manual_seed(0)
    strategy = RLR(
        theta=2,  # the sign vote a coordinate needs: below the honest clients, above the attackers expected per round
        fraction_fit=1.0, min_fit_clients=4, min_available_clients=4, fraction_evaluate=1.0,
        initial_parameters=ndarrays_to_parameters(get_weights(Net())),
        fit_metrics_aggregation_fn=weighted_average,
        evaluate_metrics_aggregation_fn=lambda m: {"accuracy": sum(n * x["accuracy"] for n, x in m) / sum(n for n, _ in m)},
    )
    return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=context.run_config.get("num-server-rounds", 2)))


app = ServerApp(server_fn=server_fn)
