"""Round time, Fisher payload and memory of whole simulated rounds (issue 7), through `flwr run .`.

    python benchmarks/scale.py overhead   # 100 clients every round: FedAvg vs RLR, FLAME, FDCR (+ fewer Fisher samples)
    python benchmarks/scale.py overhead-epochs   # the same with 5 local epochs: FedAvg vs FDCR
    python benchmarks/scale.py scale      # 1000 clients, 10% sampled, 5 rounds; FDCR's Fisher in float32 and float16

Each cell is one `flwr run .` (Flower's simulation engine, managed local SuperLink, Ray actors
with one CPU each) of fashion_mnist with the small CNN (105,866 parameters), iid, 10% attackers
with the plus trigger. Per cell it prints the first round's time and the mean over the later rounds (from the
run's own timings.jsonl: the ServerApp's wall time from the end of one round's central evaluation
to the end of the next; the first round also starts the client actors), the mean aggregation time, the ratio of the round time to FedAvg's
with the same clients, the peak total RSS of every process of the run (the SuperLink, the
simulation process with the ServerApp, Ray and its client actors; sampled from /proc every 0.5 s),
and the Fisher payload each client ships (header + one value per trainable parameter).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import numpy as np  # noqa: E402
from flwr_runs import DATA, run_cell, snapshot  # noqa: E402

from fl_defense.fisher import encode_fisher  # noqa: E402
from simulation.superlink import stop_managed_superlink  # noqa: E402

BASE = {"dataset": "fashion_mnist", "data-dir": DATA, "model": "cnn_small", "partitioner": "iid", "attack": "plus",
        "malicious-fraction": 0.1, "poison-rate": 0.5, "local-epochs": 1, "batch-size": 64, "rlr-theta": 4}
SUITES = {
    "overhead": (100, [{**BASE, "num-server-rounds": 3, "defense": d} for d in ("fedavg", "rlr", "flame", "fdcr")]
                 + [{**BASE, "num-server-rounds": 3, "defense": "fdcr", "fisher-samples": k} for k in (128, 64)]),
    # FDCR's paper trains 10 local epochs: the clients' Fisher is a smaller share of a longer round
    "overhead-epochs": (100, [{**BASE, "num-server-rounds": 3, "local-epochs": 5, "defense": d} for d in ("fedavg", "fdcr")]),
    "scale": (1000, [{**BASE, "num-server-rounds": 5, "fraction-fit": 0.1, "defense": "fedavg"},
                     {**BASE, "num-server-rounds": 5, "fraction-fit": 0.1, "defense": "fdcr"},
                     {**BASE, "num-server-rounds": 5, "fraction-fit": 0.1, "defense": "fdcr", "fisher-half": True}]),
}
CNN_SMALL_PARAMETERS = 105_866


class TreeRSS:
    """Peak of the summed RSS of a process and all its descendants, sampled in a thread."""

    def __init__(self, pattern: str, every: float = 0.5) -> None:
        self.pattern, self.every, self.peak, self.processes = pattern, every, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            roots = subprocess.run(["pgrep", "-f", self.pattern], capture_output=True, text=True).stdout.split()
            if not roots:
                continue
            pids = _descendants({int(p) for p in roots})
            self.peak = max(self.peak, sum(_rss(p) for p in pids))
            self.processes = max(self.processes, len(pids))


def _descendants(roots: set[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    seen, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(children.get(pid, []))
    return seen


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _suffix(cell: dict) -> str:
    """What tells a cell's run folder from another of the same defense (see flwr_runs.run_cell)."""
    return ("-fisher16" if cell.get("fisher-half") else "") + \
        (f"-fs{cell['fisher-samples']}" if "fisher-samples" in cell else "") + \
        (f"-e{cell['local-epochs']}" if cell["local-epochs"] != 1 else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("--out", help="results folder (default: results/benchmarks/<suite>)")
    args = parser.parse_args()
    num_nodes, cells = SUITES[args.suite]
    out = Path(args.out or ROOT / "results" / "benchmarks" / args.suite).resolve()
    flwr_home = out.parent / f"flwr_home_{args.suite}"  # its own SuperLink: stopped between cells
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    app = snapshot(out)
    rows = []
    try:
        for cell in cells:
            stop_managed_superlink(flwr_home)  # each cell's memory is its own: a fresh SuperLink
            with TreeRSS(f"flower-superlink.*{flwr_home}") as rss:
                summary = run_cell(cell, out, num_nodes, env, app, suffix=_suffix(cell))
            run_dir = out / summary["name"]
            memory = run_dir / "peak_rss.json"
            if rss.peak:  # a reused cell keeps the peak measured when it ran
                memory.write_text(json.dumps({"peak_rss": rss.peak, "processes": rss.processes}))
            mem = json.loads(memory.read_text()) if memory.exists() else {"peak_rss": 0, "processes": 0}
            timings = [json.loads(line) for line in (run_dir / "timings.jsonl").read_text().splitlines()]
            # round 1 also starts the client actors and loads their data: steady rounds are 2..R
            steady = [t for t in timings if t["round"] >= 2]
            first = next(t for t in timings if t["round"] == 1)
            rows.append({"cell": cell, "summary": summary, **mem, "first": first["round_seconds"],
                         "round": sum(t["round_seconds"] for t in steady) / len(steady),
                         "agg": sum(t.get("aggregation_seconds", 0.0) for t in steady) / len(steady)})
    finally:
        stop_managed_superlink(flwr_home)
    ref = rows[0]["round"]
    print(f"\n{num_nodes} clients, fraction-fit {cells[0].get('fraction-fit', 1.0):g}; {os.cpu_count()} CPUs, "
          f"one per client actor; peak RSS summed over up to {max(r['processes'] for r in rows)} processes\n")
    print("| defense | Fisher payload per client (bytes) | first round (s) | mean round 2.. (s) | ratio to FedAvg round "
          "| mean aggregation (s) | peak RSS, all processes (GiB) | accuracy |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        c = r["cell"]
        needs = c["defense"] in ("fdcr", "sdfc")
        payload = "-" if not needs else str(len(encode_fisher(np.zeros(CNN_SMALL_PARAMETERS), half=c.get("fisher-half", False))))
        label = c["defense"] + (" (Fisher float16)" if c.get("fisher-half") else "") \
            + (f" (fisher-samples {c['fisher-samples']})" if "fisher-samples" in c else "") \
            + (f" ({c['local-epochs']} local epochs)" if c["local-epochs"] != 1 else "")
        print(f"| {label} | {payload} | {r['first']:.2f} | {r['round']:.2f} | {r['round'] / ref:.2f} | {r['agg']:.4f} | "
              f"{r['peak_rss'] / 2**30:.2f} | {r['summary']['final']['accuracy']:.3f} |")


if __name__ == "__main__":
    main()
