"""FoolsGold (Fung, Yoon and Beschastnikh, RAID 2020)."""

from __future__ import annotations

import torch

from ..updates import RoundUpdates, reuse_rows
from .base import Defense, DefenseResult
from .krum import gram_matrix


def foolsgold_weights(history: torch.Tensor, kappa: float = 1.0) -> torch.Tensor:
    """Algorithm 1 of the paper over the clients' update histories (one row each)."""
    n = history.shape[0]
    if n < 2:
        return torch.ones(n, dtype=torch.float64)
    gram = gram_matrix(history)  # float32 GEMM, float64 result: no float64 copy of the histories
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

    def __init__(self, kappa: float = 1.0, server_lr: float = 1.0) -> None:
        self.kappa = kappa
        self.server_lr = server_lr
        self.history: dict[str, torch.Tensor] = {}

    def validate(self) -> None:
        if not self.kappa > 0 or not self.server_lr > 0:
            raise ValueError("kappa and server_lr must be > 0")

    def aggregate(self, global_params: torch.Tensor, round_updates: RoundUpdates) -> DefenseResult:
        ru = round_updates
        for cid, row in zip(ru.client_ids, ru.updates):
            prev = self.history.get(cid)
            if prev is None:
                self.history[cid] = row.detach().to("cpu", copy=True)
            else:
                prev.add_(row.detach().cpu())
        hist = self._stacked([self.history[cid] for cid in ru.client_ids])
        alpha = foolsgold_weights(hist, self.kappa).to(ru.device, torch.float32)
        step = (alpha @ ru.updates) / ru.n
        share = alpha / alpha.sum() if alpha.sum() > 0 else alpha
        return DefenseResult(params=global_params + self.server_lr * step, weights=share, flagged=alpha <= 0,
                             info={"alpha": alpha})

    def _stacked(self, rows: list[torch.Tensor]) -> torch.Tensor:
        """The sampled clients' histories as one matrix, in a buffer reused across rounds."""
        self._stack_buf = reuse_rows(getattr(self, "_stack_buf", None), len(rows), rows[0].shape[0], rows[0].dtype)
        return torch.stack(rows, out=self._stack_buf[:len(rows)])

    def state_dict(self) -> dict:
        # views of the live histories (no copy of what may be gigabytes): checkpoints pickle them
        # at once, before the next round adds to them in place
        return {"history": {k: v.numpy() for k, v in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.history = {k: torch.as_tensor(v) if getattr(v, "flags", None) is not None and v.flags.writeable
                        else torch.tensor(v) for k, v in state.get("history", {}).items()}
