"""Cost of each colluding attack's step in full-knowledge mode against Krum's aggregation, in one run.

    python benchmarks/attacks.py                       # n=100, d=1.2M, 20% attackers (the issue's point)
    python benchmarks/attacks.py --n 20 --d 50000 --repeats 5

Inputs: n client models of d float32 parameters in 4 layers, as Flower hands them over (lists of
ndarrays); the first m carry their honest update under the reserved key, as colluding attackers do.
Timed on the same inputs after a warm-up, ``--repeats`` times, each attack's timings interleaved
with Krum's (Krum, step, craft, Krum, ...) so that load from other processes falls on both sides:
- Krum: the whole defended round (validation, flatten into the n x d matrix, Krum, rebuild) through
  ``DefendedAggregation``, as benchmarks/aggregation.py times it;
- per attack, the whole collusion step (``attacks.collusion.collude``: decode the colluders' honest
  updates, flatten the others into the known-updates matrix, craft, rebuild the colluders' arrays),
  and the attack's ``craft`` alone on the prebuilt known matrix.
Ratios: best against best, and the median of the per-repeat ratios; the target is <= 1.0. Prints the CPU capability
torch dispatches to and the thread count, since another process on the machine slows both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from fl_defense.attacks import AttackRound, make_colluding
from fl_defense.attacks.collusion import HONEST_UPDATE_KEY, collude, encode_update
from fl_defense.defenses import Krum
from fl_defense.rounds import PARTITION_KEY, ClientResult, DefendedAggregation
from fl_defense.updates import ParamLayout

VARIANTS = [("alie", {}), ("alie_backdoor", {}), ("ipm", {}),
            ("min_max", {"direction": "std"}), ("min_max", {"direction": "unit"}), ("min_max", {"direction": "sign"}),
            ("min_max", {"target": "krum"}), ("min_max", {"target": "trimmed_mean"}), ("min_max", {"target": "median"}),
            ("min_sum", {"direction": "std"}),
            ("fang", {"target": "krum"}), ("fang", {"target": "trimmed_mean"})]


def layer_shapes(d: int) -> list[tuple[int, ...]]:
    big = int(d * 0.8)
    rest = d - big
    return [(big // 100, 100), (big - (big // 100) * 100 + 1,), (rest - 11, 1), (10,)]


def make_round(n: int, d: int, m: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    shapes = layer_shapes(d)
    global_arrays = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    layout = ParamLayout.from_arrays(global_arrays)
    results = []
    for k in range(n):
        arrays = [g + 0.01 * (0.1 + rng.standard_normal(g.shape, dtype=np.float32)) for g in global_arrays]
        metrics = {PARTITION_KEY: k}
        if k < m:
            metrics[HONEST_UPDATE_KEY] = encode_update(np.concatenate([(a - g).reshape(-1)
                                                                       for a, g in zip(arrays, global_arrays)]))
        results.append(ClientResult(f"c{k}", arrays, 100, metrics))
    return global_arrays, layout, results


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--d", type=int, default=1_200_000)
    parser.add_argument("--attackers", type=float, default=0.2, help="share of the n results that collude")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="results/perf/attacks.json")
    args = parser.parse_args()
    n, d, m = args.n, args.d, max(1, int(round(args.attackers * args.n)))
    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, torch threads {torch.get_num_threads()}, "
          f"cores {os.cpu_count()}, load average {os.getloadavg()}", flush=True)
    global_arrays, layout, results = make_round(n, d, m)
    rows = []

    agg = DefendedAggregation(Krum(num_malicious=m))

    def krum_round():
        agg.aggregate(1, global_arrays, results)

    krum_round()
    _, _, workspace = collude(results, global_arrays, layout, make_colluding("ipm"), "full", 1, seed=0)
    known = workspace[:n]  # the full-knowledge matrix as collude built it (own honest rows, then the others)
    poisoned = known[:m].clone()
    for name, params in VARIANTS:
        label = name + "".join(f" {k}={v}" for k, v in params.items())
        attack = make_colluding(name, **params)
        state = {"ws": workspace}
        rnd = AttackRound(n, m, "full", poisoned=poisoned if attack.uses_poisoned else None, seed=1)

        def step():
            _, _, state["ws"] = collude(results, global_arrays, layout, attack, "full", 1, seed=0,
                                        workspace=state["ws"])

        step()
        attack.craft(known, rnd)
        times = [(timed(krum_round), timed(step), timed(lambda: attack.craft(known, rnd))) for _ in range(args.repeats)]
        k_t, s_t, c_t = (np.array(col) for col in zip(*times))
        row = {"what": label, "krum_best_s": k_t.min(), "step_best_s": s_t.min(), "craft_best_s": c_t.min(),
               "step_ratio_best": s_t.min() / k_t.min(), "craft_ratio_best": c_t.min() / k_t.min(),
               "step_ratio_median": float(np.median(s_t / k_t)), "craft_ratio_median": float(np.median(c_t / k_t))}
        rows.append({k: float(v) if isinstance(v, np.floating) else v for k, v in row.items()})
        print(f"{label:<28} krum {k_t.min():7.3f} s | step {s_t.min():7.3f} s  x{row['step_ratio_best']:5.2f} "
              f"(median x{row['step_ratio_median']:5.2f}) | craft {c_t.min():7.3f} s  x{row['craft_ratio_best']:5.2f} "
              f"(median x{row['craft_ratio_median']:5.2f})", flush=True)
    print(f"load average after: {os.getloadavg()}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"n": n, "d": d, "attackers": m, "repeats": args.repeats,
                               "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                               "threads": torch.get_num_threads(), "rows": rows}, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
