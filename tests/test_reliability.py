"""Determinism and checkpoint/resume, on real simulations (a real kill included)."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

BASE = "defense='foolsgold' malicious-fraction=0.3 local-epochs=1"
ROUNDS = 10


def _run(tmp_path: Path, name: str, extra: str = "", **popen) -> subprocess.Popen:
    cfg = f"{BASE} num-server-rounds={ROUNDS} results-dir='{tmp_path}' run-name='{name}' {extra}"
    return subprocess.Popen([sys.executable, "-m", "simulation.run", "--run-config", cfg], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            **popen)


def _finish(proc: subprocess.Popen, timeout=400) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def _arrays(folder: Path):
    with open(folder / "checkpoint.pkl", "rb") as fh:
        return pickle.load(fh)


def test_same_config_same_results_files(tmp_path):
    a, b = _run(tmp_path, "a"), _run(tmp_path, "b")
    _finish(a), _finish(b)
    assert (tmp_path / "a" / "rounds.jsonl").read_bytes() == (tmp_path / "b" / "rounds.jsonl").read_bytes()
    sa, sb = (json.loads((tmp_path / r / "summary.json").read_text()) for r in "ab")
    assert sa["config"].pop("run-name") == "a" and sb["config"].pop("run-name") == "b"
    assert sa == sb
    for x, y in zip(_arrays(tmp_path / "a")["arrays"], _arrays(tmp_path / "b")["arrays"]):
        np.testing.assert_array_equal(x, y)


def test_killed_run_resumes_to_the_uninterrupted_parameters(tmp_path):
    reference = _run(tmp_path, "reference")
    _finish(reference)
    victim = _run(tmp_path, "victim")
    ckpt = tmp_path / "victim" / "checkpoint.pkl"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill it for real once round 2 is checkpointed
        if ckpt.exists():
            try:
                if _arrays(tmp_path / "victim")["round"] >= 2:
                    break
            except (EOFError, pickle.UnpicklingError):
                pass
        time.sleep(0.02)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    killed_at = _arrays(tmp_path / "victim")["round"]
    assert 2 <= killed_at < ROUNDS, "the run finished before it could be killed"
    _finish(_run(tmp_path, "victim", "resume=true"))
    final, expected = _arrays(tmp_path / "victim"), _arrays(tmp_path / "reference")
    assert final["round"] == expected["round"] == ROUNDS
    for x, y in zip(final["arrays"], expected["arrays"]):
        np.testing.assert_array_equal(x, y)
    # FoolsGold's per-client history survived the kill too
    assert final["defense"]["defense"]["history"].keys() == expected["defense"]["defense"]["history"].keys()
    rounds = [json.loads(line)["round"] for line in (tmp_path / "victim" / "rounds.jsonl").read_text().splitlines()]
    assert rounds == list(range(ROUNDS + 1))
    ref_rows = (tmp_path / "reference" / "rounds.jsonl").read_text().splitlines()
    vic_rows = (tmp_path / "victim" / "rounds.jsonl").read_text().splitlines()
    assert [json.loads(r)["accuracy"] for r in vic_rows] == [json.loads(r)["accuracy"] for r in ref_rows]
