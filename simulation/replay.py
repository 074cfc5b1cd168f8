"""Replay one round of a finished cell, for quantities its records do not keep.

    python -m simulation.replay results/grids/defenses_fmnist/deepsight-fashion_mnist-plus-00eedd702f \
        --data-dir ../shared/data

The cell's clients are rebuilt from its ``summary.json`` config (same partitions, attackers and
attack; every partition takes part, sampled or not) and train one more round, ``--round``
(default: the checkpoint's round + 1), from the global model in the cell's ``checkpoint.pkl``;
the cell's defense, built as the server app builds it, with its checkpointed state, aggregates
their updates once. Printed per client: partition, attacker (simulation's ground
truth, for reading only: the defense never sees it), flagged, weight and the update's norm, then
the defense's ``info``. For DeepSight also each model's NEUPs (the output layer's normalised
update energies, ``deepsight.neups``), the quantity behind its threshold exceedings.

Costs one local round of every client on this machine (a few minutes of CPU for Fashion-MNIST's
10 clients); the cell's own run is not touched. One round is not a run: the global model stays
the checkpoint's, and nothing is evaluated.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def replay(cell: Path, data_dir: str | None = None, server_round: int | None = None,
           overrides: dict | None = None) -> dict:
    """Train the cell's clients one round from its checkpoint and aggregate with its defense
    (``overrides``: run-config keys to change, a what-if). Returns the round, the clients'
    partitions, ground truth, update norms and numbers of examples, the DefenseResult and, for
    DeepSight, the NEUPs."""
    from client_app.app import DefenseClient
    from fl_defense.checkpoint import load_checkpoint
    from fl_defense.config import ExperimentConfig
    from fl_defense.data import load_split
    from fl_defense.defenses import DEFENSES
    from fl_defense.models import build_model, set_arrays, trainable_mask
    from fl_defense.rounds import GROUND_TRUTH_KEY
    from fl_defense.updates import RoundUpdates
    from server_app.app import build_defense

    summary = json.loads((cell / "summary.json").read_text())
    run_config = dict(summary["config"])
    if data_dir:
        run_config["data-dir"] = data_dir
    run_config.update(overrides or {})
    cfg = ExperimentConfig.from_run_config(run_config)
    ckpt = load_checkpoint(cell / "checkpoint.pkl", restore_rng=False)
    arrays = ckpt["arrays"]
    server_round = server_round or int(ckpt["round"]) + 1
    rounds = [json.loads(line) for line in (cell / "rounds.jsonl").read_text().splitlines()]
    parts = {c["partition"] for r in rounds for c in r.get("clients", []) if c["partition"] is not None}
    if not parts:
        raise ValueError(f"{cell}: its rounds record no client partitions, so the federation's size is unknown")
    n = max(parts) + 1  # partitions are 0..num-supernodes-1; a partial-participation run may miss the last
    data_cfg = cfg.data_config(n)
    model = build_model(cfg.model_name, data_cfg.spec.shape, data_cfg.spec.num_classes, seed=cfg.seed)
    set_arrays(model, arrays)
    mask = trainable_mask(model)
    glob = [np.asarray(a, dtype=np.float32) for a, t in zip(arrays, mask) if t]
    rows, examples, malicious = [], [], []
    for pid in range(n):
        client = DefenseClient(cfg, pid, n)
        out, num, metrics = client.fit([np.array(a, copy=True) for a in arrays], {"server-round": server_round})
        trained = [np.asarray(a, dtype=np.float32) for a, t in zip(out, mask) if t]
        rows.append(np.concatenate([(a - b).reshape(-1) for a, b in zip(trained, glob)]))
        examples.append(num)
        malicious.append(bool(metrics[GROUND_TRUTH_KEY]))
    slices, start = [], 0
    for a in glob:
        slices.append(slice(start, start + a.size))
        start += a.size
    # client ids as rounds.stable_identity gives them in simulation, so kept per-client state applies
    ru = RoundUpdates(updates=torch.as_tensor(np.stack(rows)), num_examples=torch.as_tensor(examples, dtype=torch.float64),
                      client_ids=[f"partition-{p}" for p in range(n)], layer_slices=slices, layer_shapes=[a.shape for a in glob])
    global_vec = torch.as_tensor(np.concatenate([a.reshape(-1) for a in glob]))
    if cfg.defense in DEFENSES and DEFENSES[cfg.defense].needs_fisher:
        raise ValueError(f"replay: {cfg.defense} needs the clients' Fisher diagonals, which the replay does not compute")
    server_data = load_split(data_cfg, "server") if cfg.server_fraction > 0 else None
    defense = build_defense(cfg, model, server_data)
    # state kept across rounds (FLDetector's window, FoolsGold's histories), as DefendedAggregation saves it
    defense.load_state_dict((ckpt.get("defense") or {}).get("defense", {}))
    neups = None
    if cfg.defense == "deepsight":
        from fl_defense.defenses.deepsight import neups as neups_of, output_layer

        w_sl, b_sl, p = output_layer(ru)
        u = ru.updates.double().numpy()
        neups = neups_of(u[:, w_sl].reshape(n, p, -1), u[:, b_sl])
    norms = torch.linalg.vector_norm(ru.updates, dim=1).tolist()
    result = defense.aggregate(global_vec.clone(), ru)
    return {"round": server_round, "partitions": list(range(n)), "malicious": malicious, "norms": norms,
            "num_examples": examples, "result": result, "neups": neups, "defense": cfg.defense}


def parse_overrides(items: list[str]) -> dict:
    """``["poison-rate=1.0", "attack='plus'"]`` -> {"poison-rate": 1.0, "attack": "plus"} (TOML values;
    a bare word is a string)."""
    import tomllib

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--set takes KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value.strip()
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m simulation.replay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cell", help="a finished cell's folder (summary.json, checkpoint.pkl)")
    parser.add_argument("--data-dir", help="where the dataset's files are, if not where the cell's config says")
    parser.add_argument("--round", type=int, help="the round number the clients train for (their seeds)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change a run-config key for the replay (a what-if; TOML value syntax), repeatable")
    args = parser.parse_args(argv)
    out = replay(Path(args.cell), args.data_dir, args.round, parse_overrides(args.set))
    res = out["result"]
    print(f"{out['defense']}: round {out['round']} replayed from {args.cell}"
          + (f" with {', '.join(args.set)}" if args.set else ""))
    print("client  attacker  flagged  weight  norm    examples")
    for i, p in enumerate(out["partitions"]):
        print(f"{p:>6}  {'yes' if out['malicious'][i] else 'no':>8}  {'yes' if bool(res.flagged[i]) else 'no':>7}  "
              f"{float(res.weights[i]):.3f}  {out['norms'][i]:.3f}  {out['num_examples'][i]}")
    if out["neups"] is not None:
        print("NEUPs (rows: clients; columns: output neurons / labels 0..P-1)")
        for i, row in enumerate(out["neups"]):
            print(f"{out['partitions'][i]:>6}{' A' if out['malicious'][i] else '  '}  " + " ".join(f"{v:.3f}" for v in row))
    print("info:", json.dumps(res.info))


if __name__ == "__main__":
    main()
