"""Experiment grids: a TOML file names what varies; every cell runs through Flower's simulation
engine in its own process, and finished cells are skipped when the grid is run again.

Grid file::

    [grid]
    name = "smoke"
    num-supernodes = 10            # simulated clients per cell
    [fixed]                        # run-config keys shared by every cell
    dataset = "digits"
    num-server-rounds = 3
    [vary]                         # each key's values are crossed with every other's
    defense = ["fedavg", "rlr"]
    seed = [1, 2]
    [[variants.partition]]         # coupled keys: one table per variant, crossed as a unit
    partitioner = "iid"
    [[variants.partition]]
    partitioner = "dirichlet"
    dirichlet-alpha = 0.5

A cell's folder is named by a hash of its run config, so reruns find it: a cell with a
summary.json is done; one with only a checkpoint resumes from it (the checkpoint and results are
the run's own, so it continues exactly where it stopped); one with neither starts afresh.

Shards: ``--shard i/k`` (1 <= i <= k) runs cells i, i+k, i+2k, ... of the grid's cell order, so k
machines or the k tasks of a job array run every cell exactly once; each shard resumes like a whole
grid. ``fl-defense report DIR1 DIR2 ...`` reports over several results folders.

On a Ray cluster: ``--ray-address ADDR --cpus-per-cell N`` runs the unfinished cells as Ray tasks
of N CPUs each, every one a cell's process as here with a private Ray instance of its own
(``simulation.cluster``; the checkout, data and results at the same paths on every node).
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

from fl_defense.config import ConfigError, ExperimentConfig

from .cputime import TreeCPU

FAILED, DONE = "[fl-defense] FAILED: ", "[fl-defense] done: "
# run-control keys every grid cell runs with unless it sets them (report.BOOKKEEPING: not part of what a
# round computes, so a record is compared without them): no stop for rounds without a valid result
GRID_RUN_CONTROL = {"max-rounds-without-valid": 0}

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Grid:
    name: str
    num_supernodes: int
    cells: list[dict]
    shard: tuple[int, int] | None = None  # (i, k): this grid is shard i of k of the file's cells
    # cell folder name -> what the cell is, said beside its folder in the run's lines (a leaderboard's
    # "row nnm+krum, column signflip, seed 2": the folder name shows the base defense and data attack only)
    names: dict[str, str] = field(default_factory=dict)

    def sharded(self, i: int, k: int) -> "Grid":
        """Shard ``i`` of ``k`` (1-based): cells i, i+k, i+2k, ... in the grid's order."""
        return replace(self, cells=shard_cells(self.cells, i, k), shard=(i, k))

    def keeping(self, cells: list[dict]) -> "Grid":
        """The same grid (shard, names) with only ``cells``."""
        return replace(self, cells=cells)

    def label(self, i: int, folder: Path) -> str:
        """How the run's lines name cell ``i`` (1-based): '3/12 <folder>', with its name where it has one."""
        name = self.names.get(folder.name)
        return f"{i}/{len(self.cells)} {folder.name}" + (f" ({name})" if name else "")

    @property
    def suffix(self) -> str:
        """'' for a whole grid, '.shard-2-of-4' for a shard: its grid.json and table.csv carry it, so
        shards writing into one results folder never overwrite each other's."""
        return "" if self.shard is None else f".shard-{self.shard[0]}-of-{self.shard[1]}"

    @classmethod
    def load(cls, path: str | Path) -> "Grid":
        try:
            spec = tomllib.loads(Path(path).read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"grid file {path}: {err}") from None
        meta = spec.get("grid", {})
        fixed = spec.get("fixed", {})
        vary = spec.get("vary", {})
        variants = spec.get("variants", {})
        axes = [[{k: v} for v in (vals if isinstance(vals, list) else [vals])] for k, vals in vary.items()]
        axes += [list(options) for options in variants.values()]
        num_supernodes = int(meta.get("num-supernodes", 10))
        cells = []
        for combo in itertools.product(*axes) if axes else [()]:
            cell = dict(fixed)
            for part in combo:
                cell.update(part)
            # a bad grid fails before anything runs
            ExperimentConfig.from_run_config(cell).check_federation(num_supernodes)
            cells.append(cell)
        return cls(name=meta.get("name", Path(path).stem), num_supernodes=num_supernodes, cells=cells)


def parse_shard(text: str) -> tuple[int, int]:
    """'i/k' with 1 <= i <= k."""
    try:
        i, k = (int(part) for part in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard: {text!r} is not i/k (e.g. 2/4: the second of four shards)") from None
    if not 1 <= i <= k:
        raise ConfigError(f"--shard: {text!r} needs 1 <= i <= k")
    return i, k


def shard_cells(cells: list, i: int, k: int) -> list:
    """Shard ``i`` of ``k`` (1-based), round-robin over the cells' order: every cell in exactly one shard."""
    if not 1 <= i <= k:
        raise ConfigError(f"--shard: {i}/{k} needs 1 <= i <= k")
    return cells[i - 1::k]


def cell_id(cell: dict) -> str:
    key = json.dumps(cell, sort_keys=True)
    label = "-".join(str(cell.get(k, "")) for k in ("defense", "dataset", "attack") if k in cell)
    return f"{label}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def cell_state(folder: Path) -> str:
    if (folder / "summary.json").exists():
        return "done"
    if (folder / "checkpoint.pkl").exists():
        return "partial"
    return "new"


ATTEMPT = "cpu-attempt.json"  # the running attempt's CPU so far, rewritten at every round


def record_cpu(folder: Path, cpu_seconds: float, wall_seconds: float, state: str) -> None:
    """Append one attempt's CPU time (user + system of the cell's process and every process it
    started, Ray's workers included: simulation.cputime) and the host's CPU capability (which
    torch's kernels, and so the times, depend on) to the cell's ``cpu.jsonl`` (wall-clock figures
    stay out of the deterministic summary.json); a resumed cell adds a line, so the sum is the
    cell's cost, including the attempts whose runner was killed that a resumed cell continues from
    (note_attempt)."""
    (folder / ATTEMPT).unlink(missing_ok=True)  # this attempt's running note: superseded by its record
    _append_cpu_line(folder, json.dumps(_cpu_record(cpu_seconds, wall_seconds, state)))


def _append_cpu_line(folder: Path, line: str) -> None:
    """Add one attempt's record (a JSON object on one line) to the cell's ``cpu.jsonl``."""
    with (folder / "cpu.jsonl").open("a") as fh:
        fh.write(line.strip() + "\n")


def _cpu_record(cpu_seconds: float, wall_seconds: float, state: str) -> dict:
    import torch

    return {"cpu_seconds": round(cpu_seconds, 3), "wall_seconds": round(wall_seconds, 3), "started_as": state,
            "capability": torch.backends.cpu.get_cpu_capability()}


def note_attempt(folder: Path, cpu_seconds: float, wall_seconds: float, state: str) -> None:
    """Keep the running attempt's CPU so far in the cell's ``cpu-attempt.json`` (written whole, then
    renamed): if the process running the grid is killed, no record_cpu follows, and the attempt the
    resumed cell builds on would otherwise count for nothing (settle_interrupted_attempt)."""
    tmp = folder / f"{ATTEMPT}.tmp"
    tmp.write_text(json.dumps({**_cpu_record(cpu_seconds, wall_seconds, state), "interrupted": True}))
    tmp.replace(folder / ATTEMPT)


def settle_interrupted_attempt(folder: Path) -> None:
    """Move an interrupted attempt's last CPU note into ``cpu.jsonl`` (marked ``interrupted``), so a
    resumed cell's cost includes the rounds it resumes from; the CPU after the attempt's last round
    line is not in it. A cell that died before its first checkpoint starts afresh, its folder and
    note removed: that attempt's work is not built on. (A runner killed after its cell's last
    round but before record_cpu leaves a finished cell with a note: cell_cpu counts it, and
    export settles it.)"""
    path = folder / ATTEMPT
    (folder / f"{ATTEMPT}.tmp").unlink(missing_ok=True)
    if path.exists():
        note = path.read_text()
        path.unlink()
        _append_cpu_line(folder, note)


def cell_cpu(folder: Path) -> tuple[float | None, str | None]:
    """The CPU seconds every recorded attempt of a cell took, and the CPU capability they ran with
    (``+``-joined where a resumed cell ran on hosts of different capability); None for the seconds
    where there is no record, for the capability where no attempt recorded one (before 2026-12-02)."""
    path = folder / "cpu.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    if (folder / ATTEMPT).exists() and cell_state(folder) == "done":  # unsettled (settle_interrupted_attempt)
        lines.append((folder / ATTEMPT).read_text())
    records = [json.loads(line) for line in lines if line.strip()]
    if not records:
        return None, None
    found = sorted({r["capability"] for r in records if r.get("capability")})
    return sum(r["cpu_seconds"] for r in records), "+".join(found) or None


class CellFailed(RuntimeError):
    """A grid cell's federation failed; the message says which, why and where its log is."""


def cells_failed(failures: list[CellFailed], started: int) -> CellFailed:
    """One error naming every cell that failed among the ``started`` ones a run started (run_grid,
    and simulation.cluster's Ray tasks)."""
    return CellFailed(f"{len(failures)} of {started} cells failed: " + "; ".join(map(str, failures)))


@dataclass
class CellOutcome:
    """How one run of a cell's process went."""

    returncode: int
    reason: str | None  # the run's own FAILED line, if it printed one
    result: str  # its done line's figures, if it printed one
    elsewhere: bool = False  # another process holds the cell's lock: it runs it, this one did not

    def failure(self, folder: Path, label: str) -> CellFailed | None:
        """``label``: how the run names the cell (``Grid.label``)."""
        if self.elsewhere or (self.returncode == 0 and cell_state(folder) == "done"):
            return None
        return CellFailed(f"cell {label}: "
                          f"{self.reason or f'its process exited with status {self.returncode}'} (its log: "
                          f"{folder}.log; run the grid again to resume)")


def run_cell(cell: dict, folder: Path, num_supernodes: int, on_round=None, env: dict | None = None) -> CellOutcome:
    """Run (or resume) one cell in its own process, writing into ``folder``; its CPU time goes to
    the folder's cpu.jsonl and its output to ``<folder>.log``. ``on_round(r)`` hears each round.
    A cell another process is running (two shards of different cell lists, a report and the
    leaderboard sharing a results folder) is left to it: ``<folder>.lock`` is held while a cell
    runs, and a cell whose lock is taken is not started (``CellOutcome.elsewhere``)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return CellOutcome(0, None, "running in another process: left to it", elsewhere=True)
        if cell_state(folder) == "done":  # finished by the process that held the lock before
            return CellOutcome(0, None, "done by another process")
        return _run_cell_locked(cell, folder, num_supernodes, on_round, env)


def _run_cell_locked(cell: dict, folder: Path, num_supernodes: int, on_round, env: dict | None) -> CellOutcome:
    state = cell_state(folder)
    # a cell is an experiment: a federation that collapses (every update rejected, round after round) is
    # its result, recorded to the last round with the model the server kept, not a failed run
    overrides = {**GRID_RUN_CONTROL, **cell, "results-dir": str(folder.parent), "run-name": folder.name,
                 "resume": state == "partial"}
    if state == "new" and folder.exists():
        shutil.rmtree(folder)  # a cell that died before its first checkpoint starts afresh
    if state == "partial":
        settle_interrupted_attempt(folder)
    cmd = [sys.executable, "-m", "simulation.run", "--in-process", "--num-supernodes", str(num_supernodes),
           "--run-config-json", json.dumps(overrides)]
    wall_before = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"})
    meter = TreeCPU(proc.pid).__enter__() if getattr(proc, "pid", None) else None  # the cell and its Ray workers
    log_lines, reason, result = [], None, ""
    for line in proc.stdout:
        log_lines.append(line)
        if line.startswith(FAILED):
            reason = line[len(FAILED):].strip()
        if line.startswith(DONE):
            result = line[len(DONE):].split("; results in")[0].strip()
        m = re.match(r"\[fl-defense\] round\s+(\d+)", line)
        if m and meter is not None and meter.exact and folder.exists():
            note_attempt(folder, meter.seconds, time.perf_counter() - wall_before, state)
        if m and int(m.group(1)) > 0 and on_round is not None:
            on_round(int(m.group(1)))
    proc.wait()
    cpu_seconds = meter.stop() if meter is not None else None
    if folder.exists() and cpu_seconds is not None:
        record_cpu(folder, cpu_seconds, time.perf_counter() - wall_before, state)
    (folder.parent / f"{folder.name}.log").write_text("".join(log_lines[-2000:]))
    return CellOutcome(proc.returncode, reason, result)


def run_grid(grid: Grid, out: Path, progress: bool = True, ray_address: str | None = None,
             cpus_per_cell: int = 4) -> list[Path]:
    """Run every cell not yet done; return the cell folders in grid order. A cell that fails is said
    at once and the cells after it still run; the grid then raises ``CellFailed`` naming every failed
    cell (a shard left unattended does not stop at its first bad cell). With ``ray_address``, the
    cells run as tasks on that Ray cluster instead (simulation.cluster)."""
    if ray_address is not None:
        from .cluster import run_grid_on_ray

        return run_grid_on_ray(grid, out, ray_address, cpus_per_cell)
    from tqdm import tqdm

    folders = _prepare(grid, out)
    total_rounds = sum(_rounds(c) for c in grid.cells)
    bar = tqdm(total=total_rounds, unit="round", disable=not progress, dynamic_ncols=True)
    failures: list[CellFailed] = []
    started = 0
    for i, (cell, folder) in enumerate(zip(grid.cells, folders), start=1):
        rounds = _rounds(cell)
        label = grid.label(i, folder)
        if cell_state(folder) == "done":
            bar.update(rounds)
            tqdm.write(f"[fl-defense] cell {label}: done earlier", file=sys.stdout)
            continue
        bar.set_description(f"cell {label}")
        done_before = bar.n

        def on_round(r: int) -> None:
            bar.n = done_before + r
            bar.refresh()

        started += 1
        outcome = run_cell(cell, folder, grid.num_supernodes, on_round)
        failure = outcome.failure(folder, label)
        bar.n = done_before + rounds
        bar.refresh()
        if failure is not None:  # said now, and the cells after it still run
            failures.append(failure)
            tqdm.write(f"[fl-defense] {failure}", file=sys.stdout)
            continue
        tqdm.write(f"[fl-defense] cell {label}: {outcome.result}", file=sys.stdout)
    bar.close()
    if len(failures) == 1:
        raise failures[0]
    if failures:
        raise cells_failed(failures, started)
    return folders


def _rounds(cell: dict) -> int:
    return int(cell.get("num-server-rounds", ExperimentConfig().num_server_rounds))


def _prepare(grid: Grid, out: Path) -> list[Path]:
    """The results folder with the grid's record (grid.json) and the announcement; the cells' folders."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"grid{grid.suffix}.json").write_text(json.dumps({"name": grid.name, "shard": grid.shard,
                                                             "cells": grid.cells}, indent=2))
    shard = f" (shard {grid.shard[0]} of {grid.shard[1]})" if grid.shard else ""
    print(f"[fl-defense] grid {grid.name}{shard}: {len(grid.cells)} cells of {grid.num_supernodes} simulated clients; "
          f"results in {out}, each cell's Flower output in <cell>.log there", flush=True)
    return [out / cell_id(c) for c in grid.cells]


def add_ray_arguments(parser) -> None:
    parser.add_argument("--ray-address", metavar="ADDR", help="run the cells as tasks on this Ray cluster ('auto': the "
                        "one `ray start` began here; 'local': a fresh one on this machine); the checkout, data and "
                        "results folder must be at the same paths on every node (simulation/cluster.py)")
    parser.add_argument("--cpus-per-cell", type=int, default=4, metavar="N",
                        help="with --ray-address: the CPUs each cell's task reserves and its simulation uses (default 4)")


def tidy_table(folders: list[Path]):
    """One row per cell and round: the cell's varying config plus the round's figures."""
    import pandas as pd

    rows = []
    for folder in folders:
        summary = json.loads((folder / "summary.json").read_text())
        timings = {}
        if (folder / "timings.jsonl").exists():
            timings = {t["round"]: t for t in map(json.loads, (folder / "timings.jsonl").read_text().splitlines())}
        cfg = {**ExperimentConfig().as_run_config(), **summary["config"]}  # runs from older versions lack new keys
        for line in (folder / "rounds.jsonl").read_text().splitlines():
            r = json.loads(line)
            t = timings.get(r["round"], {})
            rows.append({
                "cell": folder.name, "dataset": cfg["dataset"], "partitioner": cfg["partitioner"],
                "dirichlet_alpha": cfg["dirichlet-alpha"], "nir": cfg["nir"], "attack": cfg["attack"],
                "model_poisoning": cfg["model-poisoning"], "malicious_fraction": cfg["malicious-fraction"],
                "defense": cfg["defense"], "seed": cfg["seed"], "round": r["round"],
                "accuracy": r["accuracy"], "attack_success_rate": r.get("attack_success_rate"),
                "clean_target_rate": r.get("clean_target_rate"),
                "base_class_accuracy": r.get("base_class_accuracy"), "tpr": r.get("tpr"), "fpr": r.get("fpr"),
                "num_flagged": r.get("num_flagged"), "num_attackers_sampled": r.get("num_attackers_sampled"),
                "aggregation_seconds": t.get("aggregation_seconds"),
                "round_seconds": t.get("round_seconds"),
            })
    return pd.DataFrame(rows)


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m simulation run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", help="grid TOML file (see simulation/grids/)")
    parser.add_argument("--out", help="results folder (default: results/grids/<grid name>)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--shard", metavar="i/k", help="run only shard i of k (1 <= i <= k): cells i, i+k, i+2k, ... "
                        "of the grid; then fl-defense report DIR [DIR ...] over every shard's results folder")
    add_ray_arguments(parser)
    args = parser.parse_args(argv)
    grid = Grid.load(args.grid)
    if args.shard:
        grid = grid.sharded(*parse_shard(args.shard))
    out = Path(args.out or ROOT / "results" / "grids" / grid.name).resolve()
    t0 = time.time()
    folders = run_grid(grid, out, progress=not args.no_progress, ray_address=args.ray_address,
                       cpus_per_cell=args.cpus_per_cell)
    table = tidy_table(folders)
    table.to_csv(out / f"table{grid.suffix}.csv", index=False)
    print(f"[fl-defense] done: {len(folders)} cells, {len(table)} rows -> {out / f'table{grid.suffix}.csv'} "
          f"({time.time() - t0:.0f} s); tables and plots: fl-defense report {out}")
