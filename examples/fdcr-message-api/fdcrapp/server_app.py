"""The ServerApp: Flower's usual Message-API loop, with FDCR where FedAvg was."""

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fdcrapp.task import Net
from fl_defense.strategies.message import FDCR  # was: from flwr.serverapp.strategy import FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    num_rounds = context.run_config.get("num-server-rounds", 2)
    lr = context.run_config.get("lr", 0.1)
    torch.manual_seed(0)
    strategy = FDCR(fraction_train=1.0, min_train_nodes=4, min_available_nodes=4, fraction_evaluate=1.0,
                    min_evaluate_nodes=4)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(Net().state_dict()), num_rounds=num_rounds,
                            train_config=ConfigRecord({"lr": lr}))
    for rnd, metrics in sorted(result.train_metrics_clientapp.items()):
        print(f"round {rnd} train: {dict(metrics)}")
    for rnd, metrics in sorted(result.evaluate_metrics_clientapp.items()):
        print(f"round {rnd} evaluate: {dict(metrics)}")
    torch.save(result.arrays.to_torch_state_dict(), "final_model.pt")
