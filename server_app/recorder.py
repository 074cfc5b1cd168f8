"""Central evaluation and the results folder: one JSON line per round, one summary JSON.

This is the evaluation layer, the only place that reads ground truth (from the strategy's
``RoundRecord.ground_truth``, never from the defense).

Attack success is the share of test images whose label is not the target (the base class's, when
one is set) that the global model assigns the target once the trigger is stamped on: the measure of
the papers implemented here. A model that assigns the target to many images anyway scores high
without any backdoor (an untrained one does: round 0), so every round also records
``clean_target_rate``, the same share without the trigger: the floor attack success stands on
(not for an attack measured without a trigger, or on images of its own: the edge case's tail).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from fl_defense.config import ExperimentConfig
from fl_defense.durability import window_metrics
from fl_defense.metrics import attack_probes, attack_success_rate, untriggered_figures
from fl_defense.models import set_arrays


DEFINITIONS = {
    "accuracy": "share of the test split classified correctly",
    "attack_success_rate": "share of test images not of the target class (only the base class's, when base-label "
                           "is set) classified as the target once the trigger is applied; attack=semantic: "
                           "without a trigger; attack=none: the plus trigger, as a reference",
    "clean_target_rate": "the same images without the trigger, classified as the target: the floor attack success "
                         "stands on (an untrained or biased model scores high on both); absent for attack=semantic and for "
                         "attack=edge_case (measured on its held-out tail, not on the test images)",
    "round 0": "the initial global model, before any training",
    "num_attackers_sampled": "clients among the round's sampled ones that attacked in it",
    "attack_window": "attackers attack in rounds start_round..stop_round (0: no end); attack success at the "
                     "window's end and its worst round in it; lifespan_50/_10: rounds after the window until attack "
                     "success is below 0.5/0.1 (0: already at the window's end; null: never within the run, or the "
                     "window still open at its end)",
    "tpr, fpr": "flagged attackers / all attackers, flagged benign clients / all benign clients, per round; "
                "null for defenses that flag no one",
    "crfl_*": "final round, crfl-certify-samples > 0 (defense=crfl): CRFL's parameter smoothing over crfl-certify-examples "
              "test images; certified_accuracy: correct and certified, certified_rate: certified, smoothed_accuracy: "
              "the smoothed model's, mean_certified_radius: Theorem 2's radius averaged over the images (0 when wrong "
              "or not certified); crfl_certify: the attack round, attackers and constants it was computed with",
}


class RunFailed(RuntimeError):
    """The federation ran but cannot count as a result (no summary, missing rounds, no progress)."""


def run_failure(out_dir: Path, num_rounds: int) -> str | None:
    """Why the run that wrote ``out_dir`` failed, from its summary; None when it did not."""
    path = out_dir / "summary.json"
    if not path.exists():
        rounds = path.with_name("rounds.jsonl")
        done = len(rounds.read_text().splitlines()) - 1 if rounds.exists() else 0
        return f"the run ended after {max(done, 0)} of {num_rounds} rounds without writing {path}"
    summary = json.loads(path.read_text())
    if summary["rounds_completed"] < num_rounds:
        return f"the run stopped after round {summary['rounds_completed']} of {num_rounds}"
    if num_rounds > 0 and summary.get("rounds_kept_global") == num_rounds:
        last = summary.get("last_round", {})
        return (f"no round changed the global model in {num_rounds} rounds (last round: {last.get('reason')}; "
                f"{last.get('num_rejected')} results rejected, {last.get('num_failures')} clients failed)")
    return None


def failure_reason(exc: BaseException) -> str:
    """One line saying why a run failed: our own messages as they are (they name the key or the
    round), anything else with its type."""
    from fl_defense.config import ConfigError

    text = str(exc) if isinstance(exc, (ConfigError, RunFailed)) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


def failure_line(reason: str) -> str:
    return f"[fl-defense] FAILED: {reason}"


def done_line(out_dir: Path) -> str:
    """The closing line of a run that did not fail, from its summary."""
    s = json.loads((out_dir / "summary.json").read_text())
    f = s["final"]
    floor = f" ({_fmt(f['clean_target_rate'])} without the trigger)" if f.get("clean_target_rate") is not None else ""
    try:
        shown = out_dir.relative_to(Path.cwd())
    except ValueError:
        shown = out_dir
    return (f"[fl-defense] done: {s['rounds_completed']} rounds, accuracy {_fmt(f['accuracy'])}, attack success "
            f"{_fmt(f['attack_success_rate'])}{floor}; results in {shown}")


class RunRecorder:
    """Evaluates the global model each round (Flower's ``evaluate_fn``) and writes results."""

    def __init__(self, cfg: ExperimentConfig, model: torch.nn.Module, test: tuple[torch.Tensor, torch.Tensor],
                 out_dir: Path, echo=None, resume_round: int | None = None) -> None:
        self.cfg = cfg
        self.model = model
        self.test_x, self.test_y = test
        self.probes = attack_probes(cfg, tuple(test[0].shape[1:]))
        self.out_dir = out_dir
        self.echo = echo or (lambda line: print(line, flush=True))
        self.strategy = None  # set once the strategy exists; records are read from it
        self.pretrained_from: str | None = None  # the pre-training cache the run started from
        self.rows: list[dict] = []
        self._t_last = time.perf_counter()
        self._t_start = self._t_last
        out_dir.mkdir(parents=True, exist_ok=True)
        # rounds.jsonl and summary.json are reproducible (same config and seed, same bytes);
        # wall-clock figures go to timings.jsonl.
        self._rounds_path = out_dir / "rounds.jsonl"
        self._timings_path = out_dir / "timings.jsonl"
        if resume_round is None:
            self._rounds_path.write_text("")
            self._timings_path.write_text("")
            for stale in ("summary.json", "timing.json"):  # an earlier run's under the same name
                (out_dir / stale).unlink(missing_ok=True)
        else:  # keep what was recorded up to the checkpoint
            for path in (self._rounds_path, self._timings_path):
                kept = [line for line in (path.read_text().splitlines() if path.exists() else [])
                        if json.loads(line)["round"] <= resume_round]
                path.write_text("".join(line + "\n" for line in kept))
                if path == self._rounds_path:
                    self.rows = [json.loads(line) for line in kept]

    def evaluate(self, server_round: int, arrays, config) -> tuple[float, dict]:
        done = [r for r in self.rows if r["round"] == server_round]
        if done:  # already recorded before an interruption
            return 1.0 - done[0]["accuracy"], {"accuracy": done[0]["accuracy"]}
        set_arrays(self.model, arrays)
        device = self.cfg.device if self.cfg.device == "cpu" or torch.cuda.is_available() else "cpu"
        # accuracy, the floor (the same images without the trigger) and the clean accuracy on the class a
        # base-class backdoor redirects: one pass over the test images. No floor without a trigger (the
        # semantic backdoor: the untriggered images are what it measures) or for a probe that measures
        # images of its own (the edge case's held-out tail: the test images are not what it stands on)
        probe = self.probes["attack_success_rate"]
        plain = untriggered_figures(self.model, self.test_x, self.test_y, self.cfg.target_label, self.cfg.base_label,
                                    floor=probe is not None and not hasattr(probe, "success_rate"), device=device)
        acc = plain["accuracy"]
        rates = {name: attack_success_rate(self.model, self.test_x, self.test_y, trig, self.cfg.target_label,
                                           self.cfg.base_label, device) for name, trig in self.probes.items()}
        asr = rates["attack_success_rate"]
        if "clean_target_rate" in plain:
            rates["clean_target_rate"] = plain["clean_target_rate"]
        now = time.perf_counter()
        row = {"round": server_round, "accuracy": acc, **rates}
        if "base_class_accuracy" in plain:
            row["base_class_accuracy"] = plain["base_class_accuracy"]
        records = self.strategy.records if self.strategy is not None else []
        if server_round > 0 and records and records[-1].server_round == server_round:
            rec = records[-1]
            det = rec.detection()
            row.update({
                "num_clients": len(rec.client_ids),
                "num_attackers_sampled": rec.num_attackers(),
                "num_flagged": int(sum(rec.flagged)),
                "tpr": det["tpr"], "fpr": det["fpr"], "detection": det,
                "num_rejected": len(rec.rejected), "rejected": rec.rejected, "num_failures": rec.failures,
                "kept_global": rec.kept_global, "reason": rec.reason,
                "clients": [
                    {"partition": pid, "num_examples": n, "weight": w, "flagged": f, "update_norm": u,
                     "malicious": rec.ground_truth.get(cid)}
                    for cid, pid, n, w, f, u in zip(rec.client_ids, rec.partition_ids, rec.num_examples,
                                                    rec.weights, rec.flagged, rec.update_norms, strict=True)
                ],
                "info": rec.info,
            })
        if server_round == self.cfg.num_server_rounds and self.cfg.crfl_certify_samples > 0:
            row.update(self.certify(server_round, row, device))
        collusion = getattr(self.strategy, "collusion_records", None) if self.strategy is not None else None
        if server_round > 0 and collusion and collusion[-1]["round"] == server_round:
            row["collusion"] = collusion[-1]  # attack, knowledge mode, target, colluders, gamma/lambda
        timing = {"round": server_round, "round_seconds": now - self._t_last}
        if "num_clients" in row:
            timing["aggregation_seconds"] = records[-1].aggregation_seconds
        self._t_last = now
        self.rows.append(row)
        with self._rounds_path.open("a") as fh:
            fh.write(json.dumps(_finite(row)) + "\n")
        with self._timings_path.open("a") as fh:
            fh.write(json.dumps(timing) + "\n")
        self.echo(_line(row, f"pre-trained for {self.cfg.pretrain_rounds} rounds" if self.cfg.pretrain_rounds > 0
                         else "untrained"))
        if server_round == self.cfg.num_server_rounds:
            self.write_summary()
        return 1.0 - acc, {"accuracy": acc, "attack-success-rate": asr if not math.isnan(asr) else -1.0}

    def certify(self, server_round: int, row: dict, device: str) -> dict:
        """CRFL's certified accuracy and radius of the final model (``fl_defense.certify``). The
        theorem's single attack round t_adv is the last round in which attackers were sampled,
        its R attackers those of that round with the weights the defense gave them (ground truth:
        this is the evaluation layer); without one, a single attacker with weight 1/n in the final
        round, sized as the round's mean client."""
        from fl_defense import certify
        from fl_defense.defenses import DEFENSES

        cfg = self.cfg
        crfl = DEFENSES["crfl"](**cfg.defense_kwargs("crfl"))
        rows = [r for r in self.rows if r.get("clients")] + ([row] if row.get("clients") else [])
        attacked = [r for r in rows if any(c["malicious"] for c in r["clients"])]  # attackers aggregated
        if attacked:
            t_adv = attacked[-1]["round"]
            attackers = [c for c in attacked[-1]["clients"] if c["malicious"]]
            weights = [c["weight"] for c in attackers]
            sizes = [c["num_examples"] for c in attackers]
        else:
            t_adv = server_round
            clients = row.get("clients") or [{"num_examples": 0}]
            weights = [1.0 / len(clients)]
            sizes = [sum(c["num_examples"] for c in clients) / len(clients)]
        taus = [certify.local_iterations(int(round(s)), cfg.local_epochs, cfg.batch_size) for s in sizes]
        rounds = list(range(t_adv + 1, server_round))
        rhos = [crfl.rho(t) for t in rounds] + [crfl.rho(server_round)]
        sigmas = [crfl.sigma] * len(rounds) + [cfg.crfl_certify_sigma]
        scale = cfg.boost_factor if cfg.model_poisoning == "boost" else 1.0
        constants = {"t_adv": t_adv, "num_attackers": len(weights), "attacker_weights": weights,
                     "local_iterations": taus, "lipschitz": cfg.crfl_certify_lipschitz, "scale": scale,
                     "lr": cfg.learning_rate, "poison_fraction": cfg.poison_rate, "sigma_test": cfg.crfl_certify_sigma,
                     "samples": cfg.crfl_certify_samples, "alpha": cfg.crfl_certify_alpha}

        def radius(p_a, p_b):
            return certify.crfl_radius(p_a, p_b, cfg.crfl_certify_sigma, rhos, sigmas, weights, taus,
                                       cfg.crfl_certify_lipschitz, scale, cfg.learning_rate, cfg.poison_rate)

        pick = torch.randperm(len(self.test_x), generator=torch.Generator().manual_seed(cfg.seed))
        pick = pick[:cfg.crfl_certify_examples]
        counts = certify.smoothed_counts(self.model, self.test_x[pick], cfg.crfl_certify_samples,
                                         cfg.crfl_certify_sigma, cfg.seed, device)
        out = certify.certify(counts, self.test_y[pick].numpy(), cfg.crfl_certify_alpha, radius)
        return {f"crfl_{k}": out[k] for k in ("certified_accuracy", "certified_rate", "smoothed_accuracy",
                                               "mean_certified_radius")} | {"crfl_certify": constants}

    def write_summary(self) -> Path:
        attackers = sorted({c["partition"] for r in self.rows for c in r.get("clients", []) if c["malicious"]})
        final = self.rows[-1] if self.rows else {}

        def mean_of(key):
            vals = [r[key] for r in self.rows if r.get(key) is not None and not math.isnan(r[key])]
            return sum(vals) / len(vals) if vals else None

        timings = [json.loads(line) for line in self._timings_path.read_text().splitlines()]

        def mean_timing(key):
            vals = [t[key] for t in timings if key in t]
            return sum(vals) / len(vals) if vals else None

        (self.out_dir / "timing.json").write_text(json.dumps({
            "wall_seconds_this_process": time.perf_counter() - self._t_start,
            "mean_round_seconds": mean_timing("round_seconds"),
            "mean_aggregation_seconds": mean_timing("aggregation_seconds"),
        }, indent=2))
        initial = next((r for r in self.rows if r["round"] == 0), {})
        trained = [r for r in self.rows if r["round"] > 0]
        last_trained = trained[-1] if trained else {}
        figures = ("accuracy", "attack_success_rate", "clean_target_rate")
        summary = {
            "config": self.cfg.as_run_config(),
            "defense": repr(self.strategy.defense) if self.strategy is not None else None,
            "rounds_completed": final.get("round", 0),
            "rounds_kept_global": sum(r.get("kept_global") is True for r in trained),
            "last_round": {k: last_trained.get(k) for k in ("reason", "num_rejected", "num_failures")},
            "initial": {k: initial.get(k) for k in figures},
            "final": {k: final.get(k) for k in (*figures, "tpr", "fpr", "num_flagged",
                                                 *sorted(k for k in final if k.startswith("asr_piece")),
                                                 *sorted(k for k in final if k.startswith("crfl_")))},
            "mean_over_rounds": {"tpr": mean_of("tpr"), "fpr": mean_of("fpr")},
            "attack_window": window_metrics({r["round"]: r.get("attack_success_rate") for r in self.rows},
                                            self.cfg.attack_start_round, self.cfg.attack_stop_round),
            "attacker_partitions_seen": attackers,
            "pretrained_from": self.pretrained_from,
            "definitions": DEFINITIONS,
        }
        path = self.out_dir / "summary.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(_finite(summary), indent=2))
        os.replace(tmp, path)
        return path


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _line(row: dict, initial: str = "untrained") -> str:
    """A round's line; round 0 says what the initial model is (untrained, or pre-trained for N rounds)."""
    s = f"[fl-defense] round {row['round']:>3}" + (f" (initial model, {initial})" if row["round"] == 0 else "")
    s += f" | accuracy {_fmt(row['accuracy'])} | attack success {_fmt(row['attack_success_rate'])}"
    if "clean_target_rate" in row:
        s += f" ({_fmt(row['clean_target_rate'])} without the trigger)"
    if "num_flagged" in row:
        s += f" | flagged {row['num_flagged']}/{row['num_clients']} (tpr {_fmt(row['tpr'])}, fpr {_fmt(row['fpr'])})"
        if row["num_rejected"] or row["num_failures"]:
            s += f" | rejected {row['num_rejected']}, failed {row['num_failures']}"
        if row["kept_global"]:
            s += " | global model kept"
    return s


def _finite(obj):
    """JSON has no NaN: write null instead."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
