"""RLR: robust learning rate (Ozdayi, Kantarcioglu and Gel, AAAI 2021), and how to choose theta.

Choosing theta: ``python -m fl_defense.defenses.rlr_theta --clients 10 --attackers 3`` prints, for every
theta, how often a coordinate only the attackers push keeps +eta against how often a coordinate the
clients agree on with probability q keeps it (``theta_tradeoff``; exact binomial and
hypergeometric sums, no simulation).
"""

from __future__ import annotations

from dataclasses import replace

from collections.abc import Mapping, Sequence
from math import comb

import torch

from ..updates import RoundUpdates
from .aggregators import AGGREGATORS, clip_rows, clip_scale, sign_sum
from .base import Defense, DefenseResult, SeededNoise, ServerContext, no_flags, RunKey


class RLR(SeededNoise, Defense):
    """Robust learning rate, eqs. (5)-(6) of Ozdayi et al., AAAI 2021 (arXiv 2007.03767).

    Per coordinate i the server learning rate is

        eta_theta,i = eta   if |sum_k sign(delta_k,i)| >= theta
                      -eta  otherwise                                   (eq. 5)

    and the new model is w + eta_theta (.) agg(delta) (eq. 6), where ``agg`` is the
    sample-weighted mean (the paper's default), the coordinate median or the sign vote, or the
    step of any other defense (a ``Defense`` or a registry name such as "krum" or "flame": RLR on
    top of it; that defense's weights and flags are reported). With
    ``clip_norm`` C > 0 each update is first scaled to norm at most C, and with ``noise`` sigma > 0
    Gaussian noise N(0, (sigma * C)^2) is added to the aggregate (the clipping and noise of the
    paper's eq. (2), Sun et al.'s defense, which the paper combines with RLR; sigma alone if C == 0).

    RLR does not single out clients: every client keeps its aggregator weight and none is flagged.
    The sign vote is an unweighted count, so theta is an integer between 1 and the number of
    clients sampled in a round; with theta < 1 no coordinate could ever fall below it and RLR would
    be plain averaging. The paper asks for the attackers per round to be sufficiently below theta;
    ``keep_probability`` and ``theta_tradeoff`` (below) put numbers on it.

    Parameters
    ----------
    theta : int
        Vote threshold (the paper uses 4 for 10 clients, 8 for 40).
    server_lr : float
        eta, the server learning rate.
    aggregator : {"mean", "median", "sign"} or a Defense or a registered defense name
    clip_norm : float
        C; 0 disables clipping.
    noise : float
        sigma; 0 disables noise.
    seed : int
        Seed of the noise generator (the run's seed).
    """

    name = "rlr"
    paper = "Ozdayi et al., AAAI 2021"
    run_config = {
        "theta": RunKey("RLR sign-vote threshold theta, an integer in [1, clients per round]", check=lambda v: v >= 1),
        "aggregator": RunKey("RLR base aggregator, or any other defense to run RLR on top of",
                             choices=lambda: _aggregator_choices()),
    }

    def __init__(
        self,
        theta: int = 4,
        server_lr: float = 1.0,
        aggregator: str = "mean",
        clip_norm: float = 0.0,
        noise: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.theta = theta
        self.server_lr = server_lr
        self.aggregator = aggregator
        self.clip_norm = clip_norm
        self.noise = noise
        self.seed = seed

    @classmethod
    def server_parts(cls, ctx: ServerContext) -> dict:
        """RLR on top of another registered defense: that defense, built as the server app builds
        any (its own run-config keys and server parts), in place of its name."""
        from . import DEFENSES

        return {"aggregator": ctx.build(ctx.kwargs["aggregator"])} if ctx.kwargs["aggregator"] in DEFENSES else {}

    def validate(self) -> None:
        if isinstance(self.theta, bool) or not float(self.theta).is_integer() or self.theta < 1:
            raise ValueError(
                f"theta must be an integer >= 1 (sign sums are integers; theta < 1 never flips a "
                f"coordinate), got {self.theta!r}"
            )
        base = self._base()
        if base is not None:
            base.validate()
        elif self.aggregator not in AGGREGATORS:
            from . import DEFENSES

            raise ValueError(f"aggregator must be one of {sorted(AGGREGATORS)} or a defense "
                             f"{sorted(set(DEFENSES) - {'rlr'})}, got {self.aggregator!r}")
        if not self.server_lr > 0:
            raise ValueError(f"server_lr must be > 0, got {self.server_lr}")
        if self.clip_norm < 0 or self.noise < 0:
            raise ValueError("clip_norm and noise must be >= 0")

    @property
    def detects(self) -> bool:  # type: ignore[override]
        base = self._base()
        return base is not None and base.detects

    @property
    def needs_fisher(self) -> bool:  # type: ignore[override]
        base = self._base()
        return base is not None and base.needs_fisher

    def _base(self) -> Defense | None:
        """The defense RLR runs on top of, when ``aggregator`` names one (built once)."""
        if isinstance(self.aggregator, Defense):
            return self.aggregator
        if self.aggregator in AGGREGATORS:
            return None
        if getattr(self, "_base_defense", None) is None:
            from . import DEFENSES

            if self.aggregator not in DEFENSES or self.aggregator == "rlr":
                return None
            self._base_defense = DEFENSES[self.aggregator]()
        return self._base_defense

    def check_num_clients(self, n: int) -> None:
        base = self._base()
        if base is not None:
            base.check_num_clients(n)
        if self.theta > n:
            raise ValueError(
                f"theta={self.theta} exceeds the {n} clients sampled per round: every coordinate "
                f"would get a negative learning rate. Choose theta <= {n}."
            )

    def robust_lr(self, updates: torch.Tensor) -> torch.Tensor:
        """eta_theta (eq. 5): +eta where the sign vote reaches theta, -eta elsewhere."""
        votes = sign_sum(updates).abs_()
        return torch.where(votes >= self.theta, self.server_lr, -self.server_lr)

    def aggregate(self, global_params: torch.Tensor, round_updates: RoundUpdates) -> DefenseResult:
        self.check_num_clients(round_updates.n)
        updates = round_updates.updates
        lr = self.robust_lr(updates)  # clipping scales rows by positive factors: signs are unchanged
        base = self._base()
        flagged = no_flags(round_updates.n, round_updates.device)
        if base is None and self.aggregator == "mean":  # the mean of clipped rows, without building them
            weights = round_updates.sample_weights
            scale = clip_scale(updates, self.clip_norm) if self.clip_norm > 0 else 1.0
            step = (weights * scale) @ updates
        else:
            if self.clip_norm > 0:
                updates, _ = clip_rows(updates, self.clip_norm)
            if base is not None:
                inner = replace(round_updates, updates=updates)
                res = base.aggregate(torch.zeros_like(global_params), inner)
                step, weights, flagged = res.params, res.weights, res.flagged
            else:
                step, weights = AGGREGATORS[self.aggregator](round_updates, updates)
        if self.noise > 0:
            std = self.noise * (self.clip_norm if self.clip_norm > 0 else 1.0)
            step = step + std * self._noise(step.shape, step.device)
        flipped = int((lr < 0).sum())
        return DefenseResult(
            params=global_params + lr * step,
            weights=weights,
            flagged=flagged,
            info={"flipped-coordinates": flipped, "flipped-fraction": flipped / max(1, round_updates.d)},
        )

    # RLR's own noise generator, and the state of the defense it runs on top of (FoolsGold's
    # histories, say), both travel with checkpoints.
    def state_dict(self) -> dict:
        base = self._base()
        return {**super().state_dict(), **({"base": base.state_dict()} if base is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        base = self._base()
        if base is not None and "base" in state:
            base.load_state_dict(state["base"])


def _aggregator_choices() -> tuple[str, ...]:
    """RLR's base rules: the plain aggregators, or any other registered defense."""
    from . import DEFENSES

    return tuple(AGGREGATORS) + tuple(d for d in DEFENSES if d != "rlr")


# -- choosing theta ---------------------------------------------------------------------------


def effective_theta(num_clients: int, theta: int) -> int:
    """The threshold theta acts as: with ``num_clients`` nonzero signs every sign sum has the
    parity of ``num_clients`` (10 votes sum to even numbers, so theta 5 acts as 6)."""
    return theta if (theta - num_clients) % 2 == 0 else theta + 1


def keep_probability(num_clients: int, num_attackers: int, theta: int, benign_agreement: float = 0.5) -> float:
    """Probability that a coordinate keeps +eta (|sign sum| >= theta, eq. 5) when ``num_attackers``
    of the ``num_clients`` sampled clients push it one way and each of the others' signs agrees with
    them independently with probability ``benign_agreement`` (exact binomial; no zero signs).

    With ``num_attackers`` = 0 this is a coordinate the clients agree on with probability q (its
    consensus); with attackers and q = 0.5 it is a coordinate only the attackers move (the
    backdoor's), the others' signs coin flips. 10 clients, 3 attackers: 0.51 at theta 4, 0.23 at
    5 and 6, 0.06 at 8 (0.51 includes the 1/128 of rounds where all 7 others vote against)."""
    if not 0 <= num_attackers <= num_clients:
        raise ValueError(f"num_attackers must be in [0, {num_clients}], got {num_attackers}")
    if not 0.0 <= benign_agreement <= 1.0:
        raise ValueError(f"benign_agreement must be in [0, 1], got {benign_agreement}")
    others = num_clients - num_attackers
    q = benign_agreement
    total = 0.0
    for agree in range(others + 1):  # sign sum = attackers + agree - (others - agree)
        if abs(num_attackers + 2 * agree - others) >= theta:
            total += comb(others, agree) * q**agree * (1.0 - q) ** (others - agree)
    return total


def attackers_per_round(population: int, malicious: int, sampled: int) -> dict[int, float]:
    """Distribution of the attackers among ``sampled`` clients drawn without replacement from
    ``population`` clients of which ``malicious`` are attackers (hypergeometric), {count: prob}."""
    if not 0 <= malicious <= population or not 1 <= sampled <= population:
        raise ValueError(f"need 0 <= malicious <= population and 1 <= sampled <= population, got "
                         f"population={population}, malicious={malicious}, sampled={sampled}")
    total = comb(population, sampled)
    out = {a: comb(malicious, a) * comb(population - malicious, sampled - a) / total
           for a in range(max(0, sampled - (population - malicious)), min(malicious, sampled) + 1)}
    return {a: p for a, p in out.items() if p > 0}


def _as_distribution(attackers: int | Mapping[int, float]) -> dict[int, float]:
    if isinstance(attackers, Mapping):
        mass = sum(attackers.values())
        if abs(mass - 1.0) > 1e-9:
            raise ValueError(f"the attackers' distribution must sum to 1, got {mass}")
        return dict(attackers)
    return {int(attackers): 1.0}


def theta_tradeoff(
    num_clients: int,
    attackers: int | Mapping[int, float],
    thetas: Sequence[int] | None = None,
    consensus: Sequence[float] = (0.7, 0.8, 0.9),
) -> list[dict]:
    """The trade-off theta sets, one row per theta (default 1..num_clients): ``"attack"``, the
    probability that a coordinate only the attackers push keeps +eta (``attackers``: a count, or a
    {count: probability} distribution such as ``attackers_per_round``'s, averaged over the rounds
    with at least one attacker), and for each q in ``consensus`` the probability that a coordinate
    all clients (attackers included: they train on mostly clean data) agree on with probability q
    keeps it (row key ``q``). Read it as: the attack column should be small, the consensus columns
    large; a flipped benign coordinate is a step taken backwards."""
    dist = {a: p for a, p in _as_distribution(attackers).items() if a > 0}
    mass = sum(dist.values())  # rounds without an attacker push nothing: condition on >= 1
    rows = []
    for theta in thetas if thetas is not None else range(1, num_clients + 1):
        row: dict = {"theta": theta, "acts_as": effective_theta(num_clients, theta),
                     "attack": sum(p * keep_probability(num_clients, a, theta) for a, p in dist.items()) / mass
                     if mass > 0 else 0.0}
        for q in consensus:
            row[q] = keep_probability(num_clients, 0, theta, q)
        rows.append(row)
    return rows


def choose_theta(num_clients: int, attackers: int | Mapping[int, float], max_attack_keep: float = 0.25) -> int:
    """The smallest theta (so the one that flips fewest benign coordinates) at which a coordinate
    only the attackers push keeps +eta with probability at most ``max_attack_keep``, written as the
    threshold it acts as (``effective_theta``). The default 0.25 sits just above where the authors'
    own thresholds for several attackers a round put it (their FEMNIST runs: 50 of 3383 agents a round,
    theta 17, 22, 27 for 20, 30, 40% attackers keep such a coordinate with probability 0.16, 0.19,
    0.14); 10 clients with 2 or 3 attackers give 6."""
    for row in theta_tradeoff(num_clients, attackers, consensus=()):
        if row["attack"] <= max_attack_keep:
            return row["acts_as"]
    raise ValueError(f"no theta <= {num_clients} keeps the attackers' coordinates below {max_attack_keep}")


def format_tradeoff(rows: list[dict]) -> str:
    """``theta_tradeoff``'s rows as a Markdown table."""
    qs = [k for k in rows[0] if isinstance(k, float)] if rows else []
    lines = ["| theta | acts as | attack-only coordinate kept | " + " | ".join(f"consensus {q:g} kept" for q in qs) + " |",
             "|---|---|---|" + "---|" * len(qs)]
    for r in rows:
        lines.append(f"| {r['theta']} | {r['acts_as']} | {r['attack']:.3f} | "
                     + " | ".join(f"{r[q]:.3f}" for q in qs) + " |")
    return "\n".join(lines)
