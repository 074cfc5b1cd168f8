"""The leaderboard (simulation/leaderboard.py): its cells come from the registry and the file's
attack bundles; the accuracy drop, mean ± std, ranking rule and heatmap tables on constructed cells;
a page regenerated from results runs no cell; and one smoke-sized run for real (slow)."""

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from fl_defense.attacks import SOTA_BACKDOORS
from fl_defense.config import ConfigError, ExperimentConfig
from fl_defense.defenses import DEFENSES
from simulation import leaderboard as lb
from simulation.grid import cell_id

ROOT = Path(__file__).resolve().parents[1]

BOARD = """
[grid]
name = "tiny"
num-supernodes = 10
[fixed]
dataset = "digits"
num-server-rounds = 3
attack-stop-round = 2
malicious-fraction = 0.2
server-fraction = 0.05
{extra}
[leaderboard]
defenses = {defenses}
seeds = [1, 2]
[defense-keys.norm_clipping]
clip-norm = 2.0
[attacks.clean]
attack = "none"
model-poisoning = "none"
[attacks.plus]
attack = "plus"
[attacks.alie]
attack = "none"
model-poisoning = "alie"
"""


def _board_file(tmp_path, defenses='"all"', extra="") -> Path:
    path = tmp_path / "board.toml"
    path.write_text(BOARD.format(defenses=defenses, extra=extra))
    return path


def test_every_registered_defense_joins_and_subsets_work(tmp_path):
    board = lb.Leaderboard.load(_board_file(tmp_path))
    assert board.defenses == list(DEFENSES)  # read from the registry: new defenses join
    assert list(board.attacks) == ["clean", "plus", "alie"]
    assert len(board.cells()) == len(DEFENSES) * 3 * 2
    norm = board.cell_config("norm_clipping", "alie", 2)
    assert norm["clip-norm"] == 2.0 and norm["model-poisoning"] == "alie" and norm["seed"] == 2
    assert "clip-norm" not in board.cell_config("flame", "alie", 2)  # defense keys stay with their defense

    sub = lb.Leaderboard.load(_board_file(tmp_path), defenses=["flame", "krum"], attacks=["alie"], seeds=[5])
    assert list(sub.attacks) == ["clean", "alie"]  # the clean column is always in
    # the baseline's clean cell (the accuracy drop's reference) is added, first
    assert [(d, a, s) for d, a, s, _ in sub.cells()] == [
        ("fedavg", "clean", 5), ("flame", "clean", 5), ("krum", "clean", 5), ("flame", "alie", 5), ("krum", "alie", 5)]
    assert len({cell_id(c) for *_, c in sub.cells()}) == 5


VARIANTS = """
[variants."nnm+krum"]
defense = "krum"
pre-aggregation = "nnm"
[variants."bucketing+norm_clipping"]
defense = "norm_clipping"
pre-aggregation = "bucketing"
bucket-size = 3
"""


def test_variants_are_rows_of_a_defense_with_keys_of_their_own(tmp_path):
    path = _board_file(tmp_path)
    path.write_text(path.read_text() + VARIANTS)
    board = lb.Leaderboard.load(path)
    assert board.defenses == [*DEFENSES, "nnm+krum", "bucketing+norm_clipping"]  # after the registry's
    nnm = board.cell_config("nnm+krum", "plus", 1)
    assert nnm["defense"] == "krum" and nnm["pre-aggregation"] == "nnm" and nnm["attack"] == "plus"
    assert "pre-aggregation" not in board.cell_config("krum", "plus", 1)  # the plain defense keeps its row
    assert cell_id(nnm) != cell_id(board.cell_config("krum", "plus", 1))
    # a variant of a defense with defense keys takes them, then its own
    bucket = board.cell_config("bucketing+norm_clipping", "clean", 2)
    assert bucket["clip-norm"] == 2.0 and bucket["bucket-size"] == 3 and bucket["defense"] == "norm_clipping"
    sub = lb.Leaderboard.load(path, defenses=["nnm+krum"], attacks=["plus"], seeds=[1])
    assert [(d, a) for d, a, *_ in sub.cells()] == [("fedavg", "clean"), ("nnm+krum", "clean"), ("nnm+krum", "plus")]
    ExperimentConfig.from_run_config(nnm)  # a valid run config


def test_a_variant_must_name_a_registered_defense_and_not_shadow_one(tmp_path):
    path = _board_file(tmp_path)
    base = path.read_text()
    path.write_text(base + '[variants.odd]\ndefense = "nosuch"\n')
    with pytest.raises(ConfigError, match="variants.odd.*nosuch"):
        lb.Leaderboard.load(path)
    path.write_text(base + '[variants.krum]\ndefense = "krum"\n')
    with pytest.raises(ConfigError, match="variants.krum"):
        lb.Leaderboard.load(path)
    path.write_text(base + '[variants.bad]\ndefense = "krum"\npre-aggregation = "nosuch"\n')
    with pytest.raises(ConfigError, match="defense=bad .*pre-aggregation"):
        lb.Leaderboard.load(path)


def test_bad_choices_fail_naming_what(tmp_path):
    with pytest.raises(ConfigError, match="nosuch"):
        lb.Leaderboard.load(_board_file(tmp_path), defenses=["nosuch"])
    with pytest.raises(ConfigError, match="dba"):
        lb.Leaderboard.load(_board_file(tmp_path), attacks=["dba"])
    # a cell the protocol cannot run fails at load, naming the cell and the key
    with pytest.raises(ConfigError, match="defense=rlr .*rlr-theta"):
        lb.Leaderboard.load(_board_file(tmp_path, '["rlr"]', "[defense-keys.rlr]\nrlr-theta = 50"))
    # a defense key in [fixed] reaches every row, and the baseline's cells do not read it
    with pytest.raises(ConfigError, match="defense=fedavg .*'rlr-theta': 5 changes nothing: only defense=rlr"):
        lb.Leaderboard.load(_board_file(tmp_path, '["rlr"]', "rlr-theta = 5"))


def test_uncovered_attacks_are_named():
    missing = lb.uncovered_attacks({"clean": {"attack": "none", "model-poisoning": "none"},
                                    "plus": {"attack": "plus"}, "alie": {"attack": "none", "model-poisoning": "alie"}})
    assert "dba" in missing and "ipm" in missing and "plus" not in missing and "alie" not in missing
    assert "none" not in missing


def _table(rows):
    return pd.DataFrame(rows)


def test_accuracy_drop_is_paired_by_seed_against_clean_fedavg():
    t = _table([
        {"defense": "fedavg", "attack": "clean", "seed": 1, "accuracy_final": 0.90},
        {"defense": "fedavg", "attack": "clean", "seed": 2, "accuracy_final": 0.80},
        {"defense": "flame", "attack": "plus", "seed": 1, "accuracy_final": 0.85},
        {"defense": "flame", "attack": "plus", "seed": 2, "accuracy_final": 0.80},
        {"defense": "flame", "attack": "plus", "seed": 3, "accuracy_final": 0.75},  # no baseline of seed 3
    ])
    drop = lb.add_accuracy_drop(t, "fedavg", "clean", "accuracy_final")["accuracy_drop"].tolist()
    assert drop == pytest.approx([0.0, 0.0, 5.0, 0.0, 10.0])  # seed 3 against the baseline's mean, 0.85
    assert lb.add_accuracy_drop(t[t["defense"] != "fedavg"], "fedavg", "clean", "accuracy_final")[
        "accuracy_drop"].isna().all()
    # by default the drop compares the mean accuracy over rounds (one round's is too noisy)
    t["accuracy_mean"] = t["accuracy_final"] - 0.1 * (t["defense"] == "flame")
    assert lb.add_accuracy_drop(t, "fedavg", "clean")["accuracy_drop"].tolist() == pytest.approx(
        [0.0, 0.0, 15.0, 10.0, 20.0])


def test_summary_gives_mean_and_sample_std_over_seeds():
    t = _table([{"defense": "d", "attack": "a", "seed": s, "accuracy_final": v, "asr_window_end": None}
                for s, v in [(1, 0.5), (2, 0.7), (3, 0.9)]]
               + [{"defense": "d", "attack": "b", "seed": 1, "accuracy_final": 0.4, "asr_window_end": 0.2}])
    s = lb.summarise(t)
    assert s.loc[("d", "a")]["accuracy_final_mean"] == pytest.approx(0.7)
    assert s.loc[("d", "a")]["accuracy_final_std"] == pytest.approx(0.2)  # ddof 1
    assert s.loc[("d", "a")]["seeds"] == 3
    assert math.isnan(s.loc[("d", "b")]["accuracy_final_std"])  # one seed: no spread
    assert lb.fmt(0.7, 0.2, 3) == "0.700 ± 0.200"
    assert lb.fmt(0.4, float("nan"), 3) == "0.400"
    assert lb.fmt(float("nan"), float("nan"), 3) == "-"


def _ranked(cells):
    """cells: (defense, attack, [(seed, accuracy, asr at the window's end[, peak in the window])])."""
    rows = [{"defense": d, "attack": a, "seed": s[0], "accuracy_mean": s[1], "asr_window_end": s[2],
             "asr_window_worst": s[3] if len(s) > 3 else s[2]}
            for d, a, seeds in cells for s in seeds]
    t = lb.add_accuracy_drop(_table(rows), "fedavg", "clean")
    s = lb.summarise(t)
    defenses = list(dict.fromkeys(d for d, _, _ in cells))
    return lb.ranking(s, defenses, ["clean", "x", "y"], "clean")


def test_ranking_by_worst_attack_among_cells_within_two_points():
    r = _ranked([
        ("fedavg", "clean", [(1, 0.90, 0.01), (2, 0.90, 0.01)]),
        ("fedavg", "x", [(1, 0.89, 0.95), (2, 0.89, 0.85)]),
        ("fedavg", "y", [(1, 0.90, 0.10), (2, 0.90, 0.10)]),
        # A: x ruins its accuracy (drop 20 points): only y qualifies, worst 0.30
        ("A", "clean", [(1, 0.89, 0.0), (2, 0.89, 0.0)]),
        ("A", "x", [(1, 0.70, 0.0), (2, 0.70, 0.0)]),
        ("A", "y", [(1, 0.89, 0.30), (2, 0.89, 0.30)]),
        # B: both qualify (drop 1.5 points is within 2), worst 0.20 (x); y peaked at 0.9 inside the window
        ("B", "clean", [(1, 0.90, 0.0), (2, 0.90, 0.0)]),
        ("B", "x", [(1, 0.885, 0.20, 0.25), (2, 0.885, 0.20, 0.25)]),
        ("B", "y", [(1, 0.89, 0.05, 0.9), (2, 0.89, 0.05, 0.8)]),
        # C: no qualifying cell; its smallest drop under attack is 3 points
        ("C", "clean", [(1, 0.80, 0.0), (2, 0.80, 0.0)]),
        ("C", "x", [(1, 0.87, 0.0), (2, 0.87, 0.0)]),
        ("C", "y", [(1, 0.80, 0.0), (2, 0.80, 0.0)]),
        # D: no qualifying cell either, smallest drop 5 points: after C
        ("D", "clean", [(1, 0.85, 0.0), (2, 0.85, 0.0)]),
        ("D", "x", [(1, 0.85, 0.0), (2, 0.85, 0.0)]),
        ("D", "y", [(1, 0.80, 0.0), (2, 0.80, 0.0)]),
    ])
    assert [x["defense"] for x in r] == ["B", "A", "fedavg", "C", "D"]
    by = {x["defense"]: x for x in r}
    assert by["B"]["worst_attack"] == "x" and by["B"]["worst_asr"] == pytest.approx(0.20)
    # the peak is shown, not ranked on: B still ranks first on the window's end
    assert by["B"]["peak_attack"] == "y" and by["B"]["peak_asr"] == pytest.approx(0.85)
    assert by["A"]["peak_attack"] == "y"  # x, which ruined A's accuracy, does not count
    assert by["A"]["worst_attack"] == "y" and by["A"]["qualifying"] == 1 and by["A"]["attacked"] == 2
    assert by["fedavg"]["worst_asr"] == pytest.approx(0.90)
    assert by["C"]["worst_attack"] is None and by["C"]["smallest_drop"] == pytest.approx(3.0)
    assert [x["rank"] for x in r] == [1, 2, 3, 4, 5]


def test_the_floor_is_read_in_the_window_end_round_and_shown_with_the_worst_attack():
    rounds = [{"round": r, "clean_target_rate": f} for r, f in enumerate([0.0, 0.1, 0.2, 0.3, 0.4])]
    # a window of rounds 1-2 in a 4-round run: read at round 2; a window still open (stop past the
    # run): its last round; none when the window has no figure or the round kept no floor
    assert lb.window_floor(rounds, {"asr_window_end": 0.5, "stop_round": 2}) == 0.2
    assert lb.window_floor(rounds, {"asr_window_end": 0.5, "stop_round": 9}) == 0.4
    assert lb.window_floor(rounds, {"asr_window_end": 0.5, "stop_round": 0}) == 0.4
    assert lb.window_floor(rounds, {"asr_window_end": None, "stop_round": 2}) is None
    assert lb.window_floor([{"round": 2}], {"asr_window_end": 0.5, "stop_round": 2}) is None
    # the edge case measures its held-out tail, not the test images the floor counts: no floor
    assert lb.window_floor(rounds, {"asr_window_end": 0.5, "stop_round": 2}, "edge_case") is None
    assert lb.window_floor(rounds, {"asr_window_end": 0.5, "stop_round": 2}, "a3fl") == 0.2
    # the peak's floor: the same share in the round of the window's highest attack success, which a
    # model drifting towards the target in one round can make (a peak of 0.104 over a floor of 0.14)
    peak = {"asr_window_end": 0.5, "asr_window_worst": 0.6, "worst_round": 1, "stop_round": 2}
    assert lb.window_floor(rounds, peak, at="worst") == 0.1 and lb.window_floor(rounds, peak) == 0.2
    assert lb.window_floor(rounds, {**peak, "asr_window_worst": None, "worst_round": None}, at="worst") is None
    assert lb.window_floor(rounds, peak, "edge_case", at="worst") is None
    with pytest.raises(ValueError, match="at="):
        lb.window_floor(rounds, peak, at="first")
    assert [a for a in SOTA_BACKDOORS if lb.own_probe_images(a)] == ["edge_case"]
    rows = [{"defense": "A", "attack": a, "seed": seed, "accuracy_mean": 0.9, "asr_window_end": asr,
             "asr_window_worst": worst, "floor_window_end": floor, "floor_window_worst": worst_floor}
            for a, asr, floor, worst, worst_floor in [("clean", 0.0, None, 0.0, None), ("x", 0.30, 0.25, 0.30, 0.25),
                                                      ("y", 0.10, 0.01, 0.40, 0.35)] for seed in (1, 2)]
    rows += [{"defense": "fedavg", "attack": "clean", "seed": seed, "accuracy_mean": 0.9, "asr_window_end": 0.0,
              "asr_window_worst": 0.0, "floor_window_end": None, "floor_window_worst": None} for seed in (1, 2)]
    s = lb.summarise(lb.add_accuracy_drop(_table(rows), "fedavg", "clean"))
    (a,) = [r for r in lb.ranking(s, ["A"], ["clean", "x", "y"], "clean")]
    # ranked on attack success as measured; the floor of that same attack beside it
    assert a["worst_attack"] == "x" and a["worst_asr"] == pytest.approx(0.30)
    assert a["worst_floor"] == pytest.approx(0.25)
    # the peak (y's 0.40) with the floor of its own round
    assert a["peak_attack"] == "y" and a["peak_floor"] == pytest.approx(0.35)
    # as the ranking shows it: with the peak's floor, without one where none was recorded, none at all
    assert lb.peak_text(a) == "0.400 (y; floor 0.350)"
    assert lb.peak_text({**a, "peak_floor": None}) == "0.400 (y)"
    assert lb.peak_text({**a, "peak_attack": None, "peak_asr": None}) == "-"


def test_ranking_ties_break_on_the_clean_drop():
    r = _ranked([
        ("fedavg", "clean", [(1, 0.90, 0.0)]),
        ("E", "clean", [(1, 0.89, 0.0)]), ("E", "x", [(1, 0.90, 0.1)]),
        ("F", "clean", [(1, 0.90, 0.0)]), ("F", "x", [(1, 0.90, 0.1)]),
    ])
    # equal worst attack success: the smaller clean drop first; fedavg has no attacked cell: listed, not ranked
    assert [x["defense"] for x in r] == ["F", "E", "fedavg"]
    assert [x["rank"] for x in r] == [1, 2, None]


def test_heatmap_table_has_mean_std_and_marks_missing_cells():
    t = _table([{"defense": "flame", "attack": "plus", "seed": s, "asr_window_end": v} for s, v in [(1, 0.1), (2, 0.3)]])
    text = lb.heatmap_table(lb.summarise(t), "asr_window_end", ["flame", "krum"], ["plus"])
    lines = text.splitlines()
    assert lines[0] == "| defense | plus |"
    assert lines[2] == "| flame | 0.200 ± 0.141 |"
    assert lines[3] == "| krum | not run |"


def _fake_cell(folder: Path, cell: dict, seed_shift: float) -> None:
    """A finished cell as the recorder and the grid runner write it."""
    folder.mkdir(parents=True)
    cfg = ExperimentConfig.from_run_config(cell)
    attacked = cell.get("attack", "plus") != "none" or cell.get("model-poisoning", "none") != "none"
    asr = [0.0, 0.6, 0.8, 0.3] if attacked else [0.0, 0.02, 0.02, 0.02]
    acc = 0.9 - (0.05 if cell["defense"] == "krum" else 0.0) - seed_shift
    rows = [{"round": r, "accuracy": acc if r == 3 else acc - 0.4, "attack_success_rate": asr[r]} for r in range(4)]
    if attacked:  # the same images untriggered (the recorder's floor)
        for r, floor in zip(rows, [0.0, 0.01, 0.05, 0.02]):
            r["clean_target_rate"] = floor
    for r in rows[1:]:
        r.update({"num_attackers_sampled": 1 if attacked and r["round"] <= 2 else 0,
                  "tpr": 1.0 if attacked and r["round"] <= 2 and cell["defense"] == "flame" else None,
                  "fpr": 0.1 if cell["defense"] == "flame" else None,
                  "clients": [{"partition": p, "num_examples": 50, "weight": 0.1, "flagged": False,
                               "malicious": False} for p in range(10)]})
    (folder / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "timings.jsonl").write_text("".join(json.dumps({"round": r, "round_seconds": 2.0,
                                                              "aggregation_seconds": 0.01}) + "\n" for r in range(4)))
    (folder / "cpu.jsonl").write_text(json.dumps({"cpu_seconds": 10.0, "wall_seconds": 8.0}) + "\n"
                                      + json.dumps({"cpu_seconds": 5.0, "wall_seconds": 4.0}) + "\n")
    from fl_defense.durability import window_metrics

    tprs = [r["tpr"] for r in rows if r.get("tpr") is not None]
    summary = {"config": cfg.as_run_config(), "rounds_completed": 3,
               "final": {"accuracy": acc, "attack_success_rate": asr[3]},
               "mean_over_rounds": {"tpr": sum(tprs) / len(tprs) if tprs else None,
                                    "fpr": 0.1 if cell["defense"] == "flame" else None},
               "attack_window": window_metrics(dict(enumerate(asr)), 1, 2)}
    (folder / "summary.json").write_text(json.dumps(summary))


def test_a_page_of_a_subset_says_so_under_its_title_and_keeps_the_title_in_its_command(tmp_path, monkeypatch):
    path = _board_file(tmp_path)
    path.write_text(path.read_text() + VARIANTS)
    board = lb.Leaderboard.load(path, defenses=["flame", "nnm+krum"], attacks=["plus"], seeds=[1])
    results = tmp_path / "cells"
    for defense, attack, seed, cell in board.cells():
        _fake_cell(results / cell_id(cell), cell, 0.0)
    monkeypatch.setattr(lb, "run_grid", lambda *a, **k: pytest.fail("--report-only ran a cell"))
    out = tmp_path / "page"
    lb.main(["--grid", str(path), "--results", str(results), "--out", str(out), "--defenses", "flame,nnm+krum",
             "--attacks", "plus", "--seeds", "1", "--title", "Two defenses", "--report-only"])
    page = (out / "index.md").read_text()
    assert page.startswith("# Two defenses\n") and "These defenses and attacks, chosen from the leaderboard file" in page
    assert "--title 'Two defenses'" in page  # the command rewrites this page, title included
    assert "| nnm+krum | plus | 1 |" in page  # the variant's row, by its own name
    assert "Variants (rows that are a defense with keys of their own): nnm+krum: defense=\"krum\"" in page
    lb.main(["--grid", str(path), "--results", str(results), "--out", str(out), "--seeds", "1", "--report-only"])
    assert (out / "index.md").read_text().startswith("# Leaderboard: tiny\n\nEvery defense against every attack")


def test_cell_metrics_from_a_constructed_cell(tmp_path):
    board = lb.Leaderboard.load(_board_file(tmp_path, '["flame"]'))
    cell = board.cell_config("flame", "plus", 1)
    _fake_cell(tmp_path / "c", cell, 0.0)
    m = lb.cell_metrics(tmp_path / "c")
    assert m["accuracy_final"] == pytest.approx(0.9)
    assert m["accuracy_mean"] == pytest.approx((0.5 + 0.5 + 0.9) / 3)  # rounds 1..N, not round 0
    assert (m["asr_window_end"], m["asr_window_worst"], m["asr_final"]) == (0.8, 0.8, 0.3)
    assert (m["lifespan_50"], m["lifespan_50_censored"]) == (1, False)
    # never below 0.1 in the run: right-censored, at least the one-round tail plus one
    assert (m["lifespan_10"], m["lifespan_10_censored"]) == (2, True)
    assert m["asr_after_window"] == 0.3  # round 3, the one round after the window (rounds 1-2)
    assert m["floor_window_end"] == 0.05  # the untriggered share in round 2, where asr_window_end is read
    assert m["floor_window_worst"] == 0.05  # and where the window's highest attack success (0.8) is
    assert m["tpr"] == 1.0 and m["fpr"] == pytest.approx(0.1)
    assert m["cpu_seconds"] == 15.0  # every attempt of the cell
    assert m["round_seconds"] == 2.0 and m["aggregation_seconds"] == 0.01
    assert lb._steps(tmp_path / "c", epochs=2, batch_size=16) == 3 * 10 * 2 * 4


def test_a_lifespan_the_tail_ended_first_is_a_lower_bound_and_the_page_says_so():
    # rounds 0..5, window 1-2: seed 1's backdoor falls below 0.5 two rounds after it, seed 2's never
    # within the three-round tail (at least 4); an open window has no lifespan at all
    closed = {"window_closed": True, "stop_round": 2}
    assert lb.lifespans({**closed, "lifespan_50": 2, "lifespan_10": None}, 5) == {
        "lifespan_50": 2, "lifespan_50_censored": False, "lifespan_10": 4, "lifespan_10_censored": True}
    assert lb.lifespans({"window_closed": False, "stop_round": 9, "lifespan_50": None}, 5)["lifespan_50"] is None
    rows = [{"defense": "fedavg", "attack": "a", "seed": s, **lb.lifespans({**closed, "lifespan_50": l50,
                                                                               "lifespan_10": l10}, 5)}
            for s, l50, l10 in [(1, 2, 3), (2, None, 1)]]
    rows.append({"defense": "fedavg", "attack": "b", "seed": 1, **lb.lifespans({**closed, "lifespan_50": 0,
                                                                                  "lifespan_10": 1}, 5)})
    summary = lb.summarise(pd.DataFrame(rows))
    a, b = summary.loc[("fedavg", "a")], summary.loc[("fedavg", "b")]
    assert lb.summary_text(a, "lifespan_50") == ">= 3.0"  # (2 + 4) / 2, a bound: seed 2 never fell
    assert lb.summary_text(a, "lifespan_10") == "2.0 ± 1.4"  # both fell: a mean with its spread
    assert (lb.summary_text(b, "lifespan_50"), lb.summary_text(b, "lifespan_10")) == ("0.0", "1.0")


def test_cpu_records_name_the_hosts_capability_and_the_page_counts_cells_by_it(tmp_path, monkeypatch):
    import torch

    from simulation.grid import cell_cpu, record_cpu

    folder = tmp_path / "c"
    folder.mkdir()
    record_cpu(folder, 3.0, 4.0, "new")
    assert cell_cpu(folder) == (3.0, torch.backends.cpu.get_cpu_capability())
    (folder / "cpu.jsonl").write_text(json.dumps({"cpu_seconds": 1.0, "capability": "AVX2"}) + "\n"
                                      + json.dumps({"cpu_seconds": 1.0, "capability": "AVX512"}) + "\n")
    assert cell_cpu(folder) == (2.0, "AVX2+AVX512")  # resumed on another kind of host
    (folder / "cpu.jsonl").write_text(json.dumps({"cpu_seconds": 1.0}) + "\n")
    assert cell_cpu(folder) == (1.0, None)  # a record from before capabilities were kept

    path = _board_file(tmp_path, '["flame"]')
    board = lb.Leaderboard.load(path, seeds=[1])
    results = tmp_path / "cells"
    for i, (*_, cell) in enumerate(board.cells()):
        _fake_cell(results / cell_id(cell), cell, 0.0)
        if i < 2:
            (results / cell_id(cell) / "cpu.jsonl").write_text(json.dumps({"cpu_seconds": 1.0, "capability": "AVX2"}))
    monkeypatch.setattr(lb, "run_grid", lambda *a, **k: pytest.fail("--report-only ran a cell"))
    lb.main(["--grid", str(path), "--results", str(results), "--out", str(tmp_path / "page"), "--seeds", "1",
             "--report-only"])
    page = (tmp_path / "page" / "index.md").read_text()
    assert f"AVX2 2 cells, not recorded {len(board.cells()) - 2} cells." in page
    assert list(pd.read_csv(tmp_path / "page" / "cells.csv")["capability"].fillna("-")[:2]) == ["AVX2", "AVX2"]


def test_the_page_says_when_a_seeds_cells_started_from_different_models(tmp_path, monkeypatch):
    """A seed's pre-training is rebuilt on each machine; two builds can differ (seed 3 of issue 17's
    report: 0.7555 and 0.7566 before round 1, both on AVX512). The page counts each seed's cells by
    the accuracy they started from, names the baseline's start, and says when a seed is split."""
    path = _board_file(tmp_path, '["flame"]')
    board = lb.Leaderboard.load(path, seeds=[1, 2])
    results = tmp_path / "cells"
    for defense, attack, seed, cell in board.cells():
        folder = results / cell_id(cell)
        _fake_cell(folder, cell, 0.0)
        summary = json.loads((folder / "summary.json").read_text())
        split = seed == 2 and defense == "flame" and attack != "clean"  # the seed's attacked cells, run elsewhere
        summary["initial"] = {"accuracy": 0.7204 if seed == 1 else 0.7566 if split else 0.7555}
        (folder / "summary.json").write_text(json.dumps(summary))
    monkeypatch.setattr(lb, "run_grid", lambda *a, **k: pytest.fail("--report-only ran a cell"))
    lb.main(["--grid", str(path), "--results", str(results), "--out", str(tmp_path / "page"), "--seeds", "1,2",
             "--report-only"])
    page = (tmp_path / "page" / "index.md").read_text()
    table = pd.read_csv(tmp_path / "page" / "cells.csv")
    assert len(table) == 8  # fedavg clean (the baseline), flame clean, plus, alie; two seeds
    assert ("seed 1: 4 cells from 0.7204; seed 2: 2 cells from 0.7555, 2 cells from 0.7566 (the fedavg clean "
            "baseline from 0.7555).") in page
    assert "The cells of seed 2 did not all start from one model" in page and "seeds 1 and" not in page
    assert sorted(table["initial_accuracy"].unique()) == [0.7204, 0.7555, 0.7566]


def test_a_run_warns_when_this_machines_pretraining_is_not_the_seeds_finished_cells_start(tmp_path):
    """Session 29 ran 173 of seed 3's cells from a pre-training rebuilt on its machine (0.7566 before
    round 1) beside 347 from another (0.7555) without a word. Before cells run, each pre-training
    that new cells would start from is checked against the start of its finished cells: a cached
    one that differs is a warning; one not cached here (to be rebuilt) or unreadable is a note; one
    that matches says nothing. The cache is where the cells look for it: under the first results
    folder when the board sets no pretrain-dir."""
    from fl_defense.pretrain import pretrain_id

    path = _board_file(tmp_path, '["flame"]', extra="pretrain-rounds = 2")
    board = lb.Leaderboard.load(path)
    results = tmp_path / "cells"
    pending, key = [], {}
    for defense, attack, seed, cell in board.cells():
        key[seed] = pretrain_id(ExperimentConfig.from_run_config(cell), 10)
        if attack != "clean":
            pending.append(cell)
            continue
        folder = results / cell_id(cell)
        _fake_cell(folder, cell, 0.0)
        summary = json.loads((folder / "summary.json").read_text())
        summary.update({"initial": {"accuracy": {1: 0.7555, 2: 0.7405}[seed]}, "pretrained_from": key[seed]})
        (folder / "summary.json").write_text(json.dumps(summary))

    def cache(seed: int, summary: dict) -> Path:
        folder = results / "pretrain" / key[seed]  # where a cell run with results-dir = results looks
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "summary.json").write_text(json.dumps(summary))
        (folder / "checkpoint.pkl").write_bytes(b"")
        return folder

    cache(1, {"final": {"accuracy": 0.7566}})
    lines = lb.pretraining_warnings(board, pending, [results])
    assert len(lines) == 2
    assert lines[0].startswith("[fl-defense] warning: seed 1's pre-trained model here") and "0.7566" in lines[0]
    assert "but the seed's finished cells started from 0.7555 (2 cells)" in lines[0]
    assert lines[1].startswith("[fl-defense] note: seed 2's pre-training is not cached here")
    assert "finished cells started from a model at accuracy 0.7405 (2 cells)" in lines[1]
    cache(2, {"rounds_completed": 2})  # a cache summary without its final figures: a note, not a crash
    assert lb.pretraining_warnings(board, pending, [results])[1].startswith("[fl-defense] note: seed 2")
    cache(1, {"final": {"accuracy": 0.7555}})
    cache(2, {"final": {"accuracy": 0.7405}})
    assert lb.pretraining_warnings(board, pending, [results]) == []  # the starts match: nothing to say
    assert lb.pretraining_warnings(board, [], [results]) == []  # nothing to run


def test_report_only_builds_the_page_from_results_and_runs_no_cell(tmp_path, monkeypatch):
    path = _board_file(tmp_path, '["flame", "krum"]')
    board = lb.Leaderboard.load(path)
    results = [tmp_path / "host1", tmp_path / "host2"]  # two shards' folders, merged on the page
    for i, (defense, attack, seed, cell) in enumerate(board.cells()):
        if (defense, attack, seed) == ("krum", "alie", 2):
            continue  # not run yet
        _fake_cell(results[i % 2] / cell_id(cell), cell, 0.01 * (seed - 1))

    def no_runs(*a, **k):
        raise AssertionError("--report-only ran a cell")

    monkeypatch.setattr(lb, "run_grid", no_runs)
    out = tmp_path / "page"
    lb.main(["--grid", str(path), "--results", str(results[0]), "--results", str(results[1]), "--out", str(out),
             "--report-only"])
    page = (out / "index.md").read_text()
    assert f"**{len(board.cells()) - 1} of {len(board.cells())} cells**" in page
    command = next(line for line in page.splitlines() if line.startswith("    python -m simulation leaderboard"))
    assert f"--grid {path} --results {results[0]} --results {results[1]} --out {out}" in command
    assert "--report-only" not in command  # the command that runs the cells
    assert "**CPU time:** 0.05 h (195 s)" in page  # 13 cells x 15 s
    # 13 cells x 3 rounds x 10 clients x 2 epochs x ceil(50 / 16) batches replace the training share of the CPU time
    assert f"({195 * (1 - 0.4) + 13 * 3 * 10 * 2 * 4 * 0.001:,.0f} s)" in page
    assert "| krum | not run |" not in page and "not run" in page  # krum x alie seed 2 missing: seed 1 only
    for metric in ("asr_window_end", "accuracy_drop", "tpr", "fpr"):
        assert (out / f"heatmap_{metric}.png").stat().st_size > 1000
    ranking = page.split("## Ranking")[1].split("##")[0]
    rows = [line for line in ranking.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    # krum loses 5 points everywhere (no qualifying cell); flame and fedavg qualify
    assert rows[0].split("|")[2].strip() in ("flame", "fedavg") and "krum" not in rows[0]
    assert "| krum | - | - | none qualifies |" in ranking
    assert rows[0].split("|")[4].strip() == "0.050"  # the floor under its worst attack (round 2, the window's end)
    assert rows[0].split("|")[6].strip() == "0.800 (plus; floor 0.050)"  # the peak, over its own round's floor
    assert "| fedavg |" not in ranking  # the baseline's clean cells alone (fedavg not chosen) are no entry
    cells = pd.read_csv(out / "cells.csv")
    assert len(cells) == len(board.cells()) - 1


def test_exported_records_rebuild_the_same_page_and_their_cells_are_not_run_again(tmp_path, monkeypatch):
    path = _board_file(tmp_path, '["flame", "krum"]')
    board = lb.Leaderboard.load(path)
    results, records = tmp_path / "results", tmp_path / "records"
    cells = board.cells()
    for defense, attack, seed, cell in cells[:-2]:  # the last two not finished yet
        _fake_cell(results / cell_id(cell), cell, 0.01 * (seed - 1))
    (results / cell_id(cells[-2][3])).mkdir()
    (results / cell_id(cells[-2][3]) / "checkpoint.pkl").write_bytes(b"partial")  # a cell cut short
    (results / cell_id(cells[0][3]) / "checkpoint.pkl").write_bytes(b"x" * 10)
    lb.main(["--grid", str(path), "--results", str(results), "--export", str(records)])
    exported = sorted(p.name for p in records.iterdir())
    assert exported == sorted(cell_id(c) for *_, c in cells[:-2])  # finished cells only
    assert {p.name for p in (records / exported[0]).iterdir()} <= set(lb.RECORD_FILES)  # no checkpoint, no log
    again = lb.export_records(board, [results], records)
    assert again == []  # what is there already is left as it is

    def page(*roots):
        out = tmp_path / f"page{len(roots)}"
        lb.main(["--grid", str(path), *[a for r in roots for a in ("--results", str(r))], "--out", str(out),
                 "--report-only"])
        return pd.read_csv(out / "cells.csv")

    assert page(records).equals(page(results))
    # a run with the records as a further results folder runs only the cells they lack
    ran = []
    monkeypatch.setattr(lb, "run_grid", lambda grid, out, **kwargs: ran.extend(cell_id(c) for c in grid.cells))
    monkeypatch.setattr(lb, "write_page", lambda *a, **k: tmp_path / "unused")
    lb.main(["--grid", str(path), "--results", str(tmp_path / "fresh"), "--results", str(records)])
    assert ran == [cell_id(c) for *_, c in cells[-2:]]


@pytest.mark.slow
def test_smoke_leaderboard_runs_cells_and_resumes(tmp_path):
    """2 defenses x (clean + plus + boost), 1 seed, 2 rounds after 1 clean pre-training round, digits:
    the cells run for real through Flower; run again, every cell is skipped and the page is the same."""
    import subprocess
    import sys

    path = tmp_path / "smoke.toml"
    path.write_text(f"""
[grid]
name = "smoke-board"
num-supernodes = 10
[fixed]
dataset = "digits"
num-server-rounds = 2
fraction-fit = 0.5
attack-stop-round = 1
pretrain-rounds = 1
pretrain-dir = "{tmp_path / 'pretrain'}"
malicious-fraction = 0.2
local-epochs = 1
[leaderboard]
defenses = ["fedavg", "flame"]
seeds = [1]
[attacks.clean]
attack = "none"
model-poisoning = "none"
[attacks.plus]
attack = "plus"
[attacks.boost]
attack = "plus"
model-poisoning = "boost"
""")
    results, out = tmp_path / "results", tmp_path / "page"
    cmd = [sys.executable, "-m", "simulation", "leaderboard", "--grid", str(path), "--results", str(results),
           "--out", str(out), "--attacks", "plus", "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cells = pd.read_csv(out / "cells.csv")
    assert sorted(zip(cells["defense"], cells["attack"])) == [("fedavg", "clean"), ("fedavg", "plus"),
                                                               ("flame", "clean"), ("flame", "plus")]
    assert (cells["cpu_seconds"] > 0).all() and (cells["rounds"] == 2).all()
    assert len(list((tmp_path / "pretrain").glob("*/summary.json"))) == 1  # one pre-training, shared
    page = (out / "index.md").read_text()
    assert "**4 of 4 cells**" in page and "| flame |" in page
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done earlier") == 4
    # each line names the cell's row, column and seed, which its folder name cannot
    assert "(row flame, column plus, seed 1): done earlier" in again.stdout
    assert "(row fedavg, column clean, seed 1): " in proc.stdout
    assert pd.read_csv(out / "cells.csv").drop(columns=["round_seconds", "aggregation_seconds"]).equals(
        cells.drop(columns=["round_seconds", "aggregation_seconds"]))


def test_a_partial_page_says_so_and_ranks_no_defense_without_an_attacked_cell(tmp_path, monkeypatch):
    path = _board_file(tmp_path, '["flame", "krum"]')
    board = lb.Leaderboard.load(path)
    results = tmp_path / "results"
    for defense, attack, seed, cell in board.cells():
        if defense == "krum" and attack != "clean" or (defense, attack) == ("flame", "alie"):
            continue  # krum: its clean cells only; flame: plus only
        _fake_cell(results / cell_id(cell), cell, 0.0)
    monkeypatch.setattr(lb, "run_grid", lambda *a, **k: pytest.fail("--report-only ran a cell"))
    out = tmp_path / "page"
    lb.main(["--grid", str(path), "--results", str(results), "--out", str(out), "--report-only",
             "--note", "two shards side by side"])
    page = (out / "index.md").read_text()
    finished = 2 * 4  # fedavg clean (the baseline), flame clean and plus, krum clean; 2 seeds each
    assert f"**Partial:** {finished} of {len(board.cells())} cells finished" in page
    ranking = page.split("## Ranking")[1].split("\n## ")[0]
    assert "| 1 | flame |" in ranking and "qualifying" in ranking
    assert "| 1 of 1 (1 of 2 finished) |" in ranking  # flame: plus qualifies, alie not run
    assert "| - | krum | - | - | no attacked cell finished | - | 0 of 2 |" in ranking
    assert "| 0.800 (plus; floor 0.050) |" in ranking  # flame's plus cell peaked at 0.8 inside the window
    assert "**How it was run:** two shards side by side" in page
    command = next(line for line in page.splitlines() if line.startswith("    python -m simulation leaderboard"))
    assert "--note" not in command and "side by side" not in command


FORGED = """
[attacks.fisher_noise]
attack = "plus"
fisher-forgery = "noise"
"""


def test_a_forged_fisher_column_shares_the_plus_cell_of_every_defense_that_reads_no_fisher(tmp_path, monkeypatch):
    path = _board_file(tmp_path, '["fedavg", "fdcr", "sdfc", "flame"]')
    path.write_text(path.read_text() + FORGED)
    board = lb.Leaderboard.load(path)
    for d in ("fedavg", "flame"):  # the forgery has nothing to act on: the same run config, the same cell
        assert board.cell_config(d, "fisher_noise", 1) == board.cell_config(d, "plus", 1)
    for d in ("fdcr", "sdfc"):
        assert board.cell_config(d, "fisher_noise", 1)["fisher-forgery"] == "noise"
        assert cell_id(board.cell_config(d, "fisher_noise", 1)) != cell_id(board.cell_config(d, "plus", 1))
    assert board.shared_columns() == {"fisher_noise": "plus"}
    assert len(board.cells()) == 4 * 4 * 2 and len(board.grid().cells) == 4 * 4 * 2 - 2 * 2  # each cell runs once
    assert len({cell_id(c) for c in board.grid().cells}) == len(board.grid().cells)
    results = tmp_path / "cells"
    for cell in board.grid().cells:
        _fake_cell(results / cell_id(cell), cell, 0.0)
    monkeypatch.setattr(lb, "run_grid", lambda *a, **k: pytest.fail("--report-only ran a cell"))
    out = tmp_path / "page"
    lb.main(["--grid", str(path), "--results", str(results), "--out", str(out), "--report-only"])
    page = (out / "index.md").read_text()
    assert "**28 of 28 cells** finished" in page and "4 places of the matrix share a cell" in page
    assert "fisher_noise with plus" in page
    assert "**CPU time:** 0.12 h (420 s)" in page  # 28 cells x 15 s: a shared cell counted once
    every = page.split("## Every cell")[1]
    assert every.count("| flame | fisher_noise | 2 |") == 1  # the column shows the plus cell's figures
    assert "fisher-forgery=noise" not in page.split("Registered attacks without a bundle here:")[-1]


def test_uncovered_attacks_name_the_backdoors_and_forgeries_without_a_bundle():
    missing = lb.uncovered_attacks({"clean": {"attack": "none", "model-poisoning": "none"},
                                    "a3fl": {"attack": "a3fl"}, "mimic": {"attack": "plus", "fisher-forgery": "mimic"}})
    assert "edge_case" in missing and "iba" in missing and "a3fl" not in missing
    assert "fisher-forgery=noise" in missing and "fisher-forgery=clean" in missing
    assert "fisher-forgery=mimic" not in missing and "fisher-forgery=none" not in missing
    shipped = lb.Leaderboard.load(ROOT / "simulation" / "grids" / "leaderboard.toml")
    assert lb.uncovered_attacks(shipped.attacks) == ["mask"]  # a trigger file of the user's own


def test_the_grid_names_each_cell_by_its_row_columns_and_seed():
    """A cell's folder starts with its base defense and its data attack, so NNM + Krum's sign-flipping
    cell reads 'krum-...-none-...': the run's lines say the row, the columns sharing it and the seed."""
    board = lb.Leaderboard.load(ROOT / "simulation" / "grids" / "leaderboard.toml")
    grid = board.grid()
    assert set(grid.names) == {cell_id(c) for c in grid.cells}
    name = {(d, a, s): grid.names[cell_id(c)] for d, a, s, c in board.cells()}
    flip = cell_id(board.cell_config("nnm+krum", "signflip", 2))
    assert flip.startswith("krum-fashion_mnist-none-") and name["nnm+krum", "signflip", 2] == "row nnm+krum, column signflip, seed 2"
    # a forged Fisher reaches FDCR only: for Krum the forgery columns share the plus cell, and say so
    assert name["krum", "fisher_noise", 3] == "row krum, columns plus, fisher_clean, fisher_mimic, fisher_noise, seed 3"
    assert name["fdcr", "fisher_noise", 3] == "row fdcr, column fisher_noise, seed 3"


def test_a_file_that_extends_another_shares_its_cells_and_adds_columns(tmp_path, monkeypatch):
    base = _board_file(tmp_path, '["flame", "krum"]')
    child = tmp_path / "child.toml"
    child.write_text('[leaderboard]\nextends = "board.toml"\nattacks = ["alie", "alie_partial"]\n'
                     '[fixed]\nnum-server-rounds = 3\n'  # the same value: nothing changes
                     '[attacks.alie_partial]\nattack = "none"\nmodel-poisoning = "alie"\nattacker-knowledge = "partial"\n')
    parent, board = lb.Leaderboard.load(base), lb.Leaderboard.load(child)
    assert board.extends == "board.toml" and board.name == "tiny" and board.defenses == ["flame", "krum"]
    assert list(board.attacks) == ["clean", "alie", "alie_partial"]  # its own choice of columns
    assert board.seeds == parent.seeds and board.defense_keys == parent.defense_keys
    ids = {cell_id(c) for *_, c in parent.cells()}
    shared = [a for d, a, s, c in board.cells() if cell_id(c) in ids]
    assert set(shared) == {"clean", "alie"} and len(shared) == 2 + 2 * 2 * 2  # fedavg's clean cells too
    assert lb.Leaderboard.load(child, attacks=["alie_partial"]).attacks.keys() == {"clean", "alie_partial"}
    results = tmp_path / "cells"
    for *_, cell in board.cells():
        _fake_cell(results / cell_id(cell), cell, 0.0)
    monkeypatch.setattr(lb, "run_grid", lambda *a, **k: pytest.fail("--report-only ran a cell"))
    out = tmp_path / "page"
    lb.main(["--grid", str(child), "--results", str(results), "--out", str(out), "--title", "Child",
             "--report-only"])
    assert f"(`{child.as_posix()}`, which extends `board.toml`" in (out / "index.md").read_text()
    child.write_text('[leaderboard]\nextends = "nowhere.toml"\n')
    with pytest.raises(ConfigError, match="extends = 'nowhere.toml'"):
        lb.Leaderboard.load(child)


def test_the_shipped_report_of_issue_17_reuses_the_leaderboards_full_knowledge_cells():
    grids = ROOT / "simulation" / "grids"
    board, report = lb.Leaderboard.load(grids / "leaderboard.toml"), lb.Leaderboard.load(grids / "attacks_protocol.toml")
    ids = {cell_id(c) for *_, c in board.cells()}
    own = {"alie_20pct", "min_max_20pct"}  # the papers' attacker share, next to the protocol's
    for defense, attack, seed, cell in report.cells():
        assert (cell_id(cell) in ids) is (attack in board.attacks), (defense, attack)
        assert (attack in board.attacks) is not (attack.endswith("_partial") or attack in own)
    assert report.subset and report.extends == "leaderboard.toml"


def test_the_shipped_durability_report_boosts_each_backdoor_as_the_leaderboards_boost_column():
    grids = ROOT / "simulation" / "grids"
    board, report = lb.Leaderboard.load(grids / "leaderboard.toml"), lb.Leaderboard.load(grids / "durability_protocol.toml")
    ids = {cell_id(c) for *_, c in board.cells()}
    boost = board.attacks["boost"]
    for defense, attack, seed, cell in report.cells():
        assert (cell_id(cell) in ids) is (attack in ("clean", "boost")), (defense, attack)
        if attack not in ("clean", "boost"):  # the state-of-the-art backdoor's own bundle, boosted as boost is
            backdoor = attack.removesuffix("_boost")
            assert {**board.attacks[backdoor], **boost, "attack": backdoor} == report.attacks[attack], attack
    assert report.subset and set(report.defenses) <= set(board.defenses)


def test_the_shipped_adaptive_boost_report_is_the_boost_column_made_adaptive():
    grids = ROOT / "simulation" / "grids"
    board = lb.Leaderboard.load(grids / "leaderboard.toml")
    report = lb.Leaderboard.load(grids / "adaptive_boost_protocol.toml")
    ids = {cell_id(c) for *_, c in board.cells()}
    boost = board.attacks["boost"]
    for name in ("clean", "mimic", "noise"):  # the boost bundle plus a forged Fisher
        assert report.attacks[f"boost_fisher_{name}"] == {**boost, "fisher-forgery": name}
    assert report.attacks["rlr_adaptive_boost"] == {**board.attacks["rlr_adaptive"], "rlr-adaptive-boost": 10.0}
    for defense, attack, seed, cell in report.cells():
        reads_fisher = ExperimentConfig.from_run_config(cell).reads_fisher
        # clean and boost are the leaderboard's cells; a forged Fisher is the boost cell where no Fisher is read
        shared = attack in ("clean", "boost") or (attack.startswith("boost_fisher") and not reads_fisher)
        assert (cell_id(cell) in ids) is shared, (defense, attack)
    assert set(report.defenses) == {"fedavg", "rlr", "fdcr", "sdfc"}


def test_a_cycle_of_extended_files_and_a_bad_attacks_choice_fail_naming_the_key(tmp_path):
    (tmp_path / "a.toml").write_text('[leaderboard]\nextends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('[leaderboard]\nextends = "a.toml"\n')
    with pytest.raises(ConfigError, match="extends itself"):
        lb.Leaderboard.load(tmp_path / "a.toml")
    path = _board_file(tmp_path)
    path.write_text(path.read_text().replace("seeds = [1, 2]", 'seeds = [1, 2]\nattacks = "alie"'))
    with pytest.raises(ConfigError, match="attacks must be"):
        lb.Leaderboard.load(path)


def test_a_column_a_defense_cannot_run_is_not_applicable_and_a_bad_key_still_fails(tmp_path, monkeypatch):
    path = _board_file(tmp_path, '["fedavg", "bulyan"]')
    path.write_text(path.read_text() + '[attacks.alie_f2]\nattack = "none"\nmodel-poisoning = "alie"\n'
                    'num-malicious = 2\n')  # 2 sampled of 10: Bulyan needs 4f + 3 = 11
    board = lb.Leaderboard.load(path)
    assert list(board.unsupported) == [("bulyan", "alie_f2")]
    why = board.unsupported[("bulyan", "alie_f2")]  # the reason, without the advice on the federation's size
    assert why.startswith("run-config key 'num-malicious': ") and "Bulyan needs n >= 4f + 3" in why
    assert "SuperNodes" not in why and "clients sampled per round" not in why
    assert all((d, a) != ("bulyan", "alie_f2") for d, a, *_ in board.cells())
    assert ("fedavg", "alie_f2", 1) in [(d, a, s) for d, a, s, _ in board.cells()]
    results = tmp_path / "cells"
    for *_, cell in board.cells():
        _fake_cell(results / cell_id(cell), cell, 0.0)
    monkeypatch.setattr(lb, "run_grid", lambda *a, **k: pytest.fail("--report-only ran a cell"))
    out = tmp_path / "page"
    lb.main(["--grid", str(path), "--results", str(results), "--out", str(out), "--report-only"])
    page = (out / "index.md").read_text()
    assert "| bulyan | " in page and " n/a |" in page and "not run" not in page
    assert f"Not applicable (n/a; no cell): bulyan x alie_f2: {why}." in page
    # 2 defenses x 4 columns x 2 seeds, less bulyan x alie_f2 in each seed
    assert f"**{len(board.cells())} of {len(board.cells())} cells** finished (2 defenses x 4 attack columns x 2 seeds, " \
        "less 2 not applicable (n/a, below))." in page and len(board.cells()) == 14
    path.write_text(path.read_text().replace("num-malicious = 2", 'num-malicious = "two"'))
    with pytest.raises(ConfigError, match="num-malicious"):  # a bad value is no n/a: the file fails
        lb.Leaderboard.load(path)


def test_first_active_round_of_a_cell_comes_from_its_run_config():
    def first(cell):
        return lb.first_active_round(ExperimentConfig.from_run_config(cell))

    assert first({"defense": "fldetector"}) == 12  # N = 10: the window holds N pairs after N + 1
    assert first({"defense": "fldetector", "fldetector-window": 3}) == 5
    assert first({"defense": "rlr", "rlr-aggregator": "fldetector"}) == 12  # RLR's base rule
    assert first({"defense": "flame"}) == 1
    assert first({"defense": "rlr"}) == 1


def test_a_page_names_the_defenses_that_cannot_act_in_the_window(tmp_path, monkeypatch):
    path = _board_file(tmp_path, '["fldetector", "flame"]')
    board = lb.Leaderboard.load(path, seeds=[1])
    results = tmp_path / "results"
    for defense, attack, seed, cell in board.cells():
        _fake_cell(results / cell_id(cell), cell, 0.0)
    monkeypatch.setattr(lb, "run_grid", lambda *a, **k: pytest.fail("--report-only ran a cell"))
    out = tmp_path / "page"
    lb.main(["--grid", str(path), "--results", str(results), "--out", str(out), "--seeds", "1", "--report-only"])
    page = (out / "index.md").read_text()
    late = page.split("**Defenses that cannot act from the attack's first round**")[1].split("\n## ")[0]
    assert "- fldetector (every attacked column): acts from round 12 of the run" in late
    assert "the attack window is rounds 1-2, so it cannot act at all while the attack lasts" in late
    assert "flame" not in late  # it judges each round on its own
    path = _board_file(tmp_path, '["flame"]')
    lb.main(["--grid", str(path), "--results", str(results), "--out", str(out), "--seeds", "1", "--report-only"])
    assert "cannot act from the attack's first round" not in (out / "index.md").read_text()


def test_a_window_the_defense_joins_late_names_the_rounds_it_misses():
    board = lb.Leaderboard.load(ROOT / "simulation/grids/warmup_protocol.toml")
    assert board.clean == "clean_30" and board.cell_config("fedavg", "clean_30", 1)["num-server-rounds"] == 30
    assert lb.late_defenses(board, ["plus_after_warmup", "boost_after_warmup"]) == [
        "- fldetector (every attacked column): acts from round 12 of the run (it needs the earlier rounds' history "
        "first, `Defense.first_active_round`); the attack window is rounds 11-20, so round 11 of the attack meets "
        "the undefended aggregate."]


def test_a_cell_run_with_another_config_than_its_cell_has_now_stops_the_leaderboard(tmp_path, monkeypatch):
    """A changed default leaves a cell's folder name as it was: the record's config, not the name,
    says whether the figures are this config's. Where a key differs, every mode fails naming the
    folder and the key; a key that says only where a cell ran, or one the record predates (at its
    default), is not a difference."""
    path = _board_file(tmp_path, '["flame"]')
    board = lb.Leaderboard.load(path, seeds=[1])
    results = tmp_path / "cells"
    for *_, cell in board.cells():
        _fake_cell(results / cell_id(cell), cell, 0.0)
    monkeypatch.setattr(lb, "run_grid", lambda *a, **k: pytest.fail("a cell ran before the records were checked"))
    args = ["--grid", str(path), "--results", str(results), "--out", str(tmp_path / "page"), "--seeds", "1"]
    summary_path = results / cell_id(board.cells()[1][3]) / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["config"]["results-dir"] = "/elsewhere"  # where it ran
    summary["config"].pop("fisher-forgery")  # a record from before the key existed (its default now)
    summary_path.write_text(json.dumps(summary))
    lb.main([*args, "--report-only"])
    assert lb.stale_records(board, [results]) == []

    summary["config"]["local-epochs"] += 1  # as if the default had changed since the cell ran
    summary_path.write_text(json.dumps(summary))
    assert lb.stale_records(board, [results]) == [
        (summary_path.parent, f"local-epochs: recorded {summary['config']['local-epochs']}, "
                              f"now {summary['config']['local-epochs'] - 1}")]
    for mode in (["--report-only"], [], ["--export", str(tmp_path / "export")]):
        with pytest.raises(ConfigError, match=f"1 finished leaderboard cells .*/{summary_path.parent.name}: local-epochs"):
            lb.main([*args, *mode])

    # a stale copy where --export keeps the records (the committed cells) stops the export too
    export = tmp_path / "export"
    shutil.copytree(summary_path.parent, export / summary_path.parent.name)
    summary["config"]["local-epochs"] -= 1
    summary_path.write_text(json.dumps(summary))
    lb.main([*args, "--report-only"])
    with pytest.raises(ConfigError, match=f"1 finished leaderboard cells .*export/{summary_path.parent.name}: local-epochs"):
        lb.main([*args, "--export", str(export)])


def test_the_page_projects_the_unfinished_cells_cpu_from_their_columns_medians(tmp_path):
    import pandas as pd

    path = _board_file(tmp_path, '["flame", "krum"]')
    board = lb.Leaderboard.load(path, seeds=[1, 2])
    cells = {(d, a, s): cell_id(c) for d, a, s, c in board.cells()}
    finished = pd.DataFrame([  # clean: 10 and 30 s (median 20); plus: 4 s; alie: none finished
        {"defense": "flame", "attack": "clean", "seed": 1, "cell": cells[("flame", "clean", 1)], "cpu_seconds": 10.0},
        {"defense": "krum", "attack": "clean", "seed": 1, "cell": cells[("krum", "clean", 1)], "cpu_seconds": 30.0},
        {"defense": "flame", "attack": "plus", "seed": 1, "cell": cells[("flame", "plus", 1)], "cpu_seconds": 4.0},
        {"defense": "krum", "attack": "plus", "seed": 1, "cell": cells[("krum", "plus", 1)], "cpu_seconds": None}])
    todo = {name for name in cells.values()} - set(finished["cell"])
    # the clean column's 4 unfinished cells (fedavg's two, flame's and krum's seed 2) at 20 s, plus's 2 (seed 2)
    # at 4 s (krum's seed-1 plus cell is finished without a record), alie's 4 at the median of all three records (10 s)
    assert len(todo) == 10
    assert lb.remaining_cpu_seconds(board, finished) == (10, 4 * 20.0 + 2 * 4.0 + 4 * 10.0)
    assert "**Still to run:** 10 cells, about 0.0 CPU h (128 s) projected" in lb.remaining_cpu_text(board, finished)
    everything = pd.DataFrame([{"attack": a, "cell": n, "cpu_seconds": 1.0} for (_, a, _), n in cells.items()])
    assert lb.remaining_cpu_seconds(board, everything) == (0, 0.0) and lb.remaining_cpu_text(board, everything) == ""


def test_a_collapsed_federation_is_counted_and_the_page_lists_it(tmp_path, monkeypatch):
    """Rounds whose every reply was rejected (the model kept: sign flipping blew it up until each
    update overflowed float32) are counted per cell and listed on the page; a round without replies,
    or with a valid update, is not such a round."""
    assert lb.no_valid_update({"num_clients": 0, "num_rejected": 10, "num_failures": 0})
    assert lb.no_valid_update({"num_clients": 0, "num_rejected": 0, "num_failures": 3})
    assert not lb.no_valid_update({"num_clients": 1, "num_rejected": 9})
    assert not lb.no_valid_update({"num_clients": 0, "num_rejected": 0, "num_failures": 0})
    assert not lb.no_valid_update({"round": 1})  # records from before the counts: none
    path = _board_file(tmp_path, '["flame"]')
    board = lb.Leaderboard.load(path)
    results = tmp_path / "cells"
    for defense, attack, seed, cell in board.cells():
        _fake_cell(results / cell_id(cell), cell, 0.0)
    broken = results / cell_id(board.cell_config("flame", "plus", 1))
    rows = [json.loads(line) for line in (broken / "rounds.jsonl").read_text().splitlines()]
    for r in rows[2:]:
        r.update({"num_clients": 0, "num_rejected": 10, "num_failures": 0})
    (broken / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert lb.cell_metrics(broken)["rounds_no_valid"] == 2
    assert lb.cell_metrics(results / cell_id(board.cell_config("flame", "clean", 1)))["rounds_no_valid"] == 0
    monkeypatch.setattr(lb, "run_grid", lambda *a, **k: pytest.fail("--report-only ran a cell"))
    out = tmp_path / "page"
    lb.main(["--grid", str(path), "--results", str(results), "--out", str(out), "--report-only"])
    page = (out / "index.md").read_text()
    assert "**Collapsed federations**" in page
    listed = [line for line in page.splitlines() if "rounds without a valid update" in line]
    assert listed == ["- flame x plus, seed 1: 2 of 3 rounds without a valid update (every one rejected or failed; "
                      "the model kept); final accuracy 0.900."]
    assert "rounds_no_valid" in (out / "cells.csv").read_text().splitlines()[0]


def test_a_page_links_the_protocol_from_wherever_under_docs_it_is_written():
    """A report one folder deeper (docs/results/attacks-protocol/second-start) broke the strict docs
    build with the fixed '../../protocol.md'; the link is now relative to the page's folder."""
    from simulation.grid import ROOT

    assert lb.docs_link(ROOT / "docs" / "results" / "leaderboard", "protocol.md") == "../../protocol.md"
    assert lb.docs_link(ROOT / "docs" / "results" / "a" / "b", "protocol.md") == "../../../protocol.md"
    assert lb.docs_link(ROOT / "results" / "leaderboard", "protocol.md") == "../../protocol.md"  # outside docs/


def test_the_starting_models_line_counts_old_records_and_tells_close_starts_apart():
    cells = pd.DataFrame({"defense": ["fedavg", "flame", "krum", "fedavg", "flame"],
                          "attack": ["clean", "plus", "plus", "clean", "plus"], "seed": [1, 1, 1, 2, 2],
                          "initial_accuracy": [0.75551, 0.75549, None, None, None]})
    line = lb.starting_models_text(cells, "fedavg", "clean")
    # two starts that print alike at four digits get eight; cells with no record are counted, not dropped
    assert ("seed 1: 1 cell from 0.75549000, 1 cell from 0.75551000, 1 not recorded (the fedavg clean baseline "
            "from 0.75551000); seed 2: 2 not recorded.") in line
    assert "The cells of seed 1 did not all start from one model" in line
    assert lb.starting_models_text(cells.assign(initial_accuracy=None), "fedavg", "clean") is None
