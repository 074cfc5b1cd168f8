"""Flower strategies, one per defense.

``fl_defense.strategies.RLR`` etc. are legacy-API strategies (``aggregate_fit``), drop-in for
``flwr.server.strategy.FedAvg``; ``fl_defense.strategies.message`` holds their Message-API twins
(``aggregate_train``, same names), drop-in for ``flwr.serverapp.strategy.FedAvg``. Both run the
same core (``fl_defense.rounds``).
"""

from .legacy import (FDCR, FLAME, RLR, SDFC, STRATEGIES, Bulyan, DefenseStrategy, FedAvg, Fedward, FLTrust,
                     FoolsGold, Krum, Median, NormClipping, SignSGD, TrimmedMean)

__all__ = ["STRATEGIES", "DefenseStrategy", *sorted(c.__name__ for c in STRATEGIES.values())]
