"""Partitioners beyond flwr-datasets' own, in its ``Partitioner`` interface."""

from __future__ import annotations

import numpy as np
from flwr_datasets.partitioner import Partitioner


class NIRPartitioner(Partitioner):
    """Non-IID-rate (NIR) label skew for Fedward's setting (Chen et al., arXiv 2307.00356).

    Fedward's release does not include its NIR split, so this follows the group rule that
    label-skew papers of its line use (Fang et al. 2020; FLTrust; FLAME): clients are dealt
    round-robin into C groups, one per class; a sample of class l goes to group l with probability
    q and otherwise to one of the other C - 1 groups uniformly, then to a uniformly chosen client
    of that group. NIR rescales q so that the ends mean what the name says:

        q = 1/C + nir * (1 - 1/C)      (nir = 0: IID; nir = 1: each group holds only its class)

    Parameters
    ----------
    num_partitions : int
    nir : float in [0, 1]
    partition_by : str
        The label column.
    seed : int
    """

    def __init__(self, num_partitions: int, nir: float, partition_by: str = "label", seed: int = 42) -> None:
        super().__init__()
        if not 0.0 <= nir <= 1.0:
            raise ValueError(f"nir must be in [0, 1], got {nir}")
        if num_partitions < 1:
            raise ValueError("num_partitions must be >= 1")
        self._num_partitions = num_partitions
        self.nir = nir
        self.partition_by = partition_by
        self.seed = seed
        self._indices: list[np.ndarray] | None = None

    @property
    def num_partitions(self) -> int:
        return self._num_partitions

    def _assign(self) -> list[np.ndarray]:
        labels = np.asarray(self.dataset[self.partition_by])
        classes = np.unique(labels)
        c = len(classes)
        rng = np.random.default_rng(self.seed)
        q = 1.0 / c + self.nir * (1.0 - 1.0 / c)
        class_pos = {cls: i for i, cls in enumerate(classes)}
        groups = [np.arange(g, self._num_partitions, c) for g in range(c)]
        groups = [g for g in groups if len(g)]  # fewer clients than classes: some groups are empty
        n_groups = len(groups)
        home = np.array([class_pos[l] % n_groups for l in labels])
        stay = rng.random(len(labels)) < q
        other = (home + rng.integers(1, max(n_groups, 2), size=len(labels))) % n_groups if n_groups > 1 else home
        group = np.where(stay, home, other)
        owner = np.array([groups[g][rng.integers(len(groups[g]))] for g in group])
        return [np.flatnonzero(owner == p) for p in range(self._num_partitions)]

    def load_partition(self, partition_id: int):
        if self._indices is None:
            self._indices = self._assign()
        return self.dataset.select(self._indices[partition_id])
