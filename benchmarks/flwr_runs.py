"""Run `flwr run .` for a list of cells and print one Markdown table of their final figures.

Each cell is a set of run-config overrides; every run goes through Flower's simulation engine
exactly as a user runs it (managed local SuperLink, `--stream`), writes its own results folder, and
the table is read back from the `summary.json` files. The SuperLink this starts is stopped at the
end (by process id).

    python benchmarks/flwr_runs.py rlr-digits     # FedAvg vs RLR on digits (issue 2)
    python benchmarks/flwr_runs.py rlr-fmnist     # FedAvg vs RLR on fashion_mnist (issue 2)
    python benchmarks/flwr_runs.py seed-fmnist    # every seed defense, FDCR's setting (issue 3)
    python benchmarks/flwr_runs.py seed-usps      # the same on usps (issue 3)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from simulation.superlink import stop_managed_superlink  # noqa: E402

DATA = os.environ.get("FL_DEFENSE_DATA", str(ROOT.parent / "shared" / "data"))

RLR_SETTING = {"malicious-fraction": 0.1, "poison-rate": 0.5, "rlr-theta": 4, "partitioner": "iid", "attack": "plus"}

# FDCR's table-4 setting reduced for 2 cores: Dirichlet 0.5, 10 clients, 30% attackers, poison rate
# 0.5. Every cell holds out the same 2% server split (SDFC's validation set), so all defenses see
# identical client data.
FDCR_SETTING = {"partitioner": "dirichlet", "dirichlet-alpha": 0.5, "malicious-fraction": 0.3, "poison-rate": 0.5,
                "attack": "plus", "server-fraction": 0.02, "rlr-theta": 4, "batch-size": 64}
SEED_DEFENSES = ("fedavg", "rlr", "fdcr", "sdfc", "fedward")


def _seed_suite(dataset: str, rounds: int) -> list[dict]:
    base = {**FDCR_SETTING, "dataset": dataset, "data-dir": DATA, "num-server-rounds": rounds}
    return [{**base, "defense": d} for d in SEED_DEFENSES] + [{**base, "defense": "fedavg", "attack": "none"}]


BASELINES = ("krum", "bulyan", "median", "trimmed_mean", "norm_clipping", "signsgd", "foolsgold", "flame", "fltrust")
# Per-baseline settings the FDCR setting needs: f = 3 attackers for Krum; Bulyan needs n >= 4f + 3, so
# f = 1 is the most 10 clients allow; the clipping bound and signSGD step are the usual choices.
BASELINE_EXTRA = {"krum": {"num-malicious": 3, "krum-keep": 0}, "bulyan": {"num-malicious": 1},
                  "norm_clipping": {"clip-norm": 1.0, "noise": 0.001}, "signsgd": {"sign-lr": 0.001}}
ATTACKS = {  # every targeted attack against FedAvg (issue 5); DBA needs one attacker per piece
    "plus": {}, "square": {}, "pixel": {}, "corner": {}, "blend": {"blend-ratio": 0.1},
    "dba": {"malicious-fraction": 0.4, "dba-pieces": 4}, "semantic": {"base-label": 1, "poison-rate": 1.0},
    "plus-boost": {"attack": "plus", "model-poisoning": "boost", "boost-factor": 5.0},
    "plus-pgd": {"attack": "plus", "model-poisoning": "pgd", "attack-norm-bound": 2.0},
    "plus-neurotoxin": {"attack": "plus", "model-poisoning": "neurotoxin", "neurotoxin-ratio": 0.1},
}


def _baseline_suite(dataset: str, rounds: int) -> list[dict]:
    base = {**FDCR_SETTING, "dataset": dataset, "data-dir": DATA, "num-server-rounds": rounds}
    return [{**base, "defense": d, **BASELINE_EXTRA.get(d, {})} for d in BASELINES]


def _attack_suite(dataset: str, rounds: int, setting: dict) -> list[dict]:
    base = {**setting, "dataset": dataset, "data-dir": DATA, "num-server-rounds": rounds, "defense": "fedavg"}
    return [{**base, "attack": name, **over} for name, over in ATTACKS.items()]


SUITES: dict[str, list[dict]] = {
    "baselines-usps": _baseline_suite("usps", 30),
    "baselines-fmnist": _baseline_suite("fashion_mnist", 20),
    # digits: the RLR setting (iid, 1 attacker in 10); fashion_mnist: the FDCR setting of the defense
    # tables (Dirichlet 0.5, 30% attackers), so its plus cell is the seed-fmnist FedAvg cell.
    "attacks-digits": _attack_suite("digits", 40, RLR_SETTING),
    "attacks-fmnist": _attack_suite("fashion_mnist", 20, FDCR_SETTING),
    "seed-fmnist": _seed_suite("fashion_mnist", 20),
    "seed-usps": _seed_suite("usps", 30),
    "rlr-digits": [
        {**RLR_SETTING, "dataset": "digits", "num-server-rounds": 40, "defense": d} for d in ("fedavg", "rlr")
    ] + [{**RLR_SETTING, "dataset": "digits", "num-server-rounds": 40, "defense": "fedavg", "attack": "none"}],
    "rlr-fmnist": [
        {**RLR_SETTING, "dataset": "fashion_mnist", "data-dir": DATA, "num-server-rounds": 20,
         "batch-size": 64, "defense": d} for d in ("fedavg", "rlr")
    ] + [{**RLR_SETTING, "dataset": "fashion_mnist", "data-dir": DATA, "num-server-rounds": 20,
          "batch-size": 64, "defense": "fedavg", "attack": "none"}],
}


def toml_value(v) -> str:
    return f"'{v}'" if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)


def snapshot(out: Path) -> Path:
    """Copy the app as it is now, so every cell of a long suite runs the same code even while the
    working tree changes."""
    dest = out / "app"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns("results", ".git", ".venv*", "__pycache__", "*.egg-info"))
    return dest


def run_cell(cell: dict, out: Path, num_supernodes: int, env: dict, app: Path = ROOT, suffix: str = "") -> dict:
    name = "-".join(str(cell[k]) for k in ("defense", "dataset", "attack"))
    name += f"-{cell['model-poisoning']}" if cell.get("model-poisoning", "none") != "none" else ""
    name += f"-s{cell.get('seed', 42)}{suffix}"
    overrides = {**cell, "results-dir": str(out), "run-name": name}
    summary_path = out / name / "summary.json"
    if summary_path.exists() and json.loads(summary_path.read_text())["config"].items() >= \
            {k: v for k, v in overrides.items() if k not in ("results-dir",)}.items():
        summary = json.loads(summary_path.read_text())  # this cell already ran: reuse it
        summary["name"], summary["wall"] = name, float("nan")
        return summary
    cmd = ["flwr", "run", str(app), "--stream", "--federation-config",
           f"num-supernodes={num_supernodes} client-resources-num-cpus=1",
           "--run-config", " ".join(f"{k}={toml_value(v)}" for k, v in overrides.items())]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.startswith("[fl-defense]"):
            print(line, flush=True)
    summary_path = out / name / "summary.json"
    if proc.returncode != 0 or not summary_path.exists():
        raise SystemExit(f"run {name} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    summary = json.loads(summary_path.read_text())
    summary["name"], summary["wall"] = name, time.time() - t0
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("--out", help="results folder (default: results/benchmarks/<suite>)")
    parser.add_argument("--num-supernodes", type=int, default=10)
    args = parser.parse_args()
    out = Path(args.out or ROOT / "results" / "benchmarks" / args.suite).resolve()
    flwr_home = out.parent / "flwr_home"
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    rows = []
    app = snapshot(out)
    try:
        for cell in SUITES[args.suite]:
            rows.append(run_cell(cell, out, args.num_supernodes, env, app))
    finally:
        stop_managed_superlink(flwr_home)
    print("\n| dataset | attack | model poisoning | defense | rounds | accuracy | attack success | TPR (final / mean) | FPR (final / mean) | wall (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s in rows:
        c, f, m = s["config"], s["final"], s.get("mean_over_rounds", {})
        extra = "".join(f", {k[4:]} {_fmt(f[k])}" for k in sorted(f) if k.startswith("asr_piece"))
        print(f"| {c['dataset']} | {c['attack']}{extra} | {c['model-poisoning']} | {c['defense']} | {s['rounds_completed']} | {f['accuracy']:.3f} | "
              f"{_fmt(f['attack_success_rate'])} | {_fmt(f.get('tpr'))} / {_fmt(m.get('tpr'))} | "
              f"{_fmt(f.get('fpr'))} / {_fmt(m.get('fpr'))} | {s['wall']:.0f} |")


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    main()
