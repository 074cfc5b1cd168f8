"""Adaptive attacks against the seed defenses (issue 18): each attack's defining property on
constructed inputs and through the real client, their config errors, and a smoke-sized run of
each through Flower's simulation engine."""

import json

import numpy as np
import pytest
import torch
from torch.nn.utils import parameters_to_vector

from client_app.app import DefenseClient, _seed
from fl_defense.attacks import AttackRound, RLRAdaptive, make_colluding, select_attackers
from fl_defense.attacks.adaptive import (HonestShadow, anomaly_loss, fisher_penalty, match_norm, mimic_fisher,
                                         minmax_importance, noise_fisher)
from fl_defense.attacks.collusion import collude
from fl_defense.config import ConfigError, ExperimentConfig
from fl_defense.defenses.fdcr import minmax
from fl_defense.defenses.rlr import RLR
from fl_defense.fisher import decode_fisher
from fl_defense.rounds import FISHER_KEY, FISHER_REQUEST_KEY

# --- RLR-adaptive -----------------------------------------------------------------------------------


def _rlr_round(n=10, m=3, d=400, seed=0):
    """Benign updates that agree on the first half of the coordinates (signs mostly shared) and
    disagree on the second; the colluders' honest updates drawn like the benign ones; poisoned
    updates with their own signs."""
    gen = torch.Generator().manual_seed(seed)
    drift = torch.cat([torch.full((d // 2,), 1.0), torch.zeros(d - d // 2)])
    drift = drift * torch.where(torch.rand(d, generator=gen) < 0.5, -1.0, 1.0)
    honest_all = drift + 0.8 * torch.randn(n, d, generator=gen)
    poisoned = torch.randn(m, d, generator=gen) + 0.5 * drift
    return honest_all, poisoned


def _expected_targets(benign_votes, poisoned, theta):
    """T from the definition, coordinate by coordinate."""
    out = np.zeros(len(benign_votes), dtype=bool)
    p = poisoned.numpy()
    for j, b in enumerate(benign_votes):
        a = sum(np.sign(p[k, j]) for k in range(p.shape[0]))
        out[j] = abs(b) >= theta and abs(b + a) >= theta
    return out


@pytest.mark.parametrize("knowledge", ["partial", "full"])
def test_rlr_adaptive_update_is_zero_outside_the_coordinates_it_targets(knowledge):
    n, m, theta = 10, 3, 4
    honest_all, poisoned = _rlr_round(n, m)
    known = honest_all if knowledge == "full" else honest_all[:m]  # colluders' honest rows first
    h = honest_all.numpy()
    if knowledge == "full":
        votes = [sum(np.sign(h[k, j]) for k in range(m, n)) for j in range(h.shape[1])]
    else:  # (n - m) times the colluders' mean honest sign
        votes = [(n - m) * sum(np.sign(h[k, j]) for k in range(m)) / m for j in range(h.shape[1])]
    expected = torch.from_numpy(_expected_targets(votes, poisoned, theta))
    attack = RLRAdaptive(theta=theta)
    out = attack.craft(known, AttackRound(n, m, knowledge=knowledge, poisoned=poisoned))
    assert out.shape == poisoned.shape
    assert torch.equal(out[:, ~expected], torch.zeros_like(out[:, ~expected]))  # exactly zero outside T
    assert torch.equal(out[:, expected], poisoned[:, expected])  # the poisoned update, untouched, on T
    assert 0 < int(expected.sum()) < expected.numel()
    assert attack.last_targeted == pytest.approx(float(expected.double().mean()))


@pytest.mark.parametrize("knowledge", ["partial", "full"])
def test_a_boosted_rlr_adaptive_scales_its_push_on_the_same_coordinates_only(knowledge):
    # boosting (model replacement, x factor) scales the push on T; T itself is unchanged (a
    # positive factor keeps every sign, so the attackers' vote A_j is the same), and outside T
    # the update is still exactly zero
    n, m = 10, 3
    honest_all, poisoned = _rlr_round(n, m)
    known = honest_all if knowledge == "full" else honest_all[:m]
    rnd = AttackRound(n, m, knowledge=knowledge, poisoned=poisoned)
    plain, boosted = RLRAdaptive(theta=4), RLRAdaptive(theta=4, boost=10.0)
    targeted = plain.targeted(known, rnd)
    assert torch.equal(boosted.targeted(known, rnd), targeted)
    out = boosted.craft(known, rnd)
    assert torch.equal(out[:, ~targeted], torch.zeros_like(out[:, ~targeted]))
    torch.testing.assert_close(out[:, targeted], 10.0 * poisoned[:, targeted], rtol=0, atol=0)
    torch.testing.assert_close(out, 10.0 * plain.craft(known, rnd), rtol=0, atol=0)


def test_rlr_adaptive_boost_is_a_run_config_key_checked_at_start_up():
    cfg = ExperimentConfig.from_run_config({"model-poisoning": "rlr_adaptive", "rlr-adaptive-boost": 10.0})
    assert make_colluding(cfg.model_poisoning, **cfg.colluding_params()).boost == 10.0
    with pytest.raises(ValueError, match="rlr-adaptive-boost"):
        ExperimentConfig.from_run_config({"model-poisoning": "rlr_adaptive", "rlr-adaptive-boost": 0.5})
    with pytest.raises(ValueError, match="rlr-adaptive-boost"):  # read only by rlr_adaptive
        ExperimentConfig.from_run_config({"model-poisoning": "boost", "rlr-adaptive-boost": 10.0})


def test_rlr_adaptive_partial_estimate_with_three_colluders_needs_them_unanimous():
    # n = 10, m = 3, theta = 4: (n - m) s_j = 7 s_j clears 4 only when s_j = +-1
    honest = torch.tensor([[1.0, 1.0, -1.0, 2.0], [1.0, -1.0, -1.0, 3.0], [1.0, 1.0, -1.0, -1.0]])
    poisoned = torch.ones(3, 4)
    out = RLRAdaptive(theta=4).craft(honest, AttackRound(10, 3, knowledge="partial", poisoned=poisoned))
    # coordinate 2: B = -7, their push +3 leaves abs(-4) >= 4: still targeted
    assert out[0].tolist() == [1.0, 0.0, 1.0, 0.0]
    out5 = RLRAdaptive(theta=5).craft(honest, AttackRound(10, 3, knowledge="partial", poisoned=poisoned))
    assert out5[0].tolist() == [1.0, 0.0, 0.0, 0.0]  # -7 + 3 = -4 < 5: their push would break the vote


def test_with_full_knowledge_rlr_applies_every_targeted_push_with_plus_eta():
    n, m, theta = 10, 3, 4
    honest_all, poisoned = _rlr_round(n, m, seed=3)
    rnd = AttackRound(n, m, knowledge="full", poisoned=poisoned)
    attack = RLRAdaptive(theta=theta)
    crafted = attack.craft(honest_all, rnd)
    targeted = attack.targeted(honest_all, rnd)
    rlr = RLR(theta=theta)
    lr = rlr.robust_lr(torch.cat([honest_all[m:], crafted]))  # what the server sees
    assert bool((lr[targeted] > 0).all())
    plain = rlr.robust_lr(torch.cat([honest_all[m:], poisoned]))  # the plain poisoned updates instead
    pushed = poisoned.abs().sum(0) > 0
    assert bool((plain[pushed] < 0).any())  # some of a plain push is reversed


def test_rlr_adaptive_is_a_colluding_attack_reading_rlr_theta():
    cfg = ExperimentConfig.from_run_config({"model-poisoning": "rlr_adaptive", "rlr-theta": 6})
    attack = make_colluding(cfg.model_poisoning, **cfg.colluding_params())
    assert isinstance(attack, RLRAdaptive) and attack.theta == 6 and attack.uses_poisoned


# --- Fisher forgery -----------------------------------------------------------------------------------


def test_noise_fisher_is_seeded_iid_uniform_and_minmax_normalises_to_mean_one_half():
    from scipy import stats

    d = 20000
    f = noise_fisher(d, seed=11)
    assert f.dtype == np.float32 and f.shape == (d,) and f.min() >= 0 and f.max() < 1
    assert np.array_equal(f, noise_fisher(d, seed=11)) and not np.array_equal(f, noise_fisher(d, seed=12))
    assert stats.kstest(f, "uniform").pvalue > 1e-3  # uniform on [0, 1)
    assert abs(np.corrcoef(f[:-1], f[1:])[0, 1]) < 0.03  # no serial dependence
    normalised = minmax(torch.from_numpy(f)[None])[0]  # FDCR's I_k
    assert abs(float(normalised.mean()) - 0.5) < 0.01
    assert abs(float(normalised.std()) - (1 / 12) ** 0.5) < 0.01


def test_mimic_fisher_has_the_benign_statistics_and_the_attackers_ranking():
    rng = np.random.default_rng(0)
    own = rng.exponential(3.0, 5000).astype(np.float32)  # the poisoned model's clean-data Fisher
    benign = (rng.lognormal(-6, 2, 5000)).astype(np.float32)  # its honest model's
    out = mimic_fisher(own, benign)
    assert np.array_equal(np.sort(out), np.sort(benign))  # every quantile, hence mean, min, max
    assert out.mean() == pytest.approx(benign.mean(), rel=1e-6)
    for q in (0.1, 0.5, 0.9, 0.99):
        assert np.quantile(out, q) == np.quantile(benign, q)
    assert np.all(np.diff(out[np.argsort(own, kind="stable")]) >= 0)  # the attacker's ranking kept
    with pytest.raises(ValueError, match="length"):
        mimic_fisher(own, benign[:10])


def _client(pid, **over):
    cfg = ExperimentConfig.from_run_config({"local-epochs": 1, "malicious-fraction": 0.1, **over})
    return DefenseClient(cfg, pid, num_partitions=10)


ATTACKER = select_attackers(10, 0.1, 42)[0]
ROUND = {"server-round": 1, FISHER_REQUEST_KEY: True}


def _fisher(client, params):
    arrays, _, metrics = client.fit(params, ROUND)
    return decode_fisher(metrics[FISHER_KEY], sum(a.size for a in params)), arrays


def test_a_noise_forging_attacker_sends_the_seeded_noise():
    c = _client(ATTACKER, **{"fisher-forgery": "noise"})
    params = c.get_parameters({})
    f, _ = _fisher(c, params)
    assert np.array_equal(f, noise_fisher(f.size, _seed(42, ATTACKER, 1, 0xF15)))
    honest = _client(ATTACKER + 1 if ATTACKER + 1 not in select_attackers(10, 0.1, 42) else ATTACKER - 1,
                     **{"fisher-forgery": "noise"})
    fh, _ = _fisher(honest, params)  # a benign client's Fisher is never replaced
    assert not np.array_equal(fh, noise_fisher(fh.size, _seed(42, ATTACKER, 1, 0xF15))) and fh.min() >= 0


def test_a_mimicking_attacker_sends_its_honest_models_fisher_values():
    params = _client(ATTACKER).get_parameters({})
    forged, arrays = _fisher(_client(ATTACKER, **{"fisher-forgery": "mimic"}), params)
    # its honest model: the same partition trained with no attack (same seed, clean data)
    benign, _ = _fisher(_client(ATTACKER, attack="none", **{"model-poisoning": "none"}), params)
    clean, arrays_clean = _fisher(_client(ATTACKER, **{"fisher-forgery": "clean"}), params)
    np.testing.assert_array_equal(np.sort(forged), np.sort(benign))
    assert not np.array_equal(np.sort(clean), np.sort(benign))  # clean alone does not have them
    assert np.all(np.diff(forged[np.argsort(clean, kind="stable")]) >= 0)  # ranked as its model's Fisher
    for a, b in zip(arrays, arrays_clean):  # the model it sends is the poisoned one either way
        np.testing.assert_array_equal(a, b)


# --- Fisher penalty -------------------------------------------------------------------------------------


def test_fisher_penalty_is_lambda_times_the_importance_weighted_squared_distance():
    lin = torch.nn.Linear(3, 2)
    params = list(lin.parameters())
    theta = parameters_to_vector(params).detach()
    ref = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(1))
    weight = torch.rand(theta.numel(), generator=torch.Generator().manual_seed(2))
    value = fisher_penalty(params, ref, weight, lam=2.5)(lin)
    assert value.item() == pytest.approx(2.5 * float((weight * (theta - ref) ** 2).sum()), rel=1e-6)
    value.backward()
    grad = parameters_to_vector([p.grad for p in params])
    torch.testing.assert_close(grad, 2 * 2.5 * weight * (theta - ref))


def _delta(arrays, params):
    return (parameters_to_vector([torch.as_tensor(a) for a in arrays])
            - parameters_to_vector([torch.as_tensor(a) for a in params])).double()


def test_the_fisher_penalty_keeps_the_importance_weighted_update_near_the_honest_one():
    params = _client(ATTACKER).get_parameters({})
    plain, _, _ = _client(ATTACKER).fit(params, {"server-round": 1})
    pen = _client(ATTACKER, **{"model-poisoning": "fisher_penalty", "fisher-penalty-lambda": 5.0})
    penalised, _, _ = pen.fit(params, {"server-round": 1})
    honest, _, _ = _client(ATTACKER, attack="none").fit(params, {"server-round": 1})
    importance = minmax_importance(pen.shadow.fisher).double()
    dist = lambda arrays: float(torch.linalg.vector_norm(importance * (_delta(arrays, params) - _delta(honest, params))))
    assert dist(penalised) < 0.5 * dist(plain)


# --- anomaly evasion (Fedward, FLAME) ------------------------------------------------------------------


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_the_evasion_term_lowers_the_distance_to_the_global_model(distance):
    params = _client(ATTACKER).get_parameters({})
    g = parameters_to_vector([torch.as_tensor(a) for a in params]).double()
    plain, _, _ = _client(ATTACKER).fit(params, {"server-round": 1})  # plain poisoned training
    evading, _, _ = _client(ATTACKER, **{"model-poisoning": "evasion", "evasion-distance": distance,
                                         "evasion-alpha": 0.5, "evasion-norm-match": False}).fit(
        params, {"server-round": 1})

    def ano(arrays):
        w = parameters_to_vector([torch.as_tensor(a) for a in arrays]).double()
        return float(torch.linalg.vector_norm(w - g)) if distance == "l2" else float(
            1 - torch.nn.functional.cosine_similarity(w, g, dim=0))

    assert ano(evading) < 0.9 * ano(plain)


def test_evasion_with_alpha_one_is_plain_poisoned_training():
    params = _client(ATTACKER).get_parameters({})
    plain, _, _ = _client(ATTACKER).fit(params, {"server-round": 1})
    same, _, _ = _client(ATTACKER, **{"model-poisoning": "evasion", "evasion-alpha": 1.0,
                                      "evasion-norm-match": False}).fit(params, {"server-round": 1})
    for a, b in zip(plain, same):
        np.testing.assert_array_equal(a, b)


def test_norm_matching_gives_the_honest_updates_norm():
    params = _client(ATTACKER).get_parameters({})
    matched, _, _ = _client(ATTACKER, **{"model-poisoning": "evasion"}).fit(params, {"server-round": 1})
    honest, _, _ = _client(ATTACKER, attack="none").fit(params, {"server-round": 1})
    n_h = float(torch.linalg.vector_norm(_delta(honest, params)))
    assert float(torch.linalg.vector_norm(_delta(matched, params))) == pytest.approx(n_h, rel=1e-4)
    g, t = torch.zeros(5), torch.tensor([3.0, 4.0, 0, 0, 0])
    torch.testing.assert_close(match_norm(g, t, 10.0), torch.tensor([6.0, 8.0, 0, 0, 0]))


def test_anomaly_loss_is_the_l2_or_cosine_distance_to_the_global_model():
    lin = torch.nn.Linear(4, 3)
    params = list(lin.parameters())
    g = torch.randn(parameters_to_vector(params).numel(), generator=torch.Generator().manual_seed(0))
    w = parameters_to_vector(params).detach()
    assert anomaly_loss("l2", params, g)(lin).item() == pytest.approx(float(torch.linalg.vector_norm(w - g)), rel=1e-6)
    cos = float(w @ g / (w.norm() * g.norm()))
    assert anomaly_loss("cosine", params, g)(lin).item() == pytest.approx(1 - cos, rel=1e-5)


def test_the_honest_shadow_is_the_clean_round_of_the_same_client():
    c = _client(ATTACKER, **{"model-poisoning": "evasion"})
    params = c.get_parameters({})
    c.fit(params, {"server-round": 1})
    honest, _, _ = _client(ATTACKER, attack="none").fit(params, {"server-round": 1})
    torch.testing.assert_close(c.shadow.update.double(), _delta(honest, params), atol=1e-6, rtol=0)
    assert isinstance(c.shadow, HonestShadow)


# --- config ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key, value", [("evasion-alpha", 0.0), ("evasion-alpha", 1.5), ("evasion-distance", "l1"),
                                        ("fisher-forgery", "copy"), ("fisher-penalty-lambda", 0.0),
                                        ("evasion-norm-match", "yes")])
def test_adaptive_attack_config_errors_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        ExperimentConfig.from_run_config({key: value})


def test_a_divergent_fisher_penalty_is_refused_at_start_up():
    with pytest.raises(ConfigError, match="'fisher-penalty-lambda'"):
        ExperimentConfig.from_run_config({"model-poisoning": "fisher_penalty", "fisher-penalty-lambda": 10.0,
                                          "learning-rate": 0.1})
    ExperimentConfig.from_run_config({"model-poisoning": "fisher_penalty", "fisher-penalty-lambda": 10.0,
                                      "learning-rate": 0.05})


def test_partial_rlr_adaptive_never_reads_a_benign_update():
    """Through the collusion step: partial knowledge crafts from the colluders' rows alone."""
    from fl_defense.attacks.collusion import HONEST_UPDATE_KEY, encode_update
    from fl_defense.rounds import ClientResult
    from fl_defense.updates import ParamLayout

    rng = np.random.default_rng(0)
    g = [np.zeros((4, 5), np.float32)]
    layout = ParamLayout.from_arrays(g, [True])
    results = [ClientResult(str(k), [rng.normal(size=(4, 5)).astype(np.float32)], 10, {"partition": k})
               for k in range(6)]
    for k in (6, 7, 8):
        honest = rng.normal(size=20).astype(np.float32)
        results.append(ClientResult(str(k), [rng.normal(size=(4, 5)).astype(np.float32)], 10,
                                    {"partition": k, HONEST_UPDATE_KEY: encode_update(honest)}))
    out, record, _ = collude(results, g, layout, RLRAdaptive(theta=4), "partial", 1, seed=0)
    assert record["known_updates"] == 3 and "targeted" in record
    poisoned = [r.arrays[0].reshape(-1) for r in results[6:]]
    for k, p in zip((6, 7, 8), poisoned):
        sent = out[k].arrays[0].reshape(-1)
        assert np.all((sent == 0) | (sent == p))
    # the benign arrays changed: the crafted models do not
    scrambled = [ClientResult(r.client_id, [np.full((4, 5), 99.0, np.float32)], 10, r.metrics) for r in results[:6]]
    out2, _, _ = collude(scrambled + results[6:], g, layout, RLRAdaptive(theta=4), "partial", 1, seed=0)
    for k in (6, 7, 8):
        np.testing.assert_array_equal(out[k].arrays[0], out2[k].arrays[0])


# --- smoke-sized runs through Flower's simulation engine (digits, 2 rounds, 10 clients) ----------------

SMOKE = {
    "rlr_adaptive": {"defense": "rlr", "model-poisoning": "rlr_adaptive", "attacker-knowledge": "full"},
    "fisher_mimic": {"defense": "fdcr", "fisher-forgery": "mimic"},
    "fisher_noise": {"defense": "fdcr", "fisher-forgery": "noise"},
    "fisher_penalty": {"defense": "sdfc", "model-poisoning": "fisher_penalty", "server-fraction": 0.05},
    "evasion": {"defense": "flame", "model-poisoning": "evasion", "evasion-distance": "cosine"},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SMOKE))
def test_adaptive_attack_smoke_run(tmp_path, name):
    from simulation.run import run

    overrides = {"num-server-rounds": 2, "results-dir": str(tmp_path), "run-name": name, "malicious-fraction": 0.3,
                 "local-epochs": 1, "attack-stop-round": 1, "checkpoint": False, **SMOKE[name]}
    folder = run(overrides, num_supernodes=10)
    rows = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert sum(bool(c["malicious"]) for c in rows[1]["clients"]) == 3
    assert sum(bool(c["malicious"]) for c in rows[2]["clients"]) == 0  # the window closed after round 1
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["config"]["defense"] == SMOKE[name]["defense"] and summary["rounds_completed"] == 2
    if name == "rlr_adaptive":
        assert rows[1]["collusion"]["colluders"] == 3 and 0 < rows[1]["collusion"]["targeted"] < 1
