"""Attacks: data poisoning (triggers, DBA, semantic), model poisoning, and who attacks when."""

from .model_poisoning import (MODEL_ATTACKS, boost, gaussian_update, neurotoxin_mask, project_to_ball,
                              scale_to_bound, sign_flip)
from .poisoning import (DATA_ATTACKS, POOLS, AttackSchedule, eligible, poison_data, poison_with_trigger, relabel,
                        select_attackers)
from .triggers import TRIGGERS, Trigger, apply_trigger, make_trigger, plus_mask, trigger_mask

ATTACKS = DATA_ATTACKS

__all__ = ["ATTACKS", "DATA_ATTACKS", "MODEL_ATTACKS", "POOLS", "TRIGGERS", "AttackSchedule", "Trigger",
           "apply_trigger", "boost", "eligible", "gaussian_update", "make_trigger", "neurotoxin_mask",
           "plus_mask", "poison_data", "poison_with_trigger", "project_to_ball", "relabel", "scale_to_bound",
           "select_attackers", "sign_flip", "trigger_mask"]
