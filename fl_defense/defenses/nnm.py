"""Nearest-neighbour mixing, NNM (Allouah, Farhadkhani, Guerraoui, Gupta, Pinot and Stephan,
"Fixing by Mixing: A Recipe for Optimal Byzantine ML under Heterogeneity", AISTATS 2023): a
pre-aggregation step in front of any other defense."""

from __future__ import annotations

import numpy as np
import torch

from ..updates import RoundUpdates
from .aggregators import block_scratch, map_column_blocks, uses_numpy
from .base import Defense, DefenseResult
from .krum import squared_distances


def mixing_matrix(updates: torch.Tensor, num_malicious: int) -> torch.Tensor:
    """The n x n NNM matrix (float64): row i holds 1 / (n - f) on the n - f updates nearest to
    update i in Euclidean distance, itself included (ties by row order), 0 elsewhere."""
    n = updates.shape[0]
    k = n - num_malicious
    d2 = squared_distances(updates).cpu()
    d2.fill_diagonal_(-1.0)  # each update is its own nearest neighbour, even among duplicates
    nearest = torch.argsort(d2, dim=1, stable=True)[:, :k]
    mix = torch.zeros((n, n), dtype=torch.float64)
    mix.scatter_(1, nearest, 1.0 / k)
    return mix


def mix_rows_in_place(x: torch.Tensor, mix: torch.Tensor, backend: str | None = None) -> None:
    """x <- mix @ x, column block by column block (no second n x d matrix). On the CPU each
    block's product goes through numpy's BLAS into the thread's reused buffer (``block_scratch``)
    and is copied back: 1.6x faster than torch's matmul on these n x n times n x B blocks
    (``backend="torch"`` forces the path other devices take)."""
    m = mix.to(x.device, x.dtype)
    if uses_numpy(x, backend):
        xn, mn = x.detach().numpy(), m.numpy()

        def block(cols: slice) -> None:
            xb = xn[:, cols]
            out = block_scratch(x[:, cols]).numpy()
            np.matmul(mn, xb, out=out)
            xb[...] = out

        map_column_blocks(block, x)
        return

    def block(cols: slice) -> None:
        x[:, cols] = m @ x[:, cols]

    map_column_blocks(block, x)


class NNM(Defense):
    """NNM, Allouah et al., AISTATS 2023 (Algorithm 1): each update x_i is replaced by the average
    of its n - f nearest neighbours (in Euclidean distance, x_i itself included), y_i =
    (1/(n-f)) sum_{j in N_i} x_j, and the ``inner`` defense aggregates the y_i. Mixing pulls every
    row towards the honest majority (an attacker's row is averaged with at least n - 2f honest
    ones), which lets rules like Krum or the median reach the optimal error under heterogeneity.
    ``num_malicious`` is f; the paper needs f < n / 2.

    The round's updates (and Fisher, if present) are overwritten in place with the mixed rows, as
    the workspace contract allows. Client ids and sample counts are passed on unchanged. Client
    k's weight is (M^T w)_k for the mixing matrix M and the inner weights w (its share of the
    aggregate, exact for rules that return a weighted mean of their inputs); its flag is the inner
    rule's verdict on its mixed row.
    """

    paper = "Allouah et al., AISTATS 2023"

    def __init__(self, inner: Defense, num_malicious: int = 0) -> None:
        self.inner = inner
        self.num_malicious = num_malicious
        self.detects = inner.detects
        self.needs_fisher = inner.needs_fisher

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self.inner.name}+nnm"

    def validate(self) -> None:
        self.inner.validate()
        if not isinstance(self.num_malicious, int) or self.num_malicious < 0:
            raise ValueError(f"num_malicious must be an integer >= 0, got {self.num_malicious!r}")

    def check_num_clients(self, n: int) -> None:
        if n <= 2 * self.num_malicious:
            raise ValueError(f"NNM needs n > 2f clients: num_malicious={self.num_malicious} needs "
                             f"{2 * self.num_malicious + 1}, the round has {n}")
        self.inner.check_num_clients(n)

    def aggregate(self, global_params: torch.Tensor, round_updates: RoundUpdates) -> DefenseResult:
        ru = round_updates
        self.check_num_clients(ru.n)
        mix = mixing_matrix(ru.updates, self.num_malicious)
        mix_rows_in_place(ru.updates, mix)
        if ru.fisher is not None:
            mix_rows_in_place(ru.fisher, mix)
        res = self.inner.aggregate(global_params, ru)
        # a rule that picks one row (Krum) picked a mixed row, which is no client's own model: the
        # new model is res.params (global + that mixed row), not the picked client's arrays
        res.selected = None
        res.weights = (mix.T @ res.weights.to("cpu", torch.float64)).to(res.weights.device, res.weights.dtype)
        res.info = {**res.info, "neighbours": [row.nonzero().flatten().tolist() for row in mix]}
        return res

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state.get("inner", {}))

    def get_params(self) -> dict:
        return {"inner": self.inner, "num_malicious": self.num_malicious}
