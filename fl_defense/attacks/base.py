"""What a colluding model-poisoning attack implements, and the geometry they share.

A colluding attack crafts the updates its attackers send from what they know this round: a
``known`` matrix of updates whose first ``num_attackers`` rows are the attackers' own honest
updates (each also trains honestly on its clean data) and, with ``full`` knowledge, the other
clients' updates after them. It never sees who else is malicious or anything a server holds.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch

from ..defenses.aggregators import uses_numpy
from ..defenses.krum import distances_from_gram, krum_scores
from ..defenses.parallel import column_chunks, parallel_map
from ..run_keys import RunKey

KNOWLEDGE = ("partial", "full")
TARGETS = ("agnostic", "krum", "trimmed_mean", "median")


@dataclass(frozen=True)
class AttackRound:
    """The round as the colluders see it.

    ``num_clients``: n, the results the server aggregates (attackers included); ``num_attackers``:
    m, the colluders (the first m rows of ``known``); ``knowledge``: "partial" (``known`` holds
    only their honest updates) or "full" (the others' updates follow); ``poisoned``: m x d, each
    attacker's update trained on its poisoned data (attacks with ``uses_poisoned``); ``seed``:
    for attacks that draw at random."""

    num_clients: int
    num_attackers: int
    knowledge: str = "full"
    poisoned: torch.Tensor | None = None
    seed: int = 0

    def benign_rows(self, num_known: int) -> slice:
        """The rows of ``known`` that stand for the benign updates the server will see: the
        others' (full knowledge), else the attackers' own honest updates (the papers' proxy)."""
        return slice(self.num_attackers, None) if num_known > self.num_attackers else slice(0, self.num_attackers)


class ColludingAttack:
    """Base class. Subclasses set ``name``, ``paper``, ``targets`` (aggregation rules they can be
    tailored to; "agnostic" means none) and ``uses_poisoned``, take parameters in ``__init__``,
    declare the run-config keys of those the run config sets in ``run_config`` (added to the
    base's; ``fl_defense.run_keys.attack_keys``) and implement ``craft``."""

    name: str = "attack"
    paper: str = ""
    targets: tuple[str, ...] = ("agnostic",)
    uses_poisoned: bool = False
    # Every colluding attack reads these two: the knowledge the collusion step gives it, and the
    # rule it is tailored to (checked against ``targets``; a constructor's ``target`` gets it).
    run_config: dict[str, RunKey] = {
        "knowledge": RunKey("colluding attacks: attackers know their own honest updates only (partial) or the "
                            "round's benign updates too (full)", key="attacker-knowledge", choices=KNOWLEDGE,
                            default="full"),
        "target": RunKey("colluding attacks: the aggregation rule a tailored attack targets (fang, min_max: "
                         "agnostic, krum, trimmed_mean, median; the others: agnostic)", key="attack-target", choices=TARGETS, default="agnostic"),
    }
    # parameter -> a key declared elsewhere that it is set from (a defense's, for an adaptive attack)
    shared_keys: dict[str, str] = {}

    @classmethod
    def check(cls, cfg) -> tuple[str, str] | None:
        """(key, message) of a run configuration this attack cannot work with, or None."""
        if cfg.attack_target not in cls.targets:
            return "attack-target", (f"model-poisoning={cfg.model_poisoning} targets {', '.join(cls.targets)}, "
                                     f"not {cfg.attack_target!r}")
        return None

    def craft(self, known: torch.Tensor, rnd: AttackRound) -> torch.Tensor:
        """The update each attacker sends: m x d, or one d-vector that all of them send."""
        raise NotImplementedError

    @classmethod
    def param_names(cls) -> list[str]:
        params = inspect.signature(cls.__init__).parameters.values()
        return [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.param_names())
        return f"{type(self).__name__}({args})"


def check_target(attack: ColludingAttack, target: str) -> None:
    if target not in attack.targets:
        raise ValueError(f"{attack.name} targets {', '.join(attack.targets)}, not {target!r}")


PASS_CHUNK = 1 << 14  # columns per piece of the fused pass: fixed, so sums do not depend on the thread count


def column_pass(x: torch.Tensor, std: bool = False, extremes: bool = False, direction=None,
                gram: bool = False, rows: slice = slice(None), norms: bool = False,
                backend: str | None = None) -> dict[str, torch.Tensor]:
    """One pass over the known updates ``x`` (n x d) for what an attack needs from it: the
    per-coordinate ``mean``, sample ``std``, ``min`` and ``max``; a direction ``p`` computed piece
    by piece from those (``direction(stats) -> piece of p``) with ``bp`` = x[rows] @ p; the
    Gram matrix x[rows] x[rows]^T; with ``norms`` the squared row norms ``sq`` and ``bmu`` =
    x[rows] @ mean (sums and products in float64). Min-Max would otherwise read the 480 MB matrix
    three times (statistics, Gram, B p); here each piece of ``PASS_CHUNK`` columns is read once
    while in cache. On the CPU in numpy, pieces shared out among the threads, partial products
    summed in column order (the same result for any thread count); torch elsewhere
    (``backend="torch"`` forces that path)."""
    n, d = x.shape
    ddof = 1 if n > 1 else 0
    k = len(range(n)[rows])
    names = ["mean"] + (["std"] if std else []) + (["min", "max"] if extremes else []) + (["p"] if direction else [])
    out = {name: torch.empty(d, dtype=x.dtype, device=x.device) for name in names}
    numpy = uses_numpy(x, backend)
    src = x.detach().numpy() if numpy else x
    dst = {name: v.numpy() for name, v in out.items()} if numpy else out
    pieces = column_chunks(d, PASS_CHUNK)

    def piece(cols: slice):
        b = src[:, cols]
        mean = b.mean(axis=0) if numpy else b.mean(dim=0)
        stats = {"mean": mean}
        if std:
            dev = b - mean
            stats["std"] = (np.sqrt(np.einsum("ij,ij->j", dev, dev) / (n - ddof)) if numpy
                            else torch.std(b, dim=0, correction=ddof))
        if extremes:
            stats["min"], stats["max"] = (b.min(axis=0), b.max(axis=0)) if numpy else torch.aminmax(b, dim=0)
        part = {}
        if direction:
            stats["p"] = direction(stats)
            part["bp"] = b[rows] @ stats["p"]
        if gram:
            br = b[rows]
            part["gram"] = br @ br.T
        if norms:
            br = b[rows]
            part["sq"] = np.einsum("ij,ij->i", br, br) if numpy else (br * br).sum(dim=1)
            part["bmu"] = br @ mean
        for name, v in stats.items():
            dst[name][cols] = v
        return part

    parts = parallel_map(piece, pieces) if numpy else [piece(c) for c in pieces]
    for name, shape in (("bp", (k,)), ("gram", (k, k)), ("sq", (k,)), ("bmu", (k,))):
        if parts and name in parts[0]:
            total = np.zeros(shape) if numpy else torch.zeros(shape, dtype=torch.float64, device=x.device)
            for part in parts:
                total += part[name]
            out[name] = torch.from_numpy(total) if numpy else total.cpu()
    if "gram" in out:
        out["gram"] = (out["gram"] + out["gram"].T) / 2
    return out


def column_stats(x: torch.Tensor, std: bool = False, extremes: bool = False) -> dict[str, torch.Tensor]:
    """Per-coordinate ``mean`` (and ``std``, ``min``, ``max`` when asked) in one pass (``column_pass``)."""
    return column_pass(x, std=std, extremes=extremes)


class Distances:
    """Squared distances between the known updates and a candidate c(g) = mu + g * p, without a
    pass over the matrix per candidate: ||mu + g p - b_i||^2 = ||mu - b_i||^2 + 2 g p.(mu - b_i)
    + g^2 ||p||^2, whose three coefficients come from the Gram matrix (mu.b_i is its row mean) and
    one product B p, computed once (float64)."""

    def __init__(self, gram: torch.Tensor, bp: torch.Tensor, pp: float) -> None:
        # mu = the rows' mean, so mu.b_i is the Gram's row mean and mu.p the mean of B p
        sq = gram.diagonal()
        mu_b = gram.mean(dim=1)
        mu_sq = gram.mean()
        self.base = (sq - 2 * mu_b + mu_sq).clamp_min(0)  # ||mu - b_i||^2
        bp = bp.double()
        self.cross = bp.mean() - bp  # p.(mu - b_i)
        self.pp = pp  # ||p||^2
        self.gram = gram

    def at(self, gamma: float) -> torch.Tensor:
        """||mu + gamma p - b_i||^2 for every known row i."""
        return (self.base + 2 * gamma * self.cross + gamma * gamma * self.pp).clamp_min(0)


def krum_picks_candidate(gram_benign: torch.Tensor, cand_sq_dist: torch.Tensor, num_attackers: int,
                         num_malicious: int) -> bool:
    """Whether Krum (f = ``num_malicious``) over the benign rows plus ``num_attackers`` copies of one
    candidate picks a copy, from the benign Gram and the candidate's squared distances to them.
    Copies sit after the benign rows: Krum's first-index tie-break favours a benign update."""
    k = gram_benign.shape[0]
    d2 = torch.zeros((k + num_attackers,) * 2, dtype=torch.float64)
    d2[:k, :k] = distances_from_gram(gram_benign)
    d2[:k, k:] = cand_sq_dist[:, None]
    d2[k:, :k] = cand_sq_dist[None, :]
    return int(torch.argmin(krum_scores(d2, num_malicious))) >= k


def largest_feasible(ok, start: float, tol: float, max_doublings: int = 60) -> float:
    """The binary search of Shejwalkar & Houmansadr (NDSS 2021, Alg. 1) for the largest gamma with
    ``ok(gamma)``: from ``start``, doubled while still feasible (the paper's fixed start caps
    gamma at 1.5x it), then halved intervals between the last feasible and first infeasible
    values until they are ``tol`` apart. Returns the last feasible value (0 if none is)."""
    lo, hi = 0.0, float(start)
    for _ in range(max_doublings):
        if not ok(hi):
            break
        lo, hi = hi, 2 * hi
    else:
        return lo
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


__all__ = ["KNOWLEDGE", "TARGETS", "AttackRound", "ColludingAttack", "Distances", "check_target", "column_pass",
           "column_stats", "krum_picks_candidate", "largest_feasible"]
