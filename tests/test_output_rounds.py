"""What a round's line and the results files say: the untrained model's attack success is shown
for what it is, beside the rate at which the model picks the target without the trigger."""

import json

import pytest

from fl_defense.config import ExperimentConfig
from fl_defense.data import load_split
from fl_defense.metrics import attack_probes, attack_success_rate
from fl_defense.models import build_model, get_arrays
from server_app.recorder import RunRecorder, run_failure


def _recorder(tmp_path, **over):
    cfg = ExperimentConfig.from_run_config({"num-server-rounds": 1, "seed": 42, **over})
    spec = cfg.data_config(1).spec
    model = build_model(cfg.model_name, spec.shape, spec.num_classes, seed=cfg.seed)
    test = load_split(cfg.data_config(1), "test")
    lines = []
    return RunRecorder(cfg, model, test, tmp_path / "run", echo=lines.append), lines, model, test


def test_round_0_is_marked_untrained_and_shows_the_triggers_floor(tmp_path):
    rec, lines, model, (x, y) = _recorder(tmp_path)
    rec.evaluate(0, get_arrays(model), {})
    row = json.loads((tmp_path / "run" / "rounds.jsonl").read_text())
    trigger = attack_probes(rec.cfg, tuple(x.shape[1:]))["attack_success_rate"]
    assert row["attack_success_rate"] == attack_success_rate(model, x, y, trigger, 7)
    assert row["clean_target_rate"] == attack_success_rate(model, x, y, None, 7)
    # seed 42's untrained MLP calls most digits a 7, trigger or not: the 'attack success' is no backdoor
    assert row["clean_target_rate"] > 0.5 and abs(row["attack_success_rate"] - row["clean_target_rate"]) < 0.1
    assert lines == [f"[fl-defense] round   0 (initial model, untrained) | accuracy {row['accuracy']:.3f} | "
                     f"attack success {row['attack_success_rate']:.3f} ({row['clean_target_rate']:.3f} without "
                     "the trigger)"]
    rec.evaluate(1, get_arrays(model), {})
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["initial"] == {k: row[k] for k in ("accuracy", "attack_success_rate", "clean_target_rate")}
    assert summary["final"]["clean_target_rate"] == row["clean_target_rate"]
    assert "clean_target_rate" in summary["definitions"] and "round 0" in summary["definitions"]


def test_semantic_attacks_have_no_separate_floor(tmp_path):
    rec, lines, model, _ = _recorder(tmp_path, attack="semantic", **{"base-label": 1})
    rec.evaluate(0, get_arrays(model), {})
    assert "clean_target_rate" not in json.loads((tmp_path / "run" / "rounds.jsonl").read_text())
    assert "without the trigger" not in lines[0]


def test_a_probe_on_its_own_images_has_no_test_set_floor(tmp_path):
    """The edge case's success is the share of its held-out tail sent to the target: the test
    images without a trigger are not the floor it stands on, so none is recorded or shown."""
    rec, lines, model, _ = _recorder(tmp_path, attack="edge_case", **{"target-label": 1})
    assert hasattr(rec.probes["attack_success_rate"], "success_rate")
    rec.evaluate(0, get_arrays(model), {})
    row = json.loads((tmp_path / "run" / "rounds.jsonl").read_text())
    assert "clean_target_rate" not in row and row["attack_success_rate"] is not None
    assert "without the trigger" not in lines[0]


def test_the_attacks_own_probe_images_flag_matches_its_probe():
    """``SotaBackdoor.own_probe_images`` (what the leaderboard reads, knowing only the attack's name)
    says the same as the recorder's test (a probe that measures itself)."""
    from fl_defense.attacks import SOTA_BACKDOORS

    for name, attack in SOTA_BACKDOORS.items():
        if attack.learned_probe:  # built from what the attackers report; a trigger either way
            continue
        cfg = ExperimentConfig.from_run_config({"num-server-rounds": 1, "attack": name, "target-label": 1})
        spec = cfg.data_config(1).spec
        assert hasattr(attack.probe(cfg, spec.shape), "success_rate") == attack.own_probe_images, name


def test_a_rerun_under_the_same_name_does_not_keep_the_old_summary(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text('{"rounds_completed": 1}')
    _recorder(tmp_path)
    assert run_failure(tmp_path / "run", 1) == (f"the run ended after 0 of 1 rounds without writing "
                                                f"{tmp_path / 'run' / 'summary.json'}")


@pytest.mark.parametrize("summary, reason", [
    ({"rounds_completed": 2, "rounds_kept_global": 0}, "the run stopped after round 2 of 3"),
    ({"rounds_completed": 3, "rounds_kept_global": 3,
      "last_round": {"reason": "0 valid results, fewer than the minimum of 1", "num_rejected": 10, "num_failures": 0}},
     "no round changed the global model in 3 rounds (last round: 0 valid results, fewer than the minimum of 1; "
     "10 results rejected, 0 clients failed)"),
    ({"rounds_completed": 3, "rounds_kept_global": 2}, None),
])
def test_run_failure_reads_the_summary(tmp_path, summary, reason):
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert run_failure(tmp_path, 3) == reason


@pytest.mark.parametrize("base_label", [-1, 3])
def test_one_pass_gives_the_figures_of_the_separate_passes(base_label):
    """Accuracy, the floor and the base class's accuracy from one prediction pass equal the three
    separate calls they replace, on a convolutional model (channels-last batches, a partial last one)."""
    import torch

    from fl_defense.metrics import accuracy, untriggered_figures

    model = build_model("cnn_small", (1, 28, 28), 10, seed=3)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(1000, 1, 28, 28, generator=g), torch.randint(0, 10, (1000,), generator=g)
    got = untriggered_figures(model, x, y, 7, base_label)
    assert got["accuracy"] == accuracy(model, x, y)
    assert got["clean_target_rate"] == attack_success_rate(model, x, y, None, 7, base_label)
    if base_label >= 0:
        base = y == base_label
        assert got["base_class_accuracy"] == accuracy(model, x[base], y[base])
    else:
        assert "base_class_accuracy" not in got
    assert "clean_target_rate" not in untriggered_figures(model, x, y, 7, base_label, floor=False)


def test_round_0_of_a_pretrained_run_says_pre_trained(tmp_path):
    rec, lines, model, _ = _recorder(tmp_path, **{"pretrain-rounds": 30})
    rec.evaluate(0, get_arrays(model), {})
    assert lines[0].startswith("[fl-defense] round   0 (initial model, pre-trained for 30 rounds) | accuracy")


def test_each_client_line_carries_its_update_norm(tmp_path):
    """``rounds.jsonl`` keeps the norm the defense received from each accepted client, beside its
    weight and flag (what ``simulation.explain`` prints against the benign clients')."""
    import numpy as np

    from fl_defense.defenses import FedAvg
    from fl_defense.rounds import ClientResult, DefendedAggregation

    rec, _, model, _ = _recorder(tmp_path)
    g = get_arrays(model)
    agg = DefendedAggregation(FedAvg())
    agg.aggregate(1, g, [ClientResult(str(k), [a + np.float32(0.1 * k) for a in g], 5) for k in (1, 2)],
                  ground_truth={"1": False, "2": True})
    rec.strategy = agg
    rec.evaluate(0, g, {})
    rec.evaluate(1, g, {})
    row = json.loads((tmp_path / "run" / "rounds.jsonl").read_text().splitlines()[1])
    norms = [c["update_norm"] for c in row["clients"]]
    assert [c["malicious"] for c in row["clients"]] == [False, True]
    assert norms == agg.records[-1].update_norms and norms[1] == pytest.approx(2 * norms[0], rel=1e-5)
