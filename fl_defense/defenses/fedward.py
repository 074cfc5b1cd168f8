"""Fedward: AmGrad + adaptive OPTICS + adaptive clipping (Chen et al., arXiv 2307.00356)."""

from __future__ import annotations

import threading
from typing import NamedTuple

import numpy as np
import torch

from ..updates import RoundUpdates
from . import cpu_kernels
from .aggregators import column_blocks, row_max_abs, signed_combination, uses_numpy
from .base import Defense, DefenseResult, RunKey
from .krum import distances_from_gram, gram_matrix, squared_distances
from .parallel import parallel_map, split_evenly, workers

CLIP_REFERENCES = ("admitted", "all")


def amgrad_blocks(updates: torch.Tensor, layer_slices: list[slice], l1: torch.Tensor | None = None):
    """Yield (cols, AmGrad of updates[:, cols]) column block by column block (blocks never cross
    a layer): per layer l with m = max |delta_l|, sign(delta) * m where |delta| / m rounds to 1
    (is above one half; exactly one half rounds to 0, as numpy's round-half-to-even), else 0.
    With ``l1`` (an n-vector), the rows' L1 norms are added to it on the way."""
    for sl in layer_slices:
        m = row_max_abs(updates[:, sl])[:, None]
        safe = torch.where(m > 0, m, 1.0)
        for cols in column_blocks(updates, within=sl):
            block = updates[:, cols]
            mag = block.abs()
            if l1 is not None:
                l1 += mag.sum(dim=1, dtype=torch.float64)
            yield cols, mag.div_(safe).round_().mul_(m).mul_(torch.sign(block))


def amgrad(updates: torch.Tensor, layer_slices: list[slice]) -> torch.Tensor:
    """AmGrad of every update, as a matrix (see ``amgrad_blocks``)."""
    out = torch.zeros_like(updates)
    for cols, block in amgrad_blocks(updates, layer_slices):
        out[:, cols] = block
    return out


def ternary_gram(t: torch.Tensor) -> torch.Tensor:
    """t t^T for an int8 matrix of -1/0/1 entries, exactly (int32 counts), through the kernel
    this CPU runs fastest (``cpu_kernels``, task ``"ternary_gram"``)."""
    return torch.from_numpy(cpu_kernels.kernel("ternary_gram")(t.numpy()).astype(np.int32, copy=False))


def ternary_gram_int8(t: np.ndarray) -> np.ndarray:
    """The ternary Gram through torch's int8 GEMM: oneDNN's VNNI kernels where torch finds AVX-512
    VNNI (several times faster than float32), a plain loop elsewhere (ten times slower). A torch
    without ``_int_mm``, or one that refuses it, gets the float32 product."""
    int_mm = getattr(torch, "_int_mm", None)
    if int_mm is not None:
        try:
            tt = torch.from_numpy(t)
            return int_mm(tt, tt.T).numpy()
        except (RuntimeError, NotImplementedError):
            pass
    return ternary_gram_float32(t)


_scratch = threading.local()


def scratch(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A buffer the calling thread reuses from block to block (grown to the largest block): fresh
    megabyte temporaries per block cost page faults and fragment the heap (a float32 |block| for
    the L1 norms took 3x as long freshly allocated as written into a reused buffer)."""
    size = int(np.prod(shape))
    buf = getattr(_scratch, name, None)
    if buf is None or buf.size < size or buf.dtype != dtype:
        buf = np.empty(size, dtype=dtype)
        setattr(_scratch, name, buf)
    return buf[:size].reshape(shape)


def ternary_gram_float32(t: np.ndarray) -> np.ndarray:
    """The ternary Gram as a float32 product (numpy's symmetric one), exact: the entries are
    -1, 0 or 1 and every partial sum an integer of at most t's width (< 2^24)."""
    if t.shape[1] >= 1 << 24:
        raise ValueError(f"ternary_gram_float32: {t.shape[1]} columns, counts would not be exact in float32")
    f = scratch("float_signs", t.shape, np.float32)
    np.copyto(f, t)
    return np.matmul(f, f.T).astype(np.int32)


def ternary_signs(x: np.ndarray, half: np.ndarray) -> np.ndarray:
    """int8 1 where x > half, -1 where x < -half, else 0 (in the thread's reused buffers)."""
    pos = np.greater(x, half, out=scratch("above", x.shape, np.bool_))
    neg = np.less(x, -half, out=scratch("below", x.shape, np.bool_))
    return np.subtract(pos.view(np.int8), neg.view(np.int8), out=scratch("signs", x.shape, np.int8))


SPARSE_COLUMNS = 0.5  # below this share of columns with two or more nonzero signs, product the compressed block


def ternary_block_gram(t: np.ndarray, counted=None) -> np.ndarray:
    """t t^T for an n x B block of ternary signs (int8 -1/0/1), exactly, through ``counted`` (the
    kernel ``cpu_kernels`` chose; default its choice), skipping the columns that cannot add to an
    off-diagonal entry.

    A column with at most one nonzero sign adds only to the diagonal, and the diagonal is each
    row's count of nonzero signs. In trained models' updates few entries reach half their layer's
    largest magnitude (0.18% of cnn_small's after an epoch on Fashion-MNIST), so most columns hold
    one nonzero or none, and the product over the columns with two or more costs a fraction of the
    whole block's. Where those columns are at least ``SPARSE_COLUMNS`` of the block (dense signs,
    or Gaussian updates: about 60%), the block is multiplied whole. Same integers either way."""
    counted = counted or cpu_kernels.kernel("ternary_gram")
    n = t.shape[0]
    magnitude = np.abs(t, out=scratch("abs_signs", t.shape, np.int8))
    per_column = magnitude.sum(axis=0, dtype=np.int8 if n < 128 else np.int32)
    shared = per_column >= 2
    if np.count_nonzero(shared) >= SPARSE_COLUMNS * t.shape[1]:
        return counted(t)
    gram = counted(np.compress(shared, t, axis=1)).astype(np.int32, copy=False)
    gram[np.diag_indices(n)] = magnitude.sum(axis=1, dtype=np.int32)
    return gram


def _ternary_probe() -> tuple[np.ndarray]:
    """64 x 4096 ternary signs, a third of each kind (the plain int8 loop takes about 20 ms)."""
    return (np.random.default_rng(0).integers(-1, 2, size=(64, 4096), dtype=np.int8),)


cpu_kernels.register("ternary_gram", {"float32": ternary_gram_float32, "int8": ternary_gram_int8},
                     _ternary_probe)


def amgrad_gram(updates: torch.Tensor, layer_slices: list[slice], l1: torch.Tensor | None = None,
                backend: str | None = None) -> torch.Tensor:
    """The Gram matrix of the AmGrad vectors (float64), accumulated block by block so the AmGrad
    matrix itself is never built (``l1``: see ``amgrad_blocks``).

    Within a layer l every AmGrad entry is m_kl * t with t in {-1, 0, 1}, so the layer's Gram is
    m_il m_jl times the Gram of the ternary signs: on the CPU those are counted exactly, by the
    kernel ``cpu_kernels`` chose for this CPU (int8 or float32), and scaled once per layer.
    ``backend="torch"`` forces the float path other devices take."""
    n = updates.shape[0]
    if not uses_numpy(updates, backend):
        gram = torch.zeros((n, n), dtype=torch.float64, device=updates.device)
        for _, block in amgrad_blocks(updates, layer_slices, l1):
            gram += gram_matrix(block, backend=backend)
        return gram
    u = updates.detach().numpy()
    counted = cpu_kernels.kernel("ternary_gram")  # chosen here, before the threads start
    gram = np.zeros((n, n))
    l1_sum = np.zeros(n)
    for sl in layer_slices:
        blocks = list(column_blocks(updates, within=sl))
        if not blocks:  # an empty layer
            continue
        m = row_max_abs(updates[:, sl]).numpy()
        half = (m / 2)[:, None]  # |delta| / m rounds to 1 exactly when |delta| > m / 2
        # each block's L1 norms go into a row allocated before the pass (small arrays kept
        # between the blocks' large temporaries fragment the heap), totalled in column order
        l1_blocks = np.zeros((len(blocks), n), dtype=np.float32)

        def counts(group):  # the group's ternary-sign counts (exact) and each block's L1 norms
            total = np.zeros((n, n), dtype=np.int64)
            for i in group:
                x = u[:, blocks[i]]
                total += ternary_block_gram(ternary_signs(x, half), counted)
                if l1 is not None:  # torch's float32 sum (faster than numpy's float64 one)
                    mag = torch.from_numpy(scratch("magnitudes", x.shape, x.dtype))
                    l1_blocks[i] = torch.abs(updates[:, blocks[i]], out=mag).sum(dim=1).numpy()
            return total

        layer_counts = np.zeros((n, n), dtype=np.int64)
        for total in parallel_map(counts, split_evenly(list(range(len(blocks))), workers())):
            layer_counts += total  # exact integers: the same for any grouping
        for row in l1_blocks:
            l1_sum += row
        m64 = m.astype(np.float64)
        gram += layer_counts * np.outer(m64, m64)
    if l1 is not None:
        l1 += torch.from_numpy(l1_sum).to(l1)
    return torch.from_numpy(gram)


def amgrad_distances(updates: torch.Tensor, layer_slices: list[slice], l1: torch.Tensor | None = None,
                     backend: str | None = None) -> torch.Tensor:
    """Euclidean distances between AmGrad vectors, from ``amgrad_gram``."""
    return distances_from_gram(amgrad_gram(updates, layer_slices, l1, backend)).sqrt()


class OpticsResult(NamedTuple):
    ordering: np.ndarray
    core_distances: np.ndarray
    reachability: np.ndarray
    labels: np.ndarray


def optics_dbscan(dist: np.ndarray, min_samples: int, eps: float) -> OpticsResult:
    """OPTICS (Ankerst et al. 1999) over a precomputed distance matrix with no radius limit
    (max_eps = inf), then DBSCAN extraction at ``eps``: scikit-learn's
    ``OPTICS(min_samples, max_eps=inf, metric="precomputed", cluster_method="dbscan", eps)``
    step for step (the same ordering, ties to the lowest index, rounding of distances to 15
    decimals, and labels; tested against it), without its per-point neighbour queries, which
    cost 0.06 s at n = 100 against 1 ms here.

    Core distance: the distance to the ``min_samples``-th nearest point (the point itself
    counts). The ordering repeatedly takes the unprocessed point of least reachability and lowers
    its unprocessed neighbours' reachability to max(distance, its core distance). Labels: a new
    cluster starts at each point, in that order, whose reachability exceeds eps and whose core
    distance is within it; points with both above eps are noise (-1)."""
    d = np.asarray(dist, dtype=np.float64)
    n = len(d)
    decimals = np.finfo(np.float64).precision
    core = np.around(np.partition(d, min_samples - 1, axis=1)[:, min_samples - 1], decimals)
    reach = np.full(n, np.inf)
    processed = np.zeros(n, dtype=bool)
    ordering = np.zeros(n, dtype=int)
    for i in range(n):
        todo = np.flatnonzero(~processed)
        point = todo[np.argmin(reach[todo])]  # argmin: the lowest index among equals
        processed[point] = True
        ordering[i] = point
        if core[point] == np.inf:
            continue
        todo = np.flatnonzero(~processed)
        r = np.around(np.maximum(d[point, todo], core[point]), decimals)
        better = r < reach[todo]
        reach[todo[better]] = r[better]
    far, near = reach > eps, core <= eps
    labels = np.zeros(n, dtype=int)
    labels[ordering] = np.cumsum(far[ordering] & near[ordering]) - 1
    labels[far & ~near] = -1
    return OpticsResult(ordering, core, reach, labels)


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distance matrix through one GEMM (see ``krum.squared_distances``)."""
    return squared_distances(x).sqrt()


class Fedward(Defense):
    """Fedward, Chen et al., arXiv 2307.00356: AmGrad, adaptive OPTICS, adaptive clipping.

    1. AmGrad of every update (per layer, sign times the layer's largest magnitude on the entries
       that round to it, zero elsewhere): it keeps the dominant direction and drops magnitudes.
    2. Euclidean distances between AmGrad vectors; OPTICS (``optics_dbscan``: scikit-learn's
       OPTICS with a precomputed metric and DBSCAN extraction, step for step) with
       min_samples = n // 2 and eps = the median over clients of the distance to their
       (n // 2)-th nearest neighbour.
    3. The largest cluster is admitted; everyone else (other clusters and OPTICS noise) is flagged.
       No cluster at all: nothing is admitted and the global model is kept.
    4. Adaptive clipping: with a_k = ||delta_k||_1 / d, the bound S is the median of a_k over the
       admitted group (``clip_reference="all"``: over every client, as the authors' code); each
       admitted client contributes sign(delta_k) * min(a_k, S), and the contributions are summed
       (the authors' code) or averaged (``combine="mean"``).

    Rounds with fewer than 4 clients cannot form an n // 2 >= 2 neighbourhood: all are admitted.
    """

    name = "fedward"
    paper = "Chen et al., arXiv 2307.00356"
    detects = True
    run_config = {
        "clip_reference": RunKey("Fedward: clipping bound from the admitted group's or all clients' median magnitude",
                                 choices=("admitted", "all")),
        "combine": RunKey("Fedward: sum (authors' code) or mean of the clipped sign updates", choices=("sum", "mean")),
    }

    def __init__(self, clip_reference: str = "admitted", combine: str = "sum", server_lr: float = 1.0) -> None:
        self.clip_reference = clip_reference
        self.combine = combine
        self.server_lr = server_lr

    def validate(self) -> None:
        if self.clip_reference not in CLIP_REFERENCES:
            raise ValueError(f"clip_reference must be one of {CLIP_REFERENCES}, got {self.clip_reference!r}")
        if self.combine not in ("sum", "mean"):
            raise ValueError(f"combine must be 'sum' or 'mean', got {self.combine!r}")
        if not self.server_lr > 0:
            raise ValueError(f"server_lr must be > 0, got {self.server_lr}")

    def cluster(self, ru: RoundUpdates, l1: torch.Tensor | None = None) -> np.ndarray:
        """OPTICS labels over the AmGrad distances (-1: noise); ``l1``: see ``amgrad_blocks``."""
        n = ru.n
        if n < 4:
            return np.zeros(n, dtype=int)
        k = n // 2
        dist = amgrad_distances(ru.updates, ru.layer_slices, l1).cpu().numpy()
        eps = float(np.median(np.sort(dist, axis=1)[:, k]))  # column 0 is the point itself
        if eps <= 0:  # k+1 identical AmGrads per median client: any positive radius joins them
            eps = np.finfo(np.float64).tiny
        return optics_dbscan(dist, min_samples=k, eps=eps).labels

    def aggregate(self, global_params: torch.Tensor, round_updates: RoundUpdates) -> DefenseResult:
        ru = round_updates
        l1 = torch.zeros(ru.n, dtype=torch.float64, device=ru.device)
        labels = self.cluster(ru, l1)  # fills l1 on its pass over the updates (n >= 4)
        clusters, counts = np.unique(labels[labels >= 0], return_counts=True)
        admitted = np.zeros(ru.n, dtype=bool)
        if len(clusters):
            admitted = labels == clusters[np.argmax(counts)]  # ties: the lowest label
        adm = torch.as_tensor(admitted, device=ru.device)
        if ru.n < 4:
            l1 = torch.linalg.vector_norm(ru.updates, ord=1, dim=1).double()
        a = (l1 / ru.d).to(torch.float32)  # ||delta_k||_1 / d
        shares = torch.zeros(ru.n, device=ru.device)
        step = torch.zeros(ru.d, device=ru.device)
        if adm.any():
            bound = (a[adm] if self.clip_reference == "admitted" else a).median()
            shares = adm.float() / adm.sum()
            coef = adm.float() if self.combine == "sum" else shares
            step = signed_combination(coef * torch.minimum(a, bound), ru.updates)
        return DefenseResult(params=global_params + self.server_lr * step, weights=shares, flagged=~adm,
                             info={"clusters": labels.tolist()})
