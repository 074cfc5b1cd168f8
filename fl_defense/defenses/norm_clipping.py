"""Norm clipping with Gaussian noise (Sun et al., "Can you really backdoor FL?", 2019), and the
same clipping + noise as a wrapper around any other defense (how the RLR paper, Ozdayi et al.,
AAAI 2021, combines them with its robust learning rate: its eq. (2))."""

from __future__ import annotations

from dataclasses import replace

import torch

from ..updates import RoundUpdates
from .aggregators import clip_rows, clip_scale
from .base import Defense, DefenseResult, SeededNoise, no_flags


class NormClipping(SeededNoise, Defense):
    """Norm-bounded averaging with weak differential privacy, Sun et al. 2019 (sec. 4):
    each update is scaled to L2 norm at most M, the clipped updates are averaged with sample
    weights, and N(0, sigma^2) noise is added to the aggregate (sigma = 0: no noise)."""

    name = "norm_clipping"
    paper = "Sun et al., arXiv 1911.07963, 2019"

    def __init__(self, clip_norm: float = 1.0, noise: float = 0.0, seed: int = 0) -> None:
        self.clip_norm = clip_norm
        self.noise = noise
        self.seed = seed

    def validate(self) -> None:
        if not self.clip_norm > 0 or self.noise < 0:
            raise ValueError("clip_norm must be > 0 and noise >= 0")

    def aggregate(self, global_params: torch.Tensor, round_updates: RoundUpdates) -> DefenseResult:
        scale = clip_scale(round_updates.updates, self.clip_norm)
        w = round_updates.sample_weights
        step = (w * scale) @ round_updates.updates  # = w @ clipped rows
        if self.noise > 0:
            step = step + self.noise * self._noise(step.shape, step.device)
        return DefenseResult(params=global_params + step, weights=w, flagged=no_flags(round_updates.n, round_updates.device))


class ClipNoise(SeededNoise, Defense):
    """Wrap any defense: clip every update to norm ``clip_norm`` before it, add N(0, (noise *
    clip_norm)^2) to its step after it (noise alone when clip_norm is 0)."""


    def __init__(self, inner: Defense, clip_norm: float = 0.0, noise: float = 0.0, seed: int = 0) -> None:
        self.inner = inner
        self.clip_norm = clip_norm
        self.noise = noise
        self.seed = seed
        self.detects = inner.detects
        self.needs_fisher = inner.needs_fisher

    def validate(self) -> None:
        self.inner.validate()
        if self.clip_norm < 0 or self.noise < 0:
            raise ValueError("clip_norm and noise must be >= 0")

    def check_num_clients(self, n: int) -> None:
        self.inner.check_num_clients(n)

    def aggregate(self, global_params: torch.Tensor, round_updates: RoundUpdates) -> DefenseResult:
        ru = round_updates
        if self.clip_norm > 0:
            clipped, _ = clip_rows(ru.updates, self.clip_norm)
            ru = replace(ru, updates=clipped)
        res = self.inner.aggregate(global_params, ru)
        if self.noise > 0:
            std = self.noise * (self.clip_norm if self.clip_norm > 0 else 1.0)
            res.params = res.params + std * self._noise(res.params.shape, res.params.device)
        return res

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(), **super().state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state.get("inner", {}))
        super().load_state_dict(state)

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self.inner.name}+clip"

    def get_params(self) -> dict:
        return {"inner": self.inner, "clip_norm": self.clip_norm, "noise": self.noise, "seed": self.seed}
