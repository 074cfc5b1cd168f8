"""Grids: cells from a TOML file, resumable runs, the tidy table and the report."""

import time
from pathlib import Path

import pytest

from fl_defense.config import ConfigError
from simulation.grid import Grid, cell_id, run_grid, tidy_table
from simulation.report import write_report

ROOT = Path(__file__).resolve().parents[1]


def test_grid_crosses_vary_keys_and_variant_groups(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text("""
[grid]
name = "g"
[fixed]
dataset = "digits"
[vary]
defense = ["fedavg", "rlr"]
seed = [1, 2, 3]
[[variants.partition]]
partitioner = "iid"
[[variants.partition]]
partitioner = "dirichlet"
dirichlet-alpha = 0.3
""")
    grid = Grid.load(path)
    assert len(grid.cells) == 2 * 3 * 2
    assert {(c["partitioner"], c.get("dirichlet-alpha")) for c in grid.cells} == {("iid", None), ("dirichlet", 0.3)}
    assert len({cell_id(c) for c in grid.cells}) == 12 and cell_id(grid.cells[0]) == cell_id(dict(grid.cells[0]))


def test_a_bad_grid_fails_before_running(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[vary]\ndefense = ["fedavg", "krumm"]\n')
    with pytest.raises(ConfigError, match="'defense'"):
        Grid.load(path)


@pytest.mark.slow
def test_smoke_grid_runs_resumes_and_reports(tmp_path):
    grid = Grid.load(ROOT / "simulation" / "grids" / "smoke.toml")
    folders = run_grid(grid, tmp_path, progress=False)
    table = tidy_table(folders)
    assert len(table) == len(grid.cells) * 11  # rounds 0..10
    assert set(table["defense"]) == {"fedavg", "flame"} and table["accuracy"].between(0, 1).all()
    final = table[table["round"] == 10].groupby("defense")[["accuracy", "attack_success_rate"]].mean()
    # the demo: FedAvg carries the backdoor at clean accuracy, FLAME removes it
    assert final.loc["fedavg", "accuracy"] > 0.8 and final.loc["fedavg", "attack_success_rate"] > 0.6
    assert final.loc["flame", "accuracy"] > 0.8 and final.loc["flame", "attack_success_rate"] < 0.2
    assert table.loc[table["round"] > 0, "round_seconds"].notna().all()
    t0 = time.time()
    run_grid(grid, tmp_path, progress=False)  # every cell is done: nothing reruns
    assert time.time() - t0 < 5
    report = write_report(tmp_path, tmp_path / "report", "smoke")
    text = report.read_text()
    assert "| digits | iid | plus+boost | 0.1 | flame | 2 |" in text
    assert list((tmp_path / "report").glob("weights_*.png")) and list((tmp_path / "report").glob("curves_*.png"))


SHIPPED_GRIDS = sorted((ROOT / "simulation" / "grids").glob("*.toml"))


@pytest.mark.parametrize("path", SHIPPED_GRIDS, ids=[p.stem for p in SHIPPED_GRIDS])
def test_every_shipped_grid_and_leaderboard_cell_is_a_valid_run_config(path):
    """Every cell of every shipped grid file passes the start-up checks (a key no configured attack
    reads included): a leaderboard file's cells one by one, a plain grid's through Grid.load."""
    import tomllib

    from fl_defense.config import ExperimentConfig
    from simulation.leaderboard import Leaderboard

    if "leaderboard" in tomllib.loads(path.read_text()):
        cells = Leaderboard.load(path).cells()
        assert cells
        for *_, run_config in cells:
            ExperimentConfig.from_run_config(run_config)
    else:
        assert Grid.load(path).cells


def test_the_console_script_is_the_simulation_entry_point():
    from importlib.metadata import entry_points

    import simulation.__main__ as cli

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "fl-defense"]
    assert script.load() is cli.main


def test_cells_differing_only_in_pre_aggregation_get_rows_of_their_own(tmp_path):
    """Krum alone and NNM + Krum, centered clipping alone and after bucketing: four rows labelled
    by pre-aggregation, each with its own run's figures (one row and a mean of two before)."""
    from tests.test_shards import _fake_run

    cells = {"krum": {"defense": "krum"}, "nnm-krum": {"defense": "krum", "pre-aggregation": "nnm"},
             "cc": {"defense": "centered_clipping"},
             "bucketing-cc": {"defense": "centered_clipping", "pre-aggregation": "bucketing"}}
    for name, cell in cells.items():
        _fake_run(tmp_path / "runs" / name, {"attack": "plus", "seed": 1, **cell})
    text = write_report(tmp_path / "runs", tmp_path / "report").read_text()
    rows = {r.split("|")[5].strip(): r for r in text.splitlines() if r.startswith("| digits ")}
    assert set(rows) == {"krum", "nnm + krum", "centered_clipping", "bucketing + centered_clipping"}
    table = tidy_table([tmp_path / "runs" / n for n in cells])
    for name, label in (("krum", "krum"), ("nnm-krum", "nnm + krum")):
        asr = table[(table["cell"] == name) & (table["round"] == 3)]["attack_success_rate"].item()
        assert f"| {label} | 1 |" in rows[label] and f"| {asr:.3f} |" in rows[label]  # its own run, not a mean
    assert rows["nnm + krum"].split("|")[8] != rows["krum"].split("|")[8]
    csv = (tmp_path / "report" / "table.csv").read_text().splitlines()
    assert "pre_aggregation" in csv[0] and any(",nnm," in line and ",nnm + krum" in line for line in csv[1:])


def test_cells_differing_in_any_key_but_the_seed_get_rows_of_their_own(tmp_path):
    """RLR at two thetas, SDFC in two calibration modes, FDCR with honest and noise-sending
    attackers: each variant is its own row, labelled by the key that differs; two seeds of one
    variant still average into one row."""
    from simulation.report import cell_labels
    from tests.test_shards import _fake_run

    cells = {"rlr4-s1": {"defense": "rlr", "rlr-theta": 4, "seed": 1}, "rlr4-s2": {"defense": "rlr", "rlr-theta": 4, "seed": 2},
             "rlr6": {"defense": "rlr", "rlr-theta": 6, "seed": 1},
             "sdfc-server": {"defense": "sdfc", "sdfc-calibration-mode": "server", "server-fraction": 0.02, "seed": 1},
             "sdfc-client": {"defense": "sdfc", "sdfc-calibration-mode": "client", "server-fraction": 0.02, "seed": 1},
             "fdcr-honest": {"defense": "fdcr", "fisher-forgery": "none", "seed": 1},
             "fdcr-noise": {"defense": "fdcr", "fisher-forgery": "noise", "seed": 1},
             "fedavg": {"defense": "fedavg", "seed": 1}}
    for name, cell in cells.items():
        _fake_run(tmp_path / "runs" / name, {"attack": "plus", **cell})
    text = write_report(tmp_path / "runs", tmp_path / "report").read_text()
    rows = {r.split("|")[5].strip(): r for r in text.splitlines() if r.startswith("| digits ")}
    assert set(rows) == {"rlr (rlr-theta=4)", "rlr (rlr-theta=6)", "sdfc (sdfc-calibration-mode=server)",
                         "sdfc (sdfc-calibration-mode=client)", "fdcr (fisher-forgery=none)",
                         "fdcr (fisher-forgery=noise)", "fedavg"}
    assert "| rlr (rlr-theta=4) | 2 |" in rows["rlr (rlr-theta=4)"]  # two seeds, one row
    # a key that varies only with the defense (rlr-theta set on RLR's cells alone) labels nothing else
    labels = cell_labels({"a": {"defense": "rlr", "rlr-theta": 6, "dataset": "digits"},
                          "b": {"defense": "fedavg", "rlr-theta": 4, "dataset": "digits"}})
    assert labels == {"a": "rlr", "b": "fedavg"}
