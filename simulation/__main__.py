"""python -m simulation run <grid.toml> | python -m simulation report <runs folder> (also: python -m simulation
<grid.toml>; installed, the console script ``fl-defense`` takes the same arguments)."""

import sys


def main() -> None:
    argv = sys.argv[1:]
    if argv and argv[0].endswith(".toml"):
        argv = ["run", *argv]
    if not argv or argv[0] not in ("run", "report"):
        raise SystemExit(__doc__)
    if argv[0] == "run":
        from .grid import main as run_main

        run_main(argv[1:])
    else:
        from .report import main as report_main

        report_main(argv[1:])


if __name__ == "__main__":
    main()
