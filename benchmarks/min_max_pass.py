"""Where Min-Max's craft goes: the parts of its fused pass against Krum's Gram, in one run.

    python benchmarks/min_max_pass.py                 # n=100, d=1.2M float32 (issue 17's point)
    python benchmarks/min_max_pass.py --n 20 --d 50000

Times, best of ``--repeats`` after a warm-up, on one random n x d matrix: Krum's ``gram_matrix``;
``attacks.base.column_pass`` with only the mean, with the Gram, with the std, with the std
direction and B p (``min_max.pass_with_direction``), and with all of it (what Min-Max's craft
computes before its binary search). benchmarks/attacks.py times the whole steps against Krum's
round; this splits the craft to show what its statistics cost beyond the Gram.
"""

from __future__ import annotations

import argparse

import torch

from fl_defense.attacks.base import column_pass
from fl_defense.attacks.min_max import pass_with_direction
from fl_defense.defenses.krum import gram_matrix
from timing import best  # benchmarks/timing.py (run as a script: its folder is on the path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--d", type=int, default=1_200_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.n, args.d) * 0.01
    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, torch threads {torch.get_num_threads()}, "
          f"n {args.n}, d {args.d}")
    parts = [("Krum's gram_matrix", lambda: gram_matrix(x)),
             ("pass: mean", lambda: column_pass(x)),
             ("pass: mean + Gram", lambda: column_pass(x, gram=True)),
             ("pass: mean + std", lambda: column_pass(x, std=True)),
             ("pass: std direction + B p", lambda: pass_with_direction(x, "std")),
             ("pass: all of Min-Max's (std)", lambda: pass_with_direction(x, "std", gram=True))]
    for name, fn in parts:
        print(f"{name:30s} {best(fn, args.repeats):.3f} s")


if __name__ == "__main__":
    main()
