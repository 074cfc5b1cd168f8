"""The managed local SuperLink that `flwr run .` starts and leaves running in the background.

    fl-defense stop-superlink        # the one under $FLWR_HOME (default ~/.flwr), no other

Flower starts it as ``flower-superlink ... --log-file <FLWR_HOME>/local-superlink/superlink.log``,
so that path in its command line tells it apart from every other SuperLink on the machine.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path


def flwr_home() -> Path:
    """Where Flower keeps its state: $FLWR_HOME as given, else ~/.flwr (as Flower decides it)."""
    return Path(os.environ["FLWR_HOME"]) if os.environ.get("FLWR_HOME") else Path.home() / ".flwr"


def managed_superlinks(home: str | Path) -> list[int]:
    """Process ids of the SuperLinks `flwr run` started with its state under ``home``."""
    log_file = str(Path(home) / "local-superlink" / "superlink.log")
    found = subprocess.run(["pgrep", "-f", f"flower-superlink .*--log-file {re.escape(log_file)}( |$)"],
                           capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def stop_managed_superlink(flwr_home: str | Path, timeout: float = 5.0) -> list[int]:
    """Stop the SuperLink whose state lives under ``flwr_home`` (found by its command line), with
    its process group, and wait for it to exit. Returns the process ids it stopped."""
    stopped = []
    for pid in managed_superlinks(flwr_home):
        try:
            os.killpg(os.getpgid(pid), signal.SIGTERM)
        except ProcessLookupError:
            continue
        stopped.append(pid)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
    return stopped


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="fl-defense stop-superlink", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flwr-home", help="the FLWR_HOME the SuperLink was started with (default: $FLWR_HOME "
                                            "or ~/.flwr)")
    args = parser.parse_args(argv)
    home = Path(args.flwr_home) if args.flwr_home else flwr_home()
    stopped = stop_managed_superlink(home)
    if stopped:
        print(f"stopped the SuperLink of {home} (process {', '.join(map(str, stopped))})")
    else:
        print(f"no SuperLink runs with its state in {home}")
