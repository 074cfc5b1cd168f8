"""The leaderboard: every defense against every attack, and no attack, under the benchmark protocol
(docs/protocol.md), run as one resumable, shardable grid, and the Markdown page it produces.

    python -m simulation leaderboard --grid simulation/grids/leaderboard.toml --results results/leaderboard
    python -m simulation leaderboard ... --shard 3/8            # cells 3, 11, 19, ... (no page)
    python -m simulation leaderboard ... --report-only --results DIR1 --results DIR2   # page only, no cell runs
    python -m simulation leaderboard ... --export docs/results/leaderboard/cells       # keep the records
    python -m simulation leaderboard ... --ray-address auto --cpus-per-cell 4         # cells as Ray tasks

``--export DIR`` copies the records of every finished cell (``RECORD_FILES``: no checkpoint, no
log) into ``DIR/<cell>``; the committed copy under ``docs/results/leaderboard/cells`` is the page's
source, and a later run given it as a further ``--results`` folder skips the cells it holds: the
matrix fills up across machines and sessions without rerunning a cell.

Leaderboard file: a grid file whose ``[fixed]`` table is the protocol, plus

    [leaderboard]
    defenses = "all"             # every defense in fl_defense.defenses.DEFENSES and every variant (or a list)
    exclude-defenses = []        # names left out of "all"
    seeds = [1, 2, 3]
    baseline = "fedavg"          # accuracy drop: against this defense's clean cell, seed by seed
    clean = "clean"              # the bundle without attackers
    [defense-keys.norm_clipping] # keys one defense needs (clip-norm for norm clipping)
    clip-norm = 2.0
    [variants."nnm+krum"]        # a further row: a defense with keys of its own (a pre-aggregation
    defense = "krum"             # wrapper, a parameter setting); joins "all" after the registry's
    pre-aggregation = "nnm"
    [attacks.clean]              # a named bundle of run-config keys per attack, in column order
    attack = "none"
    model-poisoning = "none"
    [attacks.alie]
    attack = "none"
    model-poisoning = "alie"

Cells are defense x attack x seed, each the protocol plus the defense's keys plus the attack's bundle;
a cell's folder is named by a hash of its run config (``grid.cell_id``), so the page finds every cell
of the matrix in any of the results folders it is given, and finished cells are never rerun (a
finished cell whose recorded config differs from its cell's now, a changed default, stops the
command: ``check_records``). A
forged Fisher against a defense that asks the clients for none is dropped from the cell's run config
(``effective_config``), so such a column shares the cell of the column without it.

A file of its own can extend another and add or choose columns (a report over the leaderboard's
cells plus a few of its own; ``simulation/grids/attacks_protocol.toml`` is issue 17's):

    [leaderboard]
    extends = "leaderboard.toml"     # its tables, updated by this file's (a path relative to this file)
    attacks = ["alie", "alie_partial"]   # the columns shown and run ("all" by default; --attacks overrides)
    [attacks.alie_partial]
    attack = "none"
    model-poisoning = "alie"
    attacker-knowledge = "partial"

Per cell: final and mean accuracy (rounds 1..N), the accuracy drop against clean FedAvg (mean
accuracy, same seed, percentage points), attack success at the window's end, the worst in it, at the run's end, its
mean after the window and the lifespans (rounds after the window until below 0.5 and 0.1; ``fl_defense.durability``;
a backdoor still above at the run's end counts as the tail's length plus one and the page marks the mean as a
lower bound, ``>=``), TPR/FPR over the
rounds where defined, aggregation and round time, and the process CPU time of the cell
(``cpu.jsonl``, written by the grid runner). Every table gives mean ± std over seeds.

Ranking: among a defense's attacked cells whose mean accuracy stays within ``2`` points of clean
FedAvg's (a drop <= 2.0), its score is the highest mean attack success at the window's end (its
worst attack); lower ranks first, ties by the clean cell's accuracy drop. A defense with no
qualifying cell is ranked after every defense with one, by its smallest accuracy drop under attack.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from fl_defense.config import ConfigError, ExperimentConfig
from fl_defense.durability import mean_after_window, window_end_round

from .grid import (GRID_RUN_CONTROL, ROOT, Grid, add_ray_arguments, cell_cpu, cell_id, cell_state, parse_shard, run_grid,
                   settle_interrupted_attempt)
from .report import BOOKKEEPING

QUALIFY_POINTS = 2.0
DEFAULT_GRID = "simulation/grids/leaderboard.toml"
DEFAULT_PAGE = "docs/results/leaderboard"
# what the page reads of a finished cell (cell_metrics, training_steps): what --export keeps
RECORD_FILES = ("summary.json", "rounds.jsonl", "timings.jsonl", "cpu.jsonl")

# metric -> (heading, digits); values per cell and seed, mean ± std over seeds in the page
LIFESPANS = ("lifespan_50", "lifespan_10")  # right-censored when the tail ends first (lifespans())
METRICS = {
    "accuracy_final": ("final accuracy", 3),
    "accuracy_mean": ("mean accuracy", 3),
    "accuracy_drop": ("accuracy drop (points)", 1),
    "asr_window_end": ("attack success at the window's end", 3),
    "asr_window_worst": ("worst attack success in the window", 3),
    "floor_window_end": ("the same images untriggered at the window's end (floor)", 3),
    "floor_window_worst": ("the same images untriggered in the window's worst round (the peak's floor)", 3),
    "asr_final": ("attack success at the run's end", 3),
    "asr_after_window": ("mean attack success after the window", 3),
    "lifespan_50": ("rounds after the window to < 0.5", 1),
    "lifespan_10": ("rounds after the window to < 0.1", 1),
    "tpr": ("TPR", 2),
    "fpr": ("FPR", 2),
    "aggregation_seconds": ("aggregation (s)", 4),
    "round_seconds": ("round (s)", 2),
    "cpu_seconds": ("cell CPU (s)", 0),
}


@dataclass
class Leaderboard:
    """The defense x attack x seed matrix of one leaderboard file (module docstring)."""

    name: str
    num_supernodes: int
    fixed: dict
    defenses: list[str]
    attacks: dict[str, dict]
    seeds: list[int]
    defense_keys: dict[str, dict] = field(default_factory=dict)
    variants: dict[str, dict] = field(default_factory=dict)
    baseline: str = "fedavg"
    clean: str = "clean"
    path: str = DEFAULT_GRID
    extends: str | None = None  # the leaderboard file this one extends (read_spec)
    subset: bool = False  # defenses or attacks chosen (arguments, the file's own attacks list)
    # (defense, attack) -> why the defense cannot run that column's configuration with the protocol's
    # round (Bulyan told f = 2 of 10: n >= 4f + 3 fails): no cell, "n/a" on the page
    unsupported: dict[tuple[str, str], str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path, defenses: list[str] | None = None, attacks: list[str] | None = None,
             seeds: list[int] | None = None) -> "Leaderboard":
        """Read a leaderboard file; ``defenses``/``attacks``/``seeds`` choose a subset. The clean
        bundle is always in, and so is the baseline defense's clean cell (the accuracy drop's reference)."""
        from fl_defense.defenses import DEFENSES

        spec = read_spec(Path(path))
        meta, board = spec.get("grid", {}), spec.get("leaderboard", {})
        bundles = {name: dict(keys) for name, keys in spec.get("attacks", {}).items()}
        if attacks is None and board.get("attacks", "all") != "all":  # the file's own columns; --attacks overrides
            if not isinstance(board["attacks"], list):
                raise ConfigError(f"leaderboard file {path}: [leaderboard] attacks must be \"all\" or a list of "
                                  f"bundle names, not {board['attacks']!r}")
            attacks = list(board["attacks"])
        clean = board.get("clean", "clean")
        if clean not in bundles:
            raise ConfigError(f"leaderboard file {path}: [attacks.{clean}] (the bundle without attackers) is missing")
        variants = {name: dict(keys) for name, keys in spec.get("variants", {}).items()}
        for name, keys in variants.items():
            if name in DEFENSES:
                raise ConfigError(f"leaderboard file {path}: [variants.{name}] has a registered defense's name")
            if keys.get("defense") not in DEFENSES:
                raise ConfigError(f"leaderboard file {path}: [variants.{name}] defense = {keys.get('defense')!r} "
                                  f"is not among {', '.join(DEFENSES)}")
        chosen = board.get("defenses", "all")
        exclude = set(board.get("exclude-defenses", []))
        rows = [*DEFENSES, *variants]
        names = [d for d in rows if d not in exclude] if chosen == "all" else list(chosen)
        if defenses:
            names = list(defenses)
        unknown = [d for d in names if d not in rows]
        if unknown:
            raise ConfigError(f"leaderboard defenses: {', '.join(unknown)} not among {', '.join(rows)}")
        baseline = board.get("baseline", "fedavg")
        if attacks:
            missing = [a for a in attacks if a not in bundles]
            if missing:
                raise ConfigError(f"leaderboard attacks: {', '.join(missing)} not among the file's bundles "
                                  f"({', '.join(bundles)})")
            bundles = {a: bundles[a] for a in [clean, *attacks] if a in bundles}
        board_seeds = [int(s) for s in (seeds or board.get("seeds", [ExperimentConfig().seed]))]
        defense_keys = {d: dict(keys) for d, keys in spec.get("defense-keys", {}).items()}
        out = cls(name=meta.get("name", Path(path).stem), num_supernodes=int(meta.get("num-supernodes", 10)),
                  fixed=dict(spec.get("fixed", {})), defenses=names, attacks=bundles, seeds=board_seeds,
                  defense_keys=defense_keys, variants=variants, baseline=baseline, clean=clean, path=str(path),
                  extends=spec.get("extends"), subset=bool(defenses) or attacks is not None)
        # a bad cell fails before anything runs; a cell's seed changes only its "seed" key, so every
        # (row, column) is checked with the first seed and every seed with the first row's clean cell
        first: dict[tuple[str, str], int] = {}
        for defense, attack, seed in out.places():
            first.setdefault((defense, attack), seed)
        checks = [(d, a, s) for (d, a), s in first.items()]
        checks += [(out.baseline, out.clean, s) for s in out.seeds if s != first.get((out.baseline, out.clean))]
        for defense, attack, seed in checks:
            try:
                cfg = ExperimentConfig.from_run_config(out.cell_config(defense, attack, seed))
            except ConfigError as err:
                raise ConfigError(f"leaderboard cell defense={defense} attack={attack} seed={seed}: {err}") from None
            try:
                cfg.check_federation(out.num_supernodes)
            except ConfigError as err:  # a column this defense cannot run with the protocol's round: n/a,
                if attack == out.clean:  # but a row that cannot run without attack is a wrong file
                    raise ConfigError(f"leaderboard cell defense={defense} attack={attack} seed={seed}: {err}") from None
                out.unsupported[(defense, attack)] = err.reason  # the message without its advice
        return out

    def cell_config(self, defense: str, attack: str, seed: int) -> dict:
        """The run config of one cell; ``defense`` is a row: a registered defense or a variant (its
        ``defense`` with the registered one's keys, then its own)."""
        own = dict(self.variants.get(defense, {}))
        base = own.pop("defense", defense)
        cell = {**self.fixed, **self.defense_keys.get(base, {}), **own, **self.attacks[attack],
                "defense": base, "seed": seed}
        return effective_config(cell)

    def places(self) -> list[tuple[str, str, int]]:
        """(defense, attack, seed) of every place of the matrix: seed, then attack, then defense, so a
        round-robin shard gets a share of every defense and attack; the baseline's clean cells
        come first even when the baseline is not among the chosen defenses."""
        out = [(self.baseline, self.clean, s) for s in self.seeds] if self.baseline not in self.defenses else []
        return out + [(d, a, s) for s in self.seeds for a in self.attacks for d in self.defenses]

    def cells(self) -> list[tuple[str, str, int, dict]]:
        """(defense, attack, seed, run config) of every place (``places``) the defense can run."""
        return [(d, a, s, self.cell_config(d, a, s)) for d, a, s in self.places() if (d, a) not in self.unsupported]

    def grid(self) -> Grid:
        """The cells to run, each once: two columns that give a row the same run config (see
        ``effective_config``) share its cell."""
        unique, places = {}, {}
        for defense, attack, seed, cell in self.cells():
            name = cell_id(cell)
            unique.setdefault(name, cell)
            places.setdefault(name, (defense, seed, []))[2].append(attack)
        # the run's lines name each cell's row, column(s) and seed: its folder name cannot (a variant's
        # folder starts with its base defense; it names the data attack, "none" or "plus" for most
        # model-poisoning columns)
        names = {name: f"row {defense}, column{'s' if len(cols) > 1 else ''} {', '.join(cols)}, seed {seed}"
                 for name, (defense, seed, cols) in places.items()}
        return Grid(name=self.name, num_supernodes=self.num_supernodes, cells=list(unique.values()), names=names)

    def shared_columns(self) -> dict[str, str]:
        """attack -> the column whose cells it shares for some row (the first in column order)."""
        first, shared = {}, {}
        for defense, attack, seed, cell in self.cells():
            owner = first.setdefault((cell_id(cell)), attack)
            if owner != attack:
                shared.setdefault(attack, owner)
        return shared


def read_spec(path: Path, _seen: tuple[Path, ...] = ()) -> dict:
    """A leaderboard file's tables; with ``[leaderboard] extends = "FILE"`` (a path relative to it),
    the tables of FILE updated by its own: the same protocol, rows and bundles plus the ones it adds
    (a report of its own whose shared cells have the same run configs, and so the same folders, as
    the file it extends). ``extends`` names the file it extends, as given."""
    try:
        spec = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"leaderboard file {path}: {err}") from None
    parent = spec.get("leaderboard", {}).pop("extends", None)
    if parent is None:
        return spec
    base_path = path.parent / parent
    if not base_path.is_file():
        raise ConfigError(f"leaderboard file {path}: [leaderboard] extends = {parent!r}: no such file next to it")
    if base_path.resolve() in {p.resolve() for p in (*_seen, path)}:
        raise ConfigError(f"leaderboard file {path}: [leaderboard] extends = {parent!r} extends itself "
                          "(a cycle of files)")
    base = read_spec(base_path, (*_seen, path))
    base.pop("extends", None)
    merged = {"extends": parent}
    for table in {*base, *spec} - {"extends"}:
        own, inherited = spec.get(table, {}), base.get(table, {})
        if table == "defense-keys":  # per defense, key by key
            merged[table] = {d: {**inherited.get(d, {}), **own.get(d, {})} for d in {*inherited, *own}}
        else:  # bundles and variants keep the base's order, the file's new ones after
            merged[table] = {**inherited, **own}
    return merged


def effective_config(cell: dict) -> dict:
    """A cell's run config without the attack keys its defense never reads, so that a column whose
    only difference is such a key shares the cell of the column without it instead of rerunning the
    same computation: ``fisher-forgery`` reaches only a defense that asks the clients for Fisher
    (``ExperimentConfig.reads_fisher``); against any other, a forged-Fisher backdoor is the plain one."""
    if cell.get("fisher-forgery", "none") != "none" and not ExperimentConfig.from_run_config(cell).reads_fisher:
        cell = {k: v for k, v in cell.items() if k != "fisher-forgery"}
    return cell


def uncovered_attacks(bundles: dict[str, dict]) -> list[str]:
    """Attacks in the registries that no bundle uses: data poisoning and the state-of-the-art
    backdoors (``attack``), model poisoning (``model-poisoning``), Fisher forgery (``fisher-forgery``,
    named ``fisher-forgery=<choice>``)."""
    from fl_defense.attacks import DATA_ATTACKS, FISHER_FORGERIES, MODEL_ATTACKS, SOTA_BACKDOORS

    default = ExperimentConfig()
    used = {b.get("attack", default.attack) for b in bundles.values()}
    used |= {b.get("model-poisoning", default.model_poisoning) for b in bundles.values()}
    forged = {b.get("fisher-forgery", default.fisher_forgery) for b in bundles.values()}
    return ([a for a in (*DATA_ATTACKS, *SOTA_BACKDOORS, *MODEL_ATTACKS) if a != "none" and a not in used]
            + [f"fisher-forgery={f}" for f in FISHER_FORGERIES if f != "none" and f not in forged])


def cell_metrics(folder: Path) -> dict:
    """One finished cell's figures (see METRICS) from its summary, rounds, timings and CPU record."""
    summary = json.loads((folder / "summary.json").read_text())
    rounds = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines() if line.strip()]
    trained = [r for r in rounds if r["round"] > 0]
    timings = []
    if (folder / "timings.jsonl").exists():
        timings = [json.loads(line) for line in (folder / "timings.jsonl").read_text().splitlines() if line.strip()]
    window = summary.get("attack_window") or {}
    attack = summary.get("config", {}).get("attack")
    cpu_seconds, capability = cell_cpu(folder)

    def mean(values) -> float | None:
        vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
        return sum(vals) / len(vals) if vals else None

    return {
        "accuracy_final": summary["final"]["accuracy"],
        "accuracy_mean": mean(r["accuracy"] for r in trained),
        "asr_window_end": window.get("asr_window_end"),
        "asr_window_worst": window.get("asr_window_worst"),
        "floor_window_end": window_floor(rounds, window, attack),
        "floor_window_worst": window_floor(rounds, window, attack, at="worst"),
        "asr_final": summary["final"].get("attack_success_rate"),
        "asr_after_window": (mean_after_window({r["round"]: r.get("attack_success_rate") for r in rounds},
                                               window.get("stop_round") or 0) if window.get("window_closed") else None),
        **lifespans(window, summary["rounds_completed"]),
        "window_closed": window.get("window_closed"),
        "tpr": summary.get("mean_over_rounds", {}).get("tpr"),
        "fpr": summary.get("mean_over_rounds", {}).get("fpr"),
        "aggregation_seconds": mean(t.get("aggregation_seconds") for t in timings if t["round"] > 0),
        "round_seconds": mean(t.get("round_seconds") for t in timings if t["round"] > 0),
        "cpu_seconds": cpu_seconds,
        "capability": capability,
        "initial_accuracy": (summary.get("initial") or {}).get("accuracy"),
        "rounds": summary["rounds_completed"],
        "attackers_sampled": sum(r.get("num_attackers_sampled") or 0 for r in trained),
        "rounds_no_valid": sum(1 for r in trained if no_valid_update(r)),
    }


def no_valid_update(record: dict) -> bool:
    """Whether a round had replies but not one valid update (every one rejected or failed): the
    server kept its model. A run of such rounds is a federation that collapsed, a model blown up
    until each client's update overflows float32; a grid runs the cell on to its last round."""
    return not record.get("num_clients") and bool(record.get("num_rejected") or record.get("num_failures"))


def collapsed_cells(table) -> list[str]:
    """A line per finished cell with rounds that had no valid update (``no_valid_update``)."""
    if "rounds_no_valid" not in table:
        return []
    hit = table[table["rounds_no_valid"].fillna(0) > 0].drop_duplicates("cell")
    return [f"- {r.defense} x {r.attack}, seed {r.seed}: {int(r.rounds_no_valid)} of {int(r.rounds)} rounds without a "
            f"valid update (every one rejected or failed; the model kept); final accuracy {r.accuracy_final:.3f}."
            for r in hit.itertuples()]


def own_probe_images(attack: str | None) -> bool:
    """Whether the attack's success is measured on images of its own (``SotaBackdoor.own_probe_images``:
    the edge case's held-out tail), so that the recorded floor is not under it."""
    from fl_defense.attacks import SOTA_BACKDOORS

    return attack in SOTA_BACKDOORS and SOTA_BACKDOORS[attack].own_probe_images


def window_floor(rounds: list[dict], window: dict, attack: str | None = None, at: str = "end") -> float | None:
    """The floor under the attack success at the window's end (``at="end"``) or in its worst round
    (``at="worst"``, the peak): the share of the same (eligible) test images that the model
    classifies as the target without the trigger, in the round that figure comes from
    (``durability.window_metrics``: the window's last recorded round, or ``worst_round``). A model
    that drifts towards the target reaches it with no backdoor at all; attack success minus floor
    is the trigger's own effect. None where the round did not record it (an attack measured
    without a trigger, or records from before the floor was kept), and for an ``attack`` whose
    success is measured on images of its own (``own_probe_images``: the recorder no longer keeps a
    floor for those, but edge-case cells recorded before it stopped carry a test-set one)."""
    if at not in ("end", "worst"):
        raise ValueError(f"window_floor: at={at!r}, not 'end' or 'worst'")
    if window.get("asr_window_end" if at == "end" else "asr_window_worst") is None or own_probe_images(attack):
        return None
    if at == "end":
        read = window_end_round(max((r["round"] for r in rounds), default=0), window.get("stop_round") or 0)
    else:
        read = window.get("worst_round")
    return _finite(next((r.get("clean_target_rate") for r in rounds if r["round"] == read), None))


def lifespans(window: dict, last_round: int) -> dict:
    """The lifespans of a closed window (``fl_defense.durability``) as the page averages them: a
    backdoor that never falls below the threshold within the run's tail is right-censored, its
    lifespan at least the tail's length plus one; that lower bound is the value, and
    ``<metric>_censored`` says so. An open window (or none) has no lifespan."""
    out = {}
    for m in LIFESPANS:
        value, censored = window.get(m), False
        if window.get("window_closed") and value is None:
            value, censored = last_round - window["stop_round"] + 1, True
        out[m], out[f"{m}_censored"] = value, censored
    return out


def collect(board: Leaderboard, roots: list[Path]):
    """One row per finished cell of the board (defense, attack, seed, folder, metrics), found by
    its name under any of ``roots`` (the first folder that has it finished)."""
    import pandas as pd

    rows = []
    for defense, attack, seed, cell in board.cells():
        name = cell_id(cell)
        folder = finished_folder(name, roots)
        if folder is None:
            continue
        rows.append({"defense": defense, "attack": attack, "seed": seed, "cell": name, **cell_metrics(folder)})
    return pd.DataFrame(rows, columns=["defense", "attack", "seed", "cell", *METRICS,
                                       *(f"{m}_censored" for m in LIFESPANS), "window_closed", "rounds",
                                       "attackers_sampled", "rounds_no_valid", "capability",
                                       "initial_accuracy"])


def finished_folder(name: str, roots: list[Path]) -> Path | None:
    """The first of ``roots`` holding the cell ``name`` finished."""
    return next((r / name for r in roots if cell_state(r / name) == "done"), None)


def record_mismatch(folder: Path, cell: dict, default: dict | None = None) -> str | None:
    """How a finished cell's recorded run config (its summary.json) differs from the one its cell
    has now: ``key: recorded R, now V`` for the first such key (``report.BOOKKEEPING`` aside: where
    the files are), or None. A cell's folder is named by the keys its grid sets, so a changed
    default leaves the name as it was while the computation differs: such a record is not this
    config's cell. A key the record lacks is taken at its default now (``default``: the default
    config's keys), as for a run from before the key existed; a default changed after such a key
    was added goes unseen for that record."""
    recorded = json.loads((folder / "summary.json").read_text()).get("config")
    if recorded is None:
        return "its summary.json records no run config"
    default = default or ExperimentConfig().as_run_config()
    for key, now in ExperimentConfig.from_run_config(cell).as_run_config().items():
        was = recorded.get(key, default[key])
        if key not in BOOKKEEPING and was != now:
            return f"{key}: recorded {was!r}, now {now!r}"
    return None


def stale_records(board: Leaderboard, roots: list[Path]) -> list[tuple[Path, str]]:
    """(folder, record_mismatch) of each of the board's cells whose finished record, the one the
    page and the runner use (``finished_folder``), disagrees with its cell's run config now."""
    default = ExperimentConfig().as_run_config()
    stale = []
    for cell in board.grid().cells:  # each cell once
        folder = finished_folder(cell_id(cell), roots)
        if folder is not None and (problem := record_mismatch(folder, cell, default)):
            stale.append((folder, problem))
    return stale


def check_records(board: Leaderboard, roots: list[Path]) -> None:
    """Fail, naming the first stale record and what differs, if any finished cell was run with a
    config other than its cell's now: the runner would skip it as done and the page would show it
    as this config's."""
    stale = stale_records(board, roots)
    if stale:
        folder, problem = stale[0]
        raise ConfigError(f"{len(stale)} finished leaderboard cells were run with another config than their cell "
                          f"has now (a changed default?), e.g. {folder}: {problem}. Their figures are not this "
                          "config's: move those folders aside to rerun them, or restore what changed")


def export_records(board: Leaderboard, roots: list[Path], dest: Path) -> list[str]:
    """Copy the records (RECORD_FILES) of the board's cells finished under ``roots`` into
    ``dest/<cell>``, cells already there left as they are; the names of the cells copied."""
    import shutil

    copied = []
    for *_, cell in board.cells():
        name = cell_id(cell)
        source = finished_folder(name, roots)
        if source is None or cell_state(dest / name) == "done" or source == dest / name:
            continue
        settle_interrupted_attempt(source)  # a note a killed runner left in a finished cell: into cpu.jsonl
        (dest / name).mkdir(parents=True, exist_ok=True)
        # summary.json last: a copy cut short is not taken for a finished cell
        for file in sorted(RECORD_FILES, key=lambda f: f == "summary.json"):
            if (source / file).exists():
                shutil.copy2(source / file, dest / name / file)
        copied.append(name)
    return copied


def add_accuracy_drop(table, baseline: str, clean: str, metric: str = "accuracy_mean"):
    """``accuracy_drop``: clean ``baseline``'s accuracy minus the cell's, in percentage points, paired
    by seed; a seed without its baseline cell is compared with the baseline's mean over seeds.
    The accuracy is the mean over the run's rounds: with 10 of 100 clients a round, one round's
    accuracy swings by about 3 points, more than the 2-point criterion the ranking applies."""
    table = table.copy()
    ref = table[(table["defense"] == baseline) & (table["attack"] == clean)].set_index("seed")[metric]
    if ref.empty:
        table["accuracy_drop"] = float("nan")
        return table
    paired = table["seed"].map(ref).fillna(ref.mean())
    table["accuracy_drop"] = (paired - table[metric]) * 100.0
    return table


def summarise(table):
    """Per defense and attack: the mean, the standard deviation (ddof 1; NaN with one seed) and the
    number of seeds of every metric; ``<lifespan>_censored``: whether any seed's lifespan is only a
    lower bound (``lifespans``), which makes the mean one too."""
    import pandas as pd

    metrics = [m for m in METRICS if m in table]
    if table.empty:
        return pd.DataFrame()
    numeric = table[["defense", "attack", *metrics]].copy()
    for m in metrics:
        numeric[m] = pd.to_numeric(numeric[m], errors="coerce")
    g = numeric.groupby(["defense", "attack"], sort=False)
    out = g[metrics].mean().add_suffix("_mean").join(g[metrics].std(ddof=1).add_suffix("_std"))
    out["seeds"] = g.size()
    for m in LIFESPANS:
        if f"{m}_censored" in table:
            flags = table[["defense", "attack"]].assign(c=table[f"{m}_censored"].fillna(False).astype(bool))
            out[f"{m}_censored"] = flags.groupby(["defense", "attack"], sort=False)["c"].any()
    return out


def fmt(mean: float | None, std: float | None, digits: int) -> str:
    """'m ± s', 'm' with one seed, '-' without a value."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def peak_text(r: dict) -> str:
    """A ranking row's peak in the window: 'asr (attack)', with its round's floor where recorded
    ('0.104 (dba; floor 0.140)'); '-' without a qualifying peak."""
    if not r.get("peak_attack"):
        return "-"
    floor = f"; floor {r['peak_floor']:.3f}" if r.get("peak_floor") is not None else ""
    return f"{r['peak_asr']:.3f} ({r['peak_attack']}{floor})"


def summary_text(s, metric: str) -> str:
    """One summary row's ``metric`` as the page shows it: ``fmt``, or '>= m' for a lifespan that some
    seed's tail ended before (its mean is a lower bound, and no spread is shown)."""
    import numpy as np

    censored = s.get(f"{metric}_censored")
    if isinstance(censored, (bool, np.bool_)) and censored:
        return f">= {s[f'{metric}_mean']:.{METRICS[metric][1]}f}"
    return fmt(s[f"{metric}_mean"], s[f"{metric}_std"], METRICS[metric][1])


def ranking(summary, defenses: list[str], attacks: list[str], clean: str,
            threshold: float = QUALIFY_POINTS) -> list[dict]:
    """Defenses ranked by their worst attack (highest mean attack success at the window's end) among
    their attacked cells whose mean accuracy drop is <= ``threshold`` points; ties by the clean
    cell's accuracy drop. Defenses without a qualifying cell follow, by their smallest drop under attack."""
    rows = []
    attacked = [a for a in attacks if a != clean]
    for d in defenses:
        cells = [(a, summary.loc[(d, a)]) for a in attacked if (d, a) in summary.index]
        drops = {a: s["accuracy_drop_mean"] for a, s in cells if not math.isnan(s["accuracy_drop_mean"])}
        qualifying = [(a, s) for a, s in cells if a in drops and drops[a] <= threshold
                      and not math.isnan(s["asr_window_end_mean"])]
        worst = max(qualifying, key=lambda c: c[1]["asr_window_end_mean"], default=None)
        # a backdoor that lands in the window and fades by its end: the highest round inside it
        peaks = [(a, c) for a, c in qualifying if not math.isnan(c["asr_window_worst_mean"])]
        peak = max(peaks, key=lambda c: c[1]["asr_window_worst_mean"], default=None)
        clean_drop = summary.loc[(d, clean)]["accuracy_drop_mean"] if (d, clean) in summary.index else float("nan")
        rows.append({
            "defense": d, "qualifying": len(qualifying), "attacked": len(cells),
            "worst_attack": worst[0] if worst else None,
            "worst_asr": worst[1]["asr_window_end_mean"] if worst else None,
            "worst_asr_std": worst[1]["asr_window_end_std"] if worst else None,
            "worst_floor": _finite(worst[1].get("floor_window_end_mean")) if worst else None,
            "peak_attack": peak[0] if peak else None,
            "peak_asr": peak[1]["asr_window_worst_mean"] if peak else None,
            "peak_floor": _finite(peak[1].get("floor_window_worst_mean")) if peak else None,
            "clean_drop": clean_drop,
            "largest_drop": max(drops.values(), default=None),
            "smallest_drop": min(drops.values(), default=None),
        })

    def key(r):
        nan_last = lambda v: math.inf if v is None or math.isnan(v) else v  # noqa: E731
        if r["worst_asr"] is not None:
            return (0, r["worst_asr"], nan_last(r["clean_drop"]), r["defense"])
        return (1, nan_last(r["smallest_drop"]), nan_last(r["clean_drop"]), r["defense"])

    rows.sort(key=key)
    # a defense without a finished attacked cell has nothing to rank it by: listed last, rank None
    ranked, unranked = [r for r in rows if r["attacked"]], [r for r in rows if not r["attacked"]]
    for i, r in enumerate(ranked, start=1):
        r["rank"] = i
    for r in unranked:
        r["rank"] = None
    return ranked + unranked


def _finite(value) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def heatmap_table(summary, metric: str, defenses: list[str], attacks: list[str], unsupported=()) -> str:
    """Markdown: defenses as rows, attacks as columns, mean ± std over seeds of ``metric``; "n/a"
    where the defense cannot run the column (``unsupported``), "not run" where its cell is missing."""
    lines = ["| defense | " + " | ".join(attacks) + " |", "|---|" + "---|" * len(attacks)]
    for d in defenses:
        cells = []
        for a in attacks:
            if (d, a) in summary.index:
                cells.append(summary_text(summary.loc[(d, a)], metric))
            else:
                cells.append("n/a" if (d, a) in unsupported else "not run")
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_heatmap(summary, metric: str, defenses: list[str], attacks: list[str], path: Path,
                 vmin: float | None = None, vmax: float | None = None, cmap: str = "viridis") -> Path:
    """A PNG heatmap of ``metric``'s mean over seeds, annotated with the values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.full((len(defenses), len(attacks)), np.nan)
    for i, d in enumerate(defenses):
        for j, a in enumerate(attacks):
            if (d, a) in summary.index:
                grid[i, j] = summary.loc[(d, a)][f"{metric}_mean"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.62 * len(attacks), 1.2 + 0.36 * len(defenses)))
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax,
                   interpolation="nearest")
    digits = min(METRICS[metric][1], 2)
    for i in range(len(defenses)):
        for j in range(len(attacks)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.{digits}f}", ha="center", va="center", fontsize=6.5,
                        color="white" if im.norm(grid[i, j]) < 0.55 else "black")
    ax.set_xticks(range(len(attacks)), attacks, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(defenses)), defenses, fontsize=7)
    ax.set_title(f"{METRICS[metric][0]} (mean over seeds)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def projected_gpu_seconds(cpu_seconds: float, training_share: float, steps: float, step_ms: float) -> float:
    """CPU time minus its local-training share, plus the training's SGD steps at ``step_ms`` each."""
    return cpu_seconds * (1.0 - training_share) + steps * step_ms / 1000.0


def _steps(folder: Path, epochs: int, batch_size: int) -> int:
    """Local SGD steps of a results folder's rounds: every sampled client's batches times epochs."""
    steps = 0
    for line in (folder / "rounds.jsonl").read_text().splitlines():
        if line.strip():
            for c in json.loads(line).get("clients", []):
                steps += epochs * math.ceil(c["num_examples"] / batch_size)
    return steps


def training_steps(table, roots: list[Path], num_supernodes: int) -> int:
    """Local SGD steps the finished cells trained, counted from their rounds (each client's examples,
    batch size, epochs), plus each pre-training they started from, once."""
    from fl_defense.pretrain import cache_folder

    total, pretrained = 0, set()
    for name in table["cell"]:
        folder = finished_folder(name, roots)
        cfg = ExperimentConfig.from_run_config(json.loads((folder / "summary.json").read_text())["config"])
        total += _steps(folder, cfg.local_epochs, cfg.batch_size)
        if cfg.pretrain_rounds > 0:
            cache = cache_folder(cfg, num_supernodes)
            if cache not in pretrained and (cache / "rounds.jsonl").exists():
                pretrained.add(cache)
                total += _steps(cache, cfg.local_epochs, cfg.batch_size)
    return total


def first_active_round(cfg: ExperimentConfig) -> int:
    """``Defense.first_active_round`` of a cell's defense from its run config alone: a defense class
    that overrides it (one that must fill a history first, FLDetector) is built from its run-config
    keys, which is all it reads; every other rule acts from round 1. RLR reports its base rule."""
    from fl_defense.defenses import DEFENSES
    from fl_defense.defenses.base import Defense

    name = cfg.rlr_aggregator if cfg.defense == "rlr" else cfg.defense
    cls = DEFENSES.get(name)
    if cls is None or cls.first_active_round is Defense.first_active_round:
        return 1
    return cls(**cfg.defense_kwargs(name)).first_active_round()


def late_defenses(board: "Leaderboard", attacked: list[str]) -> list[str]:
    """A line per defense row that cannot act from the attack's first round in some attacked column
    (``server_app.app.undefended_window``, as the start-up note says it): its rounds before then
    aggregate undefended, so those cells measure FedAvg's aggregate for that part of the window."""
    from server_app.app import undefended_window

    found: dict[tuple[str, int, str, bool], list[str]] = {}
    for defense in board.defenses:
        for attack in attacked:
            if (defense, attack) in board.unsupported:
                continue
            cfg = ExperimentConfig.from_run_config(board.cell_config(defense, attack, board.seeds[0]))
            first = first_active_round(cfg)
            missed = undefended_window(cfg, first)
            if missed is not None:
                found.setdefault((defense, first, *missed), []).append(attack)
    lines = []
    for (defense, first, window, whole), columns in found.items():
        runnable = [a for a in attacked if (defense, a) not in board.unsupported]
        where = "every attacked column" if len(columns) == len(runnable) else ", ".join(columns)
        lines.append(f"- {defense} ({where}): acts from round {first} of the run (it needs the earlier rounds' "
                     f"history first, `Defense.first_active_round`); {window}"
                     + (": its cells measure the undefended aggregate in the window" if whole else "") + ".")
    return lines


def remaining_cpu_seconds(board: Leaderboard, cells) -> tuple[int, float]:
    """The board's unfinished cells (each cell once) and their projected CPU seconds: each at the
    median CPU of its attack column's finished cells (``cells``: one row per finished cell, with
    ``attack`` and ``cpu_seconds``), the median of all of them where its column has none."""
    cpu = cells.dropna(subset=["cpu_seconds"])
    if cpu.empty:
        return 0, 0.0
    by_column = cpu.groupby("attack")["cpu_seconds"].median().to_dict()
    overall = float(cpu["cpu_seconds"].median())
    done, todo = set(cells["cell"]), {}
    for _, attack, _, cell in board.cells():
        name = cell_id(cell)
        if name not in done:
            todo.setdefault(name, attack)  # a cell two columns share: the first column's
    return len(todo), sum(float(by_column.get(attack, overall)) for attack in todo.values())


def remaining_cpu_text(board: Leaderboard, cells) -> str:
    left, seconds = remaining_cpu_seconds(board, cells)
    if not left:
        return ""
    return (f" **Still to run:** {left:,} cells, about {seconds / 3600:.1f} CPU h ({seconds:,.0f} s) projected: each "
            "at the median CPU of its attack column's finished cells (of all finished cells where its column has "
            "none).")


def _and(items: list[str]) -> str:
    """'1', '1 and 2', '1, 2 and 3'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _most_first(counts) -> list[tuple[float, int]]:
    """(start, cells) pairs, the most common start first, then by value."""
    return sorted(counts, key=lambda kv: (-kv[1], kv[0]))


def starting_models_text(cells, baseline: str, clean: str) -> str | None:
    """The models a page's cells started from, seed by seed, told apart by their accuracy before
    round 1 (``summary.json``'s ``initial``): a seed's clean pre-training is rebuilt on each machine
    that runs it, and two machines of one CPU capability can still build different models. None
    when no cell records it."""
    if cells["initial_accuracy"].isna().all():
        return None
    parts, mixed = [], []
    for seed, group in cells.groupby("seed"):
        known = group["initial_accuracy"].dropna()
        counts = _most_first(known.value_counts().items())
        digits = 4 if len({f"{acc:.4f}" for acc, _ in counts}) == len(counts) else 8
        text = ", ".join(f"{n} cell{'s' if n != 1 else ''} from {acc:.{digits}f}" for acc, n in counts)
        if len(known) < len(group):
            text += f"{', ' if counts else ''}{len(group) - len(known)} not recorded"
        if len(counts) > 1:
            mixed.append(str(seed))
            base = group[(group["defense"] == baseline) & (group["attack"] == clean)]["initial_accuracy"].dropna()
            if len(base):
                text += f" (the {baseline} {clean} baseline from {base.iloc[0]:.{digits}f})"
        parts.append(f"seed {seed}: {text}")
    line = ("**Starting models:** the accuracy before round 1 of the model each cell started from (a seed's clean "
            "pre-training, where the cells have one, is rebuilt on each machine that runs the seed, and machines of "
            "one CPU capability can still build different models): " + "; ".join(parts) + ".")
    if mixed:
        line += (f" The cells of seed{'s' if len(mixed) > 1 else ''} {_and(mixed)} did not all start from one "
                 "model: an accuracy drop, or a difference between two cells, that spans two starts holds the starts' "
                 "difference as well as the attack's.")
    return line


def docs_link(page_folder: Path, target: str) -> str:
    """The relative link from a page in ``page_folder`` to ``docs/<target>``; a page written outside
    docs/ links as the pages in docs/results/<name>/ do."""
    docs = (ROOT / "docs").resolve()
    folder = Path(page_folder).resolve()
    if folder != docs and docs not in folder.parents:
        return f"../../{target}"
    return Path(os.path.relpath(docs / target, folder)).as_posix()


def _cache_start(cache: Path) -> float | None:
    """The accuracy of a cached pre-training's final model (what its cells start from), or None when
    the cache is missing, unfinished or unreadable."""
    from fl_defense.pretrain import is_cached

    if not is_cached(cache):
        return None
    try:
        return (json.loads((cache / "summary.json").read_text()).get("final") or {}).get("accuracy")
    except (OSError, ValueError):
        return None


def pretraining_warnings(board: Leaderboard, pending: list[dict], roots: list[Path]) -> list[str]:
    """Before cells run: whether this machine's pre-trained model (the cache the new cells would
    start from) is the one the finished cells of the same pre-training started from. A seed's
    pre-training is rebuilt on each machine, and two machines of one CPU capability can build
    different models; cells from two starts compare the starts as well as the attacks. One line per
    pre-training whose finished cells started from another model, or which is to be rebuilt here.
    Advice only: nothing here stops a run."""
    from fl_defense.pretrain import cache_folder, pretrain_id

    if not pending:
        return []
    starts: dict[str, Counter] = {}
    seen_cells = set()
    for _, _, _, cell in board.cells():
        name = cell_id(cell)
        folder = finished_folder(name, roots) if name not in seen_cells else None
        seen_cells.add(name)
        if folder is None:
            continue
        try:
            summary = json.loads((folder / "summary.json").read_text())
        except (OSError, ValueError):
            continue
        initial = (summary.get("initial") or {}).get("accuracy")
        if initial is not None and summary.get("pretrained_from"):
            starts.setdefault(summary["pretrained_from"], Counter())[initial] += 1
    lines, seen = [], set()
    for cell in pending:
        # as grid.run_cell runs it: the first results folder as results-dir, the checkout as working directory
        cfg = ExperimentConfig.from_run_config({**GRID_RUN_CONTROL, **cell, "results-dir": str(roots[0])})
        if cfg.pretrain_rounds <= 0:
            continue
        key = pretrain_id(cfg, board.num_supernodes)
        if key in seen or key not in starts:
            continue
        seen.add(key)
        finished = ", ".join(f"{acc:.4f} ({n} cell{'s' if n != 1 else ''})"
                             for acc, n in _most_first(starts[key].items()))
        cache = cache_folder(cfg, board.num_supernodes, relative_to=ROOT)
        here = _cache_start(cache)
        if here is None:
            lines.append(f"[fl-defense] note: seed {cfg.seed}'s pre-training is not cached here ({cache}) and will be "
                         f"rebuilt; its finished cells started from a model at accuracy {finished}. A rebuild on "
                         "another machine can differ: check the page's starting-models line once a cell is done.")
        elif set(starts[key]) != {here}:
            lines.append(f"[fl-defense] warning: seed {cfg.seed}'s pre-trained model here ({cache}) is at accuracy "
                         f"{here:.4f}, but the seed's finished cells started from {finished}: cells run here would not all "
                         "share their start, and a comparison across two starts holds the starts' difference as "
                         "well as the attack's. To keep one start, run the seed where its finished cells ran, or "
                         "copy that machine's cache folder into pretrain-dir.")
    return lines


def write_page(board: Leaderboard, roots: list[Path], out: Path, command: str,
               training_share: float, step_ms: float, note: str | None = None, title: str | None = None,
               subset: bool = False) -> Path:
    """The leaderboard page (index.md), its PNG heatmaps and cells.csv, from finished cells only;
    ``subset``: the board is a choice of the file's defenses or attacks (a report of its own, the
    leaderboard's cells reused), which the page's opening says."""
    table = add_accuracy_drop(collect(board, roots), board.baseline, board.clean)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "cells.csv", index=False)
    places = len(board.cells())
    total = len(board.grid().cells)
    if table.empty:
        raise FileNotFoundError(f"no finished leaderboard cells under {', '.join(map(str, roots))}")
    summary = summarise(table)
    defenses = [d for d in ([board.baseline] if board.baseline not in board.defenses else []) + board.defenses]
    attacks = list(board.attacks)
    attacked = [a for a in attacks if a != board.clean]
    for old in out.glob("heatmap_*.png"):
        old.unlink()
    cfg = ExperimentConfig.from_run_config(board.fixed)
    per_round = cfg.check_federation(board.num_supernodes)

    cells = table.drop_duplicates("cell")  # a cell two columns share is one run
    finished = len(cells)
    cpu = cells["cpu_seconds"].dropna()
    cpu_total = float(cpu.sum())
    steps = training_steps(cells, roots, board.num_supernodes)
    gpu = projected_gpu_seconds(cpu_total, training_share, steps, step_ms)
    flagging = [d for d in defenses if any((d, a) in summary.index and not math.isnan(summary.loc[(d, a)]["tpr_mean"])
                                           for a in attacked)]
    source = (f"`{Path(board.path).as_posix()}`, which extends `{board.extends}`: the columns it adds are its own, "
              "every other cell is the extended file's" if board.extends else f"`{Path(board.path).as_posix()}`")
    opening = (f"These defenses and attacks, chosen from the leaderboard file ({source}; its "
               f"cells, shared with the full leaderboard), and no attack ({board.clean}), under the benchmark protocol "
               if subset else
               f"Every defense against every attack and no attack ({board.clean}), under the benchmark protocol ")
    lines = [
        f"# {title or f'Leaderboard: {board.name}'}", "",
        opening + f"([its definition]({docs_link(out, 'protocol.md')})): "
        f"{cfg.dataset}, {cfg.model_name}, {board.num_supernodes} clients ({cfg.partitioner}"
        + (f" alpha {cfg.dirichlet_alpha}" if cfg.partitioner == "dirichlet" else "") + f"), {per_round} sampled per "
        f"round, {cfg.malicious_fraction:g} of the population attackers ({cfg.attacker_pool} pool), "
        f"{cfg.pretrain_rounds} rounds of clean pre-training, attack window rounds {cfg.attack_start_round}-"
        f"{cfg.attack_stop_round}, then {cfg.num_server_rounds - cfg.attack_stop_round} rounds without attack; "
        f"seeds {', '.join(map(str, board.seeds))}. Every figure: mean ± std over seeds.", "",
        f"**{finished} of {total} cells** finished ({len(defenses)} defenses x {len(attacks)} attack columns x "
        f"{len(board.seeds)} seed{'s' if len(board.seeds) != 1 else ''}"
        + (f", less {len(board.unsupported) * len(board.seeds)} not applicable (n/a, below)" if board.unsupported else "")
        + (f"; {places - total} places of the matrix share a cell with another column ("
           + "; ".join(f"{a} with {o}" for a, o in board.shared_columns().items())
           + ") where the row's defense does not read the key that tells them apart: `fisher-forgery` reaches "
           "only a defense that asks the clients for Fisher" if total < places else "") + ").", "",
        "Command (resumable; `--shard i/k` splits it; `--report-only` regenerates this page from the results "
        "without running a cell):", "", f"    {command}", "",
        f"**CPU time:** {cpu_total / 3600:.2f} h ({cpu_total:,.0f} s), the sum of every cell's process CPU time (user + system of the "
        f"cell's process and its Ray workers; {len(cpu)} cells with a record"
        + (f", {finished - len(cpu)} without" if len(cpu) < finished else "") + "; the clean pre-training of "
        "each seed is counted in the cell that built it). "
        f"**Projected GPU time:** {gpu / 3600:.2f} h ({gpu:,.0f} s): the CPU time less its local-training share "
        f"({training_share:.0%}, the share of a protocol round spent in a plain PyTorch loop doing the same "
        f"training, `benchmarks/protocol_round.py`), plus the cells' {steps:,.0f} local SGD steps at "
        f"{step_ms:g} ms each (an assumed step time of a small CNN at this batch size on a GPU, launch-bound; "
        "not measured here). Cells still run one after another, so this is a serial figure."
        + remaining_cpu_text(board, cells), "",
        "**Hosts:** the CPU capability each cell ran with (`torch.backends.cpu.get_cpu_capability()`; kernels, "
        "and so times and the last digits of results, differ between capabilities): "
        + ", ".join(f"{cap} {n} cell{'s' if n != 1 else ''}" for cap, n in
                    cells["capability"].fillna("not recorded").value_counts().sort_index().items()) + ".", "",
        *([starts, ""] if (starts := starting_models_text(cells, board.baseline, board.clean)) else []),
        *([f"**How it was run:** {note}", ""] if note else []),
        "## Ranking", "",
        f"By the worst attack: the highest attack success at the window's end over every attack, among the "
        f"defense's attacked cells whose accuracy stays within {QUALIFY_POINTS:g} points of clean "
        f"{board.baseline} (mean accuracy drop <= {QUALIFY_POINTS:g}, the accuracy averaged over the run's rounds). Lower is better; ties by the clean "
        "cell's drop. A defense with no qualifying cell ranks after every defense with one, by its smallest "
        "accuracy drop under attack. Untargeted attacks show in the drop (which can disqualify a cell), "
        "not in attack success (the plus trigger measured as a reference). The peak column is not ranked on: "
        "the highest attack success in any round of the window over the same cells, which shows a backdoor "
        "that lands while the attack lasts and fades before the window's end. The floor is what the worst "
        "attack's figure stands on: the share of the same test images the model classifies as the target "
        "without the trigger, at the same round (a model that drifts towards the target reaches it with no "
        "backdoor); attack success minus floor is the trigger's own effect. It is shown, not ranked on, and "
        "so is the peak's own floor (the same share in the peak's round), beside the peak.", "",
        *([f"**Partial:** {finished} of {total} cells finished. A defense is ranked on its finished cells only, so "
           "its worst attack may be among those not run yet; the qualifying-cells column says how many of its "
           f"{len(attacked)} attacked cells have finished.", ""] if finished < total else []),
        "| rank | defense | worst attack success | its floor | worst attack | peak in the window | qualifying cells "
        "| clean accuracy drop | largest drop under attack |", "|---|---|---|---|---|---|---|---|---|"]
    for r in ranking(summary, board.defenses, attacks, board.clean):  # the baseline alone (not chosen) is no entry
        if r["rank"] is None:
            lines.append(f"| - | {r['defense']} | - | - | no attacked cell finished | - | 0 of {len(attacked)} | "
                         f"{fmt(r['clean_drop'], None, 1)} | - |")
            continue
        of = f" ({r['attacked']} of {len(attacked)} finished)" if r["attacked"] < len(attacked) else ""
        lines.append(f"| {r['rank']} | {r['defense']} | {fmt(r['worst_asr'], r['worst_asr_std'], 3)} | "
                     f"{fmt(r.get('worst_floor'), None, 3)} | {r['worst_attack'] or 'none qualifies'} | "
                     f"{peak_text(r)} | {r['qualifying']} of {r['attacked']}{of} | "
                     f"{fmt(r['clean_drop'], None, 1)} | {fmt(r['largest_drop'], None, 1)} |")
    late = late_defenses(board, attacked)
    if late:
        lines += ["", "**Defenses that cannot act from the attack's first round** (ranked as measured):", "", *late]
    collapsed = collapsed_cells(table)
    if collapsed:
        lines += ["", "**Collapsed federations** (rounds in which no client's update was valid, so the server kept its "
                  "model; the cell ran on to its last round, and its figures count those rounds):", "", *collapsed]
    sections = [
        ("asr_window_end", "Attack success at the window's end", dict(vmin=0, vmax=1, cmap="magma"),
         "Triggered test images of other classes classified as the target, at the attack window's last round."),
        ("asr_after_window", "Attack success after the window (durability)", dict(vmin=0, vmax=1, cmap="magma"),
         "The same, averaged over the rounds after the window, when no one attacks: how long the backdoor "
         "outlives its attackers. With 10 of 100 clients sampled the attackers may sit out the window's last "
         "rounds, so the window's end can miss a backdoor that the tail still carries."),
        ("accuracy_drop", f"Accuracy drop against clean {board.baseline} (points)", dict(cmap="RdYlGn_r"),
         f"Clean {board.baseline}'s accuracy minus the cell's, seed by seed, in percentage points; the accuracy "
         "is the mean over the run's rounds (one round's swings by about 3 points with 10 of 100 clients "
         "sampled, more than the 2-point criterion)."),
        ("tpr", "TPR (defenses that flag)", dict(vmin=0, vmax=1),
         "Flagged attackers over sampled attackers, averaged over the rounds that had any."),
        ("fpr", "FPR (defenses that flag)", dict(vmin=0, vmax=1, cmap="magma"),
         "Flagged benign clients over sampled benign clients, averaged over rounds."),
    ]
    for metric, heading, style, text in sections:
        rows = flagging if metric in ("tpr", "fpr") else defenses
        cols = attacked if metric in ("tpr", "fpr") else attacks
        if not rows or not cols:
            continue
        png = plot_heatmap(summary, metric, rows, cols, out / f"heatmap_{metric}.png", **style)
        lines += ["", f"## {heading}", "", text, "", f"![{heading}]({png.name})", "",
                  heatmap_table(summary, metric, rows, cols, board.unsupported)]
    lines += ["", "## Every cell", "",
              "Final and mean accuracy (rounds 1..N), attack success at the window's end, its worst round, at the "
              "run's end, its mean after the window, rounds after the window until it falls below 0.5 and below 0.1 "
              "(`>= m`: in some seed it never did within the tail, that seed counted at the tail's length plus one, "
              "so the mean is a lower bound; `-`: the window never closed), "
              "TPR/FPR, mean aggregation and round time, and the cell's process CPU time. `cells.csv` has "
              "every seed.", "",
              "| defense | attack | seeds | " + " | ".join(METRICS[m][0] for m in METRICS) + " |",
              "|---|---|---|" + "---|" * len(METRICS)]
    for d in defenses:
        for a in attacks:
            if (d, a) not in summary.index:
                continue
            s = summary.loc[(d, a)]
            lines.append(f"| {d} | {a} | {int(s['seeds'])} | "
                         + " | ".join(summary_text(s, m) for m in METRICS) + " |")
    lines += ["", "## Attack bundles", "", "| attack | run-config keys |", "|---|---|"]
    for a, keys in board.attacks.items():
        lines.append(f"| {a} | {' '.join(f'{k}={json.dumps(v)}' for k, v in keys.items())} |")
    if board.unsupported:
        lines += ["", "Not applicable (n/a; no cell): " + "; ".join(
            f"{d} x {a}: {why}" for (d, a), why in board.unsupported.items()) + "."]
    missing = uncovered_attacks(board.attacks)
    if missing:
        lines += ["", f"Registered attacks without a bundle here: {', '.join(missing)}."]
    if board.defense_keys:
        lines += ["", "Defense keys: " + "; ".join(f"{d}: {' '.join(f'{k}={json.dumps(v)}' for k, v in keys.items())}"
                                                  for d, keys in board.defense_keys.items()) + "."]
    if board.variants:
        lines += ["", "Variants (rows that are a defense with keys of their own): " + "; ".join(
            f"{v}: {' '.join(f'{k}={json.dumps(x)}' for k, x in keys.items())}" for v, keys in board.variants.items()) + "."]
    path = out / "index.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _csv(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m simulation leaderboard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid_file", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--grid", help=f"leaderboard file (default {DEFAULT_GRID})")
    parser.add_argument("--results", action="append", metavar="DIR",
                        help="results folder (default results/leaderboard/<name>); cells run in the first; "
                             "repeat to build the page over several (shards run elsewhere)")
    parser.add_argument("--out", default=DEFAULT_PAGE, help=f"page folder (default {DEFAULT_PAGE})")
    parser.add_argument("--shard", metavar="i/k", help="run cells i, i+k, ... only (no page: build it with "
                        "--report-only once every shard is done)")
    parser.add_argument("--defenses", help="comma-separated subset of the registry's defenses")
    parser.add_argument("--attacks", help="comma-separated subset of the file's attack bundles (the clean one is always in)")
    parser.add_argument("--seeds", help="comma-separated seeds (default: the file's)")
    parser.add_argument("--report-only", action="store_true", help="write the page from finished cells; run none")
    parser.add_argument("--export", metavar="DIR", help="copy the finished cells' records (no checkpoints, no logs) "
                        "into DIR, run no cell and write no page (commit DIR; pass it as a --results folder later)")
    parser.add_argument("--training-share", type=float, default=0.4,
                        help="share of a protocol round's CPU time spent in local training, for the GPU "
                             "projection (benchmarks/protocol_round.py, 2026-12-02: 1.85 of 4.54 CPU s a round)")
    parser.add_argument("--gpu-step-ms", type=float, default=1.0, help="assumed GPU time of one local SGD step")
    parser.add_argument("--note", help="a paragraph for the page: how and where its cells ran (e.g. two shards side "
                        "by side, so wall-clock times include the other's load)")
    parser.add_argument("--title", help="the page's heading (default 'Leaderboard: <name>'), for a page of a "
                        "subset written with --out elsewhere")
    parser.add_argument("--no-progress", action="store_true")
    add_ray_arguments(parser)
    args = parser.parse_args(argv)
    path = args.grid or args.grid_file or DEFAULT_GRID
    seeds = [int(s) for s in _csv(args.seeds)] if args.seeds else None
    board = Leaderboard.load(path, _csv(args.defenses), _csv(args.attacks), seeds)
    roots = [Path(r).resolve() for r in (args.results or [str(ROOT / "results" / "leaderboard" / board.name)])]
    check_records(board, roots)
    if args.export:
        check_records(board, [Path(args.export).resolve()])  # the copies it keeps
        copied = export_records(board, roots, Path(args.export).resolve())
        print(f"[fl-defense] {len(copied)} finished cells' records copied to {args.export}")
        return
    if not args.report_only:
        from fl_defense.data import DATA_CACHE_ENV

        # the cells' processes and Ray actors memory-map decoded partitions instead of each building them
        os.environ.setdefault(DATA_CACHE_ENV, str(ROOT / "results" / "data-cache"))
        grid = board.grid()
        if args.shard:
            grid = grid.sharded(*parse_shard(args.shard))
        # cells finished in the other results folders (another machine's, the committed records) stay as they are
        elsewhere = {cell_id(c) for c in grid.cells if cell_state(roots[0] / cell_id(c)) != "done"
                     and finished_folder(cell_id(c), roots[1:]) is not None}
        if elsewhere:
            print(f"[fl-defense] {len(elsewhere)} cells finished under the other results folders: not run here")
            grid = grid.keeping([c for c in grid.cells if cell_id(c) not in elsewhere])
        pending = [c for c in grid.cells if cell_state(roots[0] / cell_id(c)) == "new"]  # a resumed cell has its model
        for line in pretraining_warnings(board, pending, roots):
            print(line)
        t0 = time.time()
        run_grid(grid, roots[0], progress=not args.no_progress, ray_address=args.ray_address,
                 cpus_per_cell=args.cpus_per_cell)
        print(f"[fl-defense] leaderboard cells done: {len(grid.cells)} ({time.time() - t0:.0f} s) in {roots[0]}")
        if args.shard:
            print("[fl-defense] a shard writes no page; once every shard is done: "
                  f"python -m simulation leaderboard --grid {path} --report-only --results DIR [--results DIR ...]")
            return
    shown = [a for a in argv if a != "--report-only"]
    # the command that runs the cells (and so rewrites this page)
    # (--note describes how these results were run, not how to run them)
    # how the cells were run (shard, cluster) is not part of the command that reproduces the page
    drop_next = {"--shard", "--note", "--ray-address", "--cpus-per-cell"} | ({"--out"} if args.out == DEFAULT_PAGE else set())
    kept, skip = [], False
    for a in shown:
        if skip:
            skip = False
            continue
        if a in drop_next:
            skip = True
            continue
        if any(a.startswith(f"{flag}=") for flag in drop_next):
            continue
        kept.append(a)
    command = "python -m simulation leaderboard " + shlex.join(kept)
    page = write_page(board, roots, Path(args.out).resolve(), command.strip(), args.training_share, args.gpu_step_ms,
                      args.note, title=args.title,
                      subset=board.subset or bool(board.extends))
    print(f"[fl-defense] leaderboard page: {page}")


if __name__ == "__main__":
    main(sys.argv[1:])
