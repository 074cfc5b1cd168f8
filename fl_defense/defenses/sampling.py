"""Seeded random choices for defenses that sample (DnC's coordinates, SignGuard's coordinates,
Bucketing's shuffle): one numpy generator per defense object, seeded with its ``seed`` parameter
(the run's seed) and saved with checkpoints, so a resumed run draws what an uninterrupted one
would have drawn."""

from __future__ import annotations

import numpy as np


class SeededGenerator:
    """Mixin: ``self._rng()`` is a ``numpy.random.Generator`` seeded with ``self.seed`` on first
    use; its state is the defense's ``"rng"`` state entry."""

    _generator: np.random.Generator | None = None

    def _rng(self) -> np.random.Generator:
        if self._generator is None:
            self._generator = np.random.default_rng(self.seed)
        return self._generator

    def state_dict(self) -> dict:
        return {"rng": self._generator.bit_generator.state} if self._generator is not None else {}

    def load_state_dict(self, state: dict) -> None:
        unknown = set(state) - {"rng"}
        if unknown:
            raise ValueError(f"{type(self).__name__} got unknown state keys {sorted(unknown)}")
        if "rng" in state:
            self._generator = np.random.default_rng(self.seed)
            self._generator.bit_generator.state = state["rng"]


def sample_columns(rng: np.random.Generator, d: int, k: int) -> np.ndarray:
    """``k`` distinct column indices of ``[0, d)`` (all of them when k >= d), sorted (gathers then
    read the rows' memory in order)."""
    if k >= d:
        return np.arange(d)
    return np.sort(rng.choice(d, size=k, replace=False))
