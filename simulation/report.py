"""Reports: from a folder of runs to one Markdown table and PNG plots.

    python -m simulation report results/grids/smoke --out results/reports/smoke

Any folder whose sub-folders hold ``summary.json`` and ``rounds.jsonl`` works (a grid's output, or
the runs of ``benchmarks/flwr_runs.py``); several folders (the shards of a grid run on several
machines: ``fl-defense report DIR1 DIR2 ... --out DIR``) report as one, a run found in more than one
of them (the same cell name) counted once. Writes ``report.md``, ``table.csv`` and PNGs:
accuracy and attack-success curves per defense, per-client weights over rounds as a heatmap with
attackers marked (the idea of the FDCR paper's figure 3), and attack success against the
malicious fraction when the runs vary it.
"""

from __future__ import annotations

import json
from pathlib import Path

SETTING = ["dataset", "partitioner", "dirichlet_alpha", "nir", "attack", "model_poisoning", "malicious_fraction"]


def defense_label(config: dict) -> str:
    """A run's row label: its defense, after its pre-aggregation step when it has one
    ("nnm + krum", "bucketing + centered_clipping"), so cells that differ only there are told apart."""
    pre = config.get("pre-aggregation") or "none"
    return config["defense"] if pre == "none" else f"{pre} + {config['defense']}"


# Run-config keys that say where a run's files are, how it keeps them or whether it goes on, never what a
# round computes: records that differ only in them are the same experiment (max-rounds-without-valid: a grid
# runs every cell to its end).
BOOKKEEPING = frozenset({"run-name", "results-dir", "resume", "pretrain-dir", "data-dir", "checkpoint",
                         "keep-workspace", "max-rounds-without-valid"})
# Run-config keys that never tell two rows apart: the seed (rows average over it), the device and bookkeeping.
NOT_A_VARIANT = {"seed", "device", *BOOKKEEPING}


def cell_labels(configs: dict[str, dict]) -> dict[str, str]:
    """Each run's row label: ``defense_label``, followed by every other run-config key whose value
    differs among the runs that share its setting (``SETTING``) and that label, e.g.
    "rlr (rlr-theta=6)" or "sdfc (sdfc-calibration-mode=client)" or "fdcr (fisher-forgery=noise)";
    so runs that differ in anything but the seed never average into one row."""
    def setting(cfg: dict) -> tuple:
        return tuple(json.dumps(cfg.get(k.replace("_", "-"))) for k in SETTING)

    groups: dict[tuple, list[str]] = {}
    for cell, cfg in configs.items():
        groups.setdefault((setting(cfg), defense_label(cfg)), []).append(cell)
    setting_keys = {k.replace("_", "-") for k in SETTING} | {"defense", "pre-aggregation"} | NOT_A_VARIANT
    labels = {}
    for (_, base), cells in groups.items():
        keys = sorted(set().union(*(configs[c] for c in cells)) - setting_keys)
        varying = [k for k in keys if len({json.dumps(configs[c].get(k)) for c in cells}) > 1]
        for c in cells:
            extra = ", ".join(f"{k}={configs[c].get(k)}" for k in varying)
            labels[c] = f"{base} ({extra})" if extra else base
    return labels


def add_labels(table, folders: list[Path]):
    """The tidy table with each run's ``pre_aggregation`` and row ``label`` (``cell_labels``),
    read from the runs' summaries (runs from before the key existed have none)."""
    configs = {f.name: json.loads((f / "summary.json").read_text())["config"] for f in folders}
    labels = cell_labels(configs)
    table = table.copy()
    table["pre_aggregation"] = table["cell"].map(lambda c: configs[c].get("pre-aggregation") or "none")
    table["label"] = table["cell"].map(labels)
    return table


def _labelled(table):
    """``table`` with a ``label`` column (the defense name where ``add_labels`` was not applied)."""
    return table if "label" in table else table.assign(label=table["defense"])


def run_folders(root: Path | list[Path]) -> list[Path]:
    """The finished runs under one folder or several, ordered by run name; a name found under
    several folders is taken from the first (shards of one grid name a cell alike everywhere)."""
    found: dict[str, Path] = {}
    for r in [root] if isinstance(root, Path) else root:
        for p in sorted(r.glob("*/summary.json")):
            found.setdefault(p.parent.name, p.parent)
    return [found[name] for name in sorted(found)]


def _mean_std(series) -> str:
    s = series.dropna()
    if s.empty:
        return "-"
    return f"{s.mean():.3f}" if len(s) == 1 else f"{s.mean():.3f} ± {s.std(ddof=1):.3f}"


def _partition(d: dict) -> str:
    """'iid', 'dirichlet a=0.5', 'nir 0.25', ..."""
    return d["partitioner"] + (f" a={d['dirichlet_alpha']}" if d["partitioner"] == "dirichlet" else "") \
        + (f" {d['nir']}" if d["partitioner"] == "nir" else "")


def _seconds(series) -> str:
    s = series.dropna()
    return "-" if s.empty else f"{s.mean():.2f}" if s.mean() >= 0.1 else f"{s.mean():.4f}"


def weight_plot_runs(table, folders: list[Path]) -> list[Path]:
    """The runs worth a weight heatmap: those of defenses that flag clients (a TPR was recorded),
    one per setting and defense (the lowest seed)."""
    table = _labelled(table)
    flagging = table[table["tpr"].notna()]
    chosen = flagging.sort_values("seed").groupby(SETTING + ["label"], dropna=False)["cell"].first()
    names = set(chosen)
    return [f for f in folders if f.name in names]


def final_table(table) -> str:
    """Final-round figures, mean ± standard deviation over seeds, one row per setting and defense
    (its row label: ``defense_label``)."""
    table = _labelled(table)
    last = table[table["round"] == table.groupby("cell")["round"].transform("max")]
    lines = ["| dataset | partition | attack | malicious | defense | seeds | accuracy | attack success "
             "| without trigger | TPR | FPR | round (s) | aggregation (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    later = table[table["round"] > 0]
    per_cell = later.groupby("cell")[["round_seconds", "aggregation_seconds"]].mean()
    for key, g in last.groupby(SETTING + ["label"], dropna=False, sort=True):
        times = per_cell.loc[g["cell"].unique()]
        d = dict(zip(SETTING + ["label"], key))
        part = _partition(d)
        attack = d["attack"] + ("" if d["model_poisoning"] == "none" else f"+{d['model_poisoning']}")
        lines.append(f"| {d['dataset']} | {part} | {attack} | {d['malicious_fraction']} | {d['label']} | "
                     f"{g['seed'].nunique()} | {_mean_std(g['accuracy'])} | {_mean_std(g['attack_success_rate'])} | "
                     f"{_mean_std(g['clean_target_rate'])} | "
                     f"{_mean_std(g['tpr'])} | {_mean_std(g['fpr'])} | {_seconds(times['round_seconds'])} | "
                     f"{_seconds(times['aggregation_seconds'])} |")
    return "\n".join(lines)


def window_table(folders: list[Path]) -> str | None:
    """Per setting and defense, over the runs whose attack window closed before their last round
    (``attack-stop-round``): attack success at the window's end and its worst round inside it
    (mean ± std over seeds), and the lifespans after it, with how many runs never fell below."""
    import pandas as pd

    from fl_defense.config import ExperimentConfig

    rows = []
    summaries = {f.name: json.loads((f / "summary.json").read_text()) for f in folders}
    labels = cell_labels({name: summary["config"] for name, summary in summaries.items()})
    for folder in folders:
        summary = summaries[folder.name]
        w = summary.get("attack_window")
        if not w or not w["window_closed"]:
            continue
        cfg = {**ExperimentConfig().as_run_config(), **summary["config"]}
        rows.append({"dataset": cfg["dataset"], "partitioner": cfg["partitioner"],
                     "dirichlet_alpha": cfg["dirichlet-alpha"], "nir": cfg["nir"], "attack": cfg["attack"],
                     "model_poisoning": cfg["model-poisoning"], "malicious_fraction": cfg["malicious-fraction"],
                     "defense": cfg["defense"], "label": labels[folder.name],
                     "window": f"{w['start_round']}-{w['stop_round']}",
                     "tail": summary["rounds_completed"] - w["stop_round"], "seed": cfg["seed"], **w})
    if not rows:
        return None
    table = pd.DataFrame(rows)

    def life(series) -> str:
        never = int(series.isna().sum())
        return _mean_std(series.astype(float)) + (f" ({never} of {len(series)} never)" if never else "")

    lines = ["| dataset | partition | attack | malicious | defense | window | tail | seeds | at window end "
             "| worst in window | rounds to < 0.5 | rounds to < 0.1 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, g in table.groupby(SETTING + ["label", "window", "tail"], dropna=False, sort=True):
        d = dict(zip(SETTING + ["label", "window", "tail"], key))
        attack = d["attack"] + ("" if d["model_poisoning"] == "none" else f"+{d['model_poisoning']}")
        lines.append(f"| {d['dataset']} | {_partition(d)} | {attack} | {d['malicious_fraction']} | {d['label']} | "
                     f"{d['window']} | {d['tail']} | {g['seed'].nunique()} | {_mean_std(g['asr_window_end'])} | "
                     f"{_mean_std(g['asr_window_worst'])} | {life(g['lifespan_50'])} | {life(g['lifespan_10'])} |")
    return "\n".join(lines)


def plot_curves(table, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for i, (key, g) in enumerate(_labelled(table).groupby(SETTING, dropna=False, sort=True)):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for defense, gd in g.groupby("label"):
            curve = gd.groupby("round")[["accuracy", "attack_success_rate"]].mean()
            axes[0].plot(curve.index, curve["accuracy"], label=defense)
            axes[1].plot(curve.index, curve["attack_success_rate"], label=defense)
        axes[0].set(title="main-task accuracy", xlabel="round", ylim=(0, 1))
        axes[1].set(title="attack success rate", xlabel="round", ylim=(0, 1))
        axes[1].legend(fontsize=8, ncol=2)
        d = dict(zip(SETTING, key))
        fig.suptitle(f"{d['dataset']}, {_partition(d)}, attack {d['attack']}, malicious {d['malicious_fraction']}",
                     fontsize=10)
        fig.tight_layout()
        path = out / f"curves_{i}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_weights(folder: Path, out: Path) -> Path | None:
    """Per-client weight over rounds for one run; attackers' rows are marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("clients")]
    if not rows:
        return None
    parts = sorted({c["partition"] for r in rows for c in r["clients"] if c["partition"] is not None})
    if not parts:
        return None
    grid = np.full((len(parts), len(rows)), np.nan)
    malicious = set()
    for j, r in enumerate(rows):
        for c in r["clients"]:
            if c["partition"] is None:
                continue
            grid[parts.index(c["partition"]), j] = c["weight"]
            if c["malicious"]:
                malicious.add(c["partition"])
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(parts) + 1.5))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(parts)), [f"{p}{' (attacker)' if p in malicious else ''}" for p in parts], fontsize=7)
    for tick, p in zip(ax.get_yticklabels(), parts):
        if p in malicious:
            tick.set_color("red")
    ax.set_xticks(range(len(rows)), [r["round"] for r in rows], fontsize=7)
    ax.set(xlabel="round", ylabel="client (partition)")
    summary = json.loads((folder / "summary.json").read_text())
    c = summary["config"]
    setting = {"partitioner": c.get("partitioner", "iid"), "dirichlet_alpha": c.get("dirichlet-alpha"),
               "nir": c.get("nir")}
    ax.set_title(f"aggregation weight per client: {defense_label(c)}, {c.get('dataset')}, {_partition(setting)}, "
                 f"malicious {c.get('malicious-fraction')}, seed {c.get('seed')}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    path = out / f"weights_{folder.name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_fraction(table, out: Path) -> list[Path]:
    """Final attack success against the malicious fraction, for settings run at several fractions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = _labelled(table)
    last = table[table["round"] == table.groupby("cell")["round"].transform("max")]
    others = [k for k in SETTING if k != "malicious_fraction"]
    paths = []
    for i, (key, g) in enumerate(last.groupby(others, dropna=False, sort=True)):
        if g["malicious_fraction"].nunique() < 2:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for defense, gd in g.groupby("label"):
            s = gd.groupby("malicious_fraction")["attack_success_rate"].mean()
            ax.plot(s.index, s.values, marker="o", label=defense)
        d = dict(zip(others, key))
        ax.set(xlabel="malicious fraction", ylabel="attack success rate (final round)", ylim=(0, 1),
               title=f"{d['dataset']}, {_partition(d)}, {d['attack']}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"asr_vs_fraction_{i}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(root: Path | list[Path], out: Path, title: str | None = None, note: str | None = None) -> Path:
    """The report over the runs under ``root`` (one folder, or several whose runs are merged)."""
    from .grid import tidy_table

    roots = [root] if isinstance(root, Path) else list(root)
    folders = run_folders(roots)
    if not folders:
        raise FileNotFoundError(f"no runs (sub-folders with summary.json) under {', '.join(map(str, roots))}")
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("curves_*.png"), *out.glob("weights_*.png"), *out.glob("asr_vs_fraction_*.png")]:
        old.unlink()  # plots of an earlier rendering that this one may not redraw
    table = add_labels(tidy_table(folders), folders)
    table.to_csv(out / "table.csv", index=False)
    curves = plot_curves(table, out)
    weights = [p for p in (plot_weights(f, out) for f in weight_plot_runs(table, folders)) if p is not None]
    fraction = plot_fraction(table, out)
    def shown(path: Path) -> str:
        try:
            return f"`{path.relative_to(Path.cwd())}`"
        except ValueError:
            return f"`{path}`"

    lines = [f"# {title or roots[0].name}", ""] + ([note, ""] if note else []) + [
        f"{len(folders)} runs from {', '.join(map(shown, roots))}. Final round, mean ± std over seeds. Attack success: triggered test "
        "images of other classes classified as the target; without trigger: the same images as they are (the floor "
        "it stands on).",
        "", final_table(table), ""]
    durability = window_table(folders)
    if durability:
        lines += ["## Attack window and lifespan", "",
                  "Runs whose attackers stop (attack-stop-round) before the last round. Attack success at the "
                  "window's last round and its highest inside it; then the rounds after the window until attack "
                  "success falls below 0.5 and 0.1 (0: already at the window's end), mean ± std over the runs "
                  "where it did, and how many never did within the tail.", "", durability, ""]
    lines += ["## Accuracy and attack success over rounds", ""]
    lines += [f"![curves]({p.name})" for p in curves]
    if fraction:
        lines += ["", "## Attack success against the malicious fraction", ""]
        lines += [f"![fraction]({p.name})" for p in fraction]
    lines += ["", "## Aggregation weight per client over rounds (attackers in red)", "",
              "One run (the lowest seed) per setting and defense that flags clients.", ""]
    lines += [f"![weights]({p.name})" for p in weights]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m simulation report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="folder whose sub-folders are runs; several (a grid's shards) merge")
    parser.add_argument("--out", help="report folder (default: <runs>/report; needed with several folders)")
    parser.add_argument("--title")
    parser.add_argument("--note", help="text under the title (how the runs were made); @FILE reads it from FILE")
    args = parser.parse_args(argv)
    roots = [Path(r).resolve() for r in args.runs]
    if len(roots) > 1 and not args.out:
        parser.error("--out is needed when merging several folders of runs")
    note = Path(args.note[1:]).read_text().strip() if args.note and args.note.startswith("@") else args.note
    out = Path(args.out).resolve() if args.out else roots[0] / "report"
    print(write_report(roots if len(roots) > 1 else roots[0], out, args.title, note))
