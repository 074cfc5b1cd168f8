"""Flower strategies, one per defense.

``fl_defense.strategies.RLR`` etc. are legacy-API strategies (``aggregate_fit``), drop-in for
``flwr.server.strategy.FedAvg``; ``fl_defense.strategies.message`` holds their Message-API twins
(``aggregate_train``, same names), drop-in for ``flwr.serverapp.strategy.FedAvg``. Both run the
same core (``fl_defense.rounds``). Flower's class names for the same rules are aliases:
``FedMedian`` (``Median``), ``FedTrimmedAvg`` (``TrimmedMean``), ``MultiKrum`` (``Krum``).
"""

from . import legacy
from .legacy import FLOWER_ALIASES, STRATEGIES, DefenseStrategy

globals().update({cls.__name__: cls for cls in STRATEGIES.values()})
globals().update(FLOWER_ALIASES)

__all__ = ["STRATEGIES", "DefenseStrategy", *sorted(c.__name__ for c in STRATEGIES.values()), *sorted(FLOWER_ALIASES)]
