"""Each attack transforms exactly what it should; model poisonings have their stated property."""

import numpy as np
import pytest
import torch

from client_app.app import DefenseClient, _seed
from fl_defense.attacks import (AttackSchedule, boost, gaussian_update, make_trigger, neurotoxin_mask, poison_data,
                                project_to_ball, relabel, scale_to_bound, select_attackers, sign_flip)
from fl_defense.config import ConfigError, ExperimentConfig
from fl_defense.fisher import decode_fisher
from fl_defense.metrics import attack_probes, attack_success_rate
from fl_defense.rounds import FISHER_KEY, FISHER_REQUEST_KEY, GROUND_TRUTH_KEY
from torch.nn.utils import parameters_to_vector


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 8, 8), (1, 16, 16)])
@pytest.mark.parametrize("name", ["plus", "square", "pixel", "corner"])
def test_stamp_triggers_set_only_their_pixels_on_every_channel(name, shape):
    trig = make_trigger(name, shape)
    x = torch.rand(5, *shape) * 0.5
    y = trig.apply(x)
    assert bool((y[..., trig.mask] == 1.0).all())
    assert torch.equal(y[..., ~trig.mask], x[..., ~trig.mask])
    assert 1 <= int(trig.mask.sum()) <= 30


def test_named_trigger_geometry():
    assert make_trigger("pixel", (1, 28, 28)).mask.sum() == 1
    assert make_trigger("square", (1, 28, 28)).mask.sum() == 16
    corner = make_trigger("corner", (3, 32, 32)).mask
    assert corner[:2, :6].all() and corner.sum() == 12


def test_blend_trigger_mixes_a_seeded_pattern():
    a = make_trigger("blend", (3, 8, 8), seed=1, blend_ratio=0.2)
    b = make_trigger("blend", (3, 8, 8), seed=1, blend_ratio=0.2)
    x = torch.rand(4, 3, 8, 8)
    torch.testing.assert_close(a.apply(x), b.apply(x))
    torch.testing.assert_close(a.apply(x), 0.8 * x + 0.2 * a.pattern)


def test_user_mask_from_file(tmp_path):
    arr = np.zeros((8, 8), dtype=np.float32)
    arr[2, 3], arr[5, 5] = 0.5, 1.0
    path = tmp_path / "t.npy"
    np.save(path, arr)
    trig = make_trigger("mask", (1, 8, 8), trigger_file=str(path))
    y = trig.apply(torch.zeros(2, 1, 8, 8))
    assert float(y[0, 0, 2, 3]) == 0.5 and float(y[0, 0, 5, 5]) == 1.0 and float(y.sum()) == 3.0
    np.save(path, np.zeros((4, 4), dtype=bool))
    with pytest.raises(ValueError, match="shape"):
        make_trigger("mask", (1, 8, 8), trigger_file=str(path))


def test_dba_pieces_partition_the_full_trigger_and_attackers_plant_one_each():
    full = make_trigger("plus", (1, 28, 28))
    pieces = full.pieces(4)
    stacked = torch.stack([p.mask for p in pieces]).int()
    assert torch.equal(stacked.sum(0).bool(), full.mask) and int(stacked.sum(0).max()) == 1
    x = torch.rand(40, 1, 28, 28) * 0.5
    y = torch.arange(40) % 10
    for rank in range(4):
        px, py, idx = poison_data(x, y, "dba", (1, 28, 28), poison_rate=1.0, target_label=7, base_label=-1,
                                  seed=0, rank=rank, dba_pieces=4)
        piece = pieces[rank].mask
        assert bool((px[idx][..., piece] == 1.0).all())
        assert torch.equal(px[idx][..., full.mask & ~piece], x[idx][..., full.mask & ~piece])


def test_semantic_attack_relabels_base_class_without_a_trigger():
    y = torch.arange(100) % 10
    new, idx = relabel(y, poison_rate=0.5, target_label=7, base_label=3, seed=0)
    assert len(idx) == 5 and bool((y[idx] == 3).all()) and bool((new[idx] == 7).all())
    assert int((new != y).sum()) == 5
    x = torch.rand(100, 1, 8, 8)
    px, _, _ = poison_data(x, y, "semantic", (1, 8, 8), poison_rate=0.5, target_label=7, base_label=3, seed=0)
    assert torch.equal(px, x)


def test_model_poisoning_properties():
    g = torch.zeros(100)
    trained = torch.randn(100)
    torch.testing.assert_close(boost(g, trained, 10.0), 10 * trained)
    torch.testing.assert_close(sign_flip(g, trained, 2.0), -2 * trained)
    p = project_to_ball(g, trained * 10, 1.0)
    assert abs(float(torch.linalg.vector_norm(p)) - 1.0) < 1e-5
    small = trained / torch.linalg.vector_norm(trained) * 0.5
    torch.testing.assert_close(project_to_ball(g, small, 1.0), small)
    assert abs(float(torch.linalg.vector_norm(scale_to_bound(g, small, 2.0))) - 2.0) < 1e-5
    noise = gaussian_update(g, 0.1, seed=3)
    torch.testing.assert_close(noise, gaussian_update(g, 0.1, seed=3))
    assert 0.07 < float(noise.std()) < 0.13
    benign = torch.arange(100.0)
    allowed = neurotoxin_mask(benign, 0.1)
    assert int((~allowed).sum()) == 10 and not allowed[90:].any() and allowed[:90].all()


def test_attack_schedule_start_every_and_fresh_pools():
    s = AttackSchedule(20, 0.2, seed=5, start_round=3, every=2)
    assert s.attackers(1) == [] and s.attackers(2) == [] and s.attackers(4) == []
    assert s.attackers(3) == s.attackers(5) == select_attackers(20, 0.2, 5)
    fresh = AttackSchedule(20, 0.2, seed=5, pool="fresh")
    pools = [tuple(fresh.attackers(r)) for r in range(1, 6)]
    assert len(set(pools)) > 1 and all(len(p) == 4 for p in pools)
    assert pools == [tuple(fresh.attackers(r)) for r in range(1, 6)]  # reproducible


def _client(pid, **over):
    cfg = ExperimentConfig.from_run_config({"local-epochs": 1, "malicious-fraction": 0.1, **over})
    return DefenseClient(cfg, pid, num_partitions=10)


ATTACKER = select_attackers(10, 0.1, 42)[0]


def _update_norm(client, params, config):
    arrays, _, metrics = client.fit(params, config)
    g = parameters_to_vector([torch.as_tensor(a) for a in params]).double()
    r = parameters_to_vector([torch.as_tensor(a) for a in arrays]).double()
    return float(torch.linalg.vector_norm(r - g)), metrics, arrays


def test_pgd_attacker_respects_its_norm_bound_exactly():
    c = _client(ATTACKER, **{"model-poisoning": "pgd", "attack-norm-bound": 0.5})
    norm, metrics, _ = _update_norm(c, c.get_parameters({}), {"server-round": 1})
    assert abs(norm - 0.5) < 1e-4 and metrics[GROUND_TRUTH_KEY] == 1


def test_boosted_attacker_scales_its_update():
    honest = _client(ATTACKER, **{"model-poisoning": "none"})
    boosted = _client(ATTACKER, **{"model-poisoning": "boost", "boost-factor": 5.0})
    n1, _, _ = _update_norm(honest, honest.get_parameters({}), {"server-round": 1})
    n5, _, _ = _update_norm(boosted, boosted.get_parameters({}), {"server-round": 1})
    assert abs(n5 / n1 - 5.0) < 1e-3


def test_neurotoxin_attacker_leaves_top_benign_coordinates_untouched():
    c = _client(ATTACKER, **{"model-poisoning": "neurotoxin", "neurotoxin-ratio": 0.2})
    params = c.get_parameters({})
    benign = c._benign_update(params, seed=_seed(42, ATTACKER, 1))  # the seed fit uses in round 1
    allowed = neurotoxin_mask(benign, 0.2)
    _, _, arrays = _update_norm(c, params, {"server-round": 1})
    delta = (parameters_to_vector([torch.as_tensor(a) for a in arrays])
             - parameters_to_vector([torch.as_tensor(a) for a in params]))
    assert float(delta[~allowed].abs().max()) == 0.0 and float(delta[allowed].abs().max()) > 0


def test_fisher_forgery_reports_the_clean_samples_fisher():
    honest = _client(ATTACKER)
    forged = _client(ATTACKER, **{"fisher-forgery": "clean"})
    cfg = {"server-round": 1, FISHER_REQUEST_KEY: True}
    params = honest.get_parameters({})
    d = sum(a.size for a in params)
    f_honest = decode_fisher(honest.fit(params, cfg)[2][FISHER_KEY], d)
    f_forged = decode_fisher(forged.fit(params, cfg)[2][FISHER_KEY], d)
    assert not np.allclose(f_honest, f_forged)


def test_attack_probes_follow_the_attack():
    cfg = ExperimentConfig.from_run_config({"attack": "dba", "dba-pieces": 3})
    probes = attack_probes(cfg, (1, 8, 8))
    assert list(probes) == ["attack_success_rate", "asr_piece_0", "asr_piece_1", "asr_piece_2"]
    sem = ExperimentConfig.from_run_config({"attack": "semantic", "base-label": 3})
    assert attack_probes(sem, (1, 8, 8)) == {"attack_success_rate": None}

    class AlwaysSeven(torch.nn.Module):
        def forward(self, x):
            out = torch.zeros(len(x), 10)
            out[:, 7] = 1
            return out

    y = torch.arange(50) % 10
    assert attack_success_rate(AlwaysSeven(), torch.rand(50, 1, 8, 8), y, None, 7, base_label=3) == 1.0


def test_attack_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="'base-label'"):
        ExperimentConfig.from_run_config({"attack": "semantic"})
    with pytest.raises(ConfigError, match="'trigger-file'"):
        ExperimentConfig.from_run_config({"attack": "mask"})
    with pytest.raises(ConfigError, match="'model-poisoning'"):
        ExperimentConfig.from_run_config({"model-poisoning": "teleport"})
