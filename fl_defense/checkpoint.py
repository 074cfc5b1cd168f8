"""Atomic per-round checkpoints: global arrays, defense state, round number and RNG states."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch


def save_checkpoint(path: str | Path, server_round: int, arrays: list[np.ndarray], defense_state: dict,
                    sampling_rng: random.Random | None = None) -> None:
    """Write the checkpoint to a temporary file and rename it over the old one: a kill at any
    moment leaves either the previous or the new checkpoint, never a torn one. ``sampling_rng``:
    the client manager's own RNG (server_app.sampling), whose state is kept as "client-sampling"."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "round": server_round,
        "arrays": [np.asarray(a) for a in arrays],
        "defense": defense_state,
        "python-random": random.getstate(),
        "numpy-random": np.random.get_state(),
        "torch-random": torch.get_rng_state(),
        "client-sampling": None if sampling_rng is None else sampling_rng.getstate(),
    }
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        pickle.dump(state, fh, protocol=pickle.HIGHEST_PROTOCOL)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, restore_rng: bool = True) -> dict:
    """Read a checkpoint (and, by default, put the process RNGs back where they were)."""
    with open(path, "rb") as fh:
        state = pickle.load(fh)
    if restore_rng:
        random.setstate(state["python-random"])
        np.random.set_state(state["numpy-random"])
        torch.set_rng_state(state["torch-random"])
    return state
