"""Flower strategies, one per defense.

``fl_defense.strategies.RLR`` etc. are legacy-API strategies (``aggregate_fit``), drop-in for
``flwr.server.strategy.FedAvg``; ``fl_defense.strategies.message`` holds their Message-API twins
(``aggregate_train``), drop-in for ``flwr.serverapp.strategy.FedAvg``. Both run the same core.
"""

from .legacy import FDCR, RLR, SDFC, DefenseStrategy, FedAvg, Fedward

STRATEGIES = {"fedavg": FedAvg, "rlr": RLR, "fedward": Fedward, "fdcr": FDCR, "sdfc": SDFC}

__all__ = ["FDCR", "RLR", "SDFC", "STRATEGIES", "DefenseStrategy", "FedAvg", "Fedward"]
