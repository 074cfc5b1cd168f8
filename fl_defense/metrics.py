"""Evaluation metrics: main-task accuracy, attack success rate, detection TPR/FPR.

Detection counts come from ``RoundRecord.detection`` (flagged vs ground truth, which only the
evaluation layer reads).
"""

from __future__ import annotations

import torch
from torch import nn

from .attacks import SOTA_BACKDOORS, Trigger, eligible, make_trigger
from .training import predict


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: str = "cpu") -> float:
    if len(labels) == 0:
        return float("nan")
    return float((predict(model, images, device=device) == labels).float().mean())


def attack_success_rate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                        trigger: Trigger | torch.Tensor | None, target_label: int, base_label: int = -1,
                        device: str = "cpu") -> float:
    """Share of test images whose true label is not the target (and is the base class, when one is
    set) that the model classifies as the target once the trigger is applied (``trigger=None``: as
    they are, the semantic backdoor's measure). A bare mask is stamped with 1.0. A probe with its own
    ``success_rate`` (the edge-case backdoor's held-out tail) measures itself."""
    if hasattr(trigger, "success_rate"):
        return trigger.success_rate(model, images, labels, target_label, base_label, device)
    keep = eligible(labels, target_label, base_label)
    if not bool(keep.any()):
        return float("nan")
    x = images[keep]
    if isinstance(trigger, torch.Tensor):
        trigger = Trigger(mask=trigger)
    if trigger is not None:
        x = trigger.apply(x)
    preds = predict(model, x, device=device)
    return float((preds == target_label).float().mean())


def untriggered_figures(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, target_label: int,
                        base_label: int = -1, floor: bool = True, device: str = "cpu") -> dict[str, float]:
    """``accuracy`` and, from the same predictions (one pass over the test images instead of up to
    three), ``clean_target_rate`` (when ``floor``: the eligible images classified as the target
    without a trigger, ``attack_success_rate(..., trigger=None)``) and ``base_class_accuracy`` (when
    a base class is set). The same figures as the separate calls: a prediction does not depend on
    the other images of its batch."""
    if len(labels) == 0:
        return {"accuracy": float("nan")}
    preds = predict(model, images, device=device)
    out = {"accuracy": _share(preds == labels)}
    if floor:
        out["clean_target_rate"] = _share(preds[eligible(labels, target_label, base_label)] == target_label)
    if base_label >= 0:
        base = labels == base_label
        out["base_class_accuracy"] = _share(preds[base] == labels[base])
    return out


def _share(hits: torch.Tensor) -> float:
    """The share of True in ``hits``; NaN when there is none to count."""
    return float(hits.float().mean()) if len(hits) else float("nan")


def attack_probes(cfg, shape: tuple[int, int, int]) -> dict[str, Trigger | None]:
    """What the central evaluation measures for the configured attack: name -> trigger (None: the
    untriggered base class). ``attack_success_rate`` is the first entry; DBA adds one per piece.
    With no data attack the RLR plus trigger is measured as a reference (a clean model's rate)."""
    if cfg.attack in SOTA_BACKDOORS:  # its trigger (A3FL, IBA: as first initialised) or held-out tail
        return {"attack_success_rate": SOTA_BACKDOORS[cfg.attack].probe(cfg, shape)}
    if cfg.attack in ("semantic", "labelflip"):  # no trigger: the untriggered base class (or every class)
        return {"attack_success_rate": None}
    if cfg.attack == "dba":
        full = make_trigger(cfg.dba_trigger, shape)
        probes = {"attack_success_rate": full}
        probes.update({f"asr_piece_{i}": p for i, p in enumerate(full.pieces(cfg.dba_pieces))})
        return probes
    name = "plus" if cfg.attack == "none" else cfg.attack
    return {"attack_success_rate": make_trigger(name, shape, seed=cfg.seed, blend_ratio=cfg.blend_ratio,
                                                trigger_file=cfg.trigger_file)}
