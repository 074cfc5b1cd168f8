"""The AGR-tailored objective of Shejwalkar & Houmansadr (NDSS 2021, sec. IV-A) against the
coordinate-wise trimmed mean and median, and the paper's search for its gamma (Alg. 1).

All m attackers send c = mu + gamma p. In one coordinate, with the k benign values sorted
b_0 <= ... <= b_{k-1}, the combined column's i-th smallest of its n = k + m values is
clamp(c, b_{i-m}, b_i) (b_j = -inf for j < 0, +inf for j >= k): c fills ranks [r, r + m), r the
benign values below it. The trimmed mean that cuts ``cut`` values at each end averages ranks
[cut, n - cut), W = n - 2 cut of them. With clamp(c, lo, hi) = c + relu(lo - c) - relu(c - hi),
and the ranks that are both a lower and an upper bound summing to (b - c):

    W f(c) = (W - n_mid) c + S_mid + sum_{b in L} relu(b - c) - sum_{b in H} relu(c - b)

S_mid and n_mid: the sum and number of benign ranks [cut, k - cut); L: benign ranks
[max(0, cut - m), min(cut, k - cut)); H: ranks [max(cut, k - cut), min(k, n - cut)), both
min(cut, m) values or fewer. The median is the trimmed mean with cut = (n - 1) // 2 (the mean of
the two middle values for even n, as numpy and ``defenses.Median``): L and H hold one or two order
statistics. One sort of the benign columns gives L, H and S_mid (``TrimmedObjective.build``);
after it f and the objective ||mu - f||^2 at any gamma need only them, never the n x d matrix.
"""

from __future__ import annotations

import numpy as np
import torch

from ..defenses.aggregators import sorted_blocks, sorted_column_blocks, uses_numpy
from ..defenses.parallel import column_chunks, parallel_map, split_evenly, workers

RULES = ("trimmed_mean", "median")
ROW_CHUNK = 1 << 15  # coordinates per piece of an evaluation: its float64 temporaries stay small


def trim_count(rule: str, num_values: int, num_attackers: int, num_clients: int, beta: float | None) -> int:
    """Values the rule cuts at each end of a column of ``num_values`` (m copies and the benign
    updates the attackers model the round with). Median: (n - 1) // 2. Trimmed mean: int(beta n),
    as ``defenses.TrimmedMean`` cuts, with ``beta`` the defense's share the attackers were told;
    ``None`` is the paper's assumption that the server trims as many as there are attackers
    (beta = m / num_clients, kept exact in integers)."""
    if rule not in RULES:
        raise ValueError(f"no AGR-tailored objective for {rule!r}; choose one of {RULES}")
    most = (num_values - 1) // 2
    if rule == "median":
        return most
    if beta is None:
        return min(most, num_attackers * num_values // num_clients)
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"trim_beta must be in [0, 0.5), got {beta}")
    return min(most, int(beta * num_values))


def _kinks_passed(block: np.ndarray, rows: slice | np.ndarray, lowest: np.ndarray, highest: np.ndarray,
                  total: np.ndarray, c: np.ndarray, upper: bool) -> tuple[np.ndarray, np.ndarray]:
    """Over the ``rows`` of ``block`` (sorted order statistics; their ``lowest``, ``highest`` and
    float64 ``total``): sum relu(v - c) and #{v > c} (``upper``: sum relu(c - v) and #{v < c}).
    Rows with c beyond all their values or none take O(1); only rows c falls among are read."""
    s = block.shape[1]
    sign = -1.0 if upper else 1.0
    every, some = (c > highest, c > lowest) if upper else (c < lowest, c < highest)
    relu = np.where(every, sign * (total - s * c), 0.0)
    count = np.where(every, s, 0)
    among = np.flatnonzero(some & ~every)
    if len(among):
        among_rows = block[rows][among] if isinstance(rows, slice) else block[rows[among]]
        over = np.maximum(sign * (among_rows - c[among, None]), 0)
        relu[among] = over.sum(axis=1)
        count[among] = np.count_nonzero(over, axis=1)
    return relu, count


class TrimmedObjective:
    """||mu - f(c(gamma))||^2, f the trimmed mean cutting ``cut`` at each end of the m copies of
    c(gamma) = mu + gamma p and the benign values, from each coordinate's L and H order statistics
    (``low``, ``high``: d x s), the middle sum (module docstring) and, per coordinate, the first,
    last and float64 sum of L and of H (``stats``): a coordinate whose c lies beyond all of L's
    (H's) values or none of them takes a few operations, so an evaluation over all coordinates
    reads d-vectors and only the rows of L and H that c falls among.

    The search visits gammas that close in (``narrow(lo, hi)``: every later gamma lies in
    [lo, hi]). A coordinate none of whose order statistics lies between c(lo) and c(hi) has an
    affine f there; it is folded into three running sums (its part of the objective is a
    quadratic in gamma) and left out of later evaluations, which so shrink to the coordinates
    near a kink."""

    def __init__(self, low: np.ndarray, high: np.ndarray, stats: dict[str, np.ndarray], mid_count: int,
                 width: int) -> None:
        self.low, self.high, self.stats = low, high, stats
        self.mean, self.p = stats["mean"], stats["p"]
        self.width = width
        self.slope = width - mid_count  # W f(c) = slope c + ... between kinks
        self.live: np.ndarray | None = None  # rows still evaluated (None: all)
        # gamma -> (deviation, #L above c, #H below c) of the live rows, at the ends of the interval
        self.ends: dict[float, tuple[np.ndarray, ...]] = {}
        self.folded = [0.0, 0.0, 0.0]  # sum A^2, sum A B, sum B^2 of folded rows' deviations A + B gamma

    @classmethod
    def build(cls, benign: torch.Tensor, num_attackers: int, cut: int, mean: torch.Tensor, p: torch.Tensor,
              backend: str | None = None) -> "TrimmedObjective":
        """One sort of the ``benign`` updates (k x d) by column blocks, on the threads
        (``aggregators.sorted_column_blocks``), for L, H and their statistics. Kept on the CPU:
        the search is many small steps, numpy's."""
        (k, d), m = benign.shape, num_attackers
        lo_start = max(0, cut - m)
        s = max(0, min(cut, k - cut) - lo_start)
        hi_start = mid_end = max(cut, k - cut)
        dtype = torch.empty(0, dtype=benign.dtype).numpy().dtype
        low, high = np.empty((d, s), dtype=dtype), np.empty((d, s), dtype=dtype)
        stats = {"mean": np.array(mean.detach().cpu(), dtype=np.float64),
                 "p": np.array(p.detach().cpu(), dtype=np.float64),
                 **{name: np.zeros(d) for name in ("mid_sum", "low_sum", "high_sum")},
                 **{name: np.zeros(d, dtype=dtype) for name in ("low_min", "low_max", "high_min", "high_max")}}

        def run(group: list[slice]) -> None:
            for cols, srt in sorted_column_blocks(benign, None, backend, blocks=group):
                srt = srt.cpu().numpy()
                # einsum: numpy's sum over a short axis is 3x slower than the sort itself
                stats["mid_sum"][cols] = np.einsum("ij->j", srt[cut:mid_end], dtype=np.float64)
                for out, start, name in ((low, lo_start, "low"), (high, hi_start, "high")):
                    out[cols] = srt[start:start + s].T
                    if s:
                        stats[f"{name}_sum"][cols] = np.einsum("ij->i", out[cols], dtype=np.float64)
                        stats[f"{name}_min"][cols], stats[f"{name}_max"][cols] = srt[start], srt[start + s - 1]

        parallel_map(run, split_evenly(sorted_blocks(benign, backend), workers() if uses_numpy(benign, backend) else 1))
        return cls(low, high, stats, mid_end - cut, k + m - 2 * cut)

    def _at(self, rows: np.ndarray | None, gamma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """f(c) - mu at c = mu + gamma p, and the numbers of L values above c and of H values
        below it (the kinks c has passed), for ``rows`` (None: every coordinate), piece by piece
        on the threads."""
        total = len(self.mean) if rows is None else len(rows)
        out = np.empty(total), np.empty(total, dtype=np.int64), np.empty(total, dtype=np.int64)

        def piece(part: slice) -> None:
            sel = part if rows is None else rows[part]
            st = {name: v[sel] for name, v in self.stats.items()}
            c = st["mean"] + gamma * st["p"]
            over, above = _kinks_passed(self.low, sel, st["low_min"], st["low_max"], st["low_sum"], c, upper=False)
            under, below = _kinks_passed(self.high, sel, st["high_min"], st["high_max"], st["high_sum"], c, upper=True)
            out[0][part] = (self.slope * c + st["mid_sum"] + over - under) / self.width - st["mean"]
            out[1][part], out[2][part] = above, below

        pieces = column_chunks(total, ROW_CHUNK)
        if len(pieces) > 1:
            parallel_map(piece, pieces)
        elif pieces:
            piece(pieces[0])
        return out

    def aggregate(self, gamma: float) -> torch.Tensor:
        """The rule's output (float64, every coordinate) when the attackers send mu + gamma p."""
        return torch.from_numpy(self.mean + self._at(None, gamma)[0])

    def value(self, gamma: float) -> float:
        """||mu - f(mu + gamma p)||^2 (kept for ``narrow`` as an end of the next interval)."""
        self.ends[gamma] = self._at(self.live, gamma)
        dev = self.ends[gamma][0]
        aa, ab, bb = self.folded
        return aa + 2 * gamma * ab + gamma * gamma * bb + float(np.square(dev).sum())

    def narrow(self, lo: float, hi: float) -> None:
        """Every later gamma lies in [lo, hi]: fold the coordinates without a kink in between."""
        for g in (lo, hi):
            if g not in self.ends:
                self.ends[g] = self._at(self.live, g)
        (dev_lo, a_lo, b_lo), (_, a_hi, b_hi) = self.ends[lo], self.ends[hi]
        flat = (a_lo == a_hi) & (b_lo == b_hi)
        if flat.any():
            keep = ~flat
            rows = np.flatnonzero(flat) if self.live is None else self.live[flat]
            # d deviation / d gamma = p (slope - #L above - #H below) / W on the whole interval
            slope = self.p[rows] * (self.slope - a_lo[flat] - b_lo[flat]) / self.width
            base = dev_lo[flat] - lo * slope
            self.folded[0] += float(np.square(base).sum())
            self.folded[1] += float((base * slope).sum())
            self.folded[2] += float(np.square(slope).sum())
            self.live = np.flatnonzero(keep) if self.live is None else self.live[keep]
            self.ends = {g: tuple(v[keep] for v in self.ends[g]) for g in (lo, hi)}
        else:
            self.ends = {g: self.ends[g] for g in (lo, hi)}


def most_damaging_gamma(objective, gamma_init: float, tol: float, rtol: float = 1e-9) -> float:
    """Shejwalkar & Houmansadr's search for gamma (NDSS 2021, Alg. 1) with the AGR-tailored
    oracle (sec. IV-A): from gamma_succ = 0 and gamma = ``gamma_init``, step = gamma_init / 2,
    evaluate the objective; where it beats the best so far, gamma_succ = gamma and gamma grows by
    step, else it shrinks by step; the step halves; stop once the step is below ``tol``; return
    gamma_succ. So gamma stays in (0, 2 gamma_init), and after a success every later gamma is
    larger. Where every copy is cut, the objective is flat in gamma: a gain below ``rtol``
    (relative) is rounding and no success, so of a flat stretch the first point visited is kept.
    ``objective`` has ``value(gamma)`` and ``narrow(lo, hi)`` (told that every later gamma lies
    in [lo, hi])."""
    if gamma_init <= 0 or tol <= 0:
        raise ValueError(f"gamma_init and tol must be positive, got {gamma_init} and {tol}")
    best_gamma, best = 0.0, objective.value(0.0)
    gamma, step, lo, hi = float(gamma_init), gamma_init / 2, 0.0, 2.0 * gamma_init
    while step >= tol:
        value = objective.value(gamma)
        if value > best + rtol * abs(best):
            best_gamma, best = gamma, value
            lo, gamma = gamma, gamma + step
        else:
            hi, gamma = gamma, gamma - step
        step /= 2
        if step >= tol:
            objective.narrow(lo, hi)
    return best_gamma


__all__ = ["RULES", "TrimmedObjective", "most_damaging_gamma", "trim_count"]
