"""Defenses: pure rules over a round's updates matrix, one module per paper.

``DEFENSES`` is the registry the run config and the strategies use, name -> class; each class's
docstring names its paper and equations.
"""

from .alignins import AlignIns
from .backdoor_indicator import BackdoorIndicator
from .base import Defense, DefenseResult, RunKey, ServerContext
from .bucketing import Bucketing
from .centered_clipping import CenteredClipping
from .crfl import CRFL
from .deepsight import DeepSight
from .dnc import DnC
from .fdcr import FDCR
from .fedavg import FedAvg
from .fedward import Fedward
from .flame import FLAME
from .flare import FLARE
from .fldetector import FLDetector
from .fltrust import FLTrust
from .foolsgold import FoolsGold
from .freqfed import FreqFed
from .krum import Bulyan, Krum
from .multimetrics import MultiMetrics
from .nnm import NNM
from .norm_clipping import ClipNoise, NormClipping
from .rfa import RFA
from .rflbat import RFLBAT
from .rlr import RLR
from .robust_stats import Median, TrimmedMean
from .sdfc import SDFC
from .signguard import SignGuard
from .signsgd import SignSGD

DEFENSES: dict[str, type[Defense]] = {
    FedAvg.name: FedAvg,  # McMahan et al., AISTATS 2017
    RLR.name: RLR,  # Ozdayi et al., AAAI 2021
    Fedward.name: Fedward,  # Chen et al., arXiv 2307.00356
    FDCR.name: FDCR,  # Huang et al., NeurIPS 2024
    SDFC.name: SDFC,  # Huang et al., ECCV 2024
    # baselines
    Krum.name: Krum,  # Blanchard et al., NeurIPS 2017 (Multi-Krum with to_keep > 0)
    Bulyan.name: Bulyan,  # El Mhamdi et al., ICML 2018
    Median.name: Median,  # Yin et al., ICML 2018
    TrimmedMean.name: TrimmedMean,  # Yin et al., ICML 2018
    NormClipping.name: NormClipping,  # Sun et al. 2019
    SignSGD.name: SignSGD,  # Bernstein et al., ICLR 2019
    FoolsGold.name: FoolsGold,  # Fung et al., RAID 2020
    FLAME.name: FLAME,  # Nguyen et al., USENIX Security 2022
    FLTrust.name: FLTrust,  # Cao et al., NDSS 2021
    RFA.name: RFA,  # Pillutla, Kakade & Harchaoui, IEEE TSP 2022
    CenteredClipping.name: CenteredClipping,  # Karimireddy, He & Jaggi, ICML 2021
    DnC.name: DnC,  # Shejwalkar & Houmansadr, NDSS 2021
    SignGuard.name: SignGuard,  # Xu et al., ICDCS 2022
    MultiMetrics.name: MultiMetrics,  # Huang et al., ICCV 2023
    RFLBAT.name: RFLBAT,  # Wang, Xu & Fan, arXiv 2201.03772 (2022)
    AlignIns.name: AlignIns,  # Xu et al., CVPR 2025
    BackdoorIndicator.name: BackdoorIndicator,  # Li & Dai, USENIX Security 2024
    FLARE.name: FLARE,  # Wang et al., AsiaCCS 2022
    FLDetector.name: FLDetector,  # Zhang et al., KDD 2022
    CRFL.name: CRFL,  # Xie et al., ICML 2021
    DeepSight.name: DeepSight,  # Rieger et al., NDSS 2022
    FreqFed.name: FreqFed,  # Fereidooni et al., NDSS 2024
}

# Pre-aggregation wrappers around any defense (run config: pre-aggregation, bucket-size).
PRE_AGGREGATIONS: dict[str, type[Defense]] = {
    "bucketing": Bucketing,  # Karimireddy, He & Jaggi, ICLR 2022
    "nnm": NNM,  # Allouah et al., AISTATS 2023
}

__all__ = ["DEFENSES", "PRE_AGGREGATIONS", "AlignIns", "BackdoorIndicator", "FLARE", "Bucketing", "CenteredClipping", "CRFL", "DeepSight", "DnC", "FreqFed", "MultiMetrics", "NNM",
           "RFA", "RFLBAT", "RunKey", "ServerContext", "SignGuard", "Bulyan", "ClipNoise", "Defense", "DefenseResult", "FDCR", "FLAME", "FLDetector", "FLTrust", "FedAvg",
           "Fedward", "FoolsGold", "Krum", "Median", "NormClipping", "RLR", "SDFC", "SignSGD", "TrimmedMean"]
