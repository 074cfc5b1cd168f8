"""AlignIns (Xu, Zhang, Li, Hu and Wang, "Detecting Backdoor Attacks in Federated Learning via
Direction Alignment Inspection", CVPR 2025)."""

from __future__ import annotations

import numpy as np
import torch

from ..updates import RoundUpdates
from .aggregators import sign_sum
from .base import Defense, DefenseResult, RunKey
from .parallel import parallel_map, split_evenly, workers

DIRECTIONS = ("global", "mean")


def kth_smallest(values: np.ndarray, r: int) -> tuple[float, int, int]:
    """t = ``np.partition(values, r)[r]``, the value of rank r (0-based), with the counts of
    values above t and equal to t, without partitioning all of a long vector: the sorted
    strided sample ``values[::64]`` brackets rank r between two sample values lo <= hi (four
    standard deviations of a sample quantile's rank either side), one pass counts the values
    below lo and gathers those in [lo, hi], and only those are partitioned and counted (every
    value above hi is above t). Exact whatever the data: when the bracket misses rank r, the
    whole vector is partitioned and counted."""
    d = len(values)
    if d >= 1 << 16:
        sample = np.sort(values[::64])
        m = len(sample)
        at = r / d * m
        margin = 4.0 * np.sqrt(m * 0.25) + 2.0
        lo = sample[max(0, int(at - margin))]
        hi = sample[min(m - 1, int(at + margin) + 1)]
        below = int(np.count_nonzero(values < lo))
        inside = values[(values >= lo) & (values <= hi)]
        if below <= r < below + len(inside):
            t = np.partition(inside, r - below)[r - below]
            above = d - below - len(inside) + int(np.count_nonzero(inside > t))
            return float(t), above, int(np.count_nonzero(inside == t))
    t = np.partition(values, r)[r]
    return float(t), int(np.count_nonzero(values > t)), int(np.count_nonzero(values == t))


def masked_sign_alignment(u: torch.Tensor, principal: torch.Tensor, k: int) -> np.ndarray:
    """MPSA_i: among the k coordinates of largest |u_i|, the fraction whose sign equals the
    principal sign. Coordinates tied at the k-th largest magnitude count in proportion to the
    places left for them (torch.topk would pick among them arbitrarily). Rows are shared out
    among the threads; each row's threshold t comes from ``kth_smallest`` of its magnitudes.

    With p in {-1, 0, 1}, q = u_i * p is +|u_i| where the signs agree on a nonzero entry, -|u_i|
    or 0 elsewhere (a product by +-1 or 0 is exact), so for t > 0 the agreeing entries above and
    at the threshold are counted by q > t and q == t, a pass each. When t = 0 the entries at the
    threshold are zeros, which agree only where p is 0."""
    x = u.detach().cpu().numpy()
    p = principal.detach().cpu().numpy().astype(x.dtype, copy=False)
    n, d = x.shape

    def rows(group: list[int]) -> list[float]:
        out = []
        for i in group:
            mag = np.abs(x[i])
            t, above, ties = kth_smallest(mag, d - k)  # the k-th largest magnitude
            q = x[i] * p
            agree_above = int(np.count_nonzero(q > t))
            agree_at = int(np.count_nonzero(q == t)) if t > 0 else int(np.count_nonzero((mag == 0) & (p == 0)))
            need = k - above
            out.append((float(agree_above) + need * float(agree_at) / ties) / k)
        return out

    groups = split_evenly(list(range(n)), workers())
    return np.array([v for part in parallel_map(rows, groups) for v in part])


def mz_scores(values: np.ndarray) -> np.ndarray:
    """|v - median(v)| / std(v) (population std), 0 when the values do not vary."""
    std = float(np.std(values))
    if not std > 1e-9:
        return np.zeros(len(values))
    return np.abs(values - np.median(values)) / std


class AlignIns(Defense):
    """AlignIns, Xu et al., CVPR 2025 (sec. 4, Algorithm 1).

    1. TDA (temporal direction alignment): omega_i = cos(delta_i, theta^t), the cosine between
       each update and the global model it was trained from (``direction="global"``, the paper
       and its authors' code; ``"mean"`` uses the mean update instead).
    2. MPSA (masked principal sign alignment ratio): with p = sign(sum_j sign(delta_j)) the
       principal sign and Top-k(delta_i) the k = ``sparsity`` * d coordinates of largest
       magnitude, rho_i = |{j in Top-k : sign(delta_i[j]) = p[j]}| / k.
    3. MZ-scores of both lists, MZ(v_i) = |v_i - med(v)| / std(v); clients with MZ(rho) <
       ``lambda_s`` and MZ(omega) < ``lambda_c`` (the filtering radii) are benign, everyone else
       is flagged.
    4. Post-filtering clipping: each benign update is scaled to at most the median norm of the
       benign updates (the lower middle one for an even count, as torch.median), and the clipped
       updates are averaged with sample weights (the authors' code). No benign update: no step.

    Defaults are the paper's: sparsity 0.3, lambda_s = lambda_c = 1.
    """

    name = "alignins"
    paper = "Xu et al., CVPR 2025"
    detects = True
    run_config = {
        "lambda_s": RunKey("AlignIns: MPSA filtering radius lambda_s (MZ-score)", check=lambda v: v > 0),
        "lambda_c": RunKey("AlignIns: TDA filtering radius lambda_c (MZ-score)", check=lambda v: v > 0),
        "sparsity": RunKey("AlignIns: share k/d of top coordinates MPSA inspects", check=lambda v: 0 < v <= 1),
        "direction": RunKey("AlignIns: TDA's cosine with the global model (paper) or the mean update",
                            choices=("global", "mean")),
    }

    def __init__(self, lambda_s: float = 1.0, lambda_c: float = 1.0, sparsity: float = 0.3,
                 direction: str = "global") -> None:
        self.lambda_s = lambda_s
        self.lambda_c = lambda_c
        self.sparsity = sparsity
        self.direction = direction

    def validate(self) -> None:
        if not self.lambda_s > 0 or not self.lambda_c > 0:
            raise ValueError(f"lambda_s and lambda_c must be > 0, got {self.lambda_s}, {self.lambda_c}")
        if not 0 < self.sparsity <= 1:
            raise ValueError(f"sparsity must be in (0, 1], got {self.sparsity}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")

    def alignment(self, global_params: torch.Tensor, ru: RoundUpdates) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
        """TDA and MPSA of every update, and the updates' norms."""
        u = ru.updates
        ref = global_params.to(u.device, u.dtype) if self.direction == "global" else u.mean(dim=0)
        norms = torch.linalg.vector_norm(u, dim=1)
        tda = (u @ ref).double() / (norms.double() * torch.linalg.vector_norm(ref).double()).clamp_min(1e-12)
        k = max(1, int(ru.d * self.sparsity))
        mpsa = masked_sign_alignment(u, torch.sign(sign_sum(u)), k)
        return tda.cpu().numpy(), mpsa, norms

    def aggregate(self, global_params: torch.Tensor, round_updates: RoundUpdates) -> DefenseResult:
        ru = round_updates
        tda, mpsa, norms = self.alignment(global_params, ru)
        mz_mpsa, mz_tda = mz_scores(mpsa), mz_scores(tda)
        benign = (mz_mpsa < self.lambda_s) & (mz_tda < self.lambda_c)
        info = {"tda": tda.tolist(), "mpsa": mpsa.tolist(), "mz-tda": mz_tda.tolist(), "mz-mpsa": mz_mpsa.tolist()}
        adm = torch.as_tensor(benign, device=ru.device)
        if not adm.any():
            return DefenseResult(params=global_params.clone(), weights=torch.zeros(ru.n, device=ru.device),
                                 flagged=~adm, info=info)
        bound = norms[adm].median()
        scale = torch.clamp(bound / norms.clamp_min(1e-30), max=1.0)
        w = torch.where(adm, ru.sample_weights, 0.0)
        w = w / w.sum()
        return DefenseResult(params=global_params + (w * scale) @ ru.updates, weights=w, flagged=~adm,
                             info={**info, "clip-bound": float(bound)})
