"""How dense Fedward's AmGrad is on real updates: the share of a trained update's entries whose
magnitude exceeds half their layer's largest (the nonzero ternary signs its Gram counts).

    python benchmarks/amgrad_density.py --data-dir ../shared/data

One client's update after one local epoch (2,000 samples of a Dirichlet 0.5 partition, batch 32,
learning rate 0.05) from a fresh model, per layer and overall, on the bundled digits (mlp) and
Fashion-MNIST (cnn_small). ``fedward.ternary_block_gram`` multiplies only the columns two clients
share a sign in, which pays off at these densities; Gaussian benchmark updates are about 2% dense.
"""

from __future__ import annotations

import argparse

import torch

from fl_defense.config import ExperimentConfig
from fl_defense.data import load_partition
from fl_defense.models import build_model
from fl_defense.training import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data")
    args = parser.parse_args()
    for dataset, extra in (("digits", {}), ("fashion_mnist", {"data-dir": args.data_dir})):
        cfg = ExperimentConfig.from_run_config({"dataset": dataset, "partitioner": "dirichlet", **extra})
        data_cfg = cfg.data_config(10)
        x, y = load_partition(data_cfg, 0)
        model = build_model(cfg.model_name, data_cfg.spec.shape, data_cfg.spec.num_classes, seed=0)
        start = [p.detach().clone() for p in model.parameters()]
        train(model, x[:2000], y[:2000], 1, 32, 0.05, 0.0, "cpu", 0)
        total = nonzero = 0
        print(f"| {dataset} ({cfg.model_name}) | layer | entries | AmGrad density |")
        print("|---|---|---|---|")
        for p, p0 in zip(model.parameters(), start):
            u = (p.detach() - p0).abs().flatten()
            k = int((u > u.max() / 2).sum())
            total, nonzero = total + u.numel(), nonzero + k
            print(f"| | {tuple(p.shape)} | {u.numel()} | {k / u.numel():.5f} |")
        print(f"| | all | {total} | **{nonzero / total:.5f}** |\n")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
