"""The state-of-the-art backdoors combined with model poisoning (issue 18): every backdoor x every
``model-poisoning`` choice either runs both, each acting as it does alone, or is refused at
start-up naming ``model-poisoning``. Each combination that runs is shown through the real client
on digits: the model poisoning's effect against the plain backdoor's update (same seed), and the
backdoor's own step (its training, A3FL's and IBA's trigger optimisation, Chameleon's contrastive
stage, the edge-case tail) still there."""

import numpy as np
import pytest
import torch
from torch.nn.utils import parameters_to_vector

import fl_defense.attacks.chameleon as chameleon
from client_app.app import DefenseClient, _seed
from fl_defense.attacks import (COLLUDING_ATTACKS, MODEL_ATTACKS, PROBE_KEY, SOTA_BACKDOORS, TrainingTerms,
                                neurotoxin_mask, select_attackers)
from fl_defense.attacks.adaptive import minmax_importance
from fl_defense.attacks.collusion import HONEST_UPDATE_KEY, collude, decode_update
from fl_defense.attacks.sota import COMPOSES_WITH, last_linear
from fl_defense.config import ConfigError, ExperimentConfig
from fl_defense.rounds import ClientResult
from fl_defense.updates import ParamLayout

BACKDOORS = ("edge_case", "a3fl", "chameleon", "iba")
ATTACKER = select_attackers(10, 0.3, 42)[0]
ROUND = {"server-round": 1}
SEED = _seed(42, ATTACKER, 1)  # the attacker's training seed in round 1
# small trigger budgets: the test is about composition, not the triggers' strength
BASE = {"malicious-fraction": 0.3, "local-epochs": 1}
OWN = {"edge_case": {"target-label": 1, "edge-case-tail": 0.3, "edge-case-samples": 20},
       "a3fl": {"a3fl-steps": 4, "a3fl-adv-steps": 2, "a3fl-adv-every": 2}, "chameleon": {}, "iba": {"iba-steps": 4}}

# The composition table (docs/attacks.md): what runs with every backdoor, what is refused
COMPOSING = ("none", "boost", "pgd", "neurotoxin", "evasion", "fisher_penalty", "alie_backdoor", "rlr_adaptive")
REFUSED = ("signflip", "gaussian", "alie", "ipm", "min_max", "min_sum", "fang")


def _config(attack: str, **over) -> ExperimentConfig:
    return ExperimentConfig.from_run_config({**BASE, "attack": attack, **OWN[attack], **over})


def _client(attack: str, **over) -> DefenseClient:
    return DefenseClient(_config(attack, **over), ATTACKER, num_partitions=10)


def _vec(arrays) -> torch.Tensor:
    return parameters_to_vector([torch.as_tensor(np.asarray(a)) for a in arrays]).double()


def _fit(client: DefenseClient, params) -> tuple[torch.Tensor, dict]:
    arrays, _, metrics = client.fit(params, ROUND)
    return _vec(arrays), metrics


def _spy(monkeypatch, attack: str) -> dict:
    """Record the backdoor's own training (the terms it was handed) and, for Chameleon, the model
    after its contrastive stage."""
    seen = {"train": [], "stage1": []}
    cls = SOTA_BACKDOORS[attack]
    own_train = cls.train

    def train(self, model, images, labels, poisoned, trainer, seed, terms=TrainingTerms()):
        seen["train"].append(terms)
        return own_train(self, model, images, labels, poisoned, trainer, seed, terms)

    monkeypatch.setattr(cls, "train", train)
    stage = chameleon.contrastive_stage

    def contrastive(model, *args, **kwargs):
        loss = stage(model, *args, **kwargs)
        seen["stage1"].append((kwargs.get("terms"), parameters_to_vector(model.parameters()).detach().double().clone()))
        return loss

    monkeypatch.setattr(chameleon, "contrastive_stage", contrastive)
    return seen


@pytest.fixture(scope="module")
def plain_run():
    """attack -> (global arrays, the plain backdoor's sent vector, Chameleon's model after its
    contrastive stage): the reference round without model poisoning, computed once per backdoor."""
    cache = {}

    def run(attack: str):
        if attack not in cache:
            with pytest.MonkeyPatch.context() as mp:
                seen = _spy(mp, attack)
                params = _client(attack).get_parameters({})
                sent, _ = _fit(_client(attack), params)
            cache[attack] = params, sent, seen["stage1"][0][1] if seen["stage1"] else None
        return cache[attack]

    return run


def _own_step_ran(attack: str, client: DefenseClient, metrics: dict, seen: dict) -> TrainingTerms:
    """The backdoor's own step ran this round; returns the terms its training was handed."""
    assert len(seen["train"]) == 1  # its own training, not a path around it
    cfg = client.cfg
    if attack in ("a3fl", "iba"):  # the trigger optimised against the global model, then reported
        steps = cfg.a3fl_steps if attack == "a3fl" else cfg.iba_steps
        assert len(client.backdoor.history) == steps + 1 and client.backdoor.history[-1] != client.backdoor.history[0]
        assert PROBE_KEY in metrics
    if attack == "chameleon":  # the contrastive stage ran, under the same terms
        assert len(seen["stage1"]) == 1 and seen["stage1"][0][0] is seen["train"][0]
    if attack == "edge_case":
        assert metrics["num-poisoned"] == cfg.edge_case_samples  # the tail was mixed in
    return seen["train"][0]


def _composed(monkeypatch, plain_run, attack: str, **keys) -> tuple:
    """One attacker's round of ``attack`` under the model poisoning ``keys`` name, beside the plain
    backdoor's (``plain_run``), with the backdoor's own step checked to have run: (params, plain,
    plain_stage1, g the global vector, seen the spies, client, the model it sent, the
    TrainingTerms its training used)."""
    params, plain, plain_stage1 = plain_run(attack)
    seen = _spy(monkeypatch, attack)
    client = _client(attack, **keys)
    sent, metrics = _fit(client, params)
    terms = _own_step_ran(attack, client, metrics, seen)
    return params, plain, plain_stage1, _vec(params), seen, client, sent, terms


# --- the table --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", COMPOSING + REFUSED)
@pytest.mark.parametrize("attack", BACKDOORS)
def test_every_backdoor_with_every_model_poisoning_runs_or_is_refused_naming_the_key(attack, mode):
    over = {"model-poisoning": mode, "attack-target": "krum" if mode == "fang" else "agnostic"}
    if mode in COMPOSING:
        assert _config(attack, **over).model_poisoning == mode
        return
    with pytest.raises(ConfigError, match=f"run-config key 'model-poisoning': {mode} with attack={attack}: ") as err:
        _config(attack, **over)
    assert "use one of none, boost, pgd" in str(err.value)


def test_the_table_covers_every_model_poisoning_choice():
    """A choice added later is in the table, or a colluding attack that the rule places by
    whether it crafts from the poisoned updates."""
    for mode in set(MODEL_ATTACKS) - set(COMPOSING + REFUSED):
        assert mode in COLLUDING_ATTACKS, f"{mode}: add it to COMPOSING or REFUSED"
        refused = SOTA_BACKDOORS["a3fl"].check_model_poisoning(_config("a3fl", **{"model-poisoning": mode}))
        assert (refused is None) == COLLUDING_ATTACKS[mode].uses_poisoned


def test_a_backdoor_whose_training_cannot_carry_a_choice_narrows_composes_with():
    class OwnLoop(SOTA_BACKDOORS["a3fl"]):
        name = "own_loop"
        composes_with = COMPOSES_WITH - {"evasion"}

    assert OwnLoop.check_model_poisoning(_config("a3fl", **{"model-poisoning": "boost"})) is None
    key, why = OwnLoop.check_model_poisoning(_config("a3fl", **{"model-poisoning": "evasion"}))
    assert key == "model-poisoning" and "own_loop's training cannot carry it" in why and "evasion" not in why.split(
        "use one of")[1]


# --- model poisoning that acts on training -----------------------------------------------------------


@pytest.mark.parametrize("attack", BACKDOORS)
def test_the_evasion_term_acts_in_every_stage_of_the_backdoors_training(monkeypatch, plain_run, attack):
    """Bagdasaryan et al.'s alpha L + (1 - alpha) L_ano: the update ends closer to the global model
    than the plain backdoor's; Chameleon's encoder already after its contrastive stage."""
    params, plain, plain_stage1, g, seen, client, evading, terms = _composed(
        monkeypatch, plain_run, attack, **{"model-poisoning": "evasion", "evasion-alpha": 0.5, "evasion-norm-match": False})
    assert terms.lr_scale == 0.5 and terms.penalty is not None
    assert float((evading - g).norm()) < 0.9 * float((plain - g).norm())
    if attack == "chameleon":
        assert float((seen["stage1"][0][1] - g).norm()) < 0.9 * float((plain_stage1 - g).norm())


@pytest.mark.parametrize("attack", BACKDOORS)
def test_the_fisher_penalty_acts_in_every_stage_of_the_backdoors_training(monkeypatch, plain_run, attack):
    """lambda sum_i I_i (theta_i - theta_ref_i)^2: the importance-weighted update ends nearer the
    attacker's honest one than the plain backdoor's does; Chameleon's already after its contrastive
    stage."""
    params, plain, plain_stage1, g, seen, client, penalised, terms = _composed(
        monkeypatch, plain_run, attack, **{"model-poisoning": "fisher_penalty", "fisher-penalty-lambda": 5.0})
    assert terms.penalty is not None and terms.lr_scale == 1.0
    importance = minmax_importance(client.shadow.fisher).double()
    honest = client.shadow.update.double()
    dist = lambda v: float((importance * (v - g - honest)).norm())
    assert dist(penalised) < 0.75 * dist(plain)  # measured: 0.60 edge_case, 0.17-0.24 the others
    if attack == "chameleon":  # on the encoder, the part the contrastive stage trains
        head = {id(p) for p in last_linear(client.model).parameters()}
        encoder = torch.cat([torch.full((p.numel(),), id(p) not in head) for p in client.model.parameters()])
        stage1 = lambda v: float((importance * (v - g - honest))[encoder].norm())
        assert stage1(seen["stage1"][0][1]) < 0.95 * stage1(plain_stage1)  # measured 0.88 (lambda I_i is small there)


@pytest.mark.parametrize("attack", BACKDOORS)
def test_pgd_projects_every_stage_of_the_backdoors_training(monkeypatch, plain_run, attack):
    """Constrain-and-scale: the update sent has exactly the bound's norm; Chameleon's contrastive
    stage already stays inside the ball (without PGD it leaves it)."""
    bound = 0.1
    params, plain, plain_stage1, g, seen, client, sent, terms = _composed(
        monkeypatch, plain_run, attack, **{"model-poisoning": "pgd", "attack-norm-bound": bound})
    assert terms.after_step is not None
    assert float((plain - g).norm()) > 2 * bound  # the projection had work to do
    assert float((sent - g).norm()) == pytest.approx(bound, rel=1e-4)
    if attack == "chameleon":
        assert float((plain_stage1 - g).norm()) > bound
        assert float((seen["stage1"][0][1] - g).norm()) <= bound * (1 + 1e-5)


@pytest.mark.parametrize("attack", BACKDOORS)
def test_neurotoxin_masks_every_stage_of_the_backdoors_training(monkeypatch, plain_run, attack):
    """Neurotoxin: the coordinates benign clients change most stay exactly at the global model's,
    in each stage (the plain backdoor changes them)."""
    params, plain, _, g, seen, client, sent, terms = _composed(
        monkeypatch, plain_run, attack, **{"model-poisoning": "neurotoxin", "neurotoxin-ratio": 0.2})
    assert terms.before_step is not None
    frozen = ~neurotoxin_mask(client._benign_update(params, SEED), 0.2)
    assert int(frozen.sum()) > 0 and bool(((sent - g)[frozen] == 0).all())
    assert float(((plain - g)[frozen] != 0).double().mean()) > 0.5
    if attack == "chameleon":  # the encoder, which only the contrastive stage moves
        assert bool(((seen["stage1"][0][1] - g)[frozen] == 0).all())


# --- model poisoning that acts on the trained update --------------------------------------------------


@pytest.mark.parametrize("attack", BACKDOORS)
def test_boosting_scales_the_backdoors_update(monkeypatch, plain_run, attack):
    params, plain, _, g, seen, client, boosted, terms = _composed(
        monkeypatch, plain_run, attack, **{"model-poisoning": "boost", "boost-factor": 4.0})
    torch.testing.assert_close(boosted - g, 4.0 * (plain - g), rtol=1e-4, atol=1e-6)


# --- colluding attacks that craft from the poisoned updates ---------------------------------------------


@pytest.mark.parametrize("mode", ["alie_backdoor", "rlr_adaptive"])
@pytest.mark.parametrize("attack", BACKDOORS)
def test_colluders_craft_from_the_backdoors_trained_update(monkeypatch, plain_run, attack, mode):
    """The colluder sends the model the backdoor trained (the plain backdoor's, exactly) with its
    honest update under the reserved key; the collusion step hands the attack that model's update
    as the poisoned one."""
    params, plain, _ = plain_run(attack)
    g = _vec(params)
    seen = _spy(monkeypatch, attack)
    client = _client(attack, **{"model-poisoning": mode})
    arrays, n, metrics = client.fit(params, ROUND)
    _own_step_ran(attack, client, metrics, seen)
    assert torch.equal(_vec(arrays), plain)
    honest = decode_update(metrics[HONEST_UPDATE_KEY], len(g))
    assert honest is not None and not np.allclose(honest, (plain - g).numpy())
    layout = ParamLayout.from_arrays(params, [True] * len(params))
    benign = ClientResult("b", [np.asarray(a) + np.float32(0.01) for a in params], n, {"partition": ATTACKER + 1})
    attack_obj = COLLUDING_ATTACKS[mode]()
    craft, got = attack_obj.craft, {}

    def spy_craft(known, rnd):
        got["poisoned"] = rnd.poisoned.clone()
        return craft(known, rnd)

    attack_obj.craft = spy_craft
    collude([ClientResult("a", arrays, n, metrics), benign], params, layout, attack_obj, "full", 1, seed=0)
    torch.testing.assert_close(got["poisoned"][0].double(), plain - g, rtol=0, atol=1e-6)
