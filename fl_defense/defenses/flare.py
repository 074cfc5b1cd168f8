"""FLARE (Wang, Xiao, Chen, Hu, Lou & Hou, AsiaCCS 2022)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..updates import RoundUpdates
from .base import Defense, DefenseResult, RunKey, ServerContext


def mmd2_matrix(plrs: torch.Tensor, chunk: int = 8) -> tuple[torch.Tensor, float]:
    """Pairwise squared MMD between the clients' PLR sets (``plrs``: n x m x h), the unbiased
    estimator with a Gaussian kernel k(a, b) = exp(-||a - b||^2 / (2 sigma^2)):
    MMD^2_u(i, j) = mean_{a != a'} k(P_i a, P_i a') + mean_{b != b'} k(P_j b, P_j b')
    - 2 mean_{a, b} k(P_i a, P_j b). One bandwidth for the whole round (sigma: the median pairwise
    distance among at most 1000 pooled representations taken at an even stride), so every pair is
    measured with the same kernel. Returns (n x n matrix, sigma)."""
    n, m, h = plrs.shape
    pooled = plrs.reshape(n * m, h).to(torch.float64)
    probe = pooled[:: max(1, (n * m) // 1000)]
    d = torch.cdist(probe, probe)
    off = d[~torch.eye(len(probe), dtype=torch.bool)]
    sigma = float(off[off > 0].median()) if (off > 0).any() else 1.0
    gamma = 1.0 / (2.0 * sigma * sigma)
    sums = torch.empty(n, n, dtype=torch.float64)
    for s in range(0, n, chunk):  # block sums of the (n m) x (n m) kernel, a few clients at a time
        rows = pooled[s * m:min(n, s + chunk) * m]
        k = torch.exp(-gamma * torch.cdist(rows, pooled).square_())
        sums[s:s + len(rows) // m] = k.reshape(len(rows) // m, m, n, m).sum(dim=(1, 3))
    sums = (sums + sums.T) / 2  # exactly symmetric (the blocks were summed in different orders)
    self_term = (sums.diagonal() - m) / (m * (m - 1)) if m > 1 else torch.zeros(n, dtype=torch.float64)
    mmd2 = self_term[:, None] + self_term[None, :] - 2.0 * sums / (m * m)
    mmd2.fill_diagonal_(0.0)
    return mmd2, sigma


def neighbour_counts(dist: torch.Tensor, k: int) -> torch.Tensor:
    """c_j = #{i != j : j is among the k nearest (smallest ``dist``) other clients of i}; ties by
    index (a stable sort)."""
    n = dist.shape[0]
    d = dist.clone()
    d.fill_diagonal_(float("inf"))
    nearest = torch.sort(d, dim=1, stable=True).indices[:, :k]
    return torch.bincount(nearest.reshape(-1), minlength=n)


class FLARE(Defense):
    """FLARE, Wang et al., AsiaCCS 2022 (sec. 4, Algorithm 1).

    The server runs every client's model w_k = G + delta_k on a small set of its own samples and
    takes the penultimate-layer representations (PLRs) P_k (m samples x h features). Then:

    1. the squared maximum mean discrepancy MMD^2(P_i, P_j) between every two clients' PLR sets
       (unbiased estimator, Gaussian kernel; ``mmd2_matrix``);
    2. for every client i its k nearest neighbours (smallest MMD), k = ``neighbour_fraction`` * n
       (the paper: 50 % of the clients, honest majority); c_j counts how often client j is among
       the others' nearest neighbours;
    3. trust scores TS_j = exp(c_j / tau) / sum_l exp(c_l / tau) (a softmax of the counts,
       temperature ``temperature``);
    4. G' = G + server_lr * sum_j TS_j delta_j.

    A weighting rule flags nobody by its weights alone (every softmax weight is positive); as for
    FoolsGold and FLTrust, whose flags are the clients the rule shuts out, a client is flagged when
    no other client counts it as a neighbour (c_j = 0): its trust is then the round's lowest,
    exp(0) / sum.

    Choices the paper leaves open: the kernel's bandwidth (one per round, the median heuristic over
    the pooled PLRs), k for odd n (floor, at least 1), ties (by client order). FLPoison divides the
    counts by their mean before the softmax; the paper's softmax of the counts is kept here.

    Parameters
    ----------
    features : callable
        Maps a trainable vector to the model's PLRs of the server's samples (m x h); the server
        app builds ``fl_defense.server_tasks.PenultimateFeatures`` over its held-out split.
    neighbour_fraction : float
        k as a share of the round's clients (0.5 in the paper).
    temperature : float
        tau of the trust softmax (1 in the paper).
    samples : int
        How many of the server's samples the server app runs each model on.
    server_lr : float
        Server learning rate on the trust-weighted update.
    """

    name = "flare"
    paper = "Wang et al., AsiaCCS 2022"
    detects = True
    server_provided = ("features",)
    run_config = {
        "neighbour_fraction": RunKey("FLARE: nearest neighbours counted per client, as a share of the round's clients "
                                     "(the paper: 0.5)", check=lambda v: 0 < v < 1),
        "temperature": RunKey("FLARE: temperature tau of the trust softmax over neighbour counts (the paper: 1)",
                              check=lambda v: v > 0),
        "samples": RunKey("FLARE: server samples each client model is run on for its penultimate-layer "
                          "representations", check=lambda v: v >= 2),
    }

    def __init__(self, features: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 neighbour_fraction: float = 0.5, temperature: float = 1.0, samples: int = 100,
                 server_lr: float = 1.0) -> None:
        self.features = features
        self.neighbour_fraction = neighbour_fraction
        self.temperature = temperature
        self.samples = samples
        self.server_lr = server_lr

    @classmethod
    def server_parts(cls, ctx: ServerContext) -> dict:
        """The PLRs of a private model copy on ``samples`` of the held-out split's images."""
        from ..server_tasks import PenultimateFeatures

        return {"features": PenultimateFeatures(ctx.model(), ctx.held_out()[0], ctx.kwargs["samples"])}

    def validate(self) -> None:
        if self.features is None or not callable(self.features):
            raise ValueError("features must be a callable: trainable vector -> penultimate-layer representations "
                             "(m x h) of the server's samples (fl_defense.server_tasks.PenultimateFeatures)")
        if not 0 < self.neighbour_fraction < 1:
            raise ValueError(f"neighbour_fraction must be in (0, 1), got {self.neighbour_fraction}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.samples < 2:
            raise ValueError(f"samples must be >= 2 (the unbiased MMD), got {self.samples}")
        if not self.server_lr > 0:
            raise ValueError(f"server_lr must be > 0, got {self.server_lr}")

    def aggregate(self, global_params: torch.Tensor, round_updates: RoundUpdates) -> DefenseResult:
        ru = round_updates
        if ru.n == 1:
            w = torch.ones(1, dtype=torch.float64)
            return DefenseResult(params=global_params + self.server_lr * ru.updates[0], weights=w,
                                 flagged=torch.zeros(1, dtype=torch.bool), info={"counts": [0]})
        plrs = torch.stack([self.features(global_params + ru.updates[k]).detach().cpu() for k in range(ru.n)])
        mmd2, sigma = mmd2_matrix(plrs)
        k = min(ru.n - 1, max(1, int(self.neighbour_fraction * ru.n)))
        counts = neighbour_counts(mmd2, k)
        trust = torch.softmax(counts.to(torch.float64) / self.temperature, dim=0)
        step = trust.to(ru.device, ru.updates.dtype) @ ru.updates
        return DefenseResult(params=global_params + self.server_lr * step, weights=trust, flagged=counts == 0,
                             info={"counts": counts, "trust": trust, "k": k, "sigma": sigma})
