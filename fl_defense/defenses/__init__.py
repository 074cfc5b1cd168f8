"""Defenses: pure rules over a round's updates matrix, one module per paper.

``DEFENSES`` is the registry the run config and the strategies use, name -> class; each class's
docstring names its paper and equations.
"""

from .base import Defense, DefenseResult
from .fdcr import FDCR
from .fedavg import FedAvg
from .fedward import Fedward
from .rlr import RLR
from .sdfc import SDFC

DEFENSES: dict[str, type[Defense]] = {
    FedAvg.name: FedAvg,  # McMahan et al., AISTATS 2017
    RLR.name: RLR,  # Ozdayi et al., AAAI 2021
    Fedward.name: Fedward,  # Chen et al., arXiv 2307.00356
    FDCR.name: FDCR,  # Huang et al., NeurIPS 2024
    SDFC.name: SDFC,  # Huang et al., ECCV 2024
}

__all__ = ["DEFENSES", "Defense", "DefenseResult", "FDCR", "FedAvg", "Fedward", "RLR", "SDFC"]
