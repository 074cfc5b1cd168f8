"""Print RLR's theta trade-off table (``fl_defense.defenses.rlr.theta_tradeoff``) for a federation:

    python -m fl_defense.defenses.rlr_theta --clients 10 --attackers 3
    python -m fl_defense.defenses.rlr_theta --clients 10 --population 100 --malicious 10

(A module of its own so that ``-m`` does not run rlr.py a second time beside the registry's import.)
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .rlr import attackers_per_round, format_tradeoff, theta_tradeoff


def main(argv: Sequence[str] | None = None) -> None:
    """Print the theta trade-off table for a federation (``python -m fl_defense.defenses.rlr_theta -h``)."""
    parser = argparse.ArgumentParser(prog="python -m fl_defense.defenses.rlr_theta",
                                     description="RLR: how often coordinates keep +eta, for every theta.")
    parser.add_argument("--clients", type=int, required=True, help="clients sampled per round")
    parser.add_argument("--attackers", type=int, help="attackers among them (every round)")
    parser.add_argument("--population", type=int, help="with --malicious: clients in the federation, "
                        "--clients of them sampled per round (attackers per round hypergeometric)")
    parser.add_argument("--malicious", type=int, help="attackers in the federation (with --population)")
    parser.add_argument("--consensus", type=float, nargs="*", default=[0.7, 0.8, 0.9],
                        help="benign agreement probabilities q to tabulate (default 0.7 0.8 0.9)")
    args = parser.parse_args(argv)
    if (args.attackers is None) == (args.population is None or args.malicious is None):
        parser.error("give either --attackers, or --population and --malicious")
    try:
        if args.attackers is not None:
            attackers: int | dict[int, float] = args.attackers
            what = f"{args.clients} clients per round, {args.attackers} of them attackers"
        else:
            attackers = attackers_per_round(args.population, args.malicious, args.clients)
            what = (f"{args.clients} of {args.population} clients per round, {args.malicious} attackers in "
                    f"the federation (per round: " + ", ".join(f"{a}: {p:.3f}" for a, p in attackers.items()) + ")")
        table = format_tradeoff(theta_tradeoff(args.clients, attackers, consensus=args.consensus))
    except ValueError as err:
        parser.error(str(err))
    print(what)
    print(table)


if __name__ == "__main__":
    main()
