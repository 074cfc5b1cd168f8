"""End to end: a real Flower simulation on digits writes per-round and summary results."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from simulation.superlink import stop_managed_superlink

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _check_results(folder: Path, rounds: int, defense: str, attackers: int = 1):
    lines = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == list(range(rounds + 1))
    for r in lines[1:]:
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["attack_success_rate"] <= 1.0
        assert r["num_clients"] == 10 and r["num_rejected"] == 0
        # the attackers (malicious-fraction of 10), known to the evaluation layer only
        assert sum(bool(c["malicious"]) for c in r["clients"]) == attackers
        assert abs(sum(c["weight"] for c in r["clients"]) - 1.0) < 1e-6
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["config"]["defense"] == defense and summary["config"]["num-server-rounds"] == rounds
    assert summary["rounds_completed"] == rounds
    assert summary["final"]["accuracy"] == lines[-1]["accuracy"]
    assert len(summary["attacker_partitions_seen"]) == attackers
    return lines


@pytest.mark.parametrize("defense, extra", [
    ("rlr", {}), ("fdcr", {}), ("sdfc", {}), ("fedward", {}), ("fltrust", {}),
    ("rlr", {"rlr-aggregator": "flame"}),  # composition: RLR on top of FLAME
    ("krum", {"krum-keep": 5, "clip-norm": 2.0, "noise": 0.001}),  # Multi-Krum inside the clip/noise wrapper
], ids=["rlr", "fdcr", "sdfc", "fedward", "fltrust", "rlr+flame", "multikrum+clip"])
def test_run_simulation_in_process(tmp_path, defense, extra):
    from flwr.client import ClientApp
    from flwr.server import ServerApp
    from flwr.simulation import run_simulation

    import client_app.app as ca
    import server_app.app as sa

    overrides = {"num-server-rounds": 2, "results-dir": str(tmp_path), "run-name": "e2e", "defense": defense,
                 "malicious-fraction": 0.3, "server-fraction": 0.05, **extra}

    def server_fn(context):
        return sa.build_components({**context.run_config, **overrides}, num_nodes=10)

    def client_fn(context):
        return ca.build_client({**context.run_config, **overrides}, context.node_config)

    run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
                   num_supernodes=10, backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    lines = _check_results(tmp_path / "e2e", 2, defense, attackers=3)
    assert lines[-1]["accuracy"] > lines[0]["accuracy"]  # it learns
    if defense != "rlr" or extra:  # detectors report TPR and FPR
        assert lines[-1]["tpr"] is not None and lines[-1]["fpr"] is not None


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.skipif(not _port_free(39093), reason="a SuperLink already listens on the local ports")
def test_flwr_run_with_managed_superlink(tmp_path):
    """`flwr run . --stream` exactly as the README says; the SuperLink it starts is stopped after."""
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr_home"),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    flwr = Path(sys.executable).with_name("flwr")
    cmd = [str(flwr), "run", ".", "--stream", "--run-config",
           f"num-server-rounds=2 defense='fedavg' results-dir='{tmp_path}' run-name='cli'",
           "--federation-config", "num-supernodes=10 client-resources-num-cpus=1"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-3000:]
        assert "[fl-defense] round   2 | accuracy" in out
        _check_results(tmp_path / "cli", 2, "fedavg")
    finally:
        stop_managed_superlink(tmp_path / "flwr_home")


def test_the_app_bundle_flwr_run_ships_holds_the_app_and_stays_under_flowers_limit():
    """`flwr run .` packs the checkout into a FAB of at most FAB_MAX_SIZE; the committed leaderboard
    records alone outgrow it, so pyproject's fab-exclude leaves out what no run reads."""
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk
    from flwr.common.constant import FAB_MAX_SIZE

    fab = build_fab_from_disk(ROOT)
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert len(fab) < FAB_MAX_SIZE // 4
    for needed in ("fl_defense/rounds.py", "client_app/app.py", "server_app/app.py", "simulation/run.py"):
        assert needed in names
    assert not any(n.startswith(("docs/", "tests/", "benchmarks/")) for n in names)
