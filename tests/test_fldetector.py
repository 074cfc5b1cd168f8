"""FLDetector (Zhang et al., KDD 2022): L-BFGS predictions, the gap statistic, detection of
inconsistent clients, partial participation, checkpoints and both Flower APIs over several rounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fl_defense import strategies
from fl_defense.defenses import FLDetector
from fl_defense.defenses.fldetector import gap_statistic_k, lbfgs_hvp
from fl_defense.rounds import GROUND_TRUTH_KEY
from fl_defense.strategies import message
from fl_defense.updates import RoundUpdates
from tests.helpers import client_models, model_arrays
from tests.test_adapters import run_legacy, run_message

D, LR = 40, 0.1


def dense_bfgs(s: np.ndarray, y: np.ndarray) -> np.ndarray:
    """B from B_0 = sigma I (sigma = y_N^T s_N / s_N^T s_N) and the BFGS update for every pair."""
    sigma = y[-1] @ s[-1] / (s[-1] @ s[-1])
    b = sigma * np.eye(s.shape[1])
    for si, yi in zip(s, y):
        bs = b @ si
        b = b - np.outer(bs, bs) / (si @ bs) + np.outer(yi, yi) / (yi @ si)
    return b


def test_lbfgs_compact_form_is_the_bfgs_recursion_and_meets_the_secant_equation():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(D, D))
    a = q @ q.T / D + np.eye(D)
    s = rng.normal(size=(5, D))
    y = s @ a.T  # a quadratic's gradient differences
    v = rng.normal(size=(3, D))
    hv = lbfgs_hvp(torch.tensor(s), torch.tensor(y), torch.tensor(v)).numpy()
    np.testing.assert_allclose(hv, v @ dense_bfgs(s, y).T, rtol=1e-8, atol=1e-8)
    last = lbfgs_hvp(torch.tensor(s), torch.tensor(y), torch.tensor(s[-1:])).numpy()[0]
    np.testing.assert_allclose(last, y[-1], rtol=1e-8)
    # no curvature, no prediction
    assert lbfgs_hvp(torch.tensor(s), torch.tensor(-y), torch.tensor(v)) is None


def test_gap_statistic_finds_two_groups_and_one_in_a_homogeneous_sample():
    rng = np.random.default_rng(1)
    two = np.concatenate([0.1 + 0.01 * rng.normal(size=9), 3.0 + 0.01 * rng.normal(size=3)])
    assert gap_statistic_k(two, 7, 10, np.random.default_rng(0), 0) >= 2
    one = 1.0 + 0.01 * rng.normal(size=12)
    assert gap_statistic_k(one, 7, 10, np.random.default_rng(0), 0) == 1
    assert gap_statistic_k(np.ones(12), 7, 10, np.random.default_rng(0), 0) == 1


class Quadratic:
    """Clients with quadratic losses f_i(w) = (w - c_i)^T A (w - c_i) / 2 and a little gradient
    noise: benign updates are -lr * grad_i(w), consistent from round to round, so FLDetector's
    prediction g_{t-1}^i + H (w_t - w_{t-1}) is close to what they send."""

    def __init__(self, n: int, seed: int = 0, outlier: int | None = None):
        rng = np.random.default_rng(seed)
        q = rng.normal(size=(D, D))
        self.a = q @ q.T / D + np.eye(D)
        self.c = 0.3 * rng.normal(size=(n, D))
        if outlier is not None:  # a benign client with data far from everyone's: a large update
            self.c[outlier] += 8.0 * rng.normal(size=D) / np.sqrt(D)
        self.rng = rng

    def updates(self, w: np.ndarray, rows: list[int], attackers: list[int], t: int) -> np.ndarray:
        g = (w - self.c[rows]) @ self.a.T + 0.01 * self.rng.normal(size=(len(rows), D))
        u = -LR * g
        for j, r in enumerate(rows):
            if r in attackers:  # a model-poisoning attacker: a different direction every round
                u[j] = 0.5 * np.linalg.norm(u[j]) * self.rng.normal(size=D) / np.sqrt(D) * 3
        return u


def rnd(u: np.ndarray, ids: list[str]) -> RoundUpdates:
    return RoundUpdates(updates=torch.tensor(u, dtype=torch.float32), num_examples=torch.full((len(ids),), 10.0,
                        dtype=torch.float64), client_ids=ids, layer_slices=[slice(0, u.shape[1])])


def test_flags_inconsistent_attackers_and_keeps_a_consistent_benign_outlier():
    n, attackers, outlier = 12, [9, 10, 11], 0
    fed = Quadratic(n, outlier=outlier)
    fld = FLDetector(window=3, seed=0)
    w = np.zeros(D)
    ids = [f"c{i}" for i in range(n)]
    flagged_rounds = []
    for t in range(1, 13):
        res = fld.aggregate(torch.tensor(w, dtype=torch.float32),
                            rnd(fed.updates(w, list(range(n)), attackers if t >= 6 else [], t), ids))
        flagged = res.flagged.numpy()
        if t < 6:
            assert not flagged.any(), f"round {t}: flagged {np.flatnonzero(flagged)} without attackers"
        else:
            flagged_rounds.append(flagged)
            assert (res.weights.numpy()[flagged] == 0).all()
        w = res.params.double().numpy()
    # from the second attack round on (the score averages over N rounds) exactly the attackers
    for flagged in flagged_rounds[1:]:
        assert np.flatnonzero(flagged).tolist() == attackers
    # the outlier's update is the largest benign one, yet its score is low: consistency is judged
    u = fed.updates(w, list(range(n)), [], 0)
    assert np.argmax(np.linalg.norm(u, axis=1)) == outlier


def test_partial_participation_scores_only_clients_seen_before_and_catches_attackers():
    n, per_round = 20, 6
    fed = Quadratic(n, seed=3)
    attackers = [17, 18, 19]
    fld = FLDetector(window=2, seed=0)
    w = np.zeros(D)
    rng = np.random.default_rng(5)
    seen = set()
    caught = set()
    for t in range(1, 31):
        rows = sorted(rng.choice(n, size=per_round, replace=False).tolist())
        ids = [f"c{r}" for r in rows]
        u = fed.updates(w, rows, attackers if t >= 10 else [], t)
        has_window = bool(fld._s)
        res = fld.aggregate(torch.tensor(w, dtype=torch.float32), rnd(u, ids))
        scored = res.info["scored"]
        # scored: exactly the clients seen before (once the window holds a pair)
        assert [ids[i] for i in scored] == ([cid for cid in ids if cid in seen] if has_window else [])
        flagged = {rows[i] for i in np.flatnonzero(res.flagged.numpy())}
        for i in np.flatnonzero(res.flagged.numpy()):
            assert i in scored  # a client seen for the first time is never flagged
        # after a warm-up (the model moves fastest in the first rounds, when a client absent since
        # is predicted worst) nobody is flagged before the attack starts
        if 5 < t < 10:
            assert not flagged
        if t >= 10:
            caught |= flagged
        seen.update(ids)
        w = res.params.double().numpy()
    assert caught & set(attackers) and not caught - set(attackers)


def test_a_prediction_error_equals_its_definition_for_a_client_absent_for_rounds():
    """Client c0 sends in round 1 and again in round 4: its predicted update is its round-1
    update plus H_4 (w_4 - w_1), with H_4 from the window after round 3."""
    fed = Quadratic(4, seed=7)
    fld = FLDetector(window=5, seed=0)
    w = np.zeros(D)
    plan = [["c0", "c1", "c2", "c3"], ["c1", "c2", "c3"], ["c1", "c2", "c3"], ["c0", "c1", "c2"]]
    kept = {}
    for t, ids in enumerate(plan, start=1):
        rows = [int(c[1:]) for c in ids]
        u = fed.updates(w, rows, [], t)
        wt = torch.tensor(w, dtype=torch.float32)
        if t == 4:
            expected_hv = lbfgs_hvp(torch.stack(fld._s), torch.stack(fld._y), (wt - kept["w1"])[None])[0]
            errors = fld._prediction_errors(wt, torch.tensor(u, dtype=torch.float32), ids)
            expected = torch.linalg.vector_norm(kept["u1"] - expected_hv - torch.tensor(u[0], dtype=torch.float32))
            assert errors["c0"] == pytest.approx(float(expected), rel=1e-5)
        res = fld.aggregate(wt, rnd(u, ids))
        if t == 1:
            kept = {"u1": torch.tensor(u[0], dtype=torch.float32), "w1": wt}
        w = res.params.double().numpy()
    # only the rounds still referenced keep their global model: c3's last (3) and the others' (4)
    assert sorted(fld._models) == [3, 4]


def test_state_survives_a_checkpoint_and_matters():
    n = 10
    fed = Quadratic(n, seed=2)
    ids = [f"c{i}" for i in range(n)]
    ran = FLDetector(window=2, seed=0)
    w = np.zeros(D)
    for t in range(1, 6):
        res = ran.aggregate(torch.tensor(w, dtype=torch.float32), rnd(fed.updates(w, list(range(n)), [7, 8], t), ids))
        w = res.params.double().numpy()
    state = ran.state_dict()
    restored = FLDetector(window=2, seed=0)
    restored.load_state_dict(state)
    u = fed.updates(w, list(range(n)), [7, 8], 6)
    a = ran.aggregate(torch.tensor(w, dtype=torch.float32), rnd(u, ids))
    b = restored.aggregate(torch.tensor(w, dtype=torch.float32), rnd(u, ids))
    torch.testing.assert_close(a.params, b.params, rtol=0, atol=0)
    assert a.flagged.tolist() == b.flagged.tolist() and a.info == b.info
    c = FLDetector(window=2, seed=0).aggregate(torch.tensor(w, dtype=torch.float32), rnd(u, ids))
    assert a.flagged.any() and not c.flagged.any()
    with pytest.raises(ValueError, match="unknown state"):
        FLDetector().load_state_dict({"bogus": 1})


def test_validation_names_the_parameter():
    FLDetector().validate()
    for kwargs, name in (({"window": 0}, "window"), ({"gap_k_max": 1}, "gap_k_max"), ({"gap_refs": 0}, "gap_refs")):
        with pytest.raises(ValueError, match=name):
            FLDetector(**kwargs).validate()


def rounds_through(api: str, offsets_by_round, metrics, g0, gt: str = "keep"):
    """Rounds of one strategy (detection active from round 3) through one Flower API: each
    client's model is the current global model plus its offset of that round."""
    if api == "legacy":
        strategy, run = strategies.DefenseStrategy(defense=FLDetector(window=1, gap_k_max=3, seed=0)), run_legacy
    else:
        strategy, run = message.DefenseStrategy(defense=FLDetector(window=1, gap_k_max=3, seed=0)), run_message
    if gt == "removed":
        metrics = [{k: v for k, v in m.items() if k != GROUND_TRUTH_KEY} for m in metrics]
    elif gt == "flipped":
        metrics = [{**m, GROUND_TRUTH_KEY: 1 - m[GROUND_TRUTH_KEY]} for m in metrics]
    g, outs = g0, []
    for r, offsets in enumerate(offsets_by_round, start=1):
        clients = [([ga + oa for ga, oa in zip(g, off)], 30, m) for off, m in zip(offsets, metrics)]
        g, _ = run(strategy, g, clients, server_round=r)
        outs.append(g)
    return outs, strategy


def test_both_apis_agree_over_rounds_and_ignore_ground_truth():
    """Benign clients keep their own direction round after round (with a little noise); the two
    attackers send a fresh random direction every round, so FLDetector flags them; every variant
    of the ground-truth key and both APIs give the same models."""
    rng = np.random.default_rng(11)
    g0 = model_arrays(rng)
    metrics = [m for _, _, m in client_models(g0, 10, rng, malicious=(2, 7))]
    own = [[0.05 * rng.normal(size=a.shape).astype(np.float32) for a in g0] for _ in range(10)]
    rounds = []
    for _ in range(4):
        rounds.append([[o + (0.3 if k in (2, 7) else 0.002) * rng.normal(size=o.shape).astype(np.float32)
                        for o in own[k]] for k in range(10)])
    base, strategy = rounds_through("legacy", rounds, metrics, g0)
    flagged = [sorted(i for i, f in enumerate(rec.flagged) if f) for rec in strategy.records]
    assert [2, 7] in flagged, f"detection never caught the attackers: {flagged}"
    for api in ("legacy", "message"):
        for gt in ("keep", "removed", "flipped") if api == "message" else ("removed", "flipped"):
            out, _ = rounds_through(api, rounds, metrics, g0, gt)
            for ra, rb in zip(base, out):
                for a, b in zip(ra, rb):
                    np.testing.assert_array_equal(a, b)


def test_detection_waits_for_a_full_window_and_says_from_which_round():
    """The L-BFGS window holds pairs of consecutive global models: none after round 1, N after
    round N + 1, so the gap statistic first runs in round N + 2 (``first_active_round``). Attackers
    present from round 1 go unflagged until then, and are flagged once it runs."""
    n, attackers = 12, [9, 10, 11]
    fed = Quadratic(n, seed=3)
    fld = FLDetector(window=3, seed=0)
    assert fld.first_active_round() == 5
    w = np.zeros(D)
    ids = [f"c{i}" for i in range(n)]
    judged, flagged_at = [], {}
    for t in range(1, 10):
        res = fld.aggregate(torch.tensor(w, dtype=torch.float32), rnd(fed.updates(w, list(range(n)), attackers, t), ids))
        if "gap-k" in res.info:
            judged.append(t)
        flagged_at[t] = np.flatnonzero(res.flagged.numpy()).tolist()
        w = res.params.double().numpy()
    assert judged[0] == fld.first_active_round()
    assert all(flagged_at[t] == [] for t in range(1, fld.first_active_round()))
    assert flagged_at[9] == attackers
    # a defense without a warm-up acts from the first round; a wrapper reports the defense it wraps
    from fl_defense.defenses import DEFENSES, PRE_AGGREGATIONS

    assert DEFENSES["fedavg"]().first_active_round() == 1
    assert PRE_AGGREGATIONS["bucketing"](FLDetector(window=7), bucket_size=2).first_active_round() == 9


def test_start_up_says_when_the_attack_window_ends_before_the_defense_can_act():
    from fl_defense.config import ExperimentConfig
    from fl_defense.defenses import DEFENSES
    from server_app.app import warmup_notice

    def notice(defense, **keys):
        cfg = ExperimentConfig.from_run_config({"defense": defense.name, "attack": "plus", "num-server-rounds": 20,
                                                "attack-start-round": 1, "attack-stop-round": 10, **keys})
        return warmup_notice(cfg, defense)

    line = notice(FLDetector(window=10))
    assert "fldetector acts from round 12" in line and "cannot act at all" in line
    line = notice(FLDetector(window=3))
    assert "rounds 1-4 of the attack meet the undefended aggregate" in line
    assert notice(FLDetector(window=3), **{"attack-start-round": 5}) is None
    assert notice(FLDetector(window=3), attack="none") is None
    assert notice(DEFENSES["fedavg"]()) is None
    cfg = ExperimentConfig.from_run_config({"defense": "fldetector", "attack": "plus"})
    assert warmup_notice(cfg, FLDetector(window=10), offset=5) is None  # a resumed run's state is warm
