"""Time of a client's diagonal Fisher against a local epoch, per model and method.

    python benchmarks/fisher.py            # one thread, 512 Fisher samples, a 600-sample epoch

For each built-in model: one local epoch of SGD over 600 random samples in batches of 64 (what a
client trains between two Fisher computations in the round benchmarks), and ``empirical_fisher``
over 512 samples with the layer-wise method and with per-sample ``torch.func`` gradients. Best of
three timed calls after a warm-up call; the ratio column is vmap / layers.
"""

from __future__ import annotations

import argparse

import torch

from fl_defense.fisher import empirical_fisher
from fl_defense.models import build_model
from timing import best  # benchmarks/timing.py (run as a script: its folder is on the path)

MODELS = [("mlp", (1, 8, 8)), ("cnn_small", (1, 28, 28)), ("rlr_cnn", (1, 28, 28)), ("cifar_cnn", (3, 32, 32))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", type=int, default=512, help="Fisher samples")
    parser.add_argument("--epoch-samples", type=int, default=600)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}\n")
    print(f"| model | parameters | local epoch, {args.epoch_samples} samples (s) | Fisher layers (s) | "
          f"Fisher vmap (s) | vmap / layers |")
    print("|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for name, shape in MODELS:
        model = build_model(name, shape, 10, seed=0)
        x, y = torch.randn((args.samples, *shape), generator=gen), torch.randint(0, 10, (args.samples,), generator=gen)
        ex = torch.randn((args.epoch_samples, *shape), generator=gen)
        ey = torch.randint(0, 10, (args.epoch_samples,), generator=gen)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)

        def epoch() -> None:
            model.train()
            for s in range(0, len(ex), 64):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(ex[s:s + 64]), ey[s:s + 64]).backward()
                opt.step()

        t_epoch = best(epoch)
        t_layers = best(lambda: empirical_fisher(model, x, y, method="layers"))
        t_vmap = best(lambda: empirical_fisher(model, x, y, method="vmap"))
        params = sum(p.numel() for p in model.parameters())
        print(f"| {name} | {params} | {t_epoch:.3f} | {t_layers:.3f} | {t_vmap:.3f} | {t_vmap / t_layers:.2f} |", flush=True)


if __name__ == "__main__":
    main()
