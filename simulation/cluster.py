"""A grid's cells as tasks on an existing Ray cluster (``--ray-address``).

Each cell becomes one Ray task that reserves ``cpus_per_cell`` CPUs on some node and runs the cell
there exactly as ``run_grid`` does on one machine: its own process (``simulation.grid.run_cell``),
whose Flower simulation starts a private Ray instance of those CPUs (``RAY_ADDRESS=local``,
``FL_DEFENSE_RAY_CPUS``) instead of joining the cluster, so cells never compete for each other's
actors. Ray places the tasks and runs as many at once as the cluster's CPUs allow.

What it assumes, like a SLURM job array over ``--shard``: the checkout, its Python environment,
the data and the results folder at the same paths on every node (a shared file system), because a
cell writes its folder, its checkpoint and the shared pre-training cache where the driver would.
Cells resume as on one machine: a finished cell is skipped, a cut one continues from its
checkpoint when the grid is run again. A failed cell does not stop the others; the grid raises
once every task has ended, naming the failures.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .grid import ROOT, CellFailed, Grid, _prepare, cell_state, cells_failed, run_cell
from .run import RAY_CPUS_ENV  # the CPUs of the Ray instance a cell's simulation starts


def cell_task(cell: dict, folder: str, num_supernodes: int, cpus: int):
    """One cell on the node Ray chose (the task's body): a private Ray instance of ``cpus`` CPUs."""
    env = {**os.environ, "RAY_ADDRESS": "local", RAY_CPUS_ENV: str(cpus)}
    return run_cell(cell, Path(folder), num_supernodes, env=env)


def run_grid_on_ray(grid: Grid, out: Path, address: str, cpus_per_cell: int = 4) -> list[Path]:
    """Run the grid's unfinished cells as tasks on the Ray cluster at ``address`` ("auto": the one
    started on this machine with ``ray start``; "local": a fresh one here); the cell folders."""
    import ray

    folders = _prepare(grid, out)
    # the tasks import this checkout (the same path on every node)
    ray.init(address=address, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}}, include_dashboard=False)
    try:
        remote = ray.remote(num_cpus=cpus_per_cell, max_retries=0)(cell_task)
        todo = [(i, c, f) for i, (c, f) in enumerate(zip(grid.cells, folders), start=1) if cell_state(f) != "done"]
        print(f"[fl-defense] {len(grid.cells) - len(todo)} cells done earlier; {len(todo)} as Ray tasks of "
              f"{cpus_per_cell} CPUs on {address} ({ray.cluster_resources().get('CPU', 0):.0f} CPUs)", flush=True)
        pending = {remote.remote(c, str(f), grid.num_supernodes, cpus_per_cell): (i, f) for i, c, f in todo}
        failures = []
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            i, folder = pending.pop(ready[0])
            label = grid.label(i, folder)
            try:
                outcome = ray.get(ready[0])
            except Exception as exc:  # the task itself died (its node lost, ...)
                failures.append(CellFailed(f"cell {label}: its Ray task failed: {exc}"))
                continue
            failure = outcome.failure(folder, label)
            if failure is not None:
                failures.append(failure)
            print(f"[fl-defense] cell {label}: {failure or outcome.result}", file=sys.stdout, flush=True)
    finally:
        ray.shutdown()
    if failures:
        raise cells_failed(failures, len(todo))
    return folders


__all__ = ["cell_task", "run_grid_on_ray"]
