"""Defenses: pure rules over a round's updates matrix, one module per paper.

``DEFENSES`` is the registry the run config and the strategies use, name -> class; each class's
docstring names its paper and equations.
"""

from .base import Defense, DefenseResult
from .fedavg import FedAvg
from .rlr import RLR

DEFENSES: dict[str, type[Defense]] = {
    FedAvg.name: FedAvg,  # McMahan et al. 2017
    RLR.name: RLR,  # Ozdayi et al., AAAI 2021
}

__all__ = ["DEFENSES", "Defense", "DefenseResult", "FedAvg", "RLR"]
