"""A grid's cells as tasks on a Ray cluster (simulation/cluster.py): each cell's simulation gets a
private Ray instance of the task's CPUs, and the cells' records are those of the same cells run one
after another on this machine."""

import json

import pytest

from simulation.grid import Grid, run_grid
from simulation.run import RAY_CPUS_ENV, backend_config

GRID = """
[grid]
name = "cluster-smoke"
num-supernodes = 4
[fixed]
dataset = "digits"
num-server-rounds = 2
local-epochs = 1
fraction-fit = 0.5
malicious-fraction = 0.25
[vary]
defense = ["fedavg", "median"]
"""


def test_a_cells_simulation_starts_ray_with_the_tasks_cpus(monkeypatch):
    monkeypatch.delenv(RAY_CPUS_ENV, raising=False)
    assert backend_config(1, 0.0) == {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}  # Ray's own count
    monkeypatch.setenv(RAY_CPUS_ENV, "3")
    assert backend_config(1, 0.0)["init_args"] == {"num_cpus": 3}


def test_a_cell_task_runs_its_cell_with_a_private_ray_instance_of_its_cpus(monkeypatch, tmp_path):
    from simulation import cluster

    seen = {}
    monkeypatch.setattr(cluster, "run_cell", lambda cell, folder, n, env: seen.update(cell=cell, folder=folder, env=env))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # what a task on a cluster node may see
    cluster.cell_task({"defense": "fedavg"}, str(tmp_path / "c"), 4, 2)
    assert seen["env"]["RAY_ADDRESS"] == "local" and seen["env"][RAY_CPUS_ENV] == "2"  # not the cluster's
    assert seen["folder"] == tmp_path / "c" and seen["cell"] == {"defense": "fedavg"}


@pytest.mark.slow
def test_cells_as_ray_tasks_give_the_records_of_a_local_run(tmp_path, capsys):
    path = tmp_path / "grid.toml"
    path.write_text(GRID)
    grid = Grid.load(path)
    # "local": a fresh Ray instance on this machine stands in for the cluster; two 1-CPU tasks at once
    folders = run_grid(grid, tmp_path / "cluster", progress=False, ray_address="local", cpus_per_cell=1)
    out = capsys.readouterr().out
    assert "0 cells done earlier; 2 as Ray tasks of 1 CPUs on local" in out
    for folder in folders:
        assert (folder / "summary.json").exists() and json.loads((folder / "cpu.jsonl").read_text())["cpu_seconds"] > 0
    local = run_grid(Grid(grid.name, grid.num_supernodes, grid.cells[:1]), tmp_path / "local", progress=False)
    assert (local[0] / "rounds.jsonl").read_bytes() == (folders[0] / "rounds.jsonl").read_bytes()
    # run again: every cell is done, no task starts
    run_grid(grid, tmp_path / "cluster", progress=False, ray_address="local", cpus_per_cell=1)
    assert "2 cells done earlier; 0 as Ray tasks" in capsys.readouterr().out
