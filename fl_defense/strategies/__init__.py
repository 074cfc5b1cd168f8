"""Flower strategies, one per defense.

``fl_defense.strategies.RLR`` etc. are legacy-API strategies (``aggregate_fit``), drop-in for
``flwr.server.strategy.FedAvg``; ``fl_defense.strategies.message`` holds their Message-API twins
(``aggregate_train``), drop-in for ``flwr.serverapp.strategy.FedAvg``. Both run the same core.
"""

from .legacy import (FDCR, FLAME, RLR, SDFC, Bulyan, DefenseStrategy, FedAvg, Fedward, FLTrust, FoolsGold, Krum,
                     Median, NormClipping, SignSGD, TrimmedMean)

STRATEGIES = {
    "fedavg": FedAvg, "rlr": RLR, "fedward": Fedward, "fdcr": FDCR, "sdfc": SDFC,
    "krum": Krum, "bulyan": Bulyan, "median": Median, "trimmed_mean": TrimmedMean,
    "norm_clipping": NormClipping, "signsgd": SignSGD, "foolsgold": FoolsGold, "flame": FLAME, "fltrust": FLTrust,
}

__all__ = ["STRATEGIES", "DefenseStrategy", *sorted(c.__name__ for c in STRATEGIES.values())]
