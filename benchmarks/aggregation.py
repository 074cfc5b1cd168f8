"""Aggregation time and peak extra memory of every defense against Flower's own aggregators.

    python benchmarks/aggregation.py --threads 1            # n=100, d=1.2M (the issue's target point)
    python benchmarks/aggregation.py --n 10 100 500 --d 50000 1200000 11000000 --repeats 1
    python benchmarks/aggregation.py --threads 2 --runs 3   # three fresh processes: each ratio's range
    python benchmarks/aggregation.py --threads 2 --runs 3 --cpu avx2   # as on AVX2 without VNNI (cpu.py)

For each (n, d): n client models of d float32 parameters in 4 layers, as Flower hands them to a
strategy (lists of ndarrays). Timed, in the same process and run, on the same inputs:
- Flower: ``aggregate`` (FedAvg), ``aggregate_krum`` (Multi-Krum), ``aggregate_median``,
  ``aggregate_trimmed_avg``;
- ours: the whole defended round (validation, one flatten into the n x d matrix, the defense,
  rebuilding the arrays) through ``DefendedAggregation``, for every defense.
Beside Bulyan, a reference row: Bulyan's round up to its per-coordinate window (flatten, Gram,
repeated Krum, the sort of the selected values), what an exact Bulyan pays before its last step.
Ratios are against Flower's FedAvg ``aggregate`` measured in the same run, by default timed again
just before each row (``--single-reference``: once, at the start): on a shared machine the load
changes within a run, and a ratio should compare two timings taken under the same load. Peak extra memory is
the rise of the process's peak RSS during the first call over the RSS before it (Linux VmHWM,
reset before the call; what an aggregator keeps between rounds counts), in
units of the n x d float32 matrix. Server-side model work is stubbed: SDFC's validation Fisher and
FLTrust's root-dataset training cost depend on the model, not on aggregation, and are measured in
round-time benchmarks instead. BackdoorIndicator and FLARE (``MODEL_BACKED``) are timed with
their real forward passes on the RLR CNN at 28x28 (d = 1,199,882), the server work being their rule. Cells whose n x d matrix exceeds --max-gb are skipped and listed.
Every table starts with the CPU capability it ran with (``cpu.describe``) and the kernels the
defenses chose on it (``fl_defense.defenses.cpu_kernels``).
"""

from __future__ import annotations

import argparse
import sys

from cpu import cpu_argument, describe, emulate  # benchmarks/cpu.py (run as a script: its folder is on the path)

emulate(cpu_argument())  # before numpy and torch load: --cpu avx2 re-runs the script capped to AVX2

import ctypes  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fl_defense.defenses import DEFENSES, PRE_AGGREGATIONS, RLR, cpu_kernels  # noqa: E402
from fl_defense.fisher import encode_fisher  # noqa: E402
from fl_defense.rounds import FISHER_KEY, ClientResult, DefendedAggregation  # noqa: E402


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def _trim() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise), so the RSS before a call
    is what is live and the next call's rise is its own."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def measure(fn, repeats: int) -> tuple[float, float, int]:
    """Best wall time over ``repeats`` calls after a first one, the best CPU time of the process
    (every thread) over the same calls, and the peak RSS of that first call above the RSS before
    it: memory an aggregator allocates on first use and keeps between rounds (our reused updates
    matrix) counts as extra memory. On one thread, CPU time is what the wall time would be on an
    idle machine, within the memory traffic other processes cause: a ratio of CPU times survives
    a busy machine better than one of wall times."""
    gc.collect()
    _trim()
    before = _status("VmRSS")
    _reset_peak()
    fn()
    peak = _status("VmHWM") - before
    times, cpu = [], []
    for _ in range(repeats):
        gc.collect()
        t, c = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return min(times), min(cpu), max(0, peak)


def layer_shapes(d: int) -> list[tuple[int, ...]]:
    """Four layers, a conv-like block holding most parameters, as a CNN has."""
    big = int(d * 0.8)
    rest = d - big
    return [(big // 100, 100), (big - (big // 100) * 100 + 1,), (rest - 11, 1), (10,)]


def make_inputs(n: int, d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    shapes = layer_shapes(d)
    glob = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    results = []
    for k in range(n):
        arrays = [g + 0.01 * rng.standard_normal(s, dtype=np.float32) for g, s in zip(glob, shapes)]
        results.append((arrays, int(rng.integers(50, 500))))
    dim = sum(int(np.prod(s)) for s in shapes)
    fisher = encode_fisher(np.abs(rng.standard_normal(dim, dtype=np.float32)))
    return glob, results, fisher


class BulyanBeforeItsWindow(DEFENSES["bulyan"]):
    """A reference, not a defense: Bulyan's round up to its window (flatten and checks, Gram,
    repeated Krum, the sort of the selected values), with the window replaced by reading one
    order statistic from the sorted block. What exact Bulyan costs before the window itself."""

    name = "bulyan-before-window"

    @staticmethod
    def coordinate_rule(s: torch.Tensor, beta: int) -> torch.Tensor:
        return s[(s.shape[0] - 1) // 2].clone()


def our_defenses(n: int) -> dict:
    f = max(1, n // 10)
    stub_fisher = lambda p: torch.ones_like(p)  # noqa: E731
    stub_update = lambda p: torch.full_like(p, 1e-3)  # noqa: E731
    return {
        "fedavg": DEFENSES["fedavg"](), "rlr": RLR(theta=max(1, n // 4)), "fedward": DEFENSES["fedward"](),
        "fdcr": DEFENSES["fdcr"](), "sdfc": DEFENSES["sdfc"](validation_fisher=stub_fisher, reference="global"),
        "krum": DEFENSES["krum"](num_malicious=f), "multikrum": DEFENSES["krum"](num_malicious=f, to_keep=n - f),
        "bulyan": DEFENSES["bulyan"](num_malicious=max(0, (n - 3) // 4 // 2)),
        "bulyan-before-window": BulyanBeforeItsWindow(num_malicious=max(0, (n - 3) // 4 // 2)),
        "median": DEFENSES["median"](),
        "trimmed_mean": DEFENSES["trimmed_mean"](), "norm_clipping": DEFENSES["norm_clipping"](clip_norm=1.0),
        "signsgd": DEFENSES["signsgd"](), "foolsgold": DEFENSES["foolsgold"](), "flame": DEFENSES["flame"](),
        "fltrust": DEFENSES["fltrust"](server_update=stub_update),
        "freqfed": DEFENSES["freqfed"](),
        # DeepSight needs an output layer and runs real forward passes: its own inputs (own_inputs)
        "deepsight": None, "deepsight-no-ddifs": None,
        "crfl": DEFENSES["crfl"](),
        "fldetector": DEFENSES["fldetector"](),
        # issue #19's rules made of a few passes over the updates; the pre-aggregation wrappers
        # around FedAvg, so their rows time the wrapper's own work
        "rfa": DEFENSES["rfa"](), "centered_clipping": DEFENSES["centered_clipping"](),
        "signguard": DEFENSES["signguard"](), "multi_metrics": DEFENSES["multi_metrics"](),
        "alignins": DEFENSES["alignins"](), "rflbat": DEFENSES["rflbat"](),
        "dnc": DEFENSES["dnc"](num_malicious=f),
        "bucketing(fedavg)": PRE_AGGREGATIONS["bucketing"](DEFENSES["fedavg"]()),
        "nnm(fedavg)": PRE_AGGREGATIONS["nnm"](DEFENSES["fedavg"](), num_malicious=f),
    }


def warmed_fldetector(n: int, d: int, glob: list[np.ndarray], seed: int = 0):
    """FLDetector as in round 12 of a run: a full window of N pairs (s^T y > 0), every client's
    last update and the previous global model kept, so the timed round predicts all n updates
    with L-BFGS and runs the gap statistic (a fresh one would only average). Its per-round work
    does not depend on the history's values, only on their sizes."""
    defense = DEFENSES["fldetector"]()
    rng = np.random.default_rng(seed)
    flat = np.concatenate([a.reshape(-1) for a in glob])
    window = defense.window
    s = 0.01 * rng.standard_normal((window, d), dtype=np.float32)
    y = s * 2.0 + 0.001 * rng.standard_normal((window, d), dtype=np.float32)
    prev = flat - 0.01 * rng.standard_normal(d, dtype=np.float32)
    defense.load_state_dict({
        "round": 11, "s": list(s), "y": list(y), "w-prev": prev, "g-prev": 0.01 * rng.standard_normal(d, dtype=np.float32),
        "clients": [f"partition-{k}" for k in range(n)],
        "last-updates": 0.01 * rng.standard_normal((n, d), dtype=np.float32),
        "last-round": {f"partition-{k}": 11 for k in range(n)}, "models": {11: prev}, "scores": {}})
    return defense


def own_inputs(name: str, n: int, d: int, seed: int = 0):
    """DeepSight's case: an MLP 784 -> h -> 10 of about d parameters (h = (d - 10) // 795; its
    output layer is what NEUPs read), n client models around it, and the defense with the server's
    real forward passes (``RandomInputProbabilities`` on 3 seeds x 2000 random 1x28x28 inputs: the
    run-config defaults) or, for ``deepsight-no-ddifs``, without them. Returns (global arrays,
    client results, defense)."""
    import copy

    from fl_defense.defenses.deepsight import RandomInputProbabilities

    h = max(1, (d - 10) // 795)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, h), torch.nn.ReLU(), torch.nn.Linear(h, 10))
    glob = [v.detach().numpy().copy() for v in model.state_dict().values()]
    rng = np.random.default_rng(seed)
    results = [([g + 0.01 * rng.standard_normal(g.shape, dtype=np.float32) for g in glob], int(rng.integers(50, 500)))
               for _ in range(n)]
    outputs = RandomInputProbabilities(copy.deepcopy(model), (1, 28, 28), 3, 2000, seed) if name == "deepsight" else None
    return glob, results, DEFENSES["deepsight"](model_outputs=outputs)


# Defenses whose server runs the model (forward passes included in their rows): built on the RLR
# paper's CNN at 28x28 (d = 1,199,882, the d = 1.2M) with their real server tasks.
MODEL_BACKED = ("backdoor_indicator", "flare")


def model_backed(name: str, n: int, seed: int = 0):
    """(global arrays, n client results around it, the defense with its server task) on rlr_cnn:
    BackdoorIndicator reads back 100 indicator samples per client (and plants on them, a row of
    its own), FLARE takes each client's PLRs of 100 server samples; both the run-config defaults."""
    import copy

    from fl_defense.models import build_model
    from fl_defense.server_tasks import IndicatorTask, PenultimateFeatures

    model = build_model("rlr_cnn", (1, 28, 28), 10, seed=seed)
    glob = [v.detach().numpy().copy() for v in model.state_dict().values()]
    rng = np.random.default_rng(seed)
    results = [([g + 0.01 * rng.standard_normal(g.shape, dtype=np.float32) for g in glob], int(rng.integers(50, 500)))
               for _ in range(n)]
    samples = torch.rand((100, 1, 28, 28), generator=torch.Generator().manual_seed(seed))
    if name == "backdoor_indicator":
        return glob, results, DEFENSES[name](indicator=IndicatorTask(copy.deepcopy(model), samples, 10, seed=seed))
    return glob, results, DEFENSES[name](features=PenultimateFeatures(copy.deepcopy(model), samples, 100))


def bench(n: int, d: int, repeats: int, skip_flower_krum_above: int, only: list[str] | None = None,
          paired: bool = True) -> list[dict]:
    from flwr.server.strategy.aggregate import aggregate, aggregate_krum, aggregate_median, aggregate_trimmed_avg

    glob, results, fisher = make_inputs(n, d)
    matrix_bytes = n * d * 4
    rows = []
    f = max(1, n // 10)
    flower = {
        "flower aggregate (FedAvg)": lambda: aggregate(results),
        "flower aggregate_median": lambda: aggregate_median(results),
        "flower aggregate_trimmed_avg": lambda: aggregate_trimmed_avg(results, 0.2),
    }
    if n <= skip_flower_krum_above:
        flower["flower aggregate_krum (Multi-Krum)"] = lambda: aggregate_krum(results, f, n - f)
    ours = our_defenses(n)
    if only:  # Flower's FedAvg stays: it is what every ratio is against
        flower = {k: v for i, (k, v) in enumerate(flower.items()) if i == 0 or any(o in k for o in only)}
        ours = {k: v for k, v in ours.items() if k in only}
    reference = flower["flower aggregate (FedAvg)"]

    def timed(name: str, fn) -> None:
        """One row; with ``paired``, Flower's FedAvg is timed again just before it and the row's
        ratio is against that (on a shared machine the load changes within a run)."""
        ref, ref_cpu, _ = measure(reference, repeats) if paired and rows else (None, None, None)
        t, cpu, peak = measure(fn, repeats)
        if ref is None:
            ref, ref_cpu = (rows[0]["seconds"], rows[0]["cpu_seconds"]) if rows else (t, cpu)
        rows.append({"n": n, "d": d, "method": name, "seconds": t, "reference_seconds": ref,
                     "ratio": t / ref, "cpu_seconds": cpu, "cpu_ratio": cpu / ref_cpu,
                     "peak_extra": peak / matrix_bytes})

    for name, fn in flower.items():
        timed(name, fn)
    # first use of each defense on a tiny input, so imports (scikit-learn's clustering), the
    # kernel choices (cpu_kernels) and allocator warm-up are not counted in the real call
    tiny_glob, tiny_results, tiny_fisher = make_inputs(n, 1000, seed=1)
    for name, defense in our_defenses(n).items():
        if name not in ours:
            continue
        t_glob, t_results = tiny_glob, tiny_results
        if defense is None:
            t_glob, t_results, defense = own_inputs(name, n, 1000, seed=1)
        DefendedAggregation(defense).aggregate(1, t_glob, [
            ClientResult(str(k), arrays, ne, {"partition-id": k, FISHER_KEY: tiny_fisher})
            for k, (arrays, ne) in enumerate(t_results)])
    if "fldetector" in ours:  # timed in its steady state, not in its first rounds (no history yet)
        ours["fldetector"] = warmed_fldetector(n, d, glob)
    for name, defense in ours.items():
        r_glob, r_results = glob, results
        if defense is None:
            r_glob, r_results, defense = own_inputs(name, n, d)
        agg = DefendedAggregation(defense)
        client_results = [ClientResult(str(k), arrays, ne, {"partition-id": k, FISHER_KEY: fisher})
                          for k, (arrays, ne) in enumerate(r_results)]
        timed(name, lambda: agg.aggregate(1, r_glob, client_results))
    for name in MODEL_BACKED:
        if only and name not in only:
            continue
        m_glob, m_results, defense = model_backed(name, n)
        m_agg = DefendedAggregation(defense)
        m_clients = [ClientResult(str(k), arrays, ne, {"partition-id": k}) for k, (arrays, ne) in enumerate(m_results)]
        timed(name, lambda: m_agg.aggregate(1, m_glob, m_clients))
        if name == "backdoor_indicator":  # the round's other server step: planting before it is sent
            timed("backdoor_indicator planting", lambda: m_agg.broadcast(m_glob))
        del m_results, m_clients, m_agg
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[100])
    parser.add_argument("--d", type=int, nargs="+", default=[1_200_000])
    parser.add_argument("--repeats", type=int, default=2, help="timed calls after the first (best one reported)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch and BLAS threads (0: their defaults, one per core)")
    parser.add_argument("--max-gb", type=float, default=4.0, help="skip cells whose n x d matrix is larger")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="only these of our defenses (and Flower's aggregators whose name contains one)")
    parser.add_argument("--skip-flower-krum-above", type=int, default=100,
                        help="Flower's aggregate_krum loops over n^2 pairs in Python; skip it for larger n")
    parser.add_argument("--runs", type=int, default=1,
                        help="repeat the whole measurement in this many fresh processes and print each "
                             "ratio's range (timings vary more between processes than within one)")
    parser.add_argument("--single-reference", action="store_true",
                        help="every ratio against the one Flower FedAvg timing at the start of the run "
                             "(default: against Flower's FedAvg timed again just before each row)")
    parser.add_argument("--cpu", choices=["native", "avx2"], default="native",
                        help="avx2: run as on an AVX2 CPU without VNNI (emulated: benchmarks/cpu.py)")
    parser.add_argument("--json", help=argparse.SUPPRESS)  # where a --runs child writes its rows
    args = parser.parse_args()
    if args.runs > 1:
        return run_processes(args)
    from threadpoolctl import threadpool_limits

    if args.threads:
        torch.set_num_threads(args.threads)
        threadpool_limits(limits=args.threads)
    print(f"CPU: {describe()}")
    print(f"torch threads: {torch.get_num_threads()}, BLAS threads: "
          f"{max(p['num_threads'] for p in threadpoolctl_info())}, device: cpu\n")
    print("| n | d | method | seconds | Flower FedAvg, its reference | ratio | CPU-time ratio | "
          "peak extra memory (x n*d*4 bytes) |")
    print("|---|---|---|---|---|---|---|---|")
    skipped, all_rows = [], []
    for n in args.n:
        for d in args.d:
            if n * d * 4 / 2**30 > args.max_gb:
                skipped.append((n, d))
                continue
            for r in bench(n, d, args.repeats, args.skip_flower_krum_above, args.only, not args.single_reference):
                all_rows.append(r)
                print(f"| {r['n']} | {r['d']} | {r['method']} | {r['seconds']:.4f} | {r['reference_seconds']:.4f} | "
                      f"{r['ratio']:.3f} | {r['cpu_ratio']:.3f} | {r['peak_extra']:.2f} |", flush=True)
    print(f"\nkernels chosen: {cpu_kernels.summary()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": all_rows, "kernels": cpu_kernels.summary()}))
    for n, d in skipped:
        print(f"\nskipped n={n}, d={d}: the matrix alone is {n * d * 4 / 2**30:.1f} GiB (--max-gb {args.max_gb})")


def run_processes(args: argparse.Namespace) -> None:
    """``--runs K``: the measurement in K fresh processes, one after another; per method the
    median seconds and the lowest, median and highest ratio over the runs."""
    per_run = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.runs):
            out = Path(tmp) / f"run{k}.json"
            # the same arguments, the last --runs (1) overriding the caller's
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--runs", "1", "--json", str(out)],
                           check=True, stdout=subprocess.DEVNULL)
            per_run.append(json.loads(out.read_text()))
            print(f"run {k + 1} of {args.runs} done", file=sys.stderr, flush=True)
    print(f"CPU: {describe()}")
    for k, run in enumerate(per_run):
        print(f"kernels chosen in run {k + 1}: {run['kernels']}")
    per_run = [run["rows"] for run in per_run]
    print(f"{args.runs} runs, each in a fresh process; torch and BLAS threads: {args.threads or 'default'}\n")
    print("| n | d | method | median seconds | its reference, median | ratio, lowest | ratio, median | ratio, highest "
          "| CPU-time ratio, lowest-highest | peak extra memory, highest |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for j, row in enumerate(per_run[0]):
        same = [run[j] for run in per_run]
        ratios = sorted(r["ratio"] for r in same)
        secs = statistics.median(r["seconds"] for r in same)
        ref = statistics.median(r["reference_seconds"] for r in same)
        cpu = sorted(r["cpu_ratio"] for r in same)
        print(f"| {row['n']} | {row['d']} | {row['method']} | {secs:.4f} | {ref:.4f} | {ratios[0]:.3f} | "
              f"{statistics.median(ratios):.3f} | {ratios[-1]:.3f} | {cpu[0]:.3f}-{cpu[-1]:.3f} | "
              f"{max(r['peak_extra'] for r in same):.2f} |")


def threadpoolctl_info() -> list[dict]:
    from threadpoolctl import threadpool_info

    return threadpool_info() or [{"num_threads": 1}]


if __name__ == "__main__":
    main()
