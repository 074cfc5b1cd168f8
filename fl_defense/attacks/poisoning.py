"""Data poisoning of a client's local data, and who attacks when (seeded)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .label_flipping import label_flip
from .triggers import Trigger, make_trigger

DATA_ATTACKS = ("none", "plus", "square", "pixel", "corner", "mask", "blend", "dba", "semantic", "labelflip")
POOLS = ("fixed", "fresh")


def select_attackers(num_partitions: int, fraction: float, seed: int, server_round: int | None = None) -> list[int]:
    """round(fraction * num_partitions) attacker partitions, seeded: the same set for the whole run,
    or, with ``server_round``, a fresh set per round (the 'fresh' pool)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"malicious-fraction must be in [0, 1], got {fraction}")
    k = int(round(fraction * num_partitions))
    key = [seed, 0xA77AC] if server_round is None else [seed, 0xA77AC, server_round]
    rng = np.random.default_rng(key)
    return sorted(int(i) for i in rng.choice(num_partitions, size=k, replace=False))


@dataclass(frozen=True)
class AttackSchedule:
    """Which partitions attack in which round: a fixed or fresh seeded pool, from ``start_round``
    on, every ``every`` rounds, up to ``stop_round`` (0: no end)."""

    num_partitions: int
    fraction: float
    seed: int
    pool: str = "fixed"
    start_round: int = 1
    every: int = 1
    stop_round: int = 0

    def attackers(self, server_round: int) -> list[int]:
        if server_round < self.start_round or (server_round - self.start_round) % self.every:
            return []
        if self.stop_round and server_round > self.stop_round:
            return []
        return select_attackers(self.num_partitions, self.fraction, self.seed,
                                server_round if self.pool == "fresh" else None)

    def rank(self, partition_id: int, server_round: int) -> int | None:
        """The partition's index among this round's attackers (None: it does not attack)."""
        pool = self.attackers(server_round)
        return pool.index(partition_id) if partition_id in pool else None


def eligible(labels: torch.Tensor, target_label: int, base_label: int) -> torch.Tensor:
    """Samples the backdoor is meant to redirect: the base class if one is set (the RLR setting),
    otherwise every sample whose label is not the target (all-to-one)."""
    return labels == base_label if base_label >= 0 else labels != target_label


def choose(labels: torch.Tensor, poison_rate: float, target_label: int, base_label: int, seed: int) -> torch.Tensor:
    """Indices of floor(poison_rate * #eligible) eligible samples, seeded."""
    if not 0.0 <= poison_rate <= 1.0:
        raise ValueError(f"poison-rate must be in [0, 1], got {poison_rate}")
    candidates = torch.nonzero(eligible(labels, target_label, base_label)).flatten().numpy()
    k = int(np.floor(poison_rate * len(candidates)))
    rng = np.random.default_rng(seed)
    return torch.as_tensor(np.sort(rng.choice(candidates, size=k, replace=False)), dtype=torch.long)


def poison_with_trigger(images: torch.Tensor, labels: torch.Tensor, trigger: Trigger | torch.Tensor,
                        poison_rate: float, target_label: int, base_label: int,
                        seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stamp the trigger (a ``Trigger`` or a bare mask) on ``poison_rate`` of the eligible samples
    and relabel them to the target. Returns (images, labels, poisoned indices); inputs untouched."""
    if isinstance(trigger, torch.Tensor):
        trigger = Trigger(mask=trigger)
    idx = choose(labels, poison_rate, target_label, base_label, seed)
    images, labels = images.clone(), labels.clone()
    if len(idx):
        images[idx] = trigger.apply(images[idx])
        labels[idx] = target_label
    return images, labels, idx


def relabel(labels: torch.Tensor, poison_rate: float, target_label: int, base_label: int,
            seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantic backdoor / label flipping: relabel ``poison_rate`` of the base-class samples to the
    target, with no trigger."""
    if base_label < 0:
        raise ValueError("the semantic attack needs base-label >= 0 (the class it redirects)")
    idx = choose(labels, poison_rate, target_label, base_label, seed)
    labels = labels.clone()
    labels[idx] = target_label
    return labels, idx


def poison_data(images: torch.Tensor, labels: torch.Tensor, attack: str, shape: tuple[int, int, int], *,
                poison_rate: float, target_label: int, base_label: int, seed: int, rank: int = 0,
                dba_pieces: int = 4, dba_trigger: str = "plus", blend_ratio: float = 0.1,
                trigger_file: str = "", trigger_seed: int = 0,
                num_classes: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply data attack ``attack`` to a client's data. DBA attackers plant piece ``rank % dba_pieces``
    of the ``dba_trigger``; label flipping maps every label l to num_classes - 1 - l, or with
    ``base_label`` >= 0 that class to ``target_label``. Returns (images, labels, poisoned indices)."""
    if attack == "none":
        return images, labels, torch.empty(0, dtype=torch.long)
    if attack == "labelflip":
        new_labels, idx = label_flip(labels, num_classes, poison_rate, base_label, target_label, seed)
        return images, new_labels, idx
    if attack == "semantic":
        new_labels, idx = relabel(labels, poison_rate, target_label, base_label, seed)
        return images, new_labels, idx
    if attack == "dba":
        trigger = make_trigger(dba_trigger, shape).pieces(dba_pieces)[rank % dba_pieces]
    else:
        trigger = make_trigger(attack, shape, seed=trigger_seed, blend_ratio=blend_ratio, trigger_file=trigger_file)
    return poison_with_trigger(images, labels, trigger, poison_rate, target_label, base_label, seed)
