"""Data loading, partitions, poisoning and attacker selection."""

from pathlib import Path

import numpy as np
import pytest
import torch

from fl_defense.attacks import plus_mask, poison_with_trigger, select_attackers
from fl_defense.data import DataConfig, federated_dataset, load_partition, load_split
from fl_defense.metrics import attack_success_rate

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "pathological"])
def test_digits_partitions_are_disjoint_seeded_and_exclude_the_server_split(partitioner):
    cfg = DataConfig(dataset="digits", partitioner=partitioner, num_partitions=5, server_fraction=0.1, seed=1)
    parts = [load_partition(cfg, i) for i in range(5)]
    fds = federated_dataset(cfg)
    rows = [set(fds.load_partition(i, "train")["row"]) for i in range(5)]
    server_rows = set(fds.load_split("server")["row"])
    assert len(server_rows) == round(0.1 * 1437)  # the digits train split is 80% of 1797
    assert sum(len(r) for r in rows) == len(set().union(*rows))  # partitions are disjoint
    assert not set().union(*rows) & server_rows  # no client receives a server sample
    if partitioner != "pathological":  # pathological may leave classes unused
        assert sum(len(r) for r in rows) + len(server_rows) == 1437
    if partitioner == "pathological":
        assert all(len(torch.unique(p[1])) <= 2 for p in parts)
    again = load_partition.__wrapped__(cfg, 3)
    torch.testing.assert_close(again[1], parts[3][1])
    other = DataConfig(dataset="digits", partitioner=partitioner, num_partitions=5, server_fraction=0.1, seed=2)
    assert not torch.equal(load_partition.__wrapped__(other, 3)[1], parts[3][1])
    assert fds is federated_dataset(cfg)


@pytest.mark.skipif(not (SHARED / "usps").is_dir(), reason="local parquet copies not present")
def test_parquet_dataset_through_flwr_datasets():
    cfg = DataConfig(dataset="usps", data_dir=str(SHARED), partitioner="dirichlet", num_partitions=4, seed=0)
    x, y = load_partition(cfg, 0)
    assert x.shape[1:] == (1, 16, 16) and x.dtype == torch.float32 and 0 <= float(x.min()) <= float(x.max()) <= 1
    tx, ty = load_split(cfg, "test")
    assert len(ty) == 2007
    from flwr_datasets import FederatedDataset

    assert isinstance(federated_dataset(cfg), FederatedDataset)


def test_missing_parquet_files_name_the_folder(tmp_path):
    cfg = DataConfig(dataset="mnist", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="data-dir"):
        load_partition(cfg, 0)


def test_plus_trigger_matches_the_rlr_pattern_at_28x28():
    m = plus_mask(28, 28)
    assert m.sum() == 9
    assert all(m[r, 5] for r in range(5, 10)) and all(m[7, c] for c in range(3, 8))


def test_poisoning_transforms_exactly_the_right_samples():
    torch.manual_seed(0)
    x = torch.rand(200, 1, 8, 8) * 0.5
    y = torch.arange(200) % 10
    mask = plus_mask(8, 8)
    px, py, idx = poison_with_trigger(x, y, mask, poison_rate=0.5, target_label=7, base_label=-1, seed=0)
    eligible = (y != 7).sum().item()
    assert len(idx) == eligible // 2
    assert bool((y[idx] != 7).all()) and bool((py[idx] == 7).all())
    assert bool((px[idx][..., mask] == 1.0).all())
    untouched = torch.ones(200, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(px[untouched], x[untouched]) and torch.equal(py[untouched], y[untouched])
    # base-class mode: only the base class is poisoned
    _, py2, idx2 = poison_with_trigger(x, y, mask, poison_rate=1.0, target_label=7, base_label=5, seed=0)
    assert bool((y[idx2] == 5).all()) and len(idx2) == 20 and bool((py2[idx2] == 7).all())
    # the inputs are not modified
    assert float(x.max()) <= 0.5


def test_attacker_selection_is_reproducible_from_the_seed():
    a = select_attackers(100, 0.3, seed=7)
    assert a == select_attackers(100, 0.3, seed=7) and len(a) == 30 and len(set(a)) == 30
    assert a != select_attackers(100, 0.3, seed=8)
    assert select_attackers(10, 0.1, seed=1) == select_attackers(10, 0.1, seed=1)
    with pytest.raises(ValueError, match="malicious-fraction"):
        select_attackers(10, 1.5, seed=0)


def test_attack_success_rate_counts_target_predictions_on_triggered_non_target_images():
    class Backdoored(torch.nn.Module):
        def forward(self, x):  # predicts 7 when the trigger is present, else the pixel-sum class
            out = torch.zeros(len(x), 10)
            triggered = x[:, 0, 1, 1] == 1.0
            out[triggered, 7] = 1.0
            out[~triggered, 0] = 1.0
            return out

    x = torch.rand(50, 1, 8, 8) * 0.5
    y = torch.arange(50) % 10
    assert attack_success_rate(Backdoored(), x, y, plus_mask(8, 8), target_label=7) == 1.0
    assert attack_success_rate(Backdoored(), x, y, plus_mask(8, 8), target_label=0) == 0.0
    # base-class mode measures the base class only: 5 images of class 3
    assert attack_success_rate(Backdoored(), x, y, plus_mask(8, 8), target_label=7, base_label=3) == 1.0


@pytest.mark.parametrize("name, hub", [("mnist", "ylecun/mnist"), ("fashion_mnist", "zalando-datasets/fashion_mnist"),
                                       ("cifar10", "uoft-cs/cifar10"), ("usps", "flwrlabs/usps"),
                                       ("cifar100", "uoft-cs/cifar100")])
def test_without_data_dir_the_hub_id_goes_to_flwr_datasets(monkeypatch, name, hub):
    import flwr_datasets

    seen = {}

    class Recorder:
        def __init__(self, **kwargs):
            seen.update(kwargs)

    monkeypatch.setattr(flwr_datasets, "FederatedDataset", Recorder)
    federated_dataset.cache_clear()
    federated_dataset(DataConfig(dataset=name, partitioner="dirichlet"))
    federated_dataset.cache_clear()
    assert seen["dataset"] == hub and "train" in seen["partitioners"] and "data_files" not in seen
