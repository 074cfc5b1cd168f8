"""Model poisoning: how an attacking client alters the update it sends.

Each function maps (global vector, the client's trained vector) to the vector it reports, or
shapes training itself (projection for constrain-and-scale, a coordinate mask for Neurotoxin: the
``TrainingTerms`` that reach every stage of an attacker's training, a state-of-the-art backdoor's
own stages included). ``client_app/app.py`` applies them; each is a ``model-poisoning=`` choice
with a registry entry (``LocalAttack``) in ``LOCAL_MODEL_ATTACKS`` that declares the run-config
keys it reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from ..run_keys import RunKey, fraction, positive


def _no_problem(cfg) -> None:
    return None


@dataclass(frozen=True)
class TrainingTerms:
    """What model poisoning adds to an attacker's local training, in every stage that changes the
    model (``fl_defense.training.train``'s hooks): ``before_step(model)`` after backward
    (Neurotoxin's gradient mask), ``after_step(model)`` after each optimiser step (PGD's
    projection), ``penalty(model)``, a scalar added to every batch's loss (the evasion term, the
    Fisher penalty; SDFC's client-side calibration), and ``lr_scale``, the factor on the learning
    rate (evasion's alpha). A backdoor that trains a stage with its own loop applies them there
    (``attacks.sota.SotaBackdoor.train``)."""

    before_step: Callable | None = None
    after_step: Callable | None = None
    penalty: Callable | None = None
    lr_scale: float = 1.0

    def plus_penalty(self, extra: Callable | None) -> "TrainingTerms":
        """These terms with ``extra`` added to the penalty (after it)."""
        if extra is None:
            return self
        own = self.penalty
        return replace(self, penalty=extra if own is None else (lambda model: own(model) + extra(model)))

    def around(self, before_step: Callable | None = None, after_step: Callable | None = None) -> "TrainingTerms":
        """These terms with a stage's own hooks run after theirs (Chameleon's frozen encoder)."""
        return replace(self, before_step=_chain(self.before_step, before_step),
                       after_step=_chain(self.after_step, after_step))


def _chain(first: Callable | None, second: Callable | None) -> Callable | None:
    """One hook running ``first`` then ``second`` (either may be None)."""
    if first is None or second is None:
        return first or second
    return lambda model: (first(model), second(model))


@dataclass(frozen=True)
class LocalAttack:
    """A model attack one attacker runs alone (``model-poisoning=name``): the paper it follows,
    the run-config keys it reads (``run_config``: name -> ``RunKey`` with its default; read as
    ``cfg.<key with underscores>``), the keys it reads that another attack declares
    (``shared_keys``: parameter -> key) and ``check(cfg)``, the (key, message) of a configuration
    it cannot work with, or None (start-up validation)."""

    name: str
    paper: str = ""
    run_config: dict[str, RunKey] = field(default_factory=dict)
    shared_keys: dict[str, str] = field(default_factory=dict)
    check: Callable[[object], tuple[str, str] | None] = _no_problem


# boost and signflip scale by the same key
BOOST_FACTOR = RunKey("model-poisoning=boost: update scale; signflip: its magnitude", key="boost-factor",
                      check=positive, default=10.0)

# What one attacker does alone; the adaptive ones (attacks.adaptive) and the colluding attacks
# follow in attacks.MODEL_ATTACKS.
LOCAL_MODEL_ATTACKS: dict[str, LocalAttack] = {a.name: a for a in (
    LocalAttack("none", "no model poisoning: the attacker sends its trained update"),
    LocalAttack("boost", "Bhagoji et al., ICML 2019; Bagdasaryan et al., AISTATS 2020 (boosting, model replacement)",
                {"factor": BOOST_FACTOR}),
    LocalAttack("pgd", "Bagdasaryan et al., AISTATS 2020 (constrain-and-scale); Wang et al., NeurIPS 2020 (PGD)",
                {"bound": RunKey("model-poisoning=pgd: the L2 bound the attacker keeps to", key="attack-norm-bound",
                                 check=positive, default=1.0)},
                # Wang et al.'s model replacement boosts any PGD update; the edge-case backdoor declares it
                shared_keys={"replacement": "model-replacement"}),
    LocalAttack("neurotoxin", "Zhang et al., ICML 2022",
                {"ratio": RunKey("model-poisoning=neurotoxin: share of top benign coordinates left alone",
                                 check=fraction, default=0.1)}),
    LocalAttack("signflip", "Byzantine sign flipping", {"factor": BOOST_FACTOR}),
    LocalAttack("gaussian", "Byzantine Gaussian noise",
                {"std": RunKey("model-poisoning=gaussian: std of the random update", check=positive, default=0.1)}),
)}


def boost(global_vec: torch.Tensor, trained: torch.Tensor, factor: float) -> torch.Tensor:
    """Boosting / model replacement (Bhagoji et al. 2019; Bagdasaryan et al. 2020): scale the
    update by ``factor`` (n / eta replaces the global model under FedAvg)."""
    return global_vec + factor * (trained - global_vec)


def project_to_ball(global_vec: torch.Tensor, current: torch.Tensor, bound: float) -> torch.Tensor:
    """Project ``current`` onto the L2 ball of radius ``bound`` around the global vector."""
    delta = current - global_vec
    norm = torch.linalg.vector_norm(delta)
    return current if norm <= bound else global_vec + delta * (bound / norm)


def scale_to_bound(global_vec: torch.Tensor, trained: torch.Tensor, bound: float) -> torch.Tensor:
    """Constrain-and-scale's final step: stretch the update to exactly the bound it knows."""
    delta = trained - global_vec
    norm = torch.linalg.vector_norm(delta)
    return trained if norm == 0 else global_vec + delta * (bound / norm)


def neurotoxin_mask(benign_update: torch.Tensor, top_ratio: float) -> torch.Tensor:
    """Neurotoxin (Zhang et al., ICML 2022): the coordinates the attacker may change: all but the
    ``top_ratio`` share with the largest benign update magnitude (those benign clients keep
    rewriting, which would erase the backdoor)."""
    d = benign_update.numel()
    k = int(round(top_ratio * d))
    allowed = torch.ones(d, dtype=torch.bool)
    if k > 0:
        allowed[torch.topk(benign_update.abs(), k).indices] = False
    return allowed


def sign_flip(global_vec: torch.Tensor, trained: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
    """Byzantine sign flipping: report -factor times the honest update."""
    return global_vec - factor * (trained - global_vec)


def gaussian_update(global_vec: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    """Byzantine noise: an update drawn from N(0, std^2), ignoring training."""
    gen = torch.Generator().manual_seed(seed)
    return global_vec + std * torch.randn(global_vec.shape, generator=gen)
