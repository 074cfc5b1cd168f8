"""The state-of-the-art backdoors (issue 18): edge-case, A3FL, Chameleon, IBA. Each test shows the
mechanism its paper defines, on constructed inputs or through the real client code."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

from fl_defense.attacks import PROBE_KEY, SOTA_BACKDOORS, select_attackers
from fl_defense.attacks.a3fl import a3fl_mask, initial_pattern, optimise_trigger, unlearned_copy
from fl_defense.attacks.chameleon import chameleon_loss, contrastive_stage, encoder_parameters
from fl_defense.attacks.edge_case import edge_case_tail, farthest_from_mean
from fl_defense.attacks.iba import GeneratedTrigger, make_generator, train_generator
from fl_defense.attacks.sota import PatternTrigger, features_and_logits, last_linear
from fl_defense.config import ConfigError, ExperimentConfig
from fl_defense.data import DataConfig, load_split
from fl_defense.models import build_model
from fl_defense.training import train

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
ATTACKER = select_attackers(10, 0.3, 42)[0]


def _client(run_config: dict):
    from client_app.app import DefenseClient

    cfg = ExperimentConfig.from_run_config({"malicious-fraction": 0.3, "local-epochs": 1, **run_config})
    return DefenseClient(cfg, ATTACKER, num_partitions=10)


@pytest.fixture(scope="module")
def digits_model():
    """An MLP trained 3 epochs on digits (the global model the triggers are optimised against)."""
    x, y = load_split(DataConfig(dataset="digits"), "train")
    model = build_model("mlp", (1, 8, 8), 10, seed=0)
    train(model, x, y, 3, 32, 0.1, seed=0)
    return model.state_dict(), x, y


def _trained_digits_model(digits_model):
    state, x, y = digits_model
    model = build_model("mlp", (1, 8, 8), 10, seed=0)
    model.load_state_dict(state)
    return model, x, y


# -- edge case ----------------------------------------------------------------------------------

def test_the_edge_case_tail_is_exactly_what_is_poisoned(monkeypatch):
    """Through the client: what it trains on is its own partition, untouched, plus tail images of
    the training split relabelled target; none of them is from the held-out (test) tail."""
    client = _client({"attack": "edge_case", "target-label": 1, "edge-case-class": 7, "edge-case-tail": 0.3,
                      "edge-case-samples": 20})
    seen = {}
    original = type(client)._sgd

    def spy(self, images, labels, *args, **kwargs):
        seen["x"], seen["y"] = images.clone(), labels.clone()
        return original(self, images, labels, *args, **kwargs)

    monkeypatch.setattr(type(client), "_sgd", spy)
    _, _, metrics = client.fit(client.get_parameters({}), {"server-round": 1})
    n = len(client.images)
    assert metrics["num-poisoned"] == 20 and len(seen["y"]) == n + 20
    assert torch.equal(seen["x"][:n], client.images) and torch.equal(seen["y"][:n], client.labels)
    assert bool((seen["y"][n:] == 1).all())
    cfg = client.cfg
    tail = edge_case_tail("digits", "", 7, 0.3, "train", cfg.seed, cfg.server_fraction)
    held_out = edge_case_tail("digits", "", 7, 0.3, "test", cfg.seed)
    flat = lambda t: {tuple(r) for r in t.reshape(len(t), -1).tolist()}
    assert flat(seen["x"][n:]) <= flat(tail) and not flat(seen["x"][n:]) & flat(held_out)
    # the in-distribution tail: that class's images farthest from their mean
    x, y = load_split(DataConfig(dataset="digits"), "train")
    sevens = x[y == 7]
    dist = (sevens - sevens.mean(0)).reshape(len(sevens), -1).norm(dim=1)
    cut = torch.sort(dist, descending=True).values[len(tail) - 1]
    tail_dist = (tail - sevens.mean(0)).reshape(len(tail), -1).norm(dim=1)
    assert len(tail) == round(0.3 * len(sevens)) and bool((tail_dist >= cut - 1e-5).all())
    # the evaluation measures the held-out tail: the share classified as the target
    probe = SOTA_BACKDOORS["edge_case"].probe(cfg, (1, 8, 8))
    always_one = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        always_one[1].weight.zero_()
        always_one[1].bias.copy_(torch.arange(10) == 1)
    assert probe.success_rate(always_one, None, None, 1) == 1.0 and probe.success_rate(always_one, None, None, 2) == 0.0


@pytest.mark.skipif(not (SHARED / "usps").is_dir(), reason="local parquet copies not present")
def test_the_mnist_tail_is_usps_sevens_in_mnist_framing():
    tail = edge_case_tail("mnist", str(SHARED), 7, 0.1, "train")
    x, y = load_split(DataConfig(dataset="usps", data_dir=str(SHARED)), "train")
    assert tail.shape == (int((y == 7).sum()), 1, 28, 28)
    assert float(tail[..., :4, :].abs().max()) == 0 and float(tail[..., 24:, :].abs().max()) == 0  # MNIST's margin
    test_tail = edge_case_tail("mnist", str(SHARED), 7, 0.1, "test")
    assert len(test_tail) == int((load_split(DataConfig(dataset="usps", data_dir=str(SHARED)), "test")[1] == 7).sum())
    assert edge_case_tail("usps", str(SHARED), 7, 0.1, "test").shape[1:] == (1, 16, 16)


def test_farthest_from_mean_orders_by_distance():
    x = torch.zeros(10, 1, 2, 2)
    x[3] += 1.0
    x[1] += 0.5
    out = farthest_from_mean(x, 0.2)
    assert len(out) == 2 and torch.equal(out[0], x[3]) and torch.equal(out[1], x[1])


def test_pgd_with_model_replacement_reports_the_boosted_update_within_the_bound():
    """Wang et al.'s PGD with model replacement: training projected onto bound / (n/eta), the
    update reported times n/eta: exactly at most the bound, and n/eta times what was trained."""
    bound, factor = 0.5, 5.0
    client = _client({"attack": "edge_case", "target-label": 1, "edge-case-tail": 0.3, "model-poisoning": "pgd",
                      "attack-norm-bound": bound, "model-replacement": factor, "learning-rate": 0.5})
    params = client.get_parameters({})
    arrays, _, _ = client.fit(params, {"server-round": 1})
    delta = np.concatenate([(a - b).reshape(-1) for a, b in zip(arrays, params)])
    assert bound * 0.9 < np.linalg.norm(delta) <= bound * 1.0001  # projection was active, then boosted
    plain = _client({"attack": "edge_case", "target-label": 1, "edge-case-tail": 0.3, "model-poisoning": "pgd",
                     "attack-norm-bound": bound, "learning-rate": 0.5})
    arrays2, _, _ = plain.fit(params, {"server-round": 1})
    delta2 = np.concatenate([(a - b).reshape(-1) for a, b in zip(arrays2, params)])
    assert np.linalg.norm(delta2) == pytest.approx(bound, rel=1e-4)  # constrain-and-scale, unchanged


# -- A3FL -------------------------------------------------------------------------------------

def test_a3fl_trigger_optimisation_raises_the_global_models_target_probability(digits_model):
    model, x, y = _trained_digits_model(digits_model)
    keep = y != 7
    mask = a3fl_mask(8, 8, 14)  # a 4x4 patch on the 8x8 digits
    before = parameters_to_vector(model.parameters()).detach().clone()
    pattern, history = optimise_trigger(model, mask, initial_pattern((1, 8, 8), 0), x[keep][:300], y[keep][:300], 7,
                                        steps=12, lr=0.1, adv_steps=5, adv_every=5, lam=1.0, batch_size=32,
                                        unlearn_lr=0.1, seed=0)
    assert len(history) == 13 and history[-1] > 2 * history[0] + 0.05
    assert sum(b > a for a, b in zip(history, history[1:])) >= 8  # rises step by step, not by luck
    assert torch.equal(parameters_to_vector(model.parameters()).detach(), before)  # the global model is untouched
    assert torch.equal(pattern * (1 - mask), initial_pattern((1, 8, 8), 0) * (1 - mask))  # only the patch moves
    assert float(pattern.min()) >= 0 and float(pattern.max()) <= 1


def test_a3fl_adversarial_copy_unlearns_the_trigger(digits_model):
    """theta'_t is trained to classify triggered inputs as their true labels: once the model has a
    backdoor for the trigger, the copy's target probability on triggered inputs is lower."""
    model, x, y = _trained_digits_model(digits_model)
    trig = PatternTrigger(a3fl_mask(8, 8, 5), torch.ones(1, 8, 8))
    xb, yb = x.clone(), y.clone()
    idx = torch.nonzero(y != 7).flatten()[:300]
    xb[idx], yb[idx] = trig.apply(x[idx]), 7
    train(model, xb, yb, 2, 32, 0.1, seed=1)  # a backdoored global model
    probe = x[y != 7][:300]
    p_global = torch.softmax(model(trig.apply(probe)), 1)[:, 7].mean()
    adv = unlearned_copy(model, probe, y[y != 7][:300], trig, 30, 0.1, 32, torch.Generator().manual_seed(0))
    p_adv = torch.softmax(adv(trig.apply(probe)), 1)[:, 7].mean()
    assert p_global > 0.5 and p_adv < p_global - 0.3


def test_a3fl_keeps_its_trigger_across_rounds_and_reports_it():
    from flwr.app import RecordDict

    state = RecordDict()
    client = _client({"attack": "a3fl", "a3fl-steps": 3})
    client.state = state
    _, _, metrics = client.fit(client.get_parameters({}), {"server-round": 1})
    kept = state.array_records["fl-defense.a3fl-trigger"]["pattern"].numpy()
    assert np.array_equal(np.frombuffer(metrics[PROBE_KEY], dtype=np.float32).reshape(1, 8, 8), kept)
    assert not np.array_equal(kept, initial_pattern((1, 8, 8), 42).numpy())
    probe = SOTA_BACKDOORS["a3fl"].probe(client.cfg, (1, 8, 8), metrics[PROBE_KEY])
    assert np.array_equal(probe.pattern.numpy(), kept)


# -- Chameleon --------------------------------------------------------------------------------

def _cos(a, b):
    a, b = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    return float((a @ b.T).mean())


def test_chameleon_pulls_poisoned_representations_to_the_target_and_away_from_their_class():
    torch.manual_seed(0)
    n = 60
    x = torch.randn(n, 1, 4, 4)
    original = torch.arange(n) % 3  # classes 0, 1, 2; target 2
    x += original.view(-1, 1, 1, 1).float()  # separable classes
    poisoned = (original == 0) & (torch.arange(n) < 30)
    labels = torch.where(poisoned, torch.tensor(2), original)
    x[poisoned, :, 0, 0] = 5.0  # the trigger
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    head_before = [p.detach().clone() for p in last_linear(model).parameters()]

    def sims():
        with torch.no_grad():
            z, _ = features_and_logits(model, x)
        obstructers = (original == 0) & ~poisoned
        return _cos(z[poisoned], z[original == 2]), _cos(z[poisoned], z[obstructers])

    to_target, to_own = sims()
    contrastive_stage(model, x, labels, original, poisoned, epochs=30, batch_size=20, lr=0.1, momentum=0.0,
                      temperature=0.5, push=2.0, seed=0)
    after_target, after_own = sims()
    assert after_target > to_target + 0.1 and after_own < to_own - 0.1 and after_target > after_own
    assert all(torch.equal(a, b) for a, b in zip(head_before, last_linear(model).parameters()))  # stage 1: encoder only


def test_chameleon_weights_obstructers_in_the_denominator():
    torch.manual_seed(1)
    z = torch.randn(8, 4)
    original = torch.tensor([0, 0, 0, 1, 1, 2, 2, 0])
    poisoned = torch.tensor([True, False, False, False, False, False, False, False])
    labels = torch.where(poisoned, torch.tensor(2), original)
    base = chameleon_loss(z, labels, original, poisoned, 0.5, 1.0)
    pushed = chameleon_loss(z, labels, original, poisoned, 0.5, 3.0)
    assert pushed > base  # only the poisoned anchor's obstructers weigh more
    clean = torch.zeros(8, dtype=torch.bool)
    assert chameleon_loss(z, original, original, clean, 0.5, 3.0) == chameleon_loss(z, original, original, clean, 0.5, 1.0)


def test_chameleon_stage_two_trains_only_the_classifier_through_the_client(monkeypatch):
    client = _client({"attack": "chameleon"})
    import fl_defense.attacks.chameleon as ch

    encoder_after_stage1 = {}
    original_stage = ch.contrastive_stage

    def spy(model, *args, **kwargs):
        loss = original_stage(model, *args, **kwargs)
        encoder_after_stage1["v"] = parameters_to_vector(encoder_parameters(model)).detach().clone()
        return loss

    monkeypatch.setattr(ch, "contrastive_stage", spy)
    params = client.get_parameters({})
    client.fit(params, {"server-round": 1})
    encoder_final = parameters_to_vector(encoder_parameters(client.model)).detach()
    start = torch.cat([torch.as_tensor(a).reshape(-1) for a in params[:2]])  # the mlp's first layer
    assert not torch.equal(encoder_after_stage1["v"], start)  # stage 1 moved the encoder
    assert torch.equal(encoder_final, encoder_after_stage1["v"])  # stage 2 left it alone


# -- IBA --------------------------------------------------------------------------------------

def test_iba_generator_makes_bounded_input_specific_triggers_that_reach_the_target(digits_model):
    model, x, y = _trained_digits_model(digits_model)
    x, y = x[y != 7][:300], y[y != 7][:300]
    keep = y != 7
    trigger = GeneratedTrigger(make_generator((1, 8, 8), 0), epsilon=0.2)
    before = parameters_to_vector(model.parameters()).detach().clone()
    history = train_generator(model, trigger, x[keep], 7, steps=20, lr=0.01, batch_size=32, seed=0)
    assert history[-1] > 2 * history[0] and history[-1] > history[0] + 0.05
    assert torch.equal(parameters_to_vector(model.parameters()).detach(), before)
    with torch.no_grad():
        out = trigger.apply(x[keep])
        pert = out - x[keep]
    assert float(pert.abs().max()) <= 0.2 + 1e-6 and float(out.min()) >= 0 and float(out.max()) <= 1
    flat = pert.reshape(len(pert), -1)
    assert float((flat - flat[0]).abs().amax(dim=1).max()) > 0.01  # a different trigger for each input


def test_the_probe_step_strips_the_reserved_key_and_follows_the_lowest_attacker(tmp_path):
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    from fl_defense.rounds import PARTITION_KEY
    from server_app.backdoor_probe import with_backdoor_probe

    cfg = ExperimentConfig.from_run_config({"attack": "a3fl"})

    class Inner:
        seen = None

        def aggregate_fit(self, rnd, results, failures):
            Inner.seen = [dict(r.metrics) for _, r in results]
            return None, {}

    class Recorder:
        probes = {"attack_success_rate": None}

    patterns = {3: torch.full((1, 8, 8), 0.3), 1: torch.full((1, 8, 8), 0.1)}
    results = []
    for pid in (3, 5, 1):
        metrics = {PARTITION_KEY: pid}
        if pid in patterns:
            metrics[PROBE_KEY] = patterns[pid].numpy().tobytes()
        results.append((object(), FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.zeros(2)]), 1, metrics)))
    rec = Recorder()
    rec.out_dir = tmp_path
    wrapped = with_backdoor_probe(cfg, Inner(), rec, (1, 8, 8))
    wrapped.aggregate_fit(1, results, [])
    assert all(PROBE_KEY not in m for m in Inner.seen) and [m[PARTITION_KEY] for m in Inner.seen] == [3, 5, 1]
    assert torch.equal(rec.probes["attack_success_rate"].pattern, patterns[1])
    wrapped.aggregate_fit(2, results[1:2], [])  # no attacker this round: the last trigger stays
    assert torch.equal(rec.probes["attack_success_rate"].pattern, patterns[1])
    resumed = Recorder()
    resumed.probes, resumed.out_dir = {"attack_success_rate": None}, tmp_path
    with_backdoor_probe(ExperimentConfig.from_run_config({"attack": "a3fl", "resume": True, "run-name": "r"}),
                        Inner(), resumed, (1, 8, 8))
    assert torch.equal(resumed.probes["attack_success_rate"].pattern, patterns[1])  # a resumed run keeps it
    plain = object()
    assert with_backdoor_probe(ExperimentConfig.from_run_config({"attack": "chameleon"}), plain, rec, (1, 8, 8)) is plain


# -- configuration ----------------------------------------------------------------------------

@pytest.mark.parametrize("run_config, key", [
    ({"attack": "edge_case"}, "edge-case-class"),                               # tail class = target
    ({"attack": "edge_case", "target-label": 1, "edge-case-class": 12}, "edge-case-class"),
    ({"attack": "edge_case", "target-label": 1, "dataset": "mnist"}, "data-dir"),  # its tail is USPS
    ({"model-poisoning": "boost", "model-replacement": 5.0}, "model-replacement"),
    ({"attack": "a3fl", "a3fl-trigger-size": 40}, "a3fl-trigger-size"),
    ({"attack": "chameleon", "chameleon-trigger": "mask"}, "chameleon-trigger"),
    ({"attack": "iba", "iba-epsilon": 0.0}, "iba-epsilon"),
])
def test_bad_backdoor_configuration_fails_at_start_up_naming_the_key(run_config, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        ExperimentConfig.from_run_config(run_config)


# -- smoke cells: every backdoor through the real client and server, 3 rounds on digits ---------

@pytest.mark.slow
@pytest.mark.parametrize("attack, extra", [
    ("edge_case", {"target-label": 1, "edge-case-tail": 0.3, "model-poisoning": "pgd", "attack-norm-bound": 2.0,
                   "model-replacement": 3.0}),
    ("a3fl", {"a3fl-steps": 10}),
    ("chameleon", {}),
    ("iba", {"iba-steps": 10}),
])
def test_backdoor_smoke_cell(tmp_path, attack, extra):
    from flwr.client import ClientApp
    from flwr.server import ServerApp
    from flwr.simulation import run_simulation

    import client_app.app as ca
    import server_app.app as sa

    overrides = {"num-server-rounds": 3, "results-dir": str(tmp_path), "run-name": attack, "defense": "fedavg",
                 "attack": attack, "malicious-fraction": 0.3, "attack-stop-round": 2, "local-epochs": 1,
                 "checkpoint": False, **extra}
    run_simulation(server_app=ServerApp(server_fn=lambda c: sa.build_components({**c.run_config, **overrides}, 6)),
                   client_app=ClientApp(client_fn=lambda c: ca.build_client({**c.run_config, **overrides},
                                                                            c.node_config, c.state)),
                   num_supernodes=6, backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    rows = [json.loads(line) for line in (tmp_path / attack / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert [r["num_attackers_sampled"] for r in rows[1:]] == [2, 2, 0]
    assert all(0 <= r["attack_success_rate"] <= 1 for r in rows)
    summary = json.loads((tmp_path / attack / "summary.json").read_text())
    assert summary["attack_window"]["stop_round"] == 2
    assert rows[-1]["accuracy"] > 0.3  # it learned while attacked
    # the learned triggers reached the evaluation (the reserved key, stripped before the defense)
    assert (tmp_path / attack / "backdoor-probe.bin").exists() == SOTA_BACKDOORS[attack].learned_probe
