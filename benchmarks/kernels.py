"""The kernels behind the aggregation figures, alone: where the CPU time of a round goes.

    python benchmarks/kernels.py              # n = 100, d = 1.2M
    python benchmarks/kernels.py --cpu avx2   # as on an AVX2 CPU without VNNI (cpu.py)

Prints, for one n x d float32 matrix (best of three calls):
- the Gram product x x^T: numpy with one BLAS thread, numpy with two BLAS threads, a general
  (non-symmetric) product of the same size, and ``krum.gram_matrix`` (column pieces over the
  torch threads) on one and two threads;
- the coordinate sort behind median, trimmed mean and Bulyan: the block transposition alone, and
  ``aggregators.reduce_sorted_columns`` on one and two threads;
- the candidates for a coordinate median on one 2 MB column block (numpy's sort, the one used;
  numpy's partition; torch's sort and kthvalue over columns);
- Fedward's ternary sign counts (its AmGrad Gram) over the same matrix, block by block on one
  thread, with each ``cpu_kernels`` candidate (torch's int8 GEMM, numpy's float32 product) and
  through ``ternary_block_gram`` (only the columns two rows share a sign in), at the Gaussian
  updates' density and at a trained model's;
- checking client values: ``isfinite`` over every client array (the check before this round of
  work) against one dot product per flattened row (``validation.check_update``), and the flatten.
"""

from __future__ import annotations

import argparse

from cpu import cpu_argument, describe, emulate  # benchmarks/cpu.py (its folder is on the path)

emulate(cpu_argument())  # before numpy and torch load

import numpy as np  # noqa: E402
import torch  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from fl_defense.defenses.aggregators import column_blocks, reduce_sorted_columns  # noqa: E402
from fl_defense.defenses.fedward import ternary_block_gram, ternary_gram_float32, ternary_gram_int8  # noqa: E402
from fl_defense.defenses.krum import gram_matrix  # noqa: E402
from fl_defense.updates import ParamLayout  # noqa: E402
from fl_defense.validation import check_update  # noqa: E402
from timing import best  # noqa: E402  (benchmarks/timing.py)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--d", type=int, default=1_200_000)
    parser.add_argument("--cpu", choices=["native", "avx2"], default="native",
                        help="avx2: run as on an AVX2 CPU without VNNI (emulated: benchmarks/cpu.py)")
    args = parser.parse_args()
    n, d = args.n, args.d
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d), dtype=np.float32)
    y = x.copy()
    xt = torch.from_numpy(x)
    rows = []

    def with_threads(k, fn):
        torch.set_num_threads(k)
        with threadpool_limits(limits=k):
            return best(fn)

    rows.append(("Gram, numpy x @ x.T, 1 BLAS thread", with_threads(1, lambda: x @ x.T)))
    rows.append(("Gram, numpy x @ x.T, 2 BLAS threads", with_threads(2, lambda: x @ x.T)))
    rows.append(("general product x @ y.T (same size), 1 thread", with_threads(1, lambda: x @ y.T)))
    rows.append(("Gram, gram_matrix, 1 thread", with_threads(1, lambda: gram_matrix(xt))))
    rows.append(("Gram, gram_matrix, 2 threads (column pieces)", with_threads(2, lambda: gram_matrix(xt))))

    def transpose_only():
        block = 5242
        buf = np.empty((block, n), np.float32)
        for s in range(0, d, block):
            w = min(block, d - s)
            buf[:w] = x[:, s:s + w].T

    rows.append(("block transposition alone, 1 thread", with_threads(1, transpose_only)))
    rows.append(("sorted columns (median), 1 thread", with_threads(1, lambda: reduce_sorted_columns(xt, lambda s: s[n // 2]))))
    rows.append(("sorted columns (median), 2 threads", with_threads(2, lambda: reduce_sorted_columns(xt, lambda s: s[n // 2]))))
    kept = list(range(n - 2 * max(1, n // 8)))  # Bulyan's selection at n = 100: 76 rows
    rows.append((f"sorted columns, {len(kept)} of the rows (Bulyan), 1 thread",
                 with_threads(1, lambda: reduce_sorted_columns(xt, lambda s: s[len(kept) // 2], rows=kept))))

    # the candidates for a coordinate median, on one 2 MB block (the CPU path's block size)
    width = (2 << 20) // (4 * n)
    block = np.ascontiguousarray(x[:, :width])
    buf = np.empty((width, n), np.float32)
    mid = ((n - 1) // 2, n // 2)

    def numpy_sort():
        buf[...] = block.T
        buf.sort(axis=1)

    def numpy_partition():
        buf[...] = block.T
        buf.partition(mid, axis=1)

    tb = torch.from_numpy(block)
    rows.append((f"median of one {width}-column block: transpose + numpy sort (used), 1 thread", with_threads(1, numpy_sort)))
    rows.append((f"median of one {width}-column block: transpose + numpy partition, 1 thread", with_threads(1, numpy_partition)))
    rows.append((f"median of one {width}-column block: torch.sort over columns, 1 thread", with_threads(1, lambda: tb.sort(dim=0))))
    rows.append((f"median of one {width}-column block: torch.kthvalue over columns, 1 thread",
                 with_threads(1, lambda: tb.kthvalue(mid[1] + 1, dim=0))))

    # Fedward's ternary signs of Gaussian updates (about 1.4% nonzero), block by block as amgrad_gram
    half = np.abs(x).max(axis=1, keepdims=True) / 2
    blocks = list(column_blocks(xt))

    def ternary(counts):
        for cols in blocks:
            b = x[:, cols]
            counts(np.subtract(np.greater(b, half).view(np.int8), np.less(b, -half).view(np.int8)))

    rows.append(("ternary signs alone (Fedward), 1 thread", with_threads(1, lambda: ternary(lambda t: None))))
    rows.append(("ternary signs + counts, int8 (torch._int_mm), 1 thread", with_threads(1, lambda: ternary(ternary_gram_int8))))
    rows.append(("ternary signs + counts, float32 (numpy), 1 thread", with_threads(1, lambda: ternary(ternary_gram_float32))))
    rows.append(("ternary signs + counts, ternary_block_gram (shared columns only), 1 thread",
                 with_threads(1, lambda: ternary(ternary_block_gram))))
    # The density of a trained model's AmGrad: 0.18% of cnn_small's entries reach half their
    # layer's largest magnitude after an epoch on Fashion-MNIST (Gaussian updates: about 1.4%).
    half = np.quantile(np.abs(x[:, :65536]), 1 - 0.0018, axis=1, keepdims=True)
    rows.append(("ternary signs + counts at trained density (0.18%), float32 (numpy), 1 thread",
                 with_threads(1, lambda: ternary(ternary_gram_float32))))
    rows.append(("ternary signs + counts at trained density (0.18%), ternary_block_gram, 1 thread",
                 with_threads(1, lambda: ternary(ternary_block_gram))))

    shapes = [(int(d * 0.8) // 100, 100), (d - (int(d * 0.8) // 100) * 100,)]
    arrays = [[rng.standard_normal(s, dtype=np.float32) for s in shapes] for _ in range(n)]
    glob = [np.zeros(s, np.float32) for s in shapes]
    layout = ParamLayout.from_arrays(glob)
    gvec = layout.flatten(glob)
    m = torch.empty(n, d)

    def isfinite_all():
        for a in arrays:
            for arr in a:
                np.all(np.isfinite(arr))

    def flatten(check: bool):
        for k, a in enumerate(arrays):
            layout.flatten_into(a, m[k], minus=gvec)
            if check:
                check_update(m[k], a, layout)

    rows.append(("isfinite over every client array, 1 thread", with_threads(1, isfinite_all)))
    rows.append(("flatten into the matrix, 1 thread", with_threads(1, lambda: flatten(False))))
    rows.append(("flatten + check_update per row, 1 thread", with_threads(1, lambda: flatten(True))))

    print(f"CPU: {describe()}")
    print(f"n = {n}, d = {d}\n")
    print("| kernel | seconds |")
    print("|---|---|")
    for name, t in rows:
        print(f"| {name} | {t:.4f} |")


if __name__ == "__main__":
    main()
