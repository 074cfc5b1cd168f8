"""fl-defense: experiments on simulated federations (also python -m simulation).

    fl-defense run <grid.toml> [--out DIR] [--shard i/k]  run a grid (or shard i of k), resumable
    fl-defense report <runs folder> [--out DIR]  tables and plots from a folder of runs (several: merged)
    fl-defense leaderboard [--grid FILE] [--results DIR] [--shard i/k] [--report-only]
                                                 every defense x attack under the protocol, and its page
    fl-defense stop-superlink                    stop the SuperLink `flwr run .` started (this FLWR_HOME's)

One run: python -m simulation.run --run-config "defense='rlr' num-server-rounds=5".
A failure ends with one line, "[fl-defense] FAILED: <reason>"; exit status 1 (2: a bad configuration).
"""

import sys

FAILED = "[fl-defense] FAILED: "


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].endswith(".toml"):
        argv = ["run", *argv]
    if not argv or argv[0] not in ("run", "report", "leaderboard", "stop-superlink"):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    from fl_defense.config import ConfigError

    from .grid import CellFailed

    try:
        if argv[0] == "run":
            from .grid import main as run_main

            run_main(argv[1:])
        elif argv[0] == "report":
            from .report import main as report_main

            report_main(argv[1:])
        elif argv[0] == "leaderboard":
            from .leaderboard import main as leaderboard_main

            leaderboard_main(argv[1:])
        else:
            from .superlink import main as stop_main

            stop_main(argv[1:])
    except ConfigError as exc:
        print(f"{FAILED}{exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    except (CellFailed, FileNotFoundError) as exc:  # a failed cell, a missing grid file or runs folder
        print(f"{FAILED}{exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{FAILED}interrupted (a grid resumes where it stopped when run again)", file=sys.stderr, flush=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
