"""CRFL's certification (Xie, Chen, Chen and Li, ICML 2021, sec. 3.2-3.3, Theorem 2): parameter
smoothing of the final global model and the certified radius of each test prediction against
backdoors of bounded magnitude. Evaluation, not defense: the recorder runs it at the final round
when ``crfl-certify-samples`` > 0 (the model must have been trained with ``defense='crfl'``).

1. Monte Carlo: M models w_T + N(0, sigma_T^2 I) (over the trainable parameters); for each test
   input the counts of each predicted class; the smoothed prediction c_A is the most frequent.
2. Confidence: p_A's lower bound at level 1 - alpha is the one-sided Clopper-Pearson bound of the
   count of c_A among M, and p_B = 1 - lower(p_A) bounds every other class (Cohen, Rosenfeld and
   Kolter, ICML 2019). The authors' code bounds p_A and p_B with Hoeffding's inequality instead,
   which is looser for the same alpha; the task asks for Clopper-Pearson. An input with
   lower(p_A) <= 1/2 is not certified (radius 0).
3. Radius (Theorem 2 as the authors' ``cal_prob_bound`` computes it): the prediction on x is the
   one of a model trained without the backdoor for every backdoor pattern of L2 magnitude below

       RAD = sqrt( -ln(1 - (sqrt(p_A) - sqrt(p_B))^2) sigma_T^2
                   / (2 R sum_i (p_i tau_i)^2 L_Z^2 gamma^2 eta^2 (q_B/n_B)^2
                      prod_{t=t_adv+1}^{T} (2 Phi(rho_t / sigma_t) - 1)) )

   with R attackers in round t_adv, p_i their aggregation weights, tau_i their local iterations,
   L_Z the Lipschitz constant of the loss gradient in the backdoor pattern, gamma the attackers'
   scale factor, eta the local learning rate, q_B/n_B the poisoned share of a batch, and the
   contraction of each round's clipping (rho_t) and noise (sigma_t; sigma_T for round T). The
   authors' code takes tau and p_i equal for all attackers (R tau^2 sum p_i^2, the same thing)
   and writes sigma_train^2 in the numerator; in all their configurations sigma_train = sigma_T.
   The theorem assumes a single attack round t_adv; the recorder certifies against the last
   round in which an attacker was sampled (see ``server_app/recorder.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy.stats import beta, norm


def clopper_pearson_lower(count: np.ndarray | int, total: int, alpha: float) -> np.ndarray:
    """One-sided lower confidence bound (level 1 - alpha) of a binomial proportion from ``count``
    successes in ``total`` trials: the alpha quantile of Beta(count, total - count + 1); 0 for 0."""
    count = np.asarray(count, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        lower = beta.ppf(alpha, count, total - count + 1)
    return np.where(count > 0, np.nan_to_num(lower, nan=0.0), 0.0)


def contraction(rhos: Sequence[float], sigmas: Sequence[float]) -> float:
    """prod_t (2 Phi(rho_t / sigma_t) - 1) over the given rounds (1 for none)."""
    out = 1.0
    for rho, sigma in zip(rhos, sigmas, strict=True):
        out *= 2.0 * norm.cdf(rho / sigma) - 1.0 if sigma > 0 else 1.0
    return out


def crfl_radius(p_a: np.ndarray | float, p_b: np.ndarray | float, sigma_test: float, rhos: Sequence[float],
                sigmas: Sequence[float], attacker_weights: Sequence[float], local_iterations: Sequence[float],
                lipschitz: float, scale: float, lr: float, poison_fraction: float) -> np.ndarray:
    """The certified radius of Theorem 2 (module docstring) for each (p_A, p_B); 0 where p_A <= p_B.
    ``rhos`` and ``sigmas`` are those of rounds t_adv + 1 .. T (the last with sigma_T)."""
    p_a, p_b = np.asarray(p_a, dtype=np.float64), np.asarray(p_b, dtype=np.float64)
    weights, taus = np.asarray(attacker_weights, dtype=np.float64), np.asarray(local_iterations, dtype=np.float64)
    if len(weights) != len(taus):
        raise ValueError("one local-iteration count per attacker weight")
    r = len(weights)
    denom = 2.0 * r * float(((weights * taus) ** 2).sum()) * lipschitz ** 2 * scale ** 2 * lr ** 2 \
        * poison_fraction ** 2 * contraction(rhos, sigmas)
    gap = np.clip(np.sqrt(np.clip(p_a, 0, 1)) - np.sqrt(np.clip(p_b, 0, 1)), 0.0, 1.0)
    with np.errstate(divide="ignore"):
        numer = -np.log1p(-gap ** 2) * sigma_test ** 2
    if not denom > 0:
        return np.where(gap > 0, np.inf, 0.0)
    return np.where(gap > 0, np.sqrt(numer / denom), 0.0)


@torch.no_grad()
def smoothed_counts(model: torch.nn.Module, x: torch.Tensor, samples: int, sigma: float, seed: int,
                    device: str = "cpu", batch_size: int = 1000) -> np.ndarray:
    """Counts (len(x) x number of classes) of each class predicted by ``samples`` models drawn as
    the model's trainable parameters plus N(0, sigma^2 I) (a generator seeded with ``seed``); the
    model's own parameters are restored afterwards."""
    model = model.to(device).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    base = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(seed)
    counts = None
    rows = np.arange(len(x))
    try:
        for _ in range(samples):
            for p, b in zip(params, base):
                p.copy_(b + sigma * torch.randn(b.shape, generator=gen, dtype=b.dtype).to(device))
            logits = torch.cat([model(x[i:i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])
            if counts is None:
                counts = np.zeros((len(x), logits.shape[1]), dtype=np.int64)
            np.add.at(counts, (rows, logits.argmax(dim=1).numpy()), 1)
    finally:
        for p, b in zip(params, base):
            p.copy_(b)
    return counts


def certify(counts: np.ndarray, labels: np.ndarray, alpha: float, radius_fn) -> dict:
    """Certified metrics from the Monte Carlo counts: the smoothed prediction c_A per input,
    lower(p_A) by Clopper-Pearson, p_B = 1 - lower(p_A), the radius ``radius_fn(p_a, p_b)``
    (0 where lower(p_A) <= 1/2: not certified). Returns the per-input arrays and the means:
    certified accuracy (correct and certified), certified rate (certified), the smoothed model's
    accuracy, and the mean certified radius over all inputs (0 for a wrong or uncertified one)."""
    samples = int(counts[0].sum())
    top = counts.argmax(axis=1)
    p_a = clopper_pearson_lower(counts[np.arange(len(counts)), top], samples, alpha)
    p_b = 1.0 - p_a
    certified = p_a > 0.5
    radius = np.where(certified, radius_fn(p_a, p_b), 0.0)
    correct = top == np.asarray(labels)
    return {
        "prediction": top, "p_a_lower": p_a, "radius": radius, "certified": certified, "correct": correct,
        "certified_accuracy": float((certified & correct).mean()),
        "certified_rate": float(certified.mean()),
        "smoothed_accuracy": float(correct.mean()),
        "mean_certified_radius": float(np.where(correct, radius, 0.0).mean()),
    }


def local_iterations(num_examples: int, local_epochs: int, batch_size: int) -> int:
    """tau: the SGD steps a client takes in a round (``training.py`` runs full epochs of batches)."""
    return local_epochs * math.ceil(num_examples / batch_size)
