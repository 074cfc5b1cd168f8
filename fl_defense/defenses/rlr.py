"""RLR: robust learning rate (Ozdayi, Kantarcioglu and Gel, AAAI 2021)."""

from __future__ import annotations

import torch

from ..updates import RoundUpdates
from .aggregators import AGGREGATORS, clip_rows, clip_scale, sign_sum
from .base import Defense, DefenseResult, SeededNoise, no_flags, RunKey


class RLR(SeededNoise, Defense):
    """Robust learning rate, eqs. (4)-(6) of Ozdayi et al., AAAI 2021.

    Per coordinate i the server learning rate is

        eta_theta,i = eta   if |sum_k sign(delta_k,i)| >= theta
                      -eta  otherwise                                   (eq. 4)

    and the new model is w + eta_theta (.) agg(delta) (eq. 5), where ``agg`` is the
    sample-weighted mean (the paper's default), the coordinate median or the sign vote, or the
    step of any other defense (a ``Defense`` or a registry name such as "krum" or "flame": RLR on
    top of it; that defense's weights and flags are reported). With
    ``clip_norm`` C > 0 each update is first scaled to norm at most C, and with ``noise`` sigma > 0
    Gaussian noise N(0, (sigma * C)^2) is added to the aggregate (eq. 6; sigma alone if C == 0).

    RLR does not single out clients: every client keeps its aggregator weight and none is flagged.
    The sign vote is an unweighted count, so theta is an integer between 1 and the number of
    clients sampled in a round; with theta < 1 no coordinate could ever fall below it and RLR would
    be plain averaging.

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
        """eta_theta (eq. 4): +eta where the sign vote reaches theta, -eta elsewhere."""
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
                inner = RoundUpdates(updates=updates, num_examples=round_updates.num_examples,
                                     client_ids=round_updates.client_ids, layer_slices=round_updates.layer_slices,
                                     fisher=round_updates.fisher, extras=round_updates.extras)
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
