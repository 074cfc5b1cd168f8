"""The examples/ apps, written as a Flower user writes them, run for two rounds in process.

The Message-API app runs FDCR with the client-side Fisher helper (its model changing proves the
Fisher was accepted: without it every update is rejected and the model never moves); the legacy
app runs RLR over NumPyClients with Flower's own client-metric aggregation.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(app_dir: str, package: str, monkeypatch):
    """Import an example app as `flwr run` would (its folder on the path, for Ray's workers too)."""
    folder = str(EXAMPLES / app_dir)
    monkeypatch.syspath_prepend(folder)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (folder, os.environ.get("PYTHONPATH")) if p))
    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        del sys.modules[name]
    return (importlib.import_module(f"{package}.server_app").app, importlib.import_module(f"{package}.client_app").app,
            importlib.import_module(f"{package}.task"))


def _simulate(server_app, client_app, nodes=4):
    from flwr.simulation import run_simulation
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=nodes,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})


@pytest.mark.slow
def test_message_api_example_with_fdcr_and_the_fisher_helper(tmp_path, monkeypatch, capfd):
    server_app, client_app, task = _load("fdcr-message-api", "fdcrapp", monkeypatch)
    monkeypatch.chdir(tmp_path)
    _simulate(server_app, client_app)
    out = capfd.readouterr().out
    assert "'fl-defense.num-valid': 4" in out and "'fl-defense.num-rejected': 0" in out, out[-3000:]
    assert "train_loss" in out  # Flower's own client-metric aggregation is kept
    torch.manual_seed(0)
    initial = task.Net().state_dict()
    final = torch.load(tmp_path / "final_model.pt")
    assert any(not torch.equal(initial[k], final[k]) for k in initial)


@pytest.mark.slow
def test_legacy_api_example_with_rlr(tmp_path, monkeypatch, caplog):
    server_app, client_app, _ = _load("rlr-legacy-api", "rlrapp", monkeypatch)
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("INFO", logger="flwr"):
        _simulate(server_app, client_app)
    out = caplog.text  # Flower's history of the fit metrics: ours beside the example's train_loss
    assert "fl-defense.num-valid" in out and "train_loss" in out, out[-3000:]
    assert "'fl-defense.num-rejected': [(1, 0), (2, 0)]" in out, out[-3000:]
