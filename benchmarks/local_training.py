"""Two costs of local training and evaluation, each against what it replaced, in one run.

1. Pooling before the ReLU (fl_defense/models.py) against the usual conv-ReLU-pool order,
   interleaved: the server's evaluation (``training.predict`` over a test set) and a client's local
   training (``training.train``, one epoch, batch 64, momentum 0.9).
2. The first local training in a fresh process (what each Ray actor of a cell runs once), with
   ``training.SGD`` and with ``torch.optim.SGD`` (whose first use imports ``torch._dynamo``): the
   CPU time of ``import torch``-to-trained in a subprocess, ``--fresh`` times each, interleaved.

    python benchmarks/local_training.py [--model cnn_small] [--images 10000] [--train 6000] [--repeats 5] [--fresh 5]

Random images of the model's dataset shape (the kernels' cost does not depend on their values).
One torch thread, as the simulation's server and each Ray actor run. Prints the best of
``--repeats`` per order, the ratio (shipped / conventional), whether the predictions and the trained
parameters are bitwise equal, and ``torch.backends.cpu.get_cpu_capability()``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fl_defense.models import build_model, relu_before_pool  # noqa: E402
from fl_defense.training import predict, train  # noqa: E402

SHAPES = {"cnn_small": (1, 28, 28), "rlr_cnn": (1, 28, 28), "cifar_cnn": (3, 32, 32)}


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


FRESH = """
import sys, time
start = time.process_time()
import torch
sys.path.insert(0, {root!r})
from fl_defense.models import build_model
from fl_defense import training
if {oracle!r}:
    training.SGD = lambda params, lr, momentum=0.0: torch.optim.SGD(params, lr=lr, momentum=momentum)
torch.set_num_threads(1)
m = build_model("cnn_small", (1, 28, 28), 10, seed=0)
training.train(m, torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,)), 1, 64, 0.01)
print(time.process_time() - start, "torch._dynamo" in sys.modules)
"""


def fresh_process(oracle: bool) -> tuple[float, bool]:
    """CPU seconds of a new interpreter from ``import torch`` to one trained batch, and whether it
    imported torch._dynamo."""
    import subprocess

    code = FRESH.format(root=str(Path(__file__).resolve().parents[1]), oracle=oracle)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), out[1] == "True"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cnn_small", choices=sorted(SHAPES))
    parser.add_argument("--images", type=int, default=10_000, help="test images per prediction call")
    parser.add_argument("--train", type=int, default=6_000, help="samples of one local epoch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fresh", type=int, default=5, help="fresh processes per optimiser (0: skip)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    shape = SHAPES[args.model]
    gen = torch.Generator().manual_seed(0)
    test_x = torch.rand(args.images, *shape, generator=gen)
    train_x = torch.rand(args.train, *shape, generator=gen)
    train_y = torch.randint(0, 10, (args.train,), generator=gen)
    shipped = build_model(args.model, shape, 10, seed=0)
    usual = relu_before_pool(shipped)
    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, 1 torch thread, load average "
          f"{os.getloadavg()[0]:.1f}, model {args.model}", flush=True)
    times = {("predict", k): [] for k in ("usual", "shipped")} | {("train", k): [] for k in ("usual", "shipped")}
    same_predictions = same_parameters = True
    for repeat in range(args.repeats + 1):  # the first is a warm-up
        preds, params = {}, {}
        for kind, model in (("usual", usual), ("shipped", shipped)):
            t, preds[kind] = timed(lambda: predict(model, test_x))
            if repeat:
                times[("predict", kind)].append(t)
            local = copy.deepcopy(model)
            t, _ = timed(lambda: train(local, train_x, train_y, epochs=1, batch_size=64, lr=0.01, momentum=0.9,
                                       seed=repeat))
            params[kind] = list(local.parameters())
            if repeat:
                times[("train", kind)].append(t)
        same_predictions &= torch.equal(preds["usual"], preds["shipped"])
        same_parameters &= all(torch.equal(a, b) for a, b in zip(params["usual"], params["shipped"]))
    print(f"{'':<34} {'conv-ReLU-pool':>15} {'conv-pool-ReLU':>15} {'ratio':>7}")
    for what, label in (("predict", f"predict, {args.images:,} images"), ("train", f"train, one epoch of {args.train:,}")):
        usual_t, shipped_t = min(times[(what, "usual")]), min(times[(what, "shipped")])
        print(f"{label:<34} {usual_t:>13.3f} s {shipped_t:>13.3f} s {shipped_t / usual_t:>6.2f}x")
    print(f"predictions bitwise equal: {same_predictions}; trained parameters bitwise equal: {same_parameters}")
    if args.fresh:
        runs = {True: [], False: []}
        for _ in range(args.fresh):
            for oracle in (True, False):
                runs[oracle].append(fresh_process(oracle))
        torch_t, ours_t = min(t for t, _ in runs[True]), min(t for t, _ in runs[False])
        print(f"fresh process, import torch to one trained batch (best of {args.fresh}): torch.optim.SGD "
              f"{torch_t:.2f} CPU s (imports torch._dynamo: {runs[True][0][1]}), training.SGD {ours_t:.2f} CPU s "
              f"(imports it: {runs[False][0][1]}); saved {torch_t - ours_t:.2f} CPU s per process")


if __name__ == "__main__":
    main()
