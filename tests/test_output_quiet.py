"""Our entry points show our lines and a progress bar; Flower's and Ray's output goes to
flower.log in the run's results folder unless --verbose."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
RUN = "defense='fedavg' num-server-rounds=1 local-epochs=1"
# what Flower and Ray print: log levels, Ray's FutureWarning, the deprecation notice, the history dump
FLOWER = ("INFO ", "WARNING ", "FutureWarning", "DEPRECATED", "[SUMMARY]", "History (", "ray/_private",
          "Starting Flower")


def _run(tmp_path, *extra):
    proc = subprocess.run([sys.executable, "-m", "simulation.run", "--run-config",
                           f"{RUN} results-dir='{tmp_path}' run-name='q'", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, proc.stderr


def test_a_quiet_run_shows_our_lines_and_a_bar_and_logs_flowers_output(tmp_path):
    out, err = _run(tmp_path)
    lines = out.splitlines()
    assert lines and all(line.startswith("[fl-defense] ") for line in lines), out
    assert lines[0].startswith("[fl-defense] starting a simulated federation of 10 clients, 1 rounds")
    assert any(line.startswith("[fl-defense] round   0 (initial model, untrained) | accuracy") for line in lines)
    assert any(line.startswith("[fl-defense] round   1 | accuracy") for line in lines)
    assert lines[-1].startswith("[fl-defense] done: 1 rounds, accuracy") and str(tmp_path / "q") in lines[-1]
    bar = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert bar and all(line.startswith("rounds:") for line in bar), err  # stderr: the progress bar only
    assert "1/1" in bar[-1]
    assert not any(word in out + err for word in FLOWER)
    log = (tmp_path / "q" / "flower.log").read_text()
    assert "Starting Flower ServerApp" in log and "[SUMMARY]" in log and "[fl-defense] round   1" in log


def test_verbose_shows_flowers_output_instead_of_the_bar(tmp_path):
    out, err = _run(tmp_path, "--verbose")
    assert "Starting Flower ServerApp" in out and "[SUMMARY]" in out
    assert "[fl-defense] round   1 | accuracy" in out and out.splitlines()[-1].startswith("[fl-defense] done:")
    assert "rounds:" not in err
    assert "[SUMMARY]" in (tmp_path / "q" / "flower.log").read_text()
