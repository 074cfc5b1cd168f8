"""The grids issue #21 asks for load, and run the settings they claim in their headers."""

from pathlib import Path

from fl_defense.config import ExperimentConfig
from fl_defense.defenses.rlr import effective_theta
from simulation.grid import Grid

GRIDS = Path(__file__).resolve().parents[1] / "simulation" / "grids"


def _configs(name):
    grid = Grid.load(GRIDS / f"{name}.toml")
    return grid, [ExperimentConfig.from_run_config(cell) for cell in grid.cells]


def test_rlr_theta_sweeps_distinct_effective_thetas_in_the_seed_setting():
    grid, cfgs = _configs("rlr_theta")
    rlr = [c for c in cfgs if c.defense == "rlr"]
    thetas = [c.rlr_theta for c in rlr]
    assert len({effective_theta(grid.num_supernodes, t) for t in thetas}) == len(thetas) >= 4
    assert {(c.defense, c.attack) for c in cfgs if c.defense == "fedavg"} == {("fedavg", "none"), ("fedavg", "plus")}
    for c in cfgs:
        assert (c.dataset, c.partitioner, c.dirichlet_alpha, c.malicious_fraction) == ("fashion_mnist", "dirichlet", 0.5, 0.3)
        assert c.local_epochs == 1 and 6 <= c.num_server_rounds <= 12


def test_seed_grids_theta():
    _, cfgs = _configs("fdcr_dirichlet")
    assert {c.rlr_theta for c in cfgs if c.defense == "rlr"} == {6}  # 2-3 attackers of 10 every round
    assert sum(c.defense == "rlr" for c in cfgs) == 8
    for name in ("rlr_fmnist_iid", "rlr_fmnist_iid_allclass"):
        _, cfgs = _configs(name)
        assert {c.rlr_theta for c in cfgs} == {4}  # the RLR paper's own setting: 1 attacker of 10


def test_fdcr_paper_attack_is_the_issues_run_config():
    _, cfgs = _configs("fdcr_paper_attack")
    assert sorted(c.defense for c in cfgs) == ["fdcr", "fedavg", "fedavg", "sdfc", "sdfc"]
    assert {c.sdfc_calibration_mode for c in cfgs if c.defense == "sdfc"} == {"server", "client"}
    for c in cfgs:
        assert (c.target_label, c.base_label, c.poison_rate) == (2, -1, 0.5)
        assert (c.learning_rate, c.momentum, c.local_epochs, c.batch_size, c.num_server_rounds) == (0.01, 0.9, 2, 64, 12)
        assert (c.dataset, c.dirichlet_alpha, c.malicious_fraction, c.seed) == ("fashion_mnist", 0.5, 0.3, 0)
        assert c.attack in ("corner", "none")


def test_paper_schedules():
    _, cfgs = _configs("paper_schedules")
    fisher = [c for c in cfgs if c.partitioner == "dirichlet"]
    rlr = [c for c in cfgs if c.partitioner == "iid"]
    assert {c.defense for c in fisher} == {"fedavg", "fdcr", "sdfc"} and {c.defense for c in rlr} == {"fedavg", "rlr"}
    for c in fisher:  # FDCR / SDFC: 10 local epochs, SGD lr 0.01, momentum 0.9
        assert (c.local_epochs, c.learning_rate, c.momentum) == (10, 0.01, 0.9)
        assert c.num_server_rounds < 50
    for c in rlr:  # RLR's authors: 2 epochs, batch 256, lr 0.1, momentum 0.9
        assert (c.local_epochs, c.batch_size, c.learning_rate, c.momentum) == (2, 256, 0.1, 0.9)
        assert (c.base_label, c.target_label, c.attack) == (5, 7, "plus") and c.num_server_rounds < 200
