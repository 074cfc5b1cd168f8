"""FoolsGold (Fung, Yoon and Beschastnikh, RAID 2020)."""

from __future__ import annotations

import torch

from ..updates import RoundUpdates
from .aggregators import column_blocks
from .base import Defense, DefenseResult, RunKey
from .krum import gram_matrix


def history_gram(history: torch.Tensor, rows: list[int], block_bytes: int = 4 << 20) -> torch.Tensor:
    """The Gram matrix of ``history[rows]`` without gathering those rows into a copy: one
    symmetric product when they are consecutive (everyone sampled), else accumulated over column
    blocks of the gathered rows (float64 sums of float32 block products)."""
    n = len(rows)
    if n == 0:
        return torch.zeros((0, 0), dtype=torch.float64)
    if rows == list(range(rows[0], rows[0] + n)):
        return gram_matrix(history[rows[0]:rows[0] + n])
    index = torch.tensor(rows)
    gram = torch.zeros((n, n), dtype=torch.float64)
    for sl in column_blocks(history[:n], block_bytes):  # blocks sized for n rows
        gram += gram_matrix(history[:, sl].index_select(0, index))
    return gram


def foolsgold_weights_from_gram(gram: torch.Tensor, kappa: float = 1.0) -> torch.Tensor:
    """Algorithm 1 from the histories' Gram matrix (float64, symmetric)."""
    n = gram.shape[0]
    if n < 2:
        return torch.ones(n, dtype=torch.float64)
    norms = gram.diagonal().clamp_min(1e-24).sqrt()
    cs = gram / (norms[:, None] * norms[None, :])
    cs.fill_diagonal_(float("-inf"))
    v = cs.max(dim=1).values  # each client's maximum similarity to another
    cs.fill_diagonal_(0.0)
    # pardoning: a client more similar to others than j is to others is not punished for j
    ratio = v[:, None] / v[None, :]
    cs = torch.where(v[None, :] > v[:, None], cs * ratio, cs)
    cs.fill_diagonal_(float("-inf"))
    alpha = (1 - cs.max(dim=1).values).clamp(0, 1)
    if alpha.max() > 0:
        alpha = alpha / alpha.max()
    alpha = torch.where(alpha == 1, torch.full_like(alpha, 0.99), alpha)
    logit = kappa * (torch.log(alpha / (1 - alpha)) + 0.5)  # alpha = 0 gives -inf, clamped to 0
    logit = torch.nan_to_num(logit, nan=0.0, posinf=1.0, neginf=0.0)
    return logit.clamp(0, 1)


class FoolsGold(Defense):
    """FoolsGold, Fung et al., RAID 2020 (Algorithm 1).

    Keeps, per client id, the running sum of its updates across rounds. Each round the sampled
    clients' histories are compared by cosine similarity; with pardoning and the logit with
    confidence ``kappa``, clients whose histories are too alike (sybils pushing one objective) get
    learning rates near 0 while diverse honest clients keep theirs. The step is
    sum_k alpha_k delta_k / n, as the authors' code. A client with alpha 0 is flagged.

    State (the histories) lives in this object and is saved with checkpoints; only the clients
    sampled in a round are compared, so partial participation works.
    """

    name = "foolsgold"
    paper = "Fung et al., RAID 2020"
    detects = True
    run_config = {"kappa": RunKey("FoolsGold: confidence kappa of the logit", check=lambda v: v > 0)}

    def __init__(self, kappa: float = 1.0, server_lr: float = 1.0) -> None:
        self.kappa = kappa
        self.server_lr = server_lr
        # the histories, one row per client id ever seen, in one float32 matrix on the CPU whose
        # capacity doubles when new clients arrive (rows past the last in use are never touched,
        # so unused capacity costs address space, not memory)
        self._rows: torch.Tensor | None = None
        self._index: dict[str, int] = {}

    @property
    def history(self) -> dict[str, torch.Tensor]:
        """Client id -> its summed updates (views of the history matrix)."""
        return {cid: self._rows[i] for cid, i in self._index.items()}

    def validate(self) -> None:
        if not self.kappa > 0 or not self.server_lr > 0:
            raise ValueError("kappa and server_lr must be > 0")

    def aggregate(self, global_params: torch.Tensor, round_updates: RoundUpdates) -> DefenseResult:
        ru = round_updates
        rows = self._accumulate(ru.client_ids, ru.updates)
        alpha = foolsgold_weights_from_gram(history_gram(self._rows, rows), self.kappa).to(ru.device, ru.updates.dtype)
        step = (alpha @ ru.updates) / ru.n
        share = alpha / alpha.sum() if alpha.sum() > 0 else alpha
        return DefenseResult(params=global_params + self.server_lr * step, weights=share, flagged=alpha <= 0,
                             info={"alpha": alpha})

    def _accumulate(self, client_ids: list[str], updates: torch.Tensor) -> list[int]:
        """Add this round's updates to the clients' histories; return their rows."""
        d = updates.shape[1]
        if self._rows is not None and self._rows.shape[1] != d:
            raise ValueError(f"update size {d} differs from the histories' {self._rows.shape[1]}")
        needed = len(self._index) + sum(cid not in self._index for cid in dict.fromkeys(client_ids))
        if self._rows is None or needed > self._rows.shape[0]:
            capacity = needed if self._rows is None else max(needed, 2 * self._rows.shape[0])
            grown = torch.empty((capacity, d), dtype=torch.float32)
            if self._rows is not None:
                grown[:len(self._index)].copy_(self._rows[:len(self._index)])
            self._rows = grown
        rows = []
        for cid, update in zip(client_ids, updates):
            i = self._index.get(cid)
            if i is None:
                i = self._index[cid] = len(self._index)
                self._rows[i].copy_(update.detach())
            else:
                self._rows[i].add_(update.detach().to("cpu"))
            rows.append(i)
        return rows

    def state_dict(self) -> dict:
        # views of the live histories (no copy of what may be gigabytes): checkpoints pickle them
        # at once, before the next round adds to them in place
        return {"history": {cid: self._rows[i].numpy() for cid, i in self._index.items()}}

    def load_state_dict(self, state: dict) -> None:
        history = state.get("history", {})
        self._index = {cid: i for i, cid in enumerate(history)}
        self._rows = None
        if history:
            first = next(iter(history.values()))
            self._rows = torch.empty((len(history), len(first)), dtype=torch.float32)
            for i, row in enumerate(history.values()):
                self._rows[i].copy_(torch.as_tensor(row))
