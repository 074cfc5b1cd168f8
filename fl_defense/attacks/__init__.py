"""Attacks: data poisoning (triggers, relabelling) and the seeded choice of attackers."""

from .poisoning import eligible, poison_with_trigger, select_attackers
from .triggers import TRIGGERS, apply_trigger, plus_mask, trigger_mask

ATTACKS = ("none",) + TRIGGERS

__all__ = ["ATTACKS", "TRIGGERS", "apply_trigger", "eligible", "plus_mask", "poison_with_trigger",
           "select_attackers", "trigger_mask"]
