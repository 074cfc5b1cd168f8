"""simulation.explain reads why a defense caught or missed the attackers from a cell's records; the
records it reads (DeepSight's te-bound and top-label, AlignIns' MZ-scores, FLDetector's gap
curve) come from the defenses' ``info``; simulation.replay reruns one round of a cell."""

import json

import numpy as np
import pytest
import torch

from fl_defense.config import ExperimentConfig
from fl_defense.defenses import AlignIns, DeepSight
from fl_defense.defenses.alignins import mz_scores
from fl_defense.defenses.fldetector import gap_statistic, gap_statistic_k
from simulation import explain
from tests.helpers import round_updates
from tests.test_deepsight import OUT_W, P, SIZES, H, constructed_round


def write_cell(folder, config: dict, rounds: list[tuple[list[bool], object]]) -> None:
    """A finished cell as the recorder writes it: each round from (ground truth, DefenseResult)."""
    folder.mkdir(parents=True)
    cfg = ExperimentConfig.from_run_config(config).as_run_config()
    rows = [{"round": 0, "accuracy": 0.1}]
    for r, (malicious, res) in enumerate(rounds, start=1):
        clients = [{"partition": i, "num_examples": 10 + i, "weight": float(res.weights[i]),
                    "flagged": bool(res.flagged[i]), "malicious": m} for i, m in enumerate(malicious)]
        rows.append({"round": r, "accuracy": 0.5, "attack_success_rate": 0.1 * r, "clients": clients,
                     "info": json.loads(json.dumps(res.info))})
    (folder / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "summary.json").write_text(json.dumps({"config": cfg, "rounds_completed": len(rounds)}))


def spread_attackers(u: np.ndarray, seed: int = 5) -> np.ndarray:
    """The constructed round's three attackers (energy on the target label 0) with energy added on
    every other label as well: they train on many labels, as data poisoning on half of a
    Dirichlet partition does, so their threshold exceedings look benign."""
    rng = np.random.default_rng(seed)
    u = u.copy()
    for i in (7, 8, 9):
        u[i, OUT_W] = (u[i, OUT_W].reshape(P, H) + np.r_[np.zeros((1, H)), 0.135 * np.sign(rng.normal(size=(P - 1, H)))]).ravel()
    return u


class TwoClusters(DeepSight):
    """The clustering separates the attackers (as it did in rounds 8-12 of the Fashion-MNIST cell):
    the benign clients in one cluster, the attackers in another."""

    def cluster(self, global_params, ru, c, bias_updates):
        return np.array([0] * 7 + [1] * 3), {}


def test_deepsight_records_why_and_explain_reads_the_vote(tmp_path):
    """The mechanism of the Fashion-MNIST miss: the attackers' own cluster is found, but none of
    its members is labelled suspicious (TE above median/2 though their top label is the target),
    so the vote accepts it; homogeneous attackers in the same cluster are rejected."""
    mal = [False] * 7 + [True] * 3
    spread = TwoClusters().aggregate(torch.zeros(len(constructed_round()[0])),
                                     round_updates(spread_attackers(constructed_round()), layer_sizes=SIZES))
    homogeneous = TwoClusters().aggregate(torch.zeros(len(constructed_round()[0])),
                                          round_updates(constructed_round(), layer_sizes=SIZES))
    te = np.array(spread.info["threshold-exceedings"])
    assert spread.info["te-bound"] == np.median(te) / 2 and spread.info["top-label"][7:] == [0, 0, 0]
    assert not spread.flagged.any() and homogeneous.flagged.tolist() == mal
    write_cell(tmp_path / "ds", {"defense": "deepsight", "attack": "plus"}, [(mal, spread), (mal, homogeneous)])
    config, (r1, r2) = explain.explain(tmp_path / "ds")
    assert r1["te_attackers"] == te[7:].tolist() and min(r1["te_attackers"]) > r1["te_bound"]
    assert r1["suspicious_attackers"] == 0 and r1["top_label_attackers"] == [0, 0, 0]
    (att,) = [c for c in r1["clusters"] if c["attackers"]]
    assert att == {"members": [7, 8, 9], "attackers": 3, "suspicious": 0, "accepted": True}
    assert r1["flagged_attackers"] == 0 and r1["weight_share"] == pytest.approx(0.3)  # DeepSight's plain mean
    (att,) = [c for c in r2["clusters"] if c["attackers"]]
    assert att["suspicious"] == 3 and not att["accepted"] and r2["flagged_attackers"] == 3 and r2["weight_share"] == 0
    for d, res in ((r1, spread), (r2, homogeneous)):  # the read votes are the defense's decisions
        for c in d["clusters"]:
            assert all(bool(res.flagged[i]) != c["accepted"] for i in c["members"])
    text = explain.report(tmp_path / "ds")
    assert "TE attackers [" in text and "{7*,8*,9*} 0/3 accepted" in text and "{7*,8*,9*} 3/3 flagged" in text
    # records from before te-bound existed: the bound is recomputed the same way
    rows = (tmp_path / "ds" / "rounds.jsonl").read_text().splitlines()
    old = [json.loads(line) for line in rows]
    for r in old[1:]:
        del r["info"]["te-bound"], r["info"]["top-label"], r["info"]["top-neup"]
    (tmp_path / "ds" / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    assert explain.explain(tmp_path / "ds")[1][0]["te_bound"] == r1["te_bound"]


def test_alignins_records_mz_scores_and_explain_says_which_test_flagged(tmp_path):
    rng = np.random.default_rng(3)
    g = torch.from_numpy(rng.normal(size=500).astype(np.float32))
    u = 0.05 * g.numpy() + 0.1 * rng.normal(size=(10, 500))
    u[8] = -u[8]  # a direction outlier
    res = AlignIns().aggregate(g, round_updates(u.astype(np.float32)))
    np.testing.assert_allclose(res.info["mz-tda"], mz_scores(np.array(res.info["tda"])))
    np.testing.assert_allclose(res.info["mz-mpsa"], mz_scores(np.array(res.info["mpsa"])))
    mal = [False] * 7 + [True] * 3
    write_cell(tmp_path / "al", {"defense": "alignins", "attack": "plus"}, [(mal, res)])
    (d,) = explain.explain(tmp_path / "al")[1]
    flagged = res.flagged.tolist()
    assert [a or b for a, b in zip(d["by_tda"], d["by_mpsa"])] == flagged and d["by_tda"][8]
    assert d["passed_attackers"] == [i for i in (7, 8, 9) if not flagged[i]]
    assert d["weight_share"] == pytest.approx(float(res.weights[7:].sum()) / float(res.weights.sum()))
    assert d["example_share"] == pytest.approx((17 + 18 + 19) / sum(range(10, 20)))
    assert ("attackers 7: TDA" in explain.report(tmp_path / "al"))


def test_fldetector_gap_curve_and_explain_recomputes_it_for_old_records(tmp_path):
    rng = np.random.default_rng(0)
    scores = np.r_[np.linspace(0.8, 1.1, 8), 1.5, 1.6]
    k, gaps, sds = gap_statistic(scores, 7, 10, np.random.default_rng([42, 9]), 42)
    assert k == gap_statistic_k(scores, 7, 10, np.random.default_rng([42, 9]), 42) and len(gaps) == len(sds) >= k
    two = np.r_[0.1 + 0.01 * rng.normal(size=9), 3.0 + 0.01 * rng.normal(size=3)]
    k2, gaps2, sds2 = gap_statistic(two, 7, 10, np.random.default_rng(0), 0)
    assert k2 >= 2 and len(gaps2) == k2 + 1  # computed up to the answer + 1, where the rule stopped
    assert gaps2[k2 - 1] >= gaps2[k2] - sds2[k2] and gaps2[0] < gaps2[1] - sds2[1]

    class Res:  # a round FLDetector scored, as an older run recorded it (no gap curve)
        weights = torch.full((10,), 0.1)
        flagged = torch.zeros(10, dtype=torch.bool)
        info = {"scored": list(range(10)), "suspicious-scores": scores.tolist(), "gap-k": k}

    mal = [False] * 8 + [True] * 2
    write_cell(tmp_path / "fd", {"defense": "fldetector", "attack": "plus", "seed": 42},
               [(mal, Res())] * 9)
    d = explain.explain(tmp_path / "fd")[1][8]  # round 9: the seed (42, 9) above
    assert d["attacker_ranks"] == [2, 1] and d["gap_k"] == k
    np.testing.assert_allclose(d["gap"], gaps)
    np.testing.assert_allclose(d["gap_sd"], sds)
    assert d["two_means"]["attackers"] == 2
    assert "gap k = " in explain.report(tmp_path / "fd")


def test_the_explain_command_prints_every_cell(tmp_path, capsys):
    mal = [False] * 7 + [True] * 3
    res = DeepSight().aggregate(torch.zeros(len(constructed_round()[0])), round_updates(constructed_round(), layer_sizes=SIZES))
    write_cell(tmp_path / "a", {"defense": "deepsight", "attack": "plus"}, [(mal, res)])
    write_cell(tmp_path / "b", {"defense": "krum", "attack": "plus", "pre-aggregation": "nnm"}, [(mal, res)])
    explain.main([str(tmp_path / "a"), str(tmp_path / "b")])
    out = capsys.readouterr().out
    assert "a: deepsight, attack plus" in out and "b: krum after nnm" in out
    assert "attackers flagged 3 of 3 times" in out


def test_explain_prints_the_attackers_update_norms_against_the_benign_ones(tmp_path):
    """Records that keep each client's update norm get a line of the attackers' norms against the
    benign median and range; records written before the norms were kept get none."""
    from fl_defense.defenses import FedAvg

    mal = [False] * 3 + [True]
    res = FedAvg().aggregate(torch.zeros(5), round_updates(np.ones((4, 5)), layer_sizes=[5]))
    write_cell(tmp_path / "old", {"defense": "fedavg", "attack": "plus"}, [(mal, res)])
    assert "update norms" not in explain.report(tmp_path / "old")
    rows = [json.loads(line) for line in (tmp_path / "old" / "rounds.jsonl").read_text().splitlines()]
    for c, norm in zip(rows[1]["clients"], [1.0, 2.0, 4.0, 40.0]):
        c["update_norm"] = norm
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "summary.json").write_text((tmp_path / "old" / "summary.json").read_text())
    (tmp_path / "new" / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "    update norms: attackers [40]  benign median 2 (range 1-4)" in explain.report(tmp_path / "new").splitlines()


def test_replay_trains_a_round_from_the_checkpoint_and_aggregates_with_the_cells_defense(tmp_path):
    """On the bundled digits: 4 clients, one attacker; the replayed round is the cell's defense on
    fresh updates from the checkpointed model, with the NEUPs DeepSight's TEs are counted from."""
    from fl_defense.checkpoint import save_checkpoint
    from fl_defense.defenses.deepsight import threshold_exceedings
    from fl_defense.models import build_model, get_arrays
    from simulation.replay import parse_overrides, replay

    config = {"defense": "deepsight", "attack": "plus", "malicious-fraction": 0.25, "deepsight-num-samples": 50,
              "local-epochs": 1}
    cfg = ExperimentConfig.from_run_config(config)
    cell = tmp_path / "cell"
    cell.mkdir()
    (cell / "summary.json").write_text(json.dumps({"config": cfg.as_run_config()}))
    (cell / "rounds.jsonl").write_text(json.dumps({"round": 1, "clients": [{"partition": p} for p in range(4)]}) + "\n")
    spec = cfg.data_config(4).spec
    save_checkpoint(cell / "checkpoint.pkl", 1, get_arrays(build_model(cfg.model_name, spec.shape, spec.num_classes,
                                                                       seed=cfg.seed)), {"defense": {}})
    out = replay(cell)
    assert out["round"] == 2 and sum(out["malicious"]) == 1 and len(out["result"].flagged) == 4
    c = out["neups"]
    np.testing.assert_allclose(c.sum(axis=1), 1.0)
    assert out["result"].info["threshold-exceedings"] == threshold_exceedings(c, 0.01).tolist()
    assert parse_overrides(["poison-rate=1.0", "attack=plus"]) == {"poison-rate": 1.0, "attack": "plus"}
    changed = replay(cell, overrides={"attack": "none"})
    assert not any(changed["malicious"])  # the what-if reached the clients
