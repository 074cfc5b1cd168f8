"""What both Flower adapters share: building the defense from keyword arguments."""

from __future__ import annotations

from ..defenses.base import Defense
from ..rounds import DefendedAggregation

# Keyword arguments of the adapters themselves (not of Flower's FedAvg, not of the defense).
CORE_KWARGS = ("trainable", "device", "min_valid_clients", "max_update_norm", "keep_workspace")


def split_kwargs(defense_class: type[Defense] | None, defense: Defense | None,
                 kwargs: dict) -> tuple[DefendedAggregation, dict]:
    """Pop defense and core arguments out of ``kwargs``; what is left goes to Flower's FedAvg."""
    core = {k: kwargs.pop(k) for k in CORE_KWARGS if k in kwargs}
    if defense is None:
        if defense_class is None:
            raise TypeError("pass defense=<a Defense instance> or use a concrete strategy class")
        own = {k: kwargs.pop(k) for k in defense_class.param_names() if k in kwargs}
        defense = defense_class(**own)
    aggregation = DefendedAggregation(
        defense,
        trainable=core.get("trainable"),
        device=core.get("device", "cpu"),
        min_clients=core.get("min_valid_clients", 1),
        max_update_norm=core.get("max_update_norm", 0.0),
        keep_workspace=core.get("keep_workspace", True),
    )
    return aggregation, kwargs


class DefenseAdapter:
    """What both adapters expose on top of Flower's FedAvg: the defense, its per-round records,
    and a one-time check that the configuration can work with the number of clients sampled."""

    aggregation: DefendedAggregation
    _checked_sample_size: int | None = None

    @property
    def defense(self) -> Defense:
        return self.aggregation.defense

    @property
    def records(self):
        return self.aggregation.records

    def __repr__(self) -> str:
        return f"{type(self).__name__}(defense={self.defense!r})"

    def _check_sample_size(self, n: int) -> None:
        """A configuration that cannot work with ``n`` clients fails when the round is configured,
        not silently later (checked again only when the sample size changes)."""
        if n and self._checked_sample_size != n:
            self.defense.check_num_clients(n)
            self._checked_sample_size = n
