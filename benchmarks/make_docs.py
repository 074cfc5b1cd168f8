"""Regenerate docs/results/<suite>/ (report.md, table.csv, plots) from results/benchmarks/<suite>,
and docs/results/<grid>/ from the shipped paper grids' runs in results/grids/<grid>.

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

GRIDS = {
    "rlr_fmnist_iid": "RLR paper, table 1 setting, reduced: Fashion-MNIST, iid, 10 clients, 1 attacker (plus trigger, "
                      "poison rate 0.5), theta 4, 20 rounds of 1 local epoch, 3 seeds",
    "rlr_fmnist_iid_allclass": "rlr_fmnist_iid with the trigger on every class (not only the paper's base class)",
    "fdcr_dirichlet": "FDCR paper, table 4 settings, reduced: Fashion-MNIST (6 rounds of 1 epoch) and USPS (15 rounds "
                      "of 2 epochs), Dirichlet 0.5 / 0.3, 20% / 30% attackers (plus trigger, poison rate 0.5)",
    "fedward_nir": "Fedward's non-IID-rate settings, reduced: MNIST, NIR 0.25 / 0.5 / 0.75, 40% attackers with a "
                   "4-piece DBA of the plus trigger, 8 rounds of 1 local epoch",
}
MACHINE = "a 2-core AMD EPYC CPU (x86-64, AVX-512), 24 GiB, no GPU; torch 2.13.0 (CPU), flwr 1.41.0"


def main() -> None:
    jobs = [(ROOT / "results" / "grids" / grid, grid, title,
             f"Produced on {MACHINE}, with `python -m simulation simulation/grids/{grid}.toml` (every cell "
             f"through Flower's simulation engine, two client actors with one CPU each) and "
             f"`python benchmarks/make_docs.py`. How this compares with the paper: [README.md](README.md).")
            for grid, title in GRIDS.items()]
    jobs += [(ROOT / "results" / "benchmarks" / suite, suite, title,
              f"Produced on a 2-core CPU machine (no GPU) with `python benchmarks/flwr_runs.py {suite}` "
              f"(every run through `flwr run .` and Flower's simulation engine) and "
              f"`python benchmarks/make_docs.py`. One seed (42) per cell.")
             for suite, title in TITLES.items()]
    for src, name, title, note in jobs:
        if src.is_dir() and run_folders(src):
            print(write_report(src, ROOT / "docs" / "results" / name, title, note))


if __name__ == "__main__":
    main()
