"""Flower strategies, one per defense.

``fl_defense.strategies.RLR`` etc. are legacy-API strategies (``aggregate_fit``), drop-in for
``flwr.server.strategy.FedAvg``; ``fl_defense.strategies.message`` holds their Message-API twins
(``aggregate_train``), drop-in for ``flwr.serverapp.strategy.FedAvg``. Both run the same core.
"""

from .legacy import RLR, DefenseStrategy, FedAvg

STRATEGIES = {"fedavg": FedAvg, "rlr": RLR}

__all__ = ["STRATEGIES", "DefenseStrategy", "FedAvg", "RLR"]
