"""Krum and Multi-Krum (Blanchard et al., NeurIPS 2017); Bulyan (El Mhamdi et al., ICML 2018)."""

from __future__ import annotations

import functools

import numpy as np
import torch

from ..updates import RoundUpdates
from .aggregators import reduce_sorted_columns, uses_numpy
from .base import Defense, DefenseResult, RunKey
from .parallel import column_chunks, parallel_map


GRAM_CHUNK = 1 << 17  # columns per partial product: fixed, so the sum is the same for any thread count


def gram_matrix(x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """x x^T from products in x's dtype (float32 for the updates; float64 costs ~9x more on CPU), symmetrised (blocked
    BLAS need not return exactly equal halves) and in float64 for what is computed from it. On the
    CPU through numpy, whose matmul runs x @ x.T as a symmetric rank-k update (half the work of
    a general product), over pieces of ``GRAM_CHUNK`` columns shared out among the threads
    (``parallel.parallel_map``; BLAS alone does not split the long inner dimension) and summed in
    float64 in column order; ``backend="torch"`` forces the path other devices take."""
    if uses_numpy(x, backend):
        xn = x.detach().numpy()
        parts = parallel_map(lambda sl: np.matmul(xn[:, sl], xn[:, sl].T), column_chunks(xn.shape[1], GRAM_CHUNK))
        total = parts[0].astype(np.float64) if parts else np.zeros((xn.shape[0],) * 2)
        for part in parts[1:]:
            total += part
        gram = torch.from_numpy(total)
    else:
        gram = (x @ x.T).double()
    return (gram + gram.T) / 2


def squared_distances(x: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances, ||a||^2 + ||b||^2 - 2 a.b, from ``gram_matrix``."""
    return distances_from_gram(gram_matrix(x))


def distances_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Squared distances from a (float64, symmetric) Gram matrix."""
    sq = gram.diagonal()
    d2 = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0)
    d2.fill_diagonal_(0)
    return d2


def krum_scores(d2: torch.Tensor, num_malicious: int) -> torch.Tensor:
    """Score of each row: the sum of squared distances to its n - f - 2 closest other rows."""
    n = d2.shape[0]
    k = min(n - 1, max(1, n - num_malicious - 2))
    if uses_numpy(d2):  # a partition, not a sort: O(n^2) per call (Bulyan calls it n - 2f times)
        nearest = np.partition(d2.numpy(), k, axis=1)[:, :k + 1]  # the row itself (0) and its k nearest
        return torch.from_numpy(nearest.sum(axis=1))
    closest = d2.sort(dim=1).values[:, 1:k + 1]  # column 0 is the row itself
    return closest.sum(dim=1)


@functools.lru_cache(maxsize=16)
def window_band(span: int, windows: int, beta: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """span x windows 0/1 matrix whose column j holds ones on rows j .. j + beta - 1, built once
    per shape and device (not copied to the device for every block); callers only read it."""
    band = torch.zeros((span, windows), dtype=dtype)
    for j in range(windows):
        band[j:j + beta, j] = 1.0
    return band.to(device)


def closest_to_median_mean(s: torch.Tensor, beta: int, backend: str | None = None) -> torch.Tensor:
    """Per column of ``s`` (sorted along dim 0), the mean of the ``beta`` values closest to the
    column's median.

    In sorted order they form a window s[j .. j + beta - 1]. Of the candidate windows around the
    median, the best is where its two ends cross: med - s[j] (how far below the median it
    reaches) falls with j and s[j + beta - 1] - med rises, so with c the first start whose upper
    end is at least as far from the median as its lower one (s[j] + s[j + beta - 1] >= 2 med,
    counted over the candidates), the nearest window is c - 1 or c, whichever's farther end is
    nearer the median (ties: c - 1). No window is compared with another one by one, and each
    window's sum comes from one product with a 0/1 band matrix (exact zeros for the values left
    out: an outlier's magnitude never reaches the sum). On the CPU over the transposed block
    (each column's values contiguous, as ``sorted_column_blocks`` yields them) in numpy; other
    devices (``backend="torch"``) the same steps in torch."""
    m = s.shape[0]
    lo, hi = (m - 1) // 2, m // 2
    first, last = max(0, lo - beta + 1), min(hi, m - beta)  # the candidate windows' first and last starts
    span = last + beta - first  # the rows any candidate window covers
    band = window_band(span, last - first + 1, beta, s.device, s.dtype)
    if uses_numpy(s, backend):
        st = s.T.numpy()  # B x m
        med2 = st[:, lo] + st[:, hi]
        med = med2 / 2
        ends = st[:, first:last + 1] + st[:, first + beta - 1:last + beta]
        c = first + (ends < med2[:, None]).astype(np.float32) @ np.ones(last - first + 1, dtype=np.float32)
        c = c.astype(np.intp)
        flat, rows = st.reshape(-1), np.arange(len(st))  # flat takes: cheaper than paired fancy indices
        below, at = np.maximum(c - 1, first), np.minimum(c, last)
        gap_below, gap_above = med - flat.take(rows * m + below), flat.take(rows * m + at + beta - 1) - med
        start = np.where((c > first) & ((c > last) | (gap_below <= gap_above)), below, at)
        sums = st[:, first:first + span] @ band.numpy()  # B x windows
        return torch.from_numpy(sums.reshape(-1).take(rows * sums.shape[1] + start - first) / beta)
    med2 = s[lo] + s[hi]
    med = med2 / 2
    ends = s[first:last + 1] + s[first + beta - 1:last + beta]
    c = first + (ends < med2).sum(dim=0)
    below, at = (c - 1).clamp_min(first), c.clamp_max(last)
    gap_below = med - s.gather(0, below[None])[0]
    gap_above = s.gather(0, (at + beta - 1)[None])[0] - med
    start = torch.where((c > first) & ((c > last) | (gap_below <= gap_above)), below, at)
    sums = band.T @ s[first:first + span]  # windows x B
    return sums.gather(0, (start - first)[None])[0] / beta


class Krum(Defense):
    """Krum / Multi-Krum, Blanchard et al., NeurIPS 2017 (sec. 4).

    Each update's score is the sum of squared distances to its n - f - 2 nearest neighbours. Krum
    (``to_keep=0``) takes the single update with the lowest score; Multi-Krum averages the
    ``to_keep`` lowest-scoring ones with sample weights (as Flower's ``aggregate_krum``). Clients
    not selected are flagged.
    """

    name = "krum"
    reference_free = True
    paper = "Blanchard et al., NeurIPS 2017"
    detects = True
    run_config = {"to_keep": RunKey("Krum: 0 for Krum, m > 0 for Multi-Krum averaging the m best", key="krum-keep",
                                    check=lambda v: v >= 0)}

    def __init__(self, num_malicious: int = 0, to_keep: int = 0) -> None:
        self.num_malicious = num_malicious
        self.to_keep = to_keep

    def validate(self) -> None:
        if self.num_malicious < 0 or self.to_keep < 0:
            raise ValueError("num_malicious and to_keep must be >= 0")

    def select(self, updates: torch.Tensor) -> torch.Tensor:
        scores = krum_scores(squared_distances(updates), self.num_malicious)
        if self.to_keep > 0:
            return torch.argsort(scores, stable=True)[: self.to_keep]
        return torch.argmin(scores).reshape(1)

    def aggregate(self, global_params: torch.Tensor, round_updates: RoundUpdates) -> DefenseResult:
        ru = round_updates
        chosen = self.select(ru.updates)
        keep = torch.zeros(ru.n, dtype=torch.bool, device=ru.device)
        keep[chosen] = True
        w = torch.where(keep, ru.sample_weights, 0.0)
        w = w / w.sum()
        # Krum's step is the chosen row itself: no pass over the matrix for a one-hot mean
        if len(chosen) == 1:  # the adapter hands back the chosen client's model itself, bit for bit
            return DefenseResult(params=global_params + ru.updates[chosen[0]], weights=w, flagged=~keep,
                                 selected=int(chosen[0]))
        return DefenseResult(params=global_params + w @ ru.updates, weights=w, flagged=~keep)


class Bulyan(Defense):
    """Bulyan, El Mhamdi et al., ICML 2018 (sec. 4), with Krum as the selection rule.

    theta = n - 2f updates are selected by repeated Krum (each time over the remaining ones, the
    paper's rule and Flower's legacy ``Bulyan``); then, per coordinate, the beta = theta - 2f
    selected values closest to the coordinate median are averaged. Requires n >= 4f + 3. Clients
    never selected are flagged.

    Parameters
    ----------
    num_malicious : int
        f, the number of Byzantine clients tolerated.
    selection : str
        ``"repeated_krum"`` (the paper's), or ``"multi_krum"``: the theta best Krum scores of one
        pass over all n (what Flower's Message-API ``Bulyan`` does with its default
        ``selection_rule``). The two differ when removing a selected update changes the others'
        scores.
    """

    name = "bulyan"
    reference_free = True
    paper = "El Mhamdi et al., ICML 2018"
    detects = True
    SELECTIONS = ("repeated_krum", "multi_krum")
    run_config = {"selection": RunKey("Bulyan: repeated Krum (the paper's) or one Multi-Krum pass (Flower's Message API)",
                                      choices=("repeated_krum", "multi_krum"))}

    def __init__(self, num_malicious: int = 0, selection: str = "repeated_krum") -> None:
        self.num_malicious = num_malicious
        self.selection = selection

    def validate(self) -> None:
        if self.num_malicious < 0:
            raise ValueError("num_malicious must be >= 0")
        if self.selection not in self.SELECTIONS:
            raise ValueError(f"selection must be one of {self.SELECTIONS}, got {self.selection!r}")

    def check_num_clients(self, n: int) -> None:
        if n < 4 * self.num_malicious + 3:
            raise ValueError(f"Bulyan needs n >= 4f + 3 clients: f={self.num_malicious} needs "
                             f"{4 * self.num_malicious + 3}, the round has {n}")

    @staticmethod
    def coordinate_rule(s: torch.Tensor, beta: int) -> torch.Tensor:
        """Bulyan's per-coordinate step over the selected values of a column block, sorted along
        dim 0: the mean of the ``beta`` closest to the median."""
        return closest_to_median_mean(s, beta)

    def aggregate(self, global_params: torch.Tensor, round_updates: RoundUpdates) -> DefenseResult:
        ru = round_updates
        self.check_num_clients(ru.n)
        f = self.num_malicious
        theta, d2 = ru.n - 2 * f, squared_distances(ru.updates)
        if self.selection == "multi_krum":
            selected = torch.argsort(krum_scores(d2, f), stable=True)[:theta].tolist()
        else:
            remaining = list(range(ru.n))
            selected = []
            for _ in range(theta):
                sub = d2[remaining][:, remaining]
                best = remaining[int(torch.argmin(krum_scores(sub, f)))]
                selected.append(best)
                remaining.remove(best)
        step = reduce_sorted_columns(ru.updates, lambda s: self.coordinate_rule(s, theta - 2 * f), rows=selected)
        keep = torch.zeros(ru.n, dtype=torch.bool, device=ru.device)
        keep[selected] = True
        w = keep.float() / keep.sum()
        return DefenseResult(params=global_params + step, weights=w, flagged=~keep)
