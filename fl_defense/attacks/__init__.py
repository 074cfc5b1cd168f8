"""Attacks: data poisoning (triggers, DBA, semantic, label flipping), model poisoning (one attacker
alone, or colluding attackers crafting from what they know: COLLUDING_ATTACKS), and who attacks when.

Each attack declares the run-config keys it reads beside its code (``run_config`` of ``RunKey``);
its registry (COLLUDING_ATTACKS and SOTA_BACKDOORS below, LOCAL_MODEL_ATTACKS in model_poisoning.py,
ADAPTIVE_LOCAL_ATTACKS in adaptive.py) is the one place it is listed, and config.py builds the keys,
their validation and docs from the registries (ATTACK_KEYS)."""

from .adaptive import ADAPTIVE_LOCAL_ATTACKS, EVASION_DISTANCES, FISHER_FORGERIES, RLRAdaptive
from .alie import ALIE, ALIEBackdoor, alie_z
from .base import KNOWLEDGE, TARGETS, AttackRound, ColludingAttack
from .fang import Fang
from .ipm import IPM
from .label_flipping import flip_labels, label_flip
from .min_max import DIRECTIONS, MinMax, MinSum
from .model_poisoning import (LOCAL_MODEL_ATTACKS, LocalAttack, TrainingTerms, boost, gaussian_update,
                              neurotoxin_mask, project_to_ball, scale_to_bound, sign_flip)
from .poisoning import (DATA_ATTACKS, POOLS, AttackSchedule, eligible, poison_data, poison_with_trigger, relabel,
                        select_attackers)
from .triggers import TRIGGERS, Trigger, apply_trigger, make_trigger, plus_mask, trigger_mask
from .a3fl import A3FL
from .chameleon import CHAMELEON_TRIGGERS, Chameleon
from .edge_case import EdgeCase
from .iba import IBA
from .sota import PROBE_KEY, SotaBackdoor

ATTACKS = DATA_ATTACKS

# Colluding model poisoning: crafted from what the attackers know of the round (base.AttackRound)
COLLUDING_ATTACKS: dict[str, type[ColludingAttack]] = {
    "alie": ALIE,                    # Baruch et al., NeurIPS 2019 (Alg. 1)
    "alie_backdoor": ALIEBackdoor,   # Baruch et al., NeurIPS 2019 (sec. 4, Alg. 2)
    "ipm": IPM,                      # Xie et al., UAI 2020
    "min_max": MinMax,               # Shejwalkar & Houmansadr, NDSS 2021 (eq. 6; targets krum, trimmed_mean, median: its AGR-tailored attacks)
    "min_sum": MinSum,               # Shejwalkar & Houmansadr, NDSS 2021 (eq. 7)
    "fang": Fang,                    # Fang et al., USENIX Security 2020 (Krum: sec. 3.3; trim/median: sec. 3.4)
    "rlr_adaptive": RLRAdaptive,     # adaptive to RLR, Ozdayi et al., AAAI 2021 (eq. 5): push where the vote clears theta
}
# State-of-the-art backdoors: attack choices that shape their own poison and training (sota.SotaBackdoor)
SOTA_BACKDOORS: dict[str, type[SotaBackdoor]] = {
    "edge_case": EdgeCase,           # Wang et al., NeurIPS 2020 (sec. 3; PGD and model replacement)
    "a3fl": A3FL,                    # Zhang et al., NeurIPS 2023 (Alg. 1)
    "chameleon": Chameleon,          # Dai & Li, ICML 2023 (sec. 4, two stages)
    "iba": IBA,                      # Nguyen et al., NeurIPS 2023 (trigger generator)
}
# Every model-poisoning= choice: one attacker alone (model_poisoning.LOCAL_MODEL_ATTACKS, then the
# adaptive ones of adaptive.ADAPTIVE_LOCAL_ATTACKS), then the colluding attacks
MODEL_ATTACKS = (*LOCAL_MODEL_ATTACKS, *ADAPTIVE_LOCAL_ATTACKS, *COLLUDING_ATTACKS)


def make_colluding(name: str, **params) -> ColludingAttack:
    """Attack ``name`` with those of ``params`` its constructor takes (the others are ignored)."""
    cls = COLLUDING_ATTACKS[name]
    return cls(**{k: v for k, v in params.items() if k in cls.param_names()})

__all__ = ["ADAPTIVE_LOCAL_ATTACKS", "EVASION_DISTANCES", "FISHER_FORGERIES", "RLRAdaptive", "ALIE", "ATTACKS", "COLLUDING_ATTACKS", "DATA_ATTACKS", "DIRECTIONS", "IPM", "KNOWLEDGE",
           "LOCAL_MODEL_ATTACKS", "LocalAttack", "MODEL_ATTACKS", "TARGETS", "ALIEBackdoor", "AttackRound", "ColludingAttack",
           "Fang", "MinMax", "MinSum", "alie_z", "flip_labels", "label_flip", "make_colluding", "POOLS", "TRIGGERS", "AttackSchedule", "Trigger",
           "apply_trigger", "boost", "eligible", "gaussian_update", "make_trigger", "neurotoxin_mask",
           "plus_mask", "poison_data", "poison_with_trigger", "project_to_ball", "relabel", "scale_to_bound",
           "select_attackers", "sign_flip", "trigger_mask", "TrainingTerms",
           "A3FL", "CHAMELEON_TRIGGERS", "Chameleon", "EdgeCase", "IBA", "PROBE_KEY", "SOTA_BACKDOORS", "SotaBackdoor"]
