"""DeepSight's DDif probe (``RandomInputProbabilities``): channels-last batches of 256 against the
default memory format in batches of 1,000 (what the probe did before), in one run, interleaved.

    python benchmarks/deepsight_probe.py [--model cnn_small] [--repeats 5]

Each call is one model's output probabilities on the protocol's DDif inputs (3 seeds x 2,000
uniform random 28 x 28 images); a DeepSight round makes n + 1 such calls (every local model and
the global one). One torch thread, as a simulation's server runs. Prints the best of ``--repeats``
per variant, the ratio, the largest difference between the two outputs and
``torch.backends.cpu.get_cpu_capability()``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fl_defense.defenses.deepsight import RandomInputProbabilities  # noqa: E402
from fl_defense.models import build_model  # noqa: E402


@torch.no_grad()
def default_format(probe: RandomInputProbabilities, vector: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """The reference: the probe's computation in the default memory format, batches of 1,000."""
    model = copy.deepcopy(probe.model).to(memory_format=torch.contiguous_format)
    torch.nn.utils.vector_to_parameters(vector.clone(), [p for p in model.parameters() if p.requires_grad])
    model.eval()
    return torch.stack([torch.cat([torch.softmax(model(x[s:s + batch_size].contiguous()), dim=1)
                                   for s in range(0, len(x), batch_size)]) for x in probe.inputs])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cnn_small")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = build_model(args.model, (1, 28, 28), 10, seed=0)
    vector = torch.nn.utils.parameters_to_vector([p for p in model.parameters() if p.requires_grad]).detach()
    probe = RandomInputProbabilities(copy.deepcopy(model), (1, 28, 28), num_seeds=3, num_samples=2000, seed=0)
    times = {"probe": [], "default": []}
    for _ in range(args.repeats):
        t = time.perf_counter()
        fast = probe(vector)
        times["probe"].append(time.perf_counter() - t)
        t = time.perf_counter()
        ref = default_format(probe, vector)
        times["default"].append(time.perf_counter() - t)
    best = {k: min(v) for k, v in times.items()}
    print(f"capability {torch.backends.cpu.get_cpu_capability()}, {args.model}, 1 thread, best of {args.repeats}")
    print(f"probe (channels-last: {probe.channels_last}, batches of {probe.batch_size}): {best['probe']:.3f} s a call")
    print(f"default format, batches of 1000: {best['default']:.3f} s a call")
    print(f"ratio probe / default: {best['probe'] / best['default']:.2f}; "
          f"largest difference {float((fast - ref).abs().max()):.1e}")


if __name__ == "__main__":
    main()
