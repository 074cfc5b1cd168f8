"""Grid shards cover every cell exactly once; a report merged over shards' folders equals one
over a single folder holding the same runs (fake runs: no federation starts)."""

import json
import shutil
from pathlib import Path

import pytest

from fl_defense.config import ConfigError, ExperimentConfig
from fl_defense.durability import window_metrics
from simulation.grid import Grid, cell_id, parse_shard, shard_cells
from simulation.report import write_report


def _grid(tmp_path) -> Grid:
    path = tmp_path / "g.toml"
    path.write_text('[grid]\nname = "g"\n[vary]\ndefense = ["fedavg", "rlr", "flame"]\nseed = [1, 2, 3]\n'
                    'malicious-fraction = [0.1, 0.2]\n')
    return Grid.load(path)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 7, 18, 25])
def test_shards_cover_every_cell_exactly_once(tmp_path, k):
    grid = _grid(tmp_path)
    ids = [cell_id(c) for c in grid.cells]
    shards = [[cell_id(c) for c in grid.sharded(i, k).cells] for i in range(1, k + 1)]
    assert sorted(sum(shards, [])) == sorted(ids)  # each cell once, none lost
    assert max(map(len, shards)) - min(map(len, shards)) <= 1  # balanced
    assert [cell_id(c) for c in Grid.load(tmp_path / "g.toml").sharded(1, k).cells] == shards[0]  # deterministic


@pytest.mark.parametrize("text", ["0/3", "4/3", "2", "a/b", "1/0"])
def test_a_bad_shard_fails_naming_the_option(text):
    with pytest.raises(ConfigError, match="--shard"):
        parse_shard(text)


def test_shard_cells_round_robin():
    assert shard_cells(list(range(7)), 2, 3) == [1, 4]
    assert parse_shard("2/3") == (2, 3)


def _fake_run(folder: Path, cell: dict, rounds: int = 3) -> None:
    """A finished run as the recorder writes it, with figures that depend on the cell."""
    folder.mkdir(parents=True)
    cfg = ExperimentConfig.from_run_config(cell).as_run_config()
    h = sum(map(ord, folder.name)) % 97 / 97
    rows = []
    for r in range(rounds + 1):
        row = {"round": r, "accuracy": min(1.0, 0.1 + 0.25 * r + 0.01 * h), "attack_success_rate": 0.5 * h + 0.1 * r / rounds,
               "clean_target_rate": 0.05}
        if r:
            row.update({"num_clients": 4, "num_attackers_sampled": 1, "num_flagged": 1, "tpr": h, "fpr": 1 - h,
                        "clients": [{"partition": p, "num_examples": 10, "weight": 0.25, "flagged": p == 0,
                                     "malicious": p == 0} for p in range(4)]})
        rows.append(row)
    (folder / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "timings.jsonl").write_text("".join(json.dumps({"round": r, "round_seconds": 1.0 + r,
                                                              "aggregation_seconds": 0.01 * r}) + "\n"
                                                  for r in range(rounds + 1)))
    summary = {"config": cfg, "rounds_completed": rounds}
    if cell.get("malicious-fraction") == 0.2:  # these attack in rounds 1-2 only
        summary["attack_window"] = window_metrics({r["round"]: r["attack_success_rate"] for r in rows}, 1, 2)
    (folder / "summary.json").write_text(json.dumps(summary))


def test_merged_report_equals_the_single_folder_report(tmp_path):
    grid = _grid(tmp_path)
    single = tmp_path / "single"
    for cell in grid.cells:
        _fake_run(single / cell_id(cell), cell)
    shard_dirs = []
    for i in (1, 2, 3):
        d = tmp_path / f"shard{i}"
        for cell in grid.sharded(i, 3).cells:
            shutil.copytree(single / cell_id(cell), d / cell_id(cell))
        shard_dirs.append(d)
    (shard_dirs[1] / "unfinished").mkdir()  # a cell without summary.json is no run
    # a cell that two shards both hold (a rerun elsewhere) counts once
    first = cell_id(grid.sharded(1, 3).cells[0])
    shutil.copytree(single / first, shard_dirs[2] / first)

    one = write_report(single, tmp_path / "r_single")
    merged = write_report(shard_dirs, tmp_path / "r_merged")
    body = lambda p: [line for line in p.read_text().splitlines() if " runs from " not in line and not line.startswith("# ")]
    assert body(one) == body(merged) and "| fedavg | 3 |" in one.read_text()
    assert "## Attack window and lifespan" in one.read_text()
    assert f"{len(grid.cells)} runs from" in merged.read_text()
    assert (tmp_path / "r_single" / "table.csv").read_text() == (tmp_path / "r_merged" / "table.csv").read_text()
    pngs = lambda d: sorted(p.name for p in d.glob("*.png"))
    assert pngs(tmp_path / "r_single") == pngs(tmp_path / "r_merged") != []


def test_the_report_command_takes_several_folders(tmp_path):
    from simulation.report import main

    grid = _grid(tmp_path)
    for i, cell in enumerate(grid.cells[:4]):
        _fake_run(tmp_path / f"s{i % 2}" / cell_id(cell), cell)
    with pytest.raises(SystemExit):  # several folders need --out
        main([str(tmp_path / "s0"), str(tmp_path / "s1")])
    main([str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "rep")])
    assert "4 runs from" in (tmp_path / "rep" / "report.md").read_text()


def test_a_shard_runs_only_its_cells_and_skips_finished_ones(tmp_path, monkeypatch):
    import simulation.grid as g

    grid = _grid(tmp_path)
    out = tmp_path / "out"
    mine = grid.sharded(2, 3).cells
    for cell in mine:  # finished earlier: nothing may start
        _fake_run(out / cell_id(cell), cell)
    monkeypatch.setattr(g.subprocess, "Popen", lambda *a, **k: pytest.fail("a finished cell was run again"))
    g.main([str(tmp_path / "g.toml"), "--shard", "2/3", "--out", str(out), "--no-progress"])
    assert json.loads((out / "grid.shard-2-of-3.json").read_text())["cells"] == mine
    table = (out / "table.shard-2-of-3.csv").read_text().splitlines()
    assert len(table) == 1 + len(mine) * 4 and not (out / "table.csv").exists()


def _fake_cell_process(launched: list):
    """A stand-in for a cell's process: records the run's name in ``launched`` and writes a
    finished run where the cell would."""

    class FakeCell:
        def __init__(self, cmd, **kwargs):
            overrides = json.loads(cmd[cmd.index("--run-config-json") + 1])
            launched.append(overrides["run-name"])
            cell = {k: v for k, v in overrides.items() if k not in ("results-dir", "run-name", "resume")}
            _fake_run(Path(overrides["results-dir"]) / overrides["run-name"], cell)
            self.stdout, self.returncode = [], 0

        def wait(self):
            return 0

    return FakeCell


def test_a_shard_starts_exactly_its_unfinished_cells(tmp_path, monkeypatch):
    import simulation.grid as g

    grid = _grid(tmp_path)
    out = tmp_path / "out"
    mine = grid.sharded(1, 4).cells
    _fake_run(out / cell_id(mine[0]), mine[0])  # done before: skipped
    launched = []
    monkeypatch.setattr(g.subprocess, "Popen", _fake_cell_process(launched))
    folders = g.run_grid(grid.sharded(1, 4), out, progress=False)
    assert launched == [cell_id(c) for c in mine[1:]]
    assert [f.name for f in folders] == [cell_id(c) for c in mine]


def test_the_window_table_summarises_lifespans_over_seeds(tmp_path):
    from simulation.report import window_table

    folders = []
    for seed, asr in ((1, [0.0, 0.9, 0.8, 0.4, 0.05]), (2, [0.0, 0.7, 0.6, 0.6, 0.3]), (3, [0.0, 0.5, 0.2, 0.05, 0.0])):
        f = tmp_path / f"run{seed}"
        f.mkdir()
        cfg = ExperimentConfig.from_run_config({"defense": "flame", "seed": seed, "attack-stop-round": 2}).as_run_config()
        w = window_metrics(dict(enumerate(asr)), 1, 2)
        (f / "summary.json").write_text(json.dumps({"config": cfg, "rounds_completed": 4, "attack_window": w}))
        folders.append(f)
    (row,) = [line for line in window_table(folders).splitlines() if "| flame |" in line]
    cells = [c.strip() for c in row.strip("|").split("|")]
    # window 1-2, 2 rounds of tail, 3 seeds; at the end 0.8, 0.6, 0.2; worst 0.9, 0.7, 0.5
    assert cells[5:10] == ["1-2", "2", "3", "0.533 ± 0.306", "0.700 ± 0.200"]
    assert cells[10] == "1.000 ± 1.000"  # lifespans below 0.5: 1, 2, 0
    assert cells[11] == "1.500 ± 0.707 (1 of 3 never)"  # below 0.1: 2, never, 1


def test_a_cell_another_process_is_running_is_left_to_it(tmp_path, monkeypatch):
    """Two runs over one results folder (a report and the leaderboard, shards of different cell
    lists) never run a cell at once: the one that finds the cell's lock taken leaves it, without
    failing, and a later run (the lock free) runs it."""
    import fcntl

    import simulation.grid as g

    grid = _grid(tmp_path)
    out = tmp_path / "out"
    mine = grid.sharded(1, 4).cells
    launched = []
    monkeypatch.setattr(g.subprocess, "Popen", _fake_cell_process(launched))
    out.mkdir()
    busy = cell_id(mine[1])
    with open(out / f"{busy}.lock", "w") as held:  # another process's run of that cell
        fcntl.flock(held, fcntl.LOCK_EX)
        g.run_grid(grid.sharded(1, 4), out, progress=False)
    assert launched == [cell_id(c) for c in mine if cell_id(c) != busy]
    assert not (out / busy / "summary.json").exists()
    g.run_grid(grid.sharded(1, 4), out, progress=False)
    assert launched[-1] == busy and len(launched) == len(mine)


def test_a_cell_whose_runner_was_killed_keeps_that_attempts_cpu(tmp_path, monkeypatch):
    """The runner notes each round's CPU so far; if it dies (here: its round callback raises), the
    resumed cell's cpu.jsonl counts that attempt (marked interrupted) beside the resumed one."""
    import simulation.grid as g

    cell = {"defense": "fedavg", "seed": 1}
    folder = tmp_path / "out" / cell_id(cell)
    readings = iter([1.5, 2.5, 3.0])

    class Meter:
        exact = True  # /proc readings (TreeCPU)

        def __init__(self, pid):
            pass

        def __enter__(self):
            return self

        @property
        def seconds(self):
            return next(readings)

        def stop(self):
            return 4.0

    class Cell:
        def __init__(self, cmd, **kwargs):
            overrides = json.loads(cmd[cmd.index("--run-config-json") + 1])
            self.pid, self.returncode = 1, 0
            folder.mkdir(parents=True, exist_ok=True)
            if overrides["resume"]:  # the second attempt finishes the run
                (folder / "summary.json").write_text("{}")
                self.stdout = ["[fl-defense] round 3\n"]
            else:
                (folder / "checkpoint.pkl").write_bytes(b"")
                self.stdout = ["[fl-defense] round 1\n", "[fl-defense] round 2\n"]

        def wait(self):
            return 0

    def killed(r):
        if r == 2:
            raise KeyboardInterrupt  # the runner dies after round 2's line

    monkeypatch.setattr(g, "TreeCPU", Meter)
    monkeypatch.setattr(g.subprocess, "Popen", Cell)
    with pytest.raises(KeyboardInterrupt):
        g.run_cell(cell, folder, 2, on_round=killed)
    assert not (folder / "cpu.jsonl").exists()
    assert json.loads((folder / g.ATTEMPT).read_text())["cpu_seconds"] == 2.5  # the note after round 2
    assert g.cell_state(folder) == "partial"
    assert g.run_cell(cell, folder, 2).returncode == 0
    records = [json.loads(line) for line in (folder / "cpu.jsonl").read_text().splitlines()]
    assert [(r["cpu_seconds"], r["started_as"], r.get("interrupted")) for r in records] == [
        (2.5, "new", True), (4.0, "partial", None)]
    assert g.cell_cpu(folder)[0] == 6.5 and not (folder / g.ATTEMPT).exists()


def test_a_finished_cell_with_a_killed_runners_note_counts_it_once(tmp_path):
    """A runner killed after its cell's last round but before it recorded the attempt leaves a
    finished cell with a note: cell_cpu counts it, and settling it (as --export does) keeps it
    counted once."""
    import simulation.grid as g

    folder = tmp_path / "c"
    folder.mkdir()
    g.record_cpu(folder, 3.0, 4.0, "new")
    g.note_attempt(folder, 2.0, 2.5, "partial")
    assert g.cell_cpu(folder)[0] == 3.0  # not finished: the note is a running (or interrupted) attempt
    (folder / "summary.json").write_text("{}")
    assert g.cell_cpu(folder)[0] == 5.0
    g.settle_interrupted_attempt(folder)
    assert g.cell_cpu(folder)[0] == 5.0 and not (folder / g.ATTEMPT).exists()
    g.note_attempt(folder, 1.0, 1.0, "partial")
    g.record_cpu(folder, 7.0, 8.0, "partial")  # the attempt's own record supersedes its note
    assert g.cell_cpu(folder)[0] == 12.0 and not (folder / g.ATTEMPT).exists()


def test_a_failed_cell_is_said_and_the_cells_after_it_still_run(tmp_path, monkeypatch, capsys):
    """An unattended shard does not stop at its first bad cell: the failure is said at once, every
    later cell runs, and the grid then fails naming each failed cell."""
    import simulation.grid as g

    grid = _grid(tmp_path)
    out = tmp_path / "out"
    mine = grid.sharded(1, 4).cells
    bad = {cell_id(mine[0]), cell_id(mine[2])}
    launched = []
    good = _fake_cell_process(launched)

    class SometimesFailing:
        def __init__(self, cmd, **kwargs):
            name = json.loads(cmd[cmd.index("--run-config-json") + 1])["run-name"]
            if name in bad:  # its run prints its reason and exits without a summary
                launched.append(name)
                self.stdout, self.returncode = ["[fl-defense] FAILED: NoValidResultsError: broken\n"], 1
            else:
                good(cmd, **kwargs)
                self.stdout, self.returncode = [], 0

        def wait(self):
            return self.returncode

    monkeypatch.setattr(g.subprocess, "Popen", SometimesFailing)
    with pytest.raises(g.CellFailed) as failed:
        g.run_grid(grid.sharded(1, 4), out, progress=False)
    assert launched == [cell_id(c) for c in mine]  # every cell was started, the failed ones too
    assert str(failed.value).startswith(f"2 of {len(mine)} cells failed")
    assert all(name in str(failed.value) for name in bad) and "NoValidResultsError: broken" in str(failed.value)
    said = [line for line in capsys.readouterr().out.splitlines() if "NoValidResultsError" in line]
    assert len(said) == 2 and not any(line.startswith("[fl-defense] FAILED") for line in said)
    # the finished cells stay done; a rerun starts only the two that failed
    launched.clear()
    bad.clear()
    g.run_grid(grid.sharded(1, 4), out, progress=False)
    assert launched == [cell_id(mine[0]), cell_id(mine[2])]


def test_every_line_of_a_run_names_the_cell_as_its_grid_names_it(tmp_path, monkeypatch, capsys):
    """A grid's names (a leaderboard's row, column and seed) follow its cells through a shard and a
    filter, and every line a run says of a cell carries it: skipped, finished, failed."""
    import simulation.grid as g

    grid = _grid(tmp_path)
    names = {cell_id(c): f"the {c['defense']} cell of seed {c['seed']}" for c in grid.cells}
    grid = Grid(grid.name, grid.num_supernodes, grid.cells, names=names)
    mine = grid.sharded(2, 3).keeping(grid.sharded(2, 3).cells[:3])
    assert mine.names == names and mine.shard == (2, 3) and len(mine.cells) == 3
    out = tmp_path / "out"
    first, second, third = mine.cells
    _fake_run(out / cell_id(first), first)
    good = _fake_cell_process([])

    class FailsTheThird:
        def __init__(self, cmd, **kwargs):
            if json.loads(cmd[cmd.index("--run-config-json") + 1])["run-name"] == cell_id(third):
                self.stdout, self.returncode = ["[fl-defense] FAILED: NoValidResultsError: broken\n"], 1
            else:
                good(cmd, **kwargs)
                self.stdout, self.returncode = ["[fl-defense] done: accuracy 0.5; results in x\n"], 0

        def wait(self):
            return self.returncode

    monkeypatch.setattr(g.subprocess, "Popen", FailsTheThird)
    with pytest.raises(g.CellFailed) as failed:
        g.run_grid(mine, out, progress=False)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[fl-defense] cell")]
    assert lines[0] == f"[fl-defense] cell 1/3 {cell_id(first)} ({names[cell_id(first)]}): done earlier"
    assert lines[1] == f"[fl-defense] cell 2/3 {cell_id(second)} ({names[cell_id(second)]}): accuracy 0.5"
    assert lines[2].startswith(f"[fl-defense] cell 3/3 {cell_id(third)} ({names[cell_id(third)]}): NoValidResultsError")
    assert f"cell 3/3 {cell_id(third)} ({names[cell_id(third)]}): " in str(failed.value)
    assert g.Grid("g", 10, [first]).label(1, out / cell_id(first)) == f"1/1 {cell_id(first)}"  # no names: the folder


def test_a_grid_cell_runs_to_its_last_round_when_no_result_is_valid(tmp_path, monkeypatch):
    """A federation that collapses (every update rejected, round after round: a model blown up by
    sign flipping) is a cell's result: the grid runs its cells with max-rounds-without-valid = 0,
    unless a cell sets it, and a record differing only in it is the same experiment."""
    import simulation.grid as g
    from simulation.leaderboard import record_mismatch

    sent = []

    class Recorder:
        def __init__(self, cmd, **kwargs):
            sent.append(json.loads(cmd[cmd.index("--run-config-json") + 1]))
            self.stdout, self.returncode = [], 1

        def wait(self):
            return 1

    monkeypatch.setattr(g.subprocess, "Popen", Recorder)
    g.run_cell({"defense": "fedavg"}, tmp_path / "a", 10)
    g.run_cell({"defense": "fedavg", "max-rounds-without-valid": 5}, tmp_path / "b", 10)
    assert [s["max-rounds-without-valid"] for s in sent] == [0, 5]
    assert ExperimentConfig().max_rounds_without_valid == 3  # a single run, a deployment: stops
    folder = tmp_path / "done"
    _fake_run(folder, {"defense": "fedavg"})
    assert record_mismatch(folder, {"defense": "fedavg", "max-rounds-without-valid": 0}) is None
    assert "defense" in record_mismatch(folder, {"defense": "rlr", "max-rounds-without-valid": 0})


def test_the_config_key_reaches_the_strategy():
    import torch

    from server_app.app import build_strategy

    model = torch.nn.Linear(2, 2)
    for value in (0, 3, 7):
        cfg = ExperimentConfig.from_run_config({"max-rounds-without-valid": value})
        assert build_strategy(cfg, model).aggregation.max_rounds_without_valid == value
    with pytest.raises(ConfigError, match="max-rounds-without-valid"):
        ExperimentConfig.from_run_config({"max-rounds-without-valid": -1})
