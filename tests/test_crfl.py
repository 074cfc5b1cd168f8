"""CRFL (Xie et al., ICML 2021): clipping of the global model, seeded parameter noise with its
generator in checkpoints, and the certification (Clopper-Pearson bound, Theorem 2's radius,
parameter smoothing)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import binomtest, norm

from fl_defense import certify
from fl_defense.config import ConfigError, ExperimentConfig
from fl_defense.defenses import CRFL
from tests.helpers import round_updates

D = 300


def updates(seed=0, n=8, scale=1.0):
    rng = np.random.default_rng(seed)
    return scale * rng.normal(size=(n, D)).astype(np.float32)


def test_the_global_model_is_fedavg_clipped_to_rho_t_and_a_small_model_is_left_alone():
    crfl = CRFL(rho0=2.0, rho_growth=0.5, rho_max=3.0, sigma=0.0)
    g = torch.full((D,), 0.5)  # norm 0.5 * sqrt(300) = 8.7 > every rho_t
    sizes = np.arange(1, 9) * 10.0
    u = updates()
    fedavg = g + torch.tensor(sizes / sizes.sum(), dtype=torch.float32) @ torch.tensor(u)
    for t, rho in ((1, 2.5), (2, 3.0), (3, 3.0)):  # min(rho_max, rho0 + growth * t)
        res = crfl.aggregate(g, round_updates(u, sizes))
        assert res.info["rho"] == rho
        assert float(torch.linalg.vector_norm(res.params)) == pytest.approx(rho, rel=1e-5)
        torch.testing.assert_close(res.params, fedavg * (rho / float(torch.linalg.vector_norm(fedavg.double()))),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(res.weights.numpy(), sizes / sizes.sum(), rtol=1e-6)
        assert not res.flagged.any()
    small = CRFL(rho0=1e6, sigma=0.0).aggregate(torch.zeros(D), round_updates(0.001 * u, sizes))
    torch.testing.assert_close(small.params, torch.tensor(sizes / sizes.sum(), dtype=torch.float32) @ torch.tensor(0.001 * u))


def test_a_boosted_attacker_moves_the_model_at_most_to_the_clipping_sphere():
    u = updates(scale=0.01)
    u[0] = 1000.0  # model replacement: a huge update
    res = CRFL(rho0=5.0, rho_growth=0.0, sigma=0.0).aggregate(torch.zeros(D), round_updates(u))
    assert float(torch.linalg.vector_norm(res.params)) <= 5.0 * (1 + 1e-6)


def test_noise_is_seeded_has_the_configured_std_and_its_generator_is_checkpointed():
    u = updates(scale=0.001)
    g = torch.zeros(D)

    def step(defense):
        return defense.aggregate(g, round_updates(u)).params

    clean = CRFL(sigma=0.0).aggregate(g, round_updates(u)).params
    a, b, c = CRFL(sigma=0.1, seed=3), CRFL(sigma=0.1, seed=3), CRFL(sigma=0.1, seed=4)
    first = step(a)
    torch.testing.assert_close(first, step(b), rtol=0, atol=0)
    assert not torch.equal(first, step(c))
    assert float((first - clean).std()) == pytest.approx(0.1, rel=0.15)
    state = a.state_dict()
    assert state["round"] == 1 and "noise-rng" in state
    restored = CRFL(sigma=0.1, seed=3)
    restored.load_state_dict(state)
    nxt = step(a)
    torch.testing.assert_close(nxt, step(restored), rtol=0, atol=0)
    assert not torch.equal(nxt, first)  # the generator moved on
    with pytest.raises(ValueError, match="unknown state"):
        CRFL().load_state_dict({"bogus": 1})


def test_validation_names_the_parameter():
    CRFL().validate()
    for kwargs, name in (({"rho0": 0}, "rho0"), ({"rho_growth": -1}, "rho_growth"), ({"sigma": -0.1}, "sigma")):
        with pytest.raises(ValueError, match=name):
            CRFL(**kwargs).validate()


# --- certification ------------------------------------------------------------------------------

def test_clopper_pearson_lower_bound_is_scipys_exact_interval():
    for k, n, alpha in ((990, 1000, 0.001), (600, 1000, 0.01), (1, 10, 0.05), (10, 10, 0.001)):
        expected = binomtest(k, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact").low
        assert float(certify.clopper_pearson_lower(k, n, alpha)) == pytest.approx(expected, rel=1e-9)
    assert float(certify.clopper_pearson_lower(0, 10, 0.05)) == 0.0


def test_radius_is_theorem_2_computed_directly():
    p_a, p_b, sigma_t = 0.93, 0.07, 0.01
    rhos, sigmas = [2.1, 2.2, 2.3], [0.01, 0.01, 0.02]
    weights, taus = [0.1, 0.05], [20, 30]
    lz, gamma, eta, q = 4.1231, 10.0, 0.1, 0.5
    contraction = 1.0
    for rho, s in zip(rhos, sigmas):
        contraction *= 2 * norm.cdf(rho / s) - 1
    denom = 2 * 2 * ((0.1 * 20) ** 2 + (0.05 * 30) ** 2) * lz ** 2 * gamma ** 2 * eta ** 2 * q ** 2 * contraction
    expected = math.sqrt(-math.log(1 - (math.sqrt(p_a) - math.sqrt(p_b)) ** 2) * sigma_t ** 2 / denom)
    got = certify.crfl_radius(p_a, p_b, sigma_t, rhos, sigmas, weights, taus, lz, gamma, eta, q)
    assert float(got) == pytest.approx(expected, rel=1e-12)
    # with equal weights and iterations it is the authors' R tau^2 sum p_i^2 form
    eq = certify.crfl_radius(p_a, p_b, sigma_t, rhos, sigmas, [0.1, 0.1], [20, 20], lz, gamma, eta, q)
    authors = math.sqrt(-math.log(1 - (math.sqrt(p_a) - math.sqrt(p_b)) ** 2) * sigma_t ** 2
                        / (2 * 2 * 20 ** 2 * lz ** 2 * (0.1 ** 2 * 2) * gamma ** 2 * eta ** 2 * q ** 2 * contraction))
    assert float(eq) == pytest.approx(authors, rel=1e-12)
    # grows with the margin between p_A and p_B, none without one
    r = certify.crfl_radius(np.array([0.6, 0.8, 0.99, 0.5]), np.array([0.4, 0.2, 0.01, 0.5]), sigma_t, rhos,
                            sigmas, weights, taus, lz, gamma, eta, q)
    assert r[0] < r[1] < r[2] and r[3] == 0


def test_certify_counts_to_certified_accuracy_rate_and_mean_radius():
    m = 1000
    counts = np.array([[1000, 0, 0], [600, 400, 0], [520, 480, 0], [0, 10, 990]])
    labels = np.array([0, 0, 1, 1])  # the last is confidently wrong
    out = certify.certify(counts, labels, 0.001, lambda pa, pb: 10.0 * (pa - pb))
    p_a = certify.clopper_pearson_lower(counts.max(axis=1), m, 0.001)
    np.testing.assert_allclose(out["p_a_lower"], p_a)
    assert out["certified"].tolist() == [True, True, False, True]  # 520/1000 does not clear 1/2
    assert out["prediction"].tolist() == [0, 0, 0, 2]
    assert out["certified_accuracy"] == 0.5 and out["certified_rate"] == 0.75 and out["smoothed_accuracy"] == 0.5
    radius = 10.0 * (2 * p_a - 1)
    assert out["mean_certified_radius"] == pytest.approx((radius[0] + radius[1]) / 4)


def test_smoothed_counts_sample_noisy_models_and_restore_the_parameters():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 3))
    x = torch.randn(40, 5)
    before = [p.detach().clone() for p in model.parameters()]
    exact = certify.smoothed_counts(model, x, samples=7, sigma=0.0, seed=0)
    assert (exact.sum(axis=1) == 7).all()
    assert (exact.argmax(axis=1) == model(x).argmax(dim=1).numpy()).all() and (exact.max(axis=1) == 7).all()
    noisy = certify.smoothed_counts(model, x, samples=50, sigma=5.0, seed=1)
    assert (noisy.sum(axis=1) == 50).all() and (noisy.max(axis=1) < 50).any()
    np.testing.assert_array_equal(noisy, certify.smoothed_counts(model, x, samples=50, sigma=5.0, seed=1))
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def test_certification_needs_crfl_training():
    cfg = ExperimentConfig.from_run_config({"defense": "crfl", "crfl-certify-samples": 100})
    assert cfg.crfl_certify_samples == 100 and cfg.crfl_sigma == 0.01
    with pytest.raises(ConfigError, match="crfl-certify-samples"):
        ExperimentConfig.from_run_config({"defense": "fedavg", "crfl-certify-samples": 100})
    with pytest.raises(ConfigError, match="crfl-certify-alpha"):
        ExperimentConfig.from_run_config({"defense": "crfl", "crfl-certify-alpha": 1.5})


def test_recorder_certifies_against_the_last_attack_round_with_its_attackers_weights(tmp_path):
    """The evaluation layer picks t_adv = the last round with attackers sampled, R and p_i from
    that round's record, tau_i from their sample counts, and the rho_t / sigma_t of the rounds
    after it; the radius it reports is Theorem 2's with those constants."""
    from fl_defense.models import build_model
    from server_app.recorder import RunRecorder

    cfg = ExperimentConfig.from_run_config({"defense": "crfl", "num-server-rounds": 4, "crfl-certify-samples": 40,
                                            "crfl-certify-examples": 30, "local-epochs": 2, "batch-size": 16,
                                            "model-poisoning": "boost", "boost-factor": 5.0})
    model = build_model("mlp", (1, 8, 8), 10, seed=0)
    gen = torch.Generator().manual_seed(0)
    test = (torch.rand(60, 1, 8, 8, generator=gen), torch.randint(0, 10, (60,), generator=gen))
    rec = RunRecorder(cfg, model, test, tmp_path, echo=lambda line: None)

    def row(r, malicious):
        return {"round": r, "num_attackers_sampled": sum(malicious), "clients": [
            {"partition": k, "num_examples": 40 + 10 * k, "weight": 0.25, "flagged": False, "malicious": m}
            for k, m in enumerate(malicious)]}

    rec.rows = [row(1, [True, False, False, False]), row(2, [False, True, True, False]),
                row(3, [False, False, False, False])]
    out = rec.certify(4, row(4, [False] * 4), "cpu")
    c = out["crfl_certify"]
    assert (c["t_adv"], c["num_attackers"], c["attacker_weights"]) == (2, 2, [0.25, 0.25])
    assert c["local_iterations"] == [2 * math.ceil(50 / 16), 2 * math.ceil(60 / 16)] and c["scale"] == 5.0
    pick = torch.randperm(60, generator=torch.Generator().manual_seed(42))[:30]  # the run's seed
    counts = certify.smoothed_counts(model, test[0][pick], 40, 0.01, 42)
    crfl = CRFL()
    direct = certify.certify(counts, test[1][pick].numpy(), 0.001, lambda pa, pb: certify.crfl_radius(
        pa, pb, 0.01, [crfl.rho(3), crfl.rho(4)], [0.01, 0.01], [0.25, 0.25], c["local_iterations"], 4.1231, 5.0,
        0.1, 0.5))
    for key in ("certified_rate", "certified_accuracy", "smoothed_accuracy", "mean_certified_radius"):
        assert out[f"crfl_{key}"] == direct[key]
    radius = direct["radius"][direct["certified"]]
    assert radius.size and (radius > 0).all()
