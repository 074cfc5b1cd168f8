"""The managed local SuperLink that `flwr run .` starts and leaves running in the background."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def stop_managed_superlink(flwr_home: str | Path, timeout: float = 5.0) -> list[int]:
    """Stop the SuperLink whose state lives under ``flwr_home`` (found by its command line), with
    its process group, and wait for it to exit. Returns the process ids it stopped."""
    found = subprocess.run(["pgrep", "-f", f"flower-superlink.*{flwr_home}"], capture_output=True, text=True)
    stopped = []
    for pid in map(int, found.stdout.split()):
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
