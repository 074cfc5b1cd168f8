"""Run-config declarations: how a defense's or an attack's parameter appears in the run config.

A defense or an attack declares its keys beside its code (``run_config = {"param": RunKey(...)}``);
``fl_defense/config.py`` builds every such key, its validation and its docs from those
declarations, so adding one is one module plus one registry line. No Flower, no torch: both
``fl_defense.defenses`` and ``fl_defense.attacks`` import it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RunKey:
    """How one parameter of a defense or an attack appears in the run config: its help text, and
    optionally its key (default ``<defense or attack name>-<parameter>``, hyphens for
    underscores), the accepted values, a range check and a run-config default other than
    ``__init__``'s (an attack that is not built from keyword arguments gives it here)."""

    doc: str
    key: str | None = None
    choices: tuple | Callable[[], tuple] | None = None
    check: Callable[[object], bool] | None = None
    default: object = None


def positive(v) -> bool:
    return v > 0


def non_negative(v) -> bool:
    return v >= 0


def fraction(v) -> bool:
    return 0.0 <= v <= 1.0


def attack_keys(attack) -> list[tuple[str, str, object, RunKey | None]]:
    """(parameter, run-config key, default, declaration) of every key attack ``attack`` reads.

    ``attack`` is a class (a colluding attack, a backdoor) or a registry entry with ``name`` and
    ``run_config`` (a one-attacker model attack). A class's declarations are those of its bases
    and its own, base first (a subclass's entry for a parameter replaces its base's); a key
    defaults to ``<name of the declaring attack>-<parameter>``, so a subclass keeps its base's
    keys. The default is the RunKey's, else ``__init__``'s. Then come the parameters an attack
    reads from keys declared elsewhere (``shared_keys``: parameter -> key, e.g. the adaptive
    attack's ``rlr-theta``), with ``None`` as default and declaration. Constructor parameters
    declared nowhere keep their ``__init__`` defaults."""
    if isinstance(attack, type):
        owners = [c for c in reversed(attack.__mro__) if "run_config" in vars(c)]
        declared = {param: (c.name, spec) for c in owners for param, spec in vars(c)["run_config"].items()}
        init = inspect.signature(attack.__init__).parameters
        defaults = {p.name: p.default for p in init.values() if p.default is not inspect.Parameter.empty}
        label = attack.__name__
    else:
        declared = {param: (attack.name, spec) for param, spec in attack.run_config.items()}
        defaults, label = {}, attack.name
    out = []
    for param, (owner, spec) in declared.items():
        default = spec.default if spec.default is not None else defaults.get(param)
        if default is None:
            raise TypeError(f"{label}.{param}: give its default (RunKey(default=...)); it is no "
                            f"__init__ parameter with one")
        out.append((param, spec.key or f"{owner}-{param}".replace("_", "-"), default, spec))
    out += [(param, key, None, None) for param, key in getattr(attack, "shared_keys", {}).items()]
    return out


__all__ = ["RunKey", "attack_keys", "fraction", "non_negative", "positive"]
