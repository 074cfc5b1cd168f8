"""Base aggregators that RLR (and later wrappers) compose with: weighted mean, median, sign."""

from __future__ import annotations

import threading

import numpy as np
import torch

from ..updates import RoundUpdates
from .parallel import map_in_groups, parallel_map, split_evenly, workers


def uses_numpy(x: torch.Tensor, backend: str | None = None) -> bool:
    """Whether work on ``x`` takes the numpy path (the CPU's default) or the torch one (other
    devices; ``backend="torch"`` forces it on the CPU, as tests of the GPU path do)."""
    return (backend or ("numpy" if x.device.type == "cpu" else "torch")) == "numpy"


def column_blocks(u: torch.Tensor, block_bytes: int = 4 << 20, within: slice | None = None):
    """Column slices of ``u`` (n x d) about ``block_bytes`` each (inside the column range
    ``within``, default all): an elementwise step on an n x d matrix done block by block keeps its
    temporaries in cache instead of allocating (and page faulting) a second n x d matrix."""
    n, d = u.shape
    lo, hi = (0, d) if within is None else (within.start, within.stop)
    step = max(1024, block_bytes // (4 * max(1, n)))
    for start in range(lo, hi, step):
        yield slice(start, min(hi, start + step))


def row_min_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row minimum and maximum. On the CPU through numpy's contiguous reductions
    (``torch.aminmax`` over rows of a wide matrix is many times slower there), column block by
    column block on the threads (exact in any order)."""
    if uses_numpy(x):
        xn = x.detach().numpy()
        if xn.shape[1] == 0:
            raise ValueError("row_min_max of a matrix without columns")

        def extremes(group: list[slice]) -> tuple[np.ndarray, np.ndarray]:
            lo, hi = xn[:, group[0]].min(axis=1), xn[:, group[0]].max(axis=1)
            for cols in group[1:]:
                np.minimum(lo, xn[:, cols].min(axis=1), out=lo)
                np.maximum(hi, xn[:, cols].max(axis=1), out=hi)
            return lo, hi

        parts = parallel_map(extremes, split_evenly(list(column_blocks(x)), workers()))
        lo, hi = parts[0]
        for a, b in parts[1:]:
            np.minimum(lo, a, out=lo)
            np.maximum(hi, b, out=hi)
        return torch.from_numpy(lo), torch.from_numpy(hi)
    return torch.aminmax(x, dim=1)


def row_max_abs(x: torch.Tensor) -> torch.Tensor:
    """Per-row maximum of |x|, from ``row_min_max`` (no |x| temporary)."""
    lo, hi = row_min_max(x)
    return torch.maximum(-lo, hi)


def map_column_blocks(fn, u: torch.Tensor, within: slice | None = None) -> None:
    """``fn(cols)`` for every ``column_blocks(u, within=within)`` block; on the CPU the blocks
    are shared out among the threads (``parallel.map_in_groups``; torch's own threads do not pay
    off on blocks this small: a sign-and-product pass ran 2x slower on two torch threads than on
    one). ``fn`` writes only its own columns and returns nothing; each block is computed the
    same way whichever thread takes it, so results do not depend on the thread count."""
    map_in_groups(fn, column_blocks(u, within=within), workers() if uses_numpy(u) else 1)


def column_block_sums(fn, u: torch.Tensor, size: int, within: slice | None = None) -> torch.Tensor:
    """The sum over ``column_blocks(u, within=within)`` of ``fn(cols)`` (a ``size``-vector), in
    float64, blocks shared out among the threads as in ``map_column_blocks`` and added in block
    order (the same result for any thread count). Each block's vector is copied at once into a
    row allocated before the pass: kept as a small allocation of its own between the blocks'
    large temporaries, it fragmented the heap (FDCR's peak memory rose by 200 MB)."""
    blocks = list(column_blocks(u, within=within))
    parts = torch.zeros((len(blocks), size), dtype=torch.float64, device=u.device)
    index = {cols.start: i for i, cols in enumerate(blocks)}

    def one(cols: slice) -> None:
        parts[index[cols.start]] = fn(cols)

    map_column_blocks(one, u, within=within)
    total = torch.zeros(size, dtype=torch.float64, device=u.device)
    for row in parts:
        total += row
    return total


_scratch = threading.local()


def block_scratch(like: torch.Tensor) -> torch.Tensor:
    """A buffer of ``like``'s shape, dtype and device, reused by the calling thread from one
    block to the next (it grows to the largest block and is kept). A fresh n x B temporary per
    block on every thread made glibc keep about 90 MB more resident after the first two-thread
    sign pass (RLR's peak memory 1.09 -> 1.33 matrices); reusing one per thread does not."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < like.numel() or buf.dtype != like.dtype or buf.device != like.device:
        buf = _scratch.buf = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
    return buf[:like.numel()].view(like.shape)


def sign_sum(u: torch.Tensor) -> torch.Tensor:
    """sum_k sign(u_k) per column, block by block."""
    out = torch.empty(u.shape[1], dtype=u.dtype, device=u.device)

    def block(cols: slice) -> None:
        x = u[:, cols]
        torch.sum(torch.sign(x, out=block_scratch(x)), dim=0, out=out[cols])

    map_column_blocks(block, u)
    return out


def signed_combination(c: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """c @ sign(u) (an n-vector of coefficients against the n x d signs), block by block."""
    out = torch.empty(u.shape[1], dtype=u.dtype, device=u.device)

    def block(cols: slice) -> None:
        x = u[:, cols]
        torch.mv(torch.sign(x, out=block_scratch(x)).T, c.to(u.dtype), out=out[cols])

    map_column_blocks(block, u)
    return out


def weighted_mean(round_updates: RoundUpdates, updates: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    u = round_updates.updates if updates is None else updates
    w = round_updates.sample_weights
    return w @ u, w


def sorted_column_blocks(u: torch.Tensor, rows: list[int] | None = None, backend: str | None = None,
                         blocks: list[slice] | None = None):
    """Yield ``(cols, s)`` with ``s`` = ``u[rows][:, cols]`` sorted along dim 0 (n x B), block by
    block (``rows``: a subset of the rows, default all; selected per block, never copied whole;
    ``blocks``: the column blocks to visit, default all of ``sorted_blocks(u, backend)``).

    Every order statistic of a column (median, trimmed mean, Bulyan's window) comes from one sort.
    On the CPU each block is transposed into a small reused buffer and its rows sorted by numpy,
    whose vectorised sort handles short rows an order of magnitude faster than a selection over
    strided columns (docs/results/aggregation.md); elsewhere ``torch.sort`` per block. ``s`` is
    only valid until the next block is yielded. ``backend`` ("numpy" or "torch") overrides the
    choice by device (tests run the GPU path on the CPU this way).
    """
    n = u.shape[0] if rows is None else len(rows)
    blocks = sorted_blocks(u, backend) if blocks is None else blocks
    if not uses_numpy(u, backend):
        idx = None if rows is None else torch.as_tensor(rows, device=u.device)
        for cols in blocks:
            block = u[:, cols] if idx is None else u[idx, cols]
            yield cols, block.sort(dim=0).values
        return
    un = u.detach().numpy()
    idx = None if rows is None else np.asarray(rows)
    buf = None
    for cols in blocks:
        if buf is None:
            buf = np.empty((cols.stop - cols.start, n), dtype=un.dtype)
        block = buf[: cols.stop - cols.start]
        block[...] = (un[:, cols] if idx is None else un[idx, cols]).T
        block.sort(axis=1)
        yield cols, torch.from_numpy(block).T


def sorted_blocks(u: torch.Tensor, backend: str | None = None) -> list[slice]:
    """The column blocks ``sorted_column_blocks`` visits: 2 MB transposition buffers on the CPU."""
    return list(column_blocks(u, block_bytes=(2 << 20) if uses_numpy(u, backend) else (4 << 20)))


def reduce_sorted_columns(u: torch.Tensor, fn, rows: list[int] | None = None, backend: str | None = None) -> torch.Tensor:
    """``fn(s)`` over every sorted column block ``s`` (n x B -> B), written into one d-vector.
    On the CPU the blocks are shared out among the threads (``parallel.parallel_map``): every
    block is computed the same way whichever thread takes it, so ``fn`` must only read ``s``."""
    out = torch.empty(u.shape[1], dtype=u.dtype, device=u.device)
    blocks = sorted_blocks(u, backend)
    groups = split_evenly(blocks, workers() if uses_numpy(u, backend) else 1)

    def run(group: list[slice]) -> None:
        for cols, s in sorted_column_blocks(u, rows, backend, blocks=group):
            out[cols] = fn(s)

    parallel_map(run, groups)
    return out


def median_of_rows(u: torch.Tensor) -> torch.Tensor:
    """Per-column median of ``u`` (n x d); for an even n the mean of the two middle values (as numpy)."""
    n = u.shape[0]
    lo, hi = (n - 1) // 2, n // 2
    return reduce_sorted_columns(u, lambda s: (s[lo] + s[hi]) / 2)


def coordinate_median(round_updates: RoundUpdates, updates: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinate-wise median of the updates, with uniform weights."""
    u = round_updates.updates if updates is None else updates
    n = u.shape[0]
    return median_of_rows(u), torch.full((n,), 1.0 / n, device=u.device)


def sign_vote(round_updates: RoundUpdates, updates: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """signSGD with majority vote (Bernstein et al. 2018): sign(sum_k sign(delta_k))."""
    u = round_updates.updates if updates is None else updates
    n = u.shape[0]
    return torch.sign(sign_sum(u)), torch.full((n,), 1.0 / n, device=u.device)


AGGREGATORS = {"mean": weighted_mean, "median": coordinate_median, "sign": sign_vote}


def clip_scale(updates: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The per-row factors 1 / max(1, ||delta_k|| / C) that clip each update to norm C. A weighted
    mean of clipped updates is (w * scale) @ updates: no clipped copy needed."""
    norms = torch.linalg.vector_norm(updates, dim=1)
    return 1.0 / torch.clamp(norms / max_norm, min=1.0)


def clip_rows(updates: torch.Tensor, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """delta_k / max(1, ||delta_k|| / C) as a new matrix, with the per-row scale factors (for
    rules that need the clipped rows themselves, not only their weighted mean)."""
    scale = clip_scale(updates, max_norm)
    return updates * scale[:, None], scale
