"""DeepSight (Rieger et al., NDSS 2022) on constructed rounds: NEUPs and threshold exceedings,
the labelling of homogeneous (backdoor-like) updates, cluster-level acceptance with tau, DDifs
catching an attacker whose labels look benign, median-norm clipping, the degraded mode without
the server's forward passes, and both Flower adapters with the probe."""

import copy
import logging

import numpy as np
import pytest
import torch

from fl_defense import strategies
from fl_defense.config import ExperimentConfig
from fl_defense.defenses import DeepSight
from fl_defense.defenses.deepsight import RandomInputProbabilities, neups, threshold_exceedings
from fl_defense.models import build_model
from fl_defense.rounds import GROUND_TRUTH_KEY
from fl_defense.strategies import message
from server_app.app import build_defense
from tests.helpers import round_updates
from tests.test_adapters import _round, run_legacy, run_message

P, H, IN = 10, 8, 6
SIZES = [H * IN, H, P * H, P]  # first layer, then the output layer: weight P x H, bias P
OUT_W = slice(H * IN + H, H * IN + H + P * H)


def constructed_round(seed=0, n_benign=7, n_attackers=3):
    """Benign clients train on 7 of the 10 labels each (energy spread over those output neurons);
    client 6 is a benign outlier, its update 8x larger. Attackers (the last rows) put nearly all
    output-layer energy on the target label 0 (homogeneous backdoor data)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_benign):
        labels = rng.choice(P, size=7, replace=False)
        w, b = 0.005 * rng.normal(size=(P, H)), 0.005 * rng.normal(size=P)
        w[labels] += 0.1 * rng.normal(size=(7, H))
        b[labels] += 0.1 * rng.normal(size=7)
        rows.append(np.concatenate([0.05 * rng.normal(size=H * IN + H), w.ravel(), b]))
    rows[6] = rows[6] * 8
    first = 0.05 * rng.normal(size=H * IN + H)
    for _ in range(n_attackers):
        w, b = 0.005 * rng.normal(size=(P, H)), 0.005 * rng.normal(size=P)
        w[0] += 0.3 + 0.01 * rng.normal(size=H)
        b[0] += 0.3
        rows.append(np.concatenate([first + 0.005 * rng.normal(size=H * IN + H), w.ravel(), b]))
    return np.array(rows, dtype=np.float32)


def with_mixed_attacker(u, seed=5):
    """One more attacker: a copy of attacker 7 with energy added on every other label, so its
    threshold exceedings look benign (TE = 10) while its outputs still carry the backdoor."""
    rng = np.random.default_rng(seed)
    extra = u[7].copy()
    extra[OUT_W].reshape(P, H)[1:] += 0.135 * np.sign(rng.normal(size=(P - 1, H)))
    return np.vstack([u, extra[None]])


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(IN, H), torch.nn.ReLU(), torch.nn.Linear(H, P))


def global_vector(model):
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


def test_neups_and_threshold_exceedings_by_hand():
    # one model, P = 3 neurons: energies |db_j| + sum_p |dw_jp| = 1 + 2, 0 + 1, 0.5 + 0
    w = np.array([[[1.0, -1.0], [0.5, -0.5], [0.0, 0.0]]])
    b = np.array([[-1.0, 0.0, 0.5]])
    c = neups(w, b)
    np.testing.assert_allclose(c, [[9 / 10.25, 1 / 10.25, 0.25 / 10.25]])
    # threshold max(0.01, 1/3) * max c = 3/10.25: only neuron 0 exceeds it
    assert threshold_exceedings(c, 0.01).tolist() == [1]
    assert threshold_exceedings(np.full((1, 4), 0.25), 0.01).tolist() == [4]  # evenly spread: every label
    # 200 neurons: the factor 0.01 is above 1/P and sets the threshold
    c2 = np.r_[1.0, np.full(199, 0.02)][None] / (1 + 199 * 0.02)
    assert threshold_exceedings(c2, 0.01).tolist() == [200] and threshold_exceedings(c2, 0.05).tolist() == [1]


def test_homogeneous_attackers_are_flagged_and_a_large_benign_update_is_kept_clipped():
    u = constructed_round()
    res = DeepSight().aggregate(torch.zeros(u.shape[1]), round_updates(u, layer_sizes=SIZES))
    assert res.info["threshold-exceedings"] == [7] * 7 + [1] * 3
    assert res.flagged.tolist() == [False] * 7 + [True] * 3
    # the benign outlier (client 6) is kept, scaled down to the median norm of all ten updates
    norms = np.linalg.norm(u.astype(np.float64), axis=1)
    bound = np.sort(norms)[4]  # torch.median: the lower middle of ten
    assert res.info["clip-bound"] == pytest.approx(bound, rel=1e-6)
    scale = np.minimum(1.0, bound / norms)
    expected = (scale[:7, None] * u[:7]).mean(axis=0)
    np.testing.assert_allclose(res.params.numpy(), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(res.weights.numpy(), [1 / 7] * 7 + [0] * 3, rtol=1e-6)


def test_ddifs_catch_an_attacker_whose_labels_look_benign(caplog):
    """The ensemble with DDifs puts the mixed attacker with a labelled attacker (a cluster whose
    suspicious share is 1/2 >= tau): it is rejected with its cluster. Without the server's forward
    passes (degraded mode) it is accepted, and a warning says what is missing."""
    u = with_mixed_attacker(constructed_round())
    model = tiny_model()
    g = global_vector(model)
    probe = RandomInputProbabilities(model, (IN,), num_seeds=3, num_samples=500, seed=0)
    res = DeepSight(model_outputs=probe).aggregate(g.clone(), round_updates(u, layer_sizes=SIZES))
    assert res.info["threshold-exceedings"][10] == 10 and not res.info["suspicious"][10]
    assert res.info["ddifs"] and len(res.info["ensemble"]["ddifs"]) == 3
    assert res.flagged.tolist() == [False] * 7 + [True] * 4
    with caplog.at_level(logging.WARNING):
        degraded = DeepSight().aggregate(g.clone(), round_updates(u, layer_sizes=SIZES))
    assert "degraded" in caplog.text and degraded.info["ddifs"] is False
    assert not degraded.flagged[10]


def test_a_cluster_is_accepted_when_fewer_than_tau_of_its_members_are_suspicious():
    class FixedClusters(DeepSight):
        def cluster(self, global_params, ru, c, bias_updates):
            return np.array([0, 0, 0, 0, 1, 1, -1, 1, 1, -1]), {}

    u = constructed_round()
    u[0] = u[7]  # client 0 homogeneous too: suspicious are 0, 7, 8, 9
    res = FixedClusters().aggregate(torch.zeros(u.shape[1]), round_updates(u, layer_sizes=SIZES))
    assert res.info["suspicious"] == [True] + [False] * 6 + [True] * 3
    # cluster 0 (1 of 4 suspicious < 1/3) is accepted with its suspicious member, cluster 1 (2 of 4)
    # is not; noise models are clusters of one, judged by their own label (6 kept, 9 not)
    assert res.flagged.tolist() == [False] * 4 + [True, True, False, True, True, True]
    res = FixedClusters(tau=0.6).aggregate(torch.zeros(u.shape[1]), round_updates(u, layer_sizes=SIZES))
    assert res.flagged.tolist() == [False] * 9 + [True]


def test_nothing_accepted_keeps_the_global_model():
    u = constructed_round()
    u[:, OUT_W.start:] = 0.0  # no output-layer energy anywhere: every TE is 0 <= median / 2
    g = torch.full((u.shape[1],), 0.5)
    res = DeepSight().aggregate(g, round_updates(u, layer_sizes=SIZES))
    assert res.info["threshold-exceedings"] == [0] * 10 and all(res.info["suspicious"])
    assert res.flagged.all() and not res.weights.any()
    assert torch.equal(res.params, g)


def test_the_probe_is_deterministic_and_never_aliases_the_vector():
    model = tiny_model()
    g = global_vector(model)
    probe = RandomInputProbabilities(model, (IN,), num_seeds=2, num_samples=50, seed=3)
    v = g.clone()
    out = probe(v)
    assert out.shape == (2, 50, P)
    np.testing.assert_allclose(out.sum(dim=2).numpy(), 1.0, rtol=1e-5)
    v += 1.0  # the model must not see the caller's later changes
    np.testing.assert_array_equal(probe(g).numpy(), out.numpy())
    again = RandomInputProbabilities(tiny_model(), (IN,), num_seeds=2, num_samples=50, seed=3)
    np.testing.assert_array_equal(again(g).numpy(), out.numpy())
    other = RandomInputProbabilities(tiny_model(), (IN,), num_seeds=2, num_samples=50, seed=4)
    assert not torch.equal(other(g), out)


def test_the_probe_of_a_convolutional_model_matches_a_plain_forward_pass():
    # the probe runs conv models in channels-last batches of 256 (3x faster on the CPU); the
    # probabilities are those of a plain default-format forward over the same inputs
    model = build_model("cnn_small", (1, 28, 28), 10, seed=0)
    base = global_vector(model)
    g = base + 0.01 * torch.randn(len(base), generator=torch.Generator().manual_seed(1))
    probe = RandomInputProbabilities(copy.deepcopy(model), (1, 28, 28), num_seeds=2, num_samples=300, seed=5)
    out = probe(g)
    torch.nn.utils.vector_to_parameters(g.clone(), [p for p in model.parameters() if p.requires_grad])
    with torch.no_grad():
        plain = torch.stack([torch.softmax(model.eval()(x), dim=1) for x in probe.inputs])
    assert out.shape == (2, 300, 10)
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-6)
    assert not torch.equal(probe(base), out)  # each call loads the vector it is given


def test_aggregate_leaves_the_global_vector_alone():
    u = with_mixed_attacker(constructed_round())
    model = tiny_model()
    g = global_vector(model)
    before = g.clone()
    DeepSight(model_outputs=RandomInputProbabilities(model, (IN,), 3, 100, 0)).aggregate(
        g, round_updates(u, layer_sizes=SIZES))
    assert torch.equal(g, before)


def test_validation_and_a_model_without_an_output_layer_fail_with_the_name():
    for kwargs, word in [({"tau": 0}, "tau"), ({"threshold_factor": 1.0}, "threshold_factor"),
                         ({"num_seeds": 0}, "num_seeds"), ({"num_samples": 0}, "num_samples"),
                         ({"min_cluster_size": 1}, "min_cluster_size"), ({"model_outputs": 3}, "model_outputs")]:
        with pytest.raises(ValueError, match=word):
            DeepSight(**kwargs).validate()
    u = np.random.default_rng(0).normal(size=(5, 21)).astype(np.float32)
    with pytest.raises(ValueError, match="output layer"):
        DeepSight().aggregate(torch.zeros(21), round_updates(u, layer_sizes=[11, 10]))  # 11 % 10 != 0
    with pytest.raises(ValueError, match="num_seeds=2"):
        model = tiny_model()
        DeepSight(model_outputs=RandomInputProbabilities(model, (IN,), 3, 10, 0), num_seeds=2).aggregate(
            global_vector(model), round_updates(constructed_round(), layer_sizes=SIZES))


def helper_probe():
    """A probe for tests.helpers' model: Linear(3, 4), ReLU, Linear(4, 2) (its arrays' order)."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    return RandomInputProbabilities(model, (3,), num_seeds=3, num_samples=64, seed=0)


def test_both_adapters_agree_and_ground_truth_changes_nothing_with_the_probe():
    g, clients = _round(seed=3)
    legacy, metrics = run_legacy(strategies.DeepSight(model_outputs=helper_probe()), g, clients)
    msg, _ = run_message(message.DeepSight(model_outputs=helper_probe()), g, clients)
    for a, b in zip(legacy, msg):
        np.testing.assert_array_equal(a, b)
    removed = [(a, n, {k: v for k, v in m.items() if k != GROUND_TRUTH_KEY}) for a, n, m in clients]
    flipped = [(a, n, {**m, GROUND_TRUTH_KEY: 1 - m[GROUND_TRUTH_KEY]}) for a, n, m in clients]
    for variant in (removed, flipped):
        out, _ = run_legacy(strategies.DeepSight(model_outputs=helper_probe()), g, variant)
        for a, b in zip(legacy, out):
            np.testing.assert_array_equal(a, b)


def test_the_server_app_builds_the_probe_without_a_server_dataset():
    cfg = ExperimentConfig.from_run_config({"defense": "deepsight", "deepsight-num-samples": 20,
                                            "deepsight-num-seeds": 2})
    model = build_model(cfg.model_name, (1, 8, 8), 10, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    defense = build_defense(cfg, model)
    assert isinstance(defense, DeepSight) and isinstance(defense.model_outputs, RandomInputProbabilities)
    assert defense.model_outputs.model is not model
    vec = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    assert defense.model_outputs(vec + 1.0).shape == (2, 20, 10)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_the_docs_snippet_builds_a_strategy_with_ddifs():
    import re
    from pathlib import Path

    from tests.test_docs_snippets import _round_through

    page = (Path(__file__).resolve().parents[1] / "docs" / "defenses" / "deepsight.md").read_text()
    code = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    namespace = {"net": net}
    exec(compile(code, "deepsight.md", "exec"), namespace)
    strategy = namespace["strategy"]
    params, metrics = _round_through(strategy, net)
    assert params is not None and metrics["fl-defense.num-valid"] == 10
    assert strategy.records[-1].info["ddifs"] is True
