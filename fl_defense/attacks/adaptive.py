"""Adaptive attacks against the seed defenses (issue 18): attackers who know the defense.

The seed papers name the adaptive attacker as their open question; each attack here is shaped by
the rule of one defense and is a run-config choice.

- ``RLRAdaptive`` (``model-poisoning=rlr_adaptive``), against RLR (Ozdayi et al., AAAI 2021,
  eq. 5): the colluders push only on the coordinates whose sign vote they expect to clear theta,
  so the server applies their push with +eta instead of flipping it.
- Fisher forgery beyond ``clean`` (``fisher-forgery=mimic|noise``), against FDCR (Huang et al.,
  NeurIPS 2024) and SDFC (Huang et al., ECCV 2024): ``mimic_fisher`` and ``noise_fisher``.
- ``fisher_penalty`` (``model-poisoning=fisher_penalty``), against FDCR and SDFC: poisoned training
  with lambda * sum_i F_i (theta_i - theta_ref_i)^2 added to the loss, which keeps the
  importance-weighted update g = delta (.) I (FDCR's eq. 7) near the benign one.
- ``evasion`` (``model-poisoning=evasion``), against Fedward (Euclidean distances between updates)
  and FLAME (cosine distances between models): Bagdasaryan et al., AISTATS 2020, constrain-and-scale section,
  "Evading anomaly detection": loss = alpha L_class + (1 - alpha) L_ano, then norm matching.

``fisher_penalty`` and ``evasion`` are ``TrainingTerms`` (``adaptive_terms``) plus a last step on
the trained update (``adaptive_report``), so with a state-of-the-art backdoor (``attack=a3fl``,
``chameleon``, ...) their term reaches every stage of the backdoor's own training
(``attacks.sota``: after A3FL's and IBA's trigger optimisation, both of Chameleon's stages).

Scale: these attacks cost at most one extra honest training pass and one Fisher diagonal per
attacker and round (``HonestShadow``), so they run at the papers' own local budget; only the
federation (clients, rounds) is scaled down in the grids (see docs/attacks.md).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

from ..run_keys import RunKey, positive
from .base import AttackRound, ColludingAttack
from .model_poisoning import LocalAttack, TrainingTerms

FISHER_FORGERIES = ("none", "clean", "mimic", "noise")
EVASION_DISTANCES = ("l2", "cosine")


def _penalty_converges(cfg) -> tuple[str, str] | None:
    if cfg.fisher_penalty_lambda * cfg.learning_rate >= 1:
        return "fisher-penalty-lambda", (f"{cfg.fisher_penalty_lambda} times learning-rate {cfg.learning_rate} "
                                         f"must be < 1 (SGD on the quadratic penalty diverges where 2 lr lambda "
                                         f"I_i >= 2)")
    return None


# One attacker alone, a term in its own training (``adaptive_terms``, then ``adaptive_report``);
# model-poisoning choices after model_poisoning.LOCAL_MODEL_ATTACKS.
ADAPTIVE_LOCAL_ATTACKS: dict[str, LocalAttack] = {a.name: a for a in (
    LocalAttack("fisher_penalty", "adaptive to FDCR (Huang et al., NeurIPS 2024) and SDFC (Huang et al., ECCV 2024)",
                {"lambda": RunKey("model-poisoning=fisher_penalty: lambda in loss + lambda * sum_i I_i "
                                  "(theta_i - theta_ref_i)^2", check=positive, default=1.0)},
                check=_penalty_converges),
    LocalAttack("evasion", "Bagdasaryan et al., AISTATS 2020 (evading anomaly detection)", {
        "alpha": RunKey("model-poisoning=evasion: alpha in alpha * L_class + (1 - alpha) * L_ano, in (0, 1] "
                        "(1: no evasion term)", check=lambda v: 0 < v <= 1, default=0.7),
        "distance": RunKey("model-poisoning=evasion: L_ano, the local model's L2 or cosine distance to the "
                           "global model", choices=EVASION_DISTANCES, default="l2"),
        "norm_match": RunKey("model-poisoning=evasion: rescale the update to the norm of the attacker's honest "
                             "update", default=True)}),
)}


# --- RLR -------------------------------------------------------------------------------------------

def sign_sum(x: torch.Tensor) -> torch.Tensor:
    """Per-coordinate sum of the rows' signs (float64; sign(0) = 0, as RLR's vote counts it)."""
    return torch.sign(x).double().sum(dim=0)


class RLRAdaptive(ColludingAttack):
    """RLR-adaptive backdoor: push only where the benign sign vote already clears theta.

    RLR (Ozdayi et al., AAAI 2021, eq. 5) gives coordinate j the server learning rate +eta when
    abs(sum_k sign(delta_k,j)) >= theta over the n updates of the round, and -eta otherwise, so a
    backdoor pushed on coordinates the benign clients disagree on is reversed. Each colluder
    trains on its poisoned data (its update p_a) and honestly on its clean data (h_a); with n
    clients, m colluders and theta = ``theta`` (the defense's ``rlr-theta``, known to an adaptive
    attacker):

    - B_j, the estimated benign vote, the sign sum of the n - m benign updates on coordinate j:
      - ``full`` knowledge: the exact sum over the round's benign updates, sum_k sign(delta_k,j);
      - ``partial`` knowledge: (n - m) * s_j with s_j = (1/m) sum_a sign(h_a,j), the colluders'
        mean honest sign. It is the expected vote of n - m benign clients whose signs follow the
        colluders' own clean-data signs: each agrees with sign(s_j) with the probability the
        colluders' honest updates do. With m = 1 it is (n - 1) sign(h_j): the attacker assumes
        every benign client agrees with its honest sign (the most optimistic estimate).
    - A_j = sum_a sign(p_a,j), the colluders' own vote on j if they push there.
    - The targeted coordinates T = {j : abs(B_j) >= theta and abs(B_j + A_j) >= theta}: the
      benign consensus clears theta without them, and their push does not pull it back below.

    Every colluder sends p_a on T and exactly 0 elsewhere (a zero update adds no vote, so outside
    T the server's vote is the benign one). With full knowledge the server's vote on T is
    B_j + A_j, so RLR applies the pushes there with +eta; with partial knowledge only as far as
    the estimate holds. ``last_targeted`` is the share of coordinates in T.

    ``boost`` (run-config key ``rlr-adaptive-boost``, default 1: none) composes it with boosting
    (Bagdasaryan et al., AISTATS 2020, model replacement): the push on T is multiplied by the
    factor. A positive factor keeps every sign, so T is the same set; under the benchmark
    protocol one attacker is about a tenth of the aggregate and only a boosted backdoor implants
    (the leaderboard's boost column), so this is the adaptive form of that attacker."""

    name = "rlr_adaptive"
    paper = "adaptive to Ozdayi et al., AAAI 2021 (eq. 5)"
    uses_poisoned = True
    shared_keys = {"theta": "rlr-theta"}  # the defense's own key: the attacker knows the defense
    run_config = {"boost": RunKey("model-poisoning=rlr_adaptive: factor the push on the targeted coordinates is "
                                  "multiplied by (model replacement; 1: none)", key="rlr-adaptive-boost",
                                  check=lambda v: v >= 1, default=1.0)}

    def __init__(self, theta: int = 4, boost: float = 1.0) -> None:
        self.theta = theta
        self.boost = boost
        self.last_targeted: float | None = None

    def benign_votes(self, known: torch.Tensor, rnd: AttackRound) -> torch.Tensor:
        """B: the estimated sign sum of the round's benign updates, per coordinate (float64)."""
        m = rnd.num_attackers
        if rnd.knowledge == "full" and known.shape[0] > m:
            return sign_sum(known[m:])
        return (rnd.num_clients - m) * sign_sum(known[:m]) / m

    def targeted(self, known: torch.Tensor, rnd: AttackRound) -> torch.Tensor:
        """T as a boolean d-vector (see the class doc)."""
        if rnd.poisoned is None:
            raise ValueError("rlr_adaptive needs the attackers' poisoned updates")
        benign = self.benign_votes(known, rnd)
        with_them = benign + sign_sum(rnd.poisoned)
        return (benign.abs() >= self.theta) & (with_them.abs() >= self.theta)

    def craft(self, known: torch.Tensor, rnd: AttackRound) -> torch.Tensor:
        mask = self.targeted(known, rnd)
        self.last_targeted = float(mask.double().mean())
        out = rnd.poisoned * mask.to(rnd.poisoned.dtype)
        return out.mul_(self.boost) if self.boost != 1 else out


# --- Fisher forgery (FDCR, SDFC) ---------------------------------------------------------------------

def noise_fisher(dim: int, seed: int) -> np.ndarray:
    """``fisher-forgery=noise``: d values drawn i.i.d. uniform on [0, 1), seeded. After FDCR's
    min-max normalisation (I_k, its eq. 6) the vector is again i.i.d. uniform, the noise FDCR's
    released server writes over the attackers' Fisher from the ground-truth attacker list: sent by
    the attacker, the same condition arises without the server reading ground truth."""
    return np.random.default_rng(seed).random(dim, dtype=np.float32)


def mimic_fisher(own: np.ndarray, benign: np.ndarray) -> np.ndarray:
    """``fisher-forgery=mimic``: ``own`` (the Fisher of the attacker's trained, poisoned model on
    its clean samples) mapped onto the distribution of ``benign`` (the Fisher of its honestly
    trained model on its clean data) by quantile matching: the coordinate holding own's k-th
    smallest value gets benign's k-th smallest (ties broken by index). The result has exactly the
    benign vector's values, so its mean, variance, minimum, maximum and every quantile, while
    keeping the ranking of importance of the model the attacker sends. Partial knowledge only: a
    benign peer's Fisher would have to travel from the peer to the attacker within the round, and
    the collusion step (``attacks.collusion``) exchanges updates, not Fisher payloads, and runs
    only for colluding model poisoning."""
    own, benign = np.asarray(own, dtype=np.float32).reshape(-1), np.asarray(benign, dtype=np.float32).reshape(-1)
    if own.shape != benign.shape:
        raise ValueError(f"mimic: the Fishers differ in length ({own.size} vs {benign.size})")
    out = np.empty_like(own)
    out[np.argsort(own, kind="stable")] = np.sort(benign)
    return out


def minmax_importance(fisher: np.ndarray | torch.Tensor) -> torch.Tensor:
    """FDCR's parameter importance I = min-max normalised Fisher (eq. 6); a constant vector gives 0."""
    f = torch.as_tensor(np.asarray(fisher), dtype=torch.float32).reshape(-1)
    span = f.max() - f.min()
    return (f - f.min()) / span if span > 0 else torch.zeros_like(f)


# --- the attacker's honest reference -----------------------------------------------------------------

class HonestShadow:
    """What the attacker would have sent had it been honest this round: its model trained on its
    clean data from the global ``parameters`` (same epochs, batches and seed as its real
    training), computed on first use. ``update`` is that model's trainable vector minus the
    global one; ``fisher`` its empirical Fisher diagonal on the clean data."""

    def __init__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg, seed: int,
                 device: str = "cpu") -> None:
        self._global = copy.deepcopy(model)  # taken now: ``model`` is trained in place afterwards
        self._start = trainable_vector(self._global).clone()
        self.images, self.labels = images, labels
        self.cfg, self.seed, self.device = cfg, seed, device
        self._model: nn.Module | None = None
        self._fisher: np.ndarray | None = None

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            from ..training import train

            cfg = self.cfg
            shadow = self._global
            torch.manual_seed(self.seed)
            train(shadow, self.images, self.labels, cfg.local_epochs, cfg.batch_size, cfg.learning_rate,
                  cfg.momentum, self.device, self.seed)
            self._model = shadow.to("cpu")
        return self._model

    @property
    def update(self) -> torch.Tensor:
        return trainable_vector(self.model) - self._start

    @property
    def fisher(self) -> np.ndarray:
        if self._fisher is None:
            from ..fisher import empirical_fisher

            self._fisher = empirical_fisher(self.model, self.images, self.labels, max_samples=self.cfg.fisher_samples)
        return self._fisher


def trainable_vector(model: nn.Module) -> torch.Tensor:
    return parameters_to_vector([p for p in model.parameters() if p.requires_grad]).detach()


# --- penalties and the local adaptive fit --------------------------------------------------------------

def fisher_penalty(params: list[nn.Parameter], reference: torch.Tensor, importance: torch.Tensor,
                   lam: float) -> Callable[[nn.Module], torch.Tensor]:
    """lambda * sum_i F_i (theta_i - theta_ref_i)^2 over the trainable vector theta.

    F = ``importance`` (the attacker's honest Fisher, min-max normalised as FDCR's I), theta_ref =
    ``reference`` = global + the attacker's estimate of the benign update (its own honest update:
    partial knowledge; the round's benign updates are not known while it trains). Pulling the
    poisoned model towards theta_ref on the coordinates FDCR weighs most keeps its
    importance-weighted update delta (.) I near the benign ones (FDCR's discrepancy V_k, eq. 9)."""
    ref, weight = reference.detach().clone(), importance.detach().clone()

    def penalty(model: nn.Module) -> torch.Tensor:
        theta = torch.cat([p.reshape(-1) for p in params])
        return lam * (weight.to(theta) * (theta - ref.to(theta)) ** 2).sum()

    return penalty


def anomaly_loss(kind: str, params: list[nn.Parameter], global_vec: torch.Tensor) -> Callable[[nn.Module], torch.Tensor]:
    """Bagdasaryan et al.'s L_ano, the local model's distance to the global model: ``l2``,
    ||theta - theta_G||_2 (what Fedward's Euclidean distances between updates see), or ``cosine``,
    1 - cos(theta, theta_G) over the whole trainable vectors (FLAME's cosine distance between
    models)."""
    if kind not in EVASION_DISTANCES:
        raise ValueError(f"evasion distance must be one of {EVASION_DISTANCES}, got {kind!r}")
    g = global_vec.detach().clone()

    def loss(model: nn.Module) -> torch.Tensor:
        theta = torch.cat([p.reshape(-1) for p in params])
        if kind == "l2":
            return torch.linalg.vector_norm(theta - g.to(theta))
        return 1 - torch.nn.functional.cosine_similarity(theta, g.to(theta), dim=0)

    return loss


def match_norm(global_vec: torch.Tensor, trained: torch.Tensor, norm: float) -> torch.Tensor:
    """Norm matching: the update trained - global rescaled to L2 norm ``norm`` (unchanged if zero)."""
    delta = trained - global_vec
    current = torch.linalg.vector_norm(delta)
    return trained if current == 0 else global_vec + delta * (norm / current)


def adaptive_terms(mode: str, params: list[nn.Parameter], global_vec: torch.Tensor, cfg,
                   honest: HonestShadow) -> TrainingTerms:
    """What ``mode`` adds to the attacker's training on its (poisoned) data, in every stage of it (a
    state-of-the-art backdoor's own stages included: ``attacks.sota``); ``params`` the trainable
    parameters, holding ``global_vec``:

    - ``fisher_penalty``: loss + ``fisher_penalty`` with lambda = ``fisher-penalty-lambda``.
    - ``evasion``: SGD on alpha L + (1 - alpha) L_ano (``evasion-alpha``, ``evasion-distance``; L
      the stage's own loss, L_class in plain training), run as SGD with learning rate alpha * eta
      on L + ((1 - alpha) / alpha) L_ano, the same steps (momentum included: its buffer is linear
      in the gradients)."""
    if mode not in ADAPTIVE_LOCAL_ATTACKS:
        raise ValueError(f"adaptive mode must be one of {tuple(ADAPTIVE_LOCAL_ATTACKS)}, got {mode!r}")
    if mode == "fisher_penalty":
        return TrainingTerms(penalty=fisher_penalty(params, global_vec + honest.update,
                                                    minmax_importance(honest.fisher), cfg.fisher_penalty_lambda))
    alpha = cfg.evasion_alpha
    ano = anomaly_loss(cfg.evasion_distance, params, global_vec)
    return TrainingTerms(penalty=lambda m: ((1 - alpha) / alpha) * ano(m), lr_scale=alpha)


def adaptive_report(mode: str, global_vec: torch.Tensor, trained: torch.Tensor, cfg,
                    honest: HonestShadow) -> torch.Tensor:
    """The vector the attacker sends once trained: with ``evasion`` and ``evasion-norm-match`` the
    update rescaled to the norm of its honest update; otherwise what it trained."""
    if mode == "evasion" and cfg.evasion_norm_match:
        return match_norm(global_vec, trained, float(torch.linalg.vector_norm(honest.update)))
    return trained


__all__ = ["ADAPTIVE_LOCAL_ATTACKS", "EVASION_DISTANCES", "FISHER_FORGERIES", "HonestShadow", "RLRAdaptive",
           "adaptive_report", "adaptive_terms", "anomaly_loss", "fisher_penalty", "match_norm", "mimic_fisher", "minmax_importance",
           "noise_fisher", "sign_sum", "trainable_vector"]
