"""CRFL (Xie, Chen, Chen and Li, "CRFL: Certifiably Robust Federated Learning against Backdoor
Attacks", ICML 2021): the training side. The certification is evaluation (``fl_defense.certify``)."""

from __future__ import annotations

import torch

from ..updates import RoundUpdates
from .base import Defense, DefenseResult, RunKey, SeededNoise, no_flags


class CRFL(SeededNoise, Defense):
    """CRFL, Xie et al., ICML 2021 (Algorithm 1, sec. 3): clipping and parameter smoothing of
    the global model.

    Each round t the server aggregates the clients' models with FedAvg, clips the *model
    parameters* (not the updates) to norm rho_t and adds isotropic Gaussian noise:

        w_{t+1} = Clip_{rho_t}(w_t + sum_k p_k delta_k) + N(0, sigma_t^2 I),
        Clip_rho(w) = w / max(1, ||w||_2 / rho).

    The clipping bound grows with the round, rho_t = min(rho_max, rho_0 + rho_growth * t): the
    schedule of the authors' code (MNIST: 2 + 0.1 t, capped at 15; EMNIST 4 + 0.25 t; LOAN
    2 + 0.025 t); defaults are their MNIST values, with sigma_t = sigma = 0.01. At test time the
    final model is smoothed with N(0, sigma_T^2 I) and its prediction certified against backdoors
    of bounded magnitude (Theorem 2): ``fl_defense.certify``, turned on by the run-config key
    ``crfl-certify-samples``.

    Choices: the norm is over the trainable parameters (buffers are averaged by the adapter and
    neither clipped nor noised; the authors' clipping also skips buffers, their noise does not).
    The defense does not know which round is the last, so every round's model carries its noise
    (the paper adds training noise in rounds before T and smooths the final model at test time;
    the certification samples its M models around the released, already noised, model). Nobody
    is flagged (``detects`` is False); client k's weight is its FedAvg share n_k / sum n.

    State: the round count (for rho_t) and the noise generator, saved with checkpoints.
    """

    name = "crfl"
    paper = "Xie et al., ICML 2021"
    run_config = {
        "rho0": RunKey("CRFL: clipping bound rho_t = min(rho-max, rho0 + rho-growth * t) on the global model's norm: rho0",
                       check=lambda v: v > 0),
        "rho_growth": RunKey("CRFL: growth of the clipping bound per round", check=lambda v: v >= 0),
        "rho_max": RunKey("CRFL: largest clipping bound", check=lambda v: v > 0),
        "sigma": RunKey("CRFL: std of the Gaussian noise added to the global model's parameters each round",
                        check=lambda v: v >= 0),
    }

    def __init__(self, rho0: float = 2.0, rho_growth: float = 0.1, rho_max: float = 15.0, sigma: float = 0.01,
                 seed: int = 0) -> None:
        self.rho0 = rho0
        self.rho_growth = rho_growth
        self.rho_max = rho_max
        self.sigma = sigma
        self.seed = seed
        self._round = 0

    def validate(self) -> None:
        if not self.rho0 > 0 or not self.rho_max > 0:
            raise ValueError(f"rho0 and rho_max must be > 0, got {self.rho0}, {self.rho_max}")
        if not self.rho_growth >= 0:
            raise ValueError(f"rho_growth must be >= 0, got {self.rho_growth}")
        if not self.sigma >= 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")

    def rho(self, t: int) -> float:
        """The clipping bound of round t (1-based)."""
        return min(self.rho_max, self.rho0 + self.rho_growth * t)

    def aggregate(self, global_params: torch.Tensor, round_updates: RoundUpdates) -> DefenseResult:
        ru = round_updates
        self._round += 1
        rho = self.rho(self._round)
        w = ru.sample_weights
        model = global_params + w @ ru.updates
        norm = float(torch.linalg.vector_norm(model.double()))
        model = model * (1.0 / max(1.0, norm / rho))
        if self.sigma > 0:
            model = model + self.sigma * self._noise(model.shape, model.device).to(model.dtype)
        return DefenseResult(params=model, weights=w, flagged=no_flags(ru.n, ru.device),
                             info={"round": self._round, "rho": rho, "norm-before-clip": norm})

    def state_dict(self) -> dict:
        return {"round": self._round, **super().state_dict()} if self._round else {}

    def load_state_dict(self, state: dict) -> None:
        unknown = set(state) - {"round", "noise-rng"}
        if unknown:
            raise ValueError(f"CRFL got unknown state keys {sorted(unknown)}")
        self._round = int(state.get("round", 0))
        self._gen = None
        super().load_state_dict(state)
