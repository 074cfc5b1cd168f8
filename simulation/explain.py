"""Why a detecting defense caught or missed the attackers, read from a finished cell's records.

    python -m simulation.explain results/grids/defenses_fmnist/deepsight-fashion_mnist-plus-00eedd702f

Reads the cell's ``summary.json`` and ``rounds.jsonl`` (nothing is rerun) and prints, round by
round, the attackers against the benign clients: who was flagged, the attackers' share of the
aggregation weight against their share of the examples (what FedAvg would give them), the
attackers' update norms against the benign ones' (in records that keep them), and the figures of
the defense's own tests from its ``info``:

- DeepSight: threshold exceedings (TE) of attackers and benign clients against the labelling bound
  median(TE) / 2, the final clusters with their suspicious members against tau, accepted or not;
- AlignIns: TDA and MPSA with their MZ-scores against the radii, and which test flagged whom;
- FLDetector: suspicious scores and the attackers' ranks, the gap statistic's k (with Gap(k) and
  s_k; recomputed from the recorded scores when the records predate them) and what K-means with
  k = 2 would have flagged.

Other defenses get the common part. Attackers are known from the simulation's ground truth
(``malicious`` in each client's record), which only this evaluation reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def load_cell(cell: Path) -> tuple[dict, list[dict]]:
    """The cell's run config (its summary's, over today's defaults) and its rounds with clients."""
    from fl_defense.config import ExperimentConfig

    summary = json.loads((cell / "summary.json").read_text())
    config = {**ExperimentConfig().as_run_config(), **summary["config"]}
    rows = [json.loads(line) for line in (cell / "rounds.jsonl").read_text().splitlines() if line.strip()]
    return config, [r for r in rows if r.get("clients")]


def common(row: dict) -> dict:
    """Flags and weight shares of one round's attackers and benign clients."""
    clients = row["clients"]
    mal = np.array([bool(c["malicious"]) for c in clients])
    flagged = np.array([bool(c["flagged"]) for c in clients])
    weights = np.array([float(c["weight"]) for c in clients])
    examples = np.array([float(c["num_examples"] or 0) for c in clients])
    total_w = weights.sum()
    norms = [c.get("update_norm") for c in clients]  # absent from records before they were kept
    norms = np.array(norms, dtype=float) if all(u is not None for u in norms) else None
    return {"round": row["round"], "asr": row.get("attack_success_rate"), "malicious": mal,
            "norms_attackers": None if norms is None else norms[mal].tolist(),
            "norms_benign": None if norms is None else norms[~mal].tolist(),
            "attackers": int(mal.sum()), "benign": int((~mal).sum()),
            "flagged_attackers": int((flagged & mal).sum()), "flagged_benign": int((flagged & ~mal).sum()),
            "weight_share": float(weights[mal].sum() / total_w) if total_w > 0 else 0.0,
            "example_share": float(examples[mal].sum() / examples.sum()) if examples.sum() > 0 else 0.0,
            "kept_global": total_w <= 0}


def deepsight(row: dict, config: dict) -> dict:
    """TE against the bound, and the final clusters' votes (a noise model is a cluster of one)."""
    info, base = row["info"], common(row)
    mal = base["malicious"]
    te = np.array(info["threshold-exceedings"])
    bound = info.get("te-bound", float(np.median(te)) / 2)
    suspicious = np.array(info["suspicious"], dtype=bool)
    labels = np.array(info["clusters"])
    tau = float(config["deepsight-tau"])
    groups = [np.flatnonzero(labels == lab) for lab in sorted(set(labels[labels >= 0].tolist()))]
    groups += [np.array([i]) for i in np.flatnonzero(labels < 0)]
    clusters = [{"members": g.tolist(), "attackers": int(mal[g].sum()), "suspicious": int(suspicious[g].sum()),
                 "accepted": bool(suspicious[g].sum() < tau * len(g))} for g in groups]
    return {**base, "te_attackers": te[mal].tolist(), "te_benign": te[~mal].tolist(), "te_bound": bound,
            "suspicious_attackers": int((suspicious & mal).sum()), "suspicious_benign": int((suspicious & ~mal).sum()),
            "top_label_attackers": [info["top-label"][i] for i in np.flatnonzero(mal)] if "top-label" in info else None,
            "clusters": clusters, "tau": tau}


def alignins(row: dict, config: dict) -> dict:
    """TDA, MPSA and their MZ-scores; which test flagged each client."""
    from fl_defense.defenses.alignins import mz_scores

    info, base = row["info"], common(row)
    tda, mpsa = np.array(info["tda"]), np.array(info["mpsa"])
    mz_tda = np.array(info["mz-tda"]) if "mz-tda" in info else mz_scores(tda)
    mz_mpsa = np.array(info["mz-mpsa"]) if "mz-mpsa" in info else mz_scores(mpsa)
    by_tda, by_mpsa = mz_tda >= float(config["alignins-lambda-c"]), mz_mpsa >= float(config["alignins-lambda-s"])
    return {**base, "tda": tda.tolist(), "mpsa": mpsa.tolist(), "mz_tda": mz_tda.tolist(), "mz_mpsa": mz_mpsa.tolist(),
            "by_tda": by_tda.tolist(), "by_mpsa": by_mpsa.tolist(),
            "passed_attackers": [int(i) for i in np.flatnonzero(base["malicious"] & ~by_tda & ~by_mpsa)]}


def fldetector(row: dict, config: dict) -> dict:
    """Scores, the attackers' ranks (1: highest), the gap statistic and K-means' split at k = 2."""
    from fl_defense.defenses.fldetector import gap_statistic, two_means_high_cluster

    info, base = row["info"], common(row)
    out = {**base, "scored": "suspicious-scores" in info}
    if not out["scored"]:
        return out
    scored = np.array(info["scored"])
    scores = np.array(info["suspicious-scores"])
    mal = base["malicious"][scored]
    ranks = [int((scores > scores[i]).sum()) + 1 for i in np.flatnonzero(mal)]
    out.update({"scores_attackers": scores[mal].tolist(), "scores_benign": scores[~mal].tolist(),
                "attacker_ranks": ranks, "gap_k": info.get("gap-k")})
    if "gap-k" in info:
        seed = int(config["seed"])
        if "gap" in info:
            gaps, sds = info["gap"], info["gap-sd"]
        else:  # records from before the curve was kept: the same computation, same seed
            _, gaps, sds = gap_statistic(scores, int(config["fldetector-gap-k-max"]), int(config["fldetector-gap-refs"]),
                                         np.random.default_rng([seed, row["round"]]), seed)
        high = two_means_high_cluster(scores, seed) if len(scores) >= 2 and scores.max() > scores.min() else None
        out.update({"gap": [float(g) for g in gaps], "gap_sd": [float(s) for s in sds],
                    "two_means": None if high is None else
                    {"attackers": int((high & mal).sum()), "benign": int((high & ~mal).sum())}})
    return out


EXPLAINERS = {"deepsight": deepsight, "alignins": alignins, "fldetector": fldetector}


def explain(cell: Path) -> tuple[dict, list[dict]]:
    """(config, one dict per round) for a finished cell; defense-specific figures where known."""
    config, rows = load_cell(cell)
    fn = EXPLAINERS.get(config["defense"])
    return config, [fn(r, config) if fn and r.get("info") else common(r) for r in rows]


def _ints(xs) -> str:
    return "[" + " ".join(str(x) for x in xs) + "]"


def _floats(xs, fmt: str = ".3f") -> str:
    return "[" + " ".join(format(x, fmt) for x in xs) + "]"


def format_round(d: dict, defense: str) -> list[str]:
    asr = "-" if d["asr"] is None else f"{d['asr']:.3f}"
    head = (f"round {d['round']:>3}  attack success {asr}  flagged: attackers {d['flagged_attackers']}/{d['attackers']}, "
            f"benign {d['flagged_benign']}/{d['benign']}  attackers' weight {d['weight_share']:.2f} "
            f"(examples {d['example_share']:.2f})" + ("  global model kept" if d["kept_global"] else ""))
    lines = [head]
    mal = d["malicious"]
    if d.get("norms_attackers") and d.get("norms_benign"):
        lines.append(f"    update norms: attackers {_floats(d['norms_attackers'], '.3g')}  benign median "
                     f"{np.median(d['norms_benign']):.3g} (range {min(d['norms_benign']):.3g}-{max(d['norms_benign']):.3g})")
    if defense == "deepsight" and "te_bound" in d:
        lines.append(f"    TE attackers {_ints(d['te_attackers'])}  benign {_ints(d['te_benign'])}  "
                     f"bound median/2 = {d['te_bound']:g}  suspicious: attackers {d['suspicious_attackers']}, "
                     f"benign {d['suspicious_benign']}"
                     + (f"  attackers' top label {_ints(d['top_label_attackers'])}" if d["top_label_attackers"] else ""))
        parts = []
        for c in d["clusters"]:
            members = ",".join(f"{i}{'*' if mal[i] else ''}" for i in c["members"])
            parts.append(f"{{{members}}} {c['suspicious']}/{len(c['members'])} {'accepted' if c['accepted'] else 'flagged'}")
        lines.append(f"    clusters (* attacker; suspicious/size, accepted when < tau = {d['tau']:.3g}): " + "  ".join(parts))
    if defense == "alignins" and "tda" in d:
        att = np.flatnonzero(mal)
        lines.append("    attackers " + "  ".join(
            f"{i}: TDA {d['tda'][i]:.3f} (MZ {d['mz_tda'][i]:.2f}) MPSA {d['mpsa'][i]:.3f} (MZ {d['mz_mpsa'][i]:.2f})"
            + (" passed" if i in d["passed_attackers"] else
               " flagged by " + "+".join(t for t, f in (("TDA", d["by_tda"][i]), ("MPSA", d["by_mpsa"][i])) if f))
            for i in att))
        ben = np.flatnonzero(~mal)
        lines.append(f"    benign flagged by TDA {sum(d['by_tda'][i] for i in ben)}, by MPSA {sum(d['by_mpsa'][i] for i in ben)}"
                     f" of {len(ben)}")
    if defense == "fldetector" and d.get("scored"):
        line = (f"    scores attackers {_floats(d['scores_attackers'])} (ranks {_ints(d['attacker_ranks'])})  "
                f"benign {_floats(d['scores_benign'])}")
        if d.get("gap_k") is not None:
            line += f"  gap k = {d['gap_k']} (Gap {_floats(d['gap'])}, s {_floats(d['gap_sd'])})"
            if d.get("two_means"):
                line += (f"; K-means k=2 would flag {d['two_means']['attackers']} attackers, "
                         f"{d['two_means']['benign']} benign")
        lines.append(line)
    return lines


def report(cell: Path) -> str:
    config, rounds = explain(cell)
    defense = config["defense"]
    pre = config.get("pre-aggregation", "none")
    lines = [f"{cell.name}: {defense}" + (f" after {pre}" if pre != "none" else "")
             + f", attack {config['attack']}" + ("" if config["model-poisoning"] == "none" else f"+{config['model-poisoning']}")]
    for d in rounds:
        lines += format_round(d, defense)
    if rounds:
        caught = sum(d["flagged_attackers"] for d in rounds)
        total = sum(d["attackers"] for d in rounds)
        lines.append(f"over {len(rounds)} rounds: attackers flagged {caught} of {total} times; attackers' mean weight "
                     f"{np.mean([d['weight_share'] for d in rounds]):.2f} against their examples' "
                     f"{np.mean([d['example_share'] for d in rounds]):.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m simulation.explain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cells", nargs="+", help="finished cells' folders (summary.json, rounds.jsonl)")
    args = parser.parse_args(argv)
    print("\n\n".join(report(Path(c)) for c in args.cells))


if __name__ == "__main__":
    main()
