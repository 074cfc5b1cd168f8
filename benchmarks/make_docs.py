"""Regenerate docs/results/<suite>/ (report.md, table.csv, plots) from results/benchmarks/<suite>.

    python benchmarks/make_docs.py
"""

from pathlib import Path

from simulation.report import run_folders, write_report

ROOT = Path(__file__).resolve().parents[1]

TITLES = {
    "rlr-digits": "Issue 2: FedAvg vs RLR on digits (iid, 10 clients, 1 attacker, plus trigger, poison rate 0.5, theta 4)",
    "rlr-fmnist": "Issue 2: FedAvg vs RLR on Fashion-MNIST (iid, 10 clients, 1 attacker, plus trigger, poison rate 0.5, theta 4)",
    "seed-usps": "Issue 3: seed defenses on USPS (Dirichlet 0.5, 10 clients, 30% attackers, poison rate 0.5)",
    "seed-fmnist": "Issue 3: seed defenses on Fashion-MNIST (Dirichlet 0.5, 10 clients, 30% attackers, poison rate 0.5)",
    "attacks-digits": "Issue 5: every targeted attack against FedAvg on digits (iid, 10 clients)",
    "attacks-fmnist": "Issue 5: every targeted attack against FedAvg on Fashion-MNIST (the seed-defense setting: "
                      "Dirichlet 0.5, 10 clients, 30% attackers, 40% for 4-piece DBA)",
    "baselines-usps": "Issue 4: baselines on USPS in the seed-defense setting",
    "baselines-fmnist": "Issue 4: baselines on Fashion-MNIST in the seed-defense setting (Dirichlet 0.5, 10 clients, "
                        "30% attackers, poison rate 0.5)",
}


def main() -> None:
    for suite, title in TITLES.items():
        src = ROOT / "results" / "benchmarks" / suite
        if src.is_dir() and run_folders(src):
            note = (f"Produced on a 2-core CPU machine (no GPU) with `python benchmarks/flwr_runs.py {suite}` "
                    f"(every run through `flwr run .` and Flower's simulation engine) and "
                    f"`python benchmarks/make_docs.py`. One seed (42) per cell.")
            print(write_report(src, ROOT / "docs" / "results" / suite, title, note))


if __name__ == "__main__":
    main()
